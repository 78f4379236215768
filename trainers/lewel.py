"""LEWEL: Learning Where to Learn (Huang, You, Zheng et al., CVPR 2022), the BYOL-based variant LEWEL_B.

Spec: ../shared/papers/methods_ssl.md section 6. Official code: github.com/LayneH/LEWEL (models/lewel.py, main.py,
scripts/srun_lewelb{,_eman}.sh).

    x = f(v)                                    backbone map (B, D, H, W), no pooling; x_p its pixel p (D,)
    [z_g | a_1 .. a_HW] = g([avgpool(x) | x_1 .. x_HW])
                                                ONE projector g on the pooled vector and on every pixel (the same
                                                Conv1d MLP, one BatchNorm over both): z_g the global embedding
                                                (K,), a_p the alignment-map logits of pixel p (K,)
    A_{k,p} = softmax_p(a_p[k] / ||a_p|| / s)   K alignment maps over the HW positions, read as h heads x m maps
                                                (m = K / h): A_{i,j} is head i's map j
    o_j = [sum_p A_{i,j,p} x_p^(i)]_{i=1..h}    aligned feature j (D,): the D/h channels of group i, x^(i), are
                                                pooled with head i's map j; channels keep their order
    e_j = g_obj(o_j)                            aligned embedding j (K,), j = 1..m
    l(q, z) = 2 - 2 cos(q, z)                   BYOL's normalised MSE
    L(1->2) = w l(q(z_g^1), z̄_g^2) + (1 - w) mean_j l(q_obj(e_j^1), ē_j^2)
    L = L(1->2) + L(2->1)                       (official: the two directions are added, as in BYOL)

q, q_obj are the online predictors; z̄, ē come from the target network, an EMA of the backbone, g and g_obj:
theta_t <- m_k theta_t + (1 - m_k) theta_o with m_k = 1 - (1 - m) (cos(pi k / K) + 1) / 2 at step k of K.
Aligned embeddings are matched index to index across the views (map j of view 1 with map j of view 2).

Paper symbol -> Config field:
    f (ResNet-50)                                         -> arch
    hidden width of g, g_obj, q, q_obj (4096)             -> hidden_dim
    K, embedding size (256)                               -> out_dim
    h, heads (official --lewel-num-heads 4; m = K/h = 64) -> num_heads
    s, softmax scale (--lewel-scale 1.0)                  -> scale
    w, weight of the global loss (--lewel-loss-weight)    -> loss_weight
    m, base target momentum (0.98 EMAN, 0.996 SyncBN)     -> base_momentum
    K of the momentum schedule (epochs x iterations)      -> total_steps (set it to optim.steps)
    LEWELB_EMAN / LEWELB (official model classes)         -> eman, sync_bn

Defaults: the official EMAN ImageNet recipe (scripts/srun_lewelb_eman.sh: ResNet-50, 4096/256, 4 heads, scale 1,
w 0.5, m 0.98, 200 epochs of 1251 steps at batch 1024, LARS lr 3.6 wd 1.5e-6 with biases and BN excluded, 10
warm-up epochs, cosine, AMP; the optimizer lives in the experiment's `optim:` block). EMAN (Cai et al., 2021):
the target's BN statistics follow the online ones by the same EMA and the target runs in eval mode (this module's
`train()` keeps it there). The SyncBN recipe (LEWELB, 400 epochs at batch 4096): eman false, sync_bn true, m 0.996;
its EMA covers parameters only, the target's BN runs on batch statistics in train mode.

`model.encoder` is the online backbone with an online linear classifier trained on the detached pooled features of
both views (solo-learn's online evaluation, not in the official code); `eval_step` is supervised's on its logits.
The MoCo-v2-based LEWEL_M of the paper is not implemented: it is not in the official code.

Deviations from the official code, with reasons:
- The backbone comes from `build_backbone` (timm's resnet50 zero-initialises the last BN of each block; the
  official torchvision-style ResNet does not).
- The momentum schedule counts optimizer steps (`total_steps`), as the official code does with epochs x iterations;
  the lr schedule is the orchestrator's per-step cosine, not the official per-epoch one.
- Weight decay and LARS exclusion follow the orchestrator's default groups (every 1-d parameter: biases and all
  BN weights). The official EMAN run excludes the same set; its SyncBN run applies decay and LARS to the weights of
  the projector/predictor BNs (its name filter misses them there).
- sync_bn converts every BatchNorm to SyncBatchNorm: it needs GPUs under DDP (PyTorch's SyncBN has no CPU
  all-reduce); in one process it is plain BN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainers import supervised
from trainers._common.backbones import Classifier, build_backbone, check_arch, feature_map
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.ema import cosine_momentum, make_teacher


@dataclass
class Config:
    """The official EMAN ImageNet recipe (LEWELB_EMAN, 200 epochs); the SyncBN values are in the module docstring."""

    arch: str = "resnet50"  # f: small_cnn, wrn28_2, or a timm CNN whose forward_features is an NCHW map
    hidden_dim: int = 4096  # hidden width of the projector, proj_obj and both predictors (official --hid-dim)
    out_dim: int = 256  # K: embedding size, and the number of alignment maps (official --proj-dim)
    num_heads: int = 4  # h: heads; m = out_dim / num_heads maps per head (4 x 64 official)
    scale: float = 1.0  # s: the L2-normalised map logits are divided by it before the softmax over positions
    loss_weight: float = 0.5  # w: weight of the global term; the aligned term gets 1 - w
    base_momentum: float = 0.98  # m: target momentum at step 0, cosine-annealed to 1 (0.98 EMAN, 0.996 SyncBN)
    total_steps: int = 250200  # K: steps of the momentum schedule; 200 epochs x 1251 steps (batch 1024); = optim.steps
    eman: bool = True  # EMAN (LEWELB_EMAN): BN statistics EMA'd too, target in eval mode; False: LEWELB
    sync_bn: bool = False  # LEWELB's SyncBN (GPU + DDP only); the EMAN recipe keeps per-GPU BN


TINY = Config(arch="small_cnn", hidden_dim=32, out_dim=16, num_heads=2, base_momentum=0.99, total_steps=20)


# ---------------------------------------------------------------------------------------------- networks


class MLP1d(nn.Sequential):
    """The official neck MLP on (B, C, L): 1x1 Conv1d C -> hidden (no bias), BN, ReLU, 1x1 Conv1d hidden -> out (no
    bias). BN statistics are over the batch and the L positions. Convolutions are He-normal (fan-out), as official."""

    def __init__(self, c_in: int, hidden: int, c_out: int):
        super().__init__(nn.Conv1d(c_in, hidden, 1, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Conv1d(hidden, c_out, 1, bias=False))
        for layer in (self[0], self[3]):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")


class ObjectNeck(nn.Module):
    """g (projector) and g_obj (proj_obj): the global embedding and the m aligned embeddings of a backbone map."""

    def __init__(self, num_features: int, cfg: Config):
        super().__init__()
        self.projector = MLP1d(num_features, cfg.hidden_dim, cfg.out_dim)
        self.proj_obj = MLP1d(num_features, cfg.hidden_dim, cfg.out_dim)
        self.num_heads, self.scale = cfg.num_heads, cfg.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, H, W) -> z_g (B, K, 1), aligned embeddings e (B, K, m)."""
        x = x.flatten(2)  # (B, D, HW)
        z = self.projector(torch.cat([x.mean(dim=2, keepdim=True), x], dim=2))  # (B, K, 1 + HW)
        z_g, logits = z[:, :, :1], z[:, :, 1:]  # (B, K, 1), (B, K, HW)
        maps = alignment_maps(logits, self.num_heads, self.scale)  # (B, h, m, HW)
        return z_g, self.proj_obj(aligned_features(x, maps))  # (B, K, 1), (B, K, m)


class LEWEL(nn.Module):
    """Online: encoder (backbone + online classifier), neck, predictor, predictor_obj. Target: frozen copies of the
    backbone (as a Classifier without a head) and of the neck, updated by `update_target`."""

    def __init__(self, encoder: Classifier, cfg: Config):
        super().__init__()
        self.encoder = encoder
        self.neck = ObjectNeck(encoder.num_features, cfg)
        self.predictor = MLP1d(cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
        self.predictor_obj = MLP1d(cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
        self.target_encoder = make_teacher(encoder)
        self.target_encoder.head = nn.Identity()  # the target needs no classifier
        self.target_neck = make_teacher(self.neck)
        self.eman = cfg.eman
        self.train()  # puts an EMAN target in eval mode from the start

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes), the online classifier
        return self.encoder(x)

    def train(self, mode: bool = True) -> LEWEL:
        """EMAN keeps the target in eval mode (its BN uses the EMA statistics) while the online network trains."""
        super().train(mode)
        if self.eman:
            self.target_encoder.eval()
            self.target_neck.eval()
        return self

    def online(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> pooled features h (B, D), predictions q(z_g) (B, K, 1) and q_obj(e) (B, K, m)."""
        x = feature_map(self.encoder, v)  # (B, D, H', W')
        z_g, e = self.neck(x)
        return x.mean(dim=(2, 3)), self.predictor(z_g), self.predictor_obj(e)

    @torch.no_grad()
    def target(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> target embeddings z̄_g (B, K, 1), ē (B, K, m)."""
        return self.target_neck(feature_map(self.target_encoder, v))


def build(cfg: Config, info: DataInfo) -> nn.Module:
    encoder = build_backbone(cfg.arch, info.in_channels, info.num_classes)
    if encoder.num_features % cfg.num_heads:
        raise ValueError(f"num_heads {cfg.num_heads} must divide the backbone's {encoder.num_features} channels")
    model = LEWEL(encoder, cfg)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if cfg.sync_bn else model


def check(cfg: Config) -> None:
    check_arch(cfg.arch)
    if cfg.num_heads <= 0 or cfg.out_dim % cfg.num_heads:
        raise ConfigError("num_heads", f"a positive divisor of out_dim {cfg.out_dim}", cfg.num_heads)
    if cfg.total_steps <= 0:
        raise ConfigError("total_steps", "a positive number of steps (set it to optim.steps)", cfg.total_steps)
    if not 0.0 <= cfg.base_momentum <= 1.0:
        raise ConfigError("base_momentum", "a momentum in [0, 1]", cfg.base_momentum)


# ---------------------------------------------------------------------------------------------- pure functions


def alignment_maps(logits: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Map logits (B, K, HW) -> maps (B, h, m, HW): each pixel's K-vector L2-normalised, divided by `scale`,
    softmax over the HW positions; channel k = i * m + j is head i's map j."""
    b, k, hw = logits.shape
    maps = torch.softmax(F.normalize(logits.float(), dim=1) / scale, dim=2)  # (B, K, HW)
    return maps.view(b, num_heads, k // num_heads, hw)


def aligned_features(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Backbone map x (B, D, HW), maps (B, h, m, HW) -> aligned features (B, D, m): the D/h channels of group i
    (channels i*D/h .. (i+1)*D/h - 1) are pooled with head i's map j to give those channels of column j."""
    b, d, hw = x.shape
    h, m = maps.shape[1:3]
    groups = x.reshape(b, h, d // h, hw)  # (B, h, D/h, HW)
    pooled = groups @ maps.to(x.dtype).transpose(2, 3)  # (B, h, D/h, m)
    return pooled.reshape(b, d, m)


def byol_loss(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(q, z) over dim 1, averaged over everything else: (B, K) or (B, K, L) pairs -> scalar."""
    return 2.0 - 2.0 * F.cosine_similarity(q.float(), z.float(), dim=1).mean()


def symmetric_byol_loss(q1: torch.Tensor, q2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """l(q1, z2) + l(q2, z1): each view's online prediction against the other view's target."""
    return byol_loss(q1, z2) + byol_loss(q2, z1)


# ---------------------------------------------------------------------------------------------- target (in place)


@torch.no_grad()
def update_target(model: LEWEL, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_o for the backbone, projector and proj_obj. EMAN also averages the BN
    statistics (integer counters are copied); without it the target's buffers follow its own passes (official)."""
    pairs = ((model.target_encoder.encoder, model.encoder.encoder), (model.target_neck, model.neck))
    for target, online in pairs:
        for t, o in zip(target.parameters(), online.parameters()):
            t.lerp_(o.detach(), 1.0 - momentum)
        if model.eman:
            for t, o in zip(target.buffers(), online.buffers()):
                if t.is_floating_point():
                    t.lerp_(o, 1.0 - momentum)
                else:
                    t.copy_(o)


# ---------------------------------------------------------------------------------------------- the step


def train_step(model: nn.Module, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    h1, q1, q_obj1 = model.online(batch["x1"])
    h2, q2, q_obj2 = model.online(batch["x2"])
    z1, e1 = model.target(batch["x1"])
    z2, e2 = model.target(batch["x2"])
    loss_global = symmetric_byol_loss(q1, q2, z1, z2)
    loss_aligned = symmetric_byol_loss(q_obj1, q_obj2, e1, e2)
    loss_lewel = cfg.loss_weight * loss_global + (1.0 - cfg.loss_weight) * loss_aligned
    logits = model.encoder.head(torch.cat([h1, h2]).detach())  # (2B, num_classes): online linear evaluation
    y = torch.cat([batch["y"], batch["y"]])
    loss_cls = F.cross_entropy(logits.float(), y)
    metrics = {
        "loss_lewel": loss_lewel.detach(),
        "loss_global": loss_global.detach(),
        "loss_aligned": loss_aligned.detach(),
        "loss_cls": loss_cls.detach(),
        "online_acc": (logits.argmax(1) == y).float().mean(),
    }
    return loss_lewel + loss_cls, metrics


def on_step_end(model: nn.Module, cfg: Config, step: int) -> None:
    """`step` optimizer steps are done: the update after step k (0-based) uses m_k, as the official loop."""
    update_target(model, cosine_momentum(step - 1, cfg.total_steps, cfg.base_momentum))


def eval_step(model: nn.Module, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """Accuracy / loss sums of the online linear classifier on the online backbone."""
    return supervised.eval_step(model.encoder, batch, cfg)


SPEC = TrainerSpec(
    name="lewel",
    paper="LEWEL (Huang, You, Zheng et al., CVPR 2022)",
    Config=Config,
    TINY=TINY,
    views="byol_two_crop",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    on_step_end=on_step_end,
    check=check,
)
