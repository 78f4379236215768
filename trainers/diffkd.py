"""DiffKD: Knowledge Diffusion for Distillation (Huang, Guo, You, Wang, Qian, Xu; NeurIPS 2023).

Spec: ../shared/papers/methods_ssl.md section 9. Official code: github.com/hunto/DiffKD and its submodule
hunto/image_classification_sota, lib/models/losses/diffkd/{diffkd,diffkd_modules,scheduling_ddim}.py (wired by
lib/models/losses/kd_loss.py).

A frozen teacher T (a `supervised` run's checkpoint) and the student S see the same images. The student's features
are noisier than the teacher's, so DiffKD trains a diffusion model on the teacher's features only and uses it to
denoise the student's features before they are compared with the teacher's. At each distillation location, with s
the student's and t the teacher's output there:

    s'      = trans(s)                                    1x1 conv, student -> (latent) teacher channels
    h, t^   = AE_enc(t), AE_dec(AE_enc(t))                feature location only: linear autoencoder, h (B, ae, h, w)
    L_ae    = MSE(t^, t);  z = h.detach()                 (logit location: z = t, no autoencoder)
    L_ddim  = MSE(eps_theta(sqrt(a_k) z + sqrt(1 - a_k) eps, k), eps),   k ~ U[0, 1000), eps ~ N(0, I)
    gamma   = softmax(Linear(pool(adapter(s'))))[:, 0]    adaptive noise matching, in (0, 1)
    x       = gamma s' + (1 - gamma) eps                  the start point: a linear mix
    x       <- DDIM(eta 0) step of eps_theta at t = 400, 300, 200, 100, 0   (the last 5 of a 10-step schedule)
    s^      = BN(conv1x1(x))                              `proj`
    L_kd    = MSE(s^, z) (feature) | tau^2 KL(softmax(z / tau) || softmax(s^ / tau)) (logit)
    L       = CE(S(x), y) + kd_weight * sum_locations (L_kd + L_ddim (+ L_ae))

The two locations, as the official ResNet entries of KD_MODULES (`layer4`, `fc`): the backbones' final spatial maps
(trainers._common.backbones.feature_map; ResNet `layer4`, (B, 512, 7, 7) at 224 px) with the 3x3 diffusion net and
the autoencoder, and the logits (B, classes, 1, 1) with the 1x1 diffusion net. Gradients reach the student through
s' and every DDIM step; eps_theta gets gradients from L_ddim and, through the sampling steps, from L_kd (as
official). The diffusion modules live in this module next to the student, so the orchestrator's optimizer trains
them with the student (official: `student._diff = self.diff`). The teacher's parameters have requires_grad False,
and it stays in eval mode when the module is put in train mode; its weights are part of the module's state.

Paper symbol -> Config field:
    student / teacher backbones (ResNet-18 / ResNet-34)       -> arch / teacher_arch
    the teacher's weights (a `supervised` checkpoint)          -> teacher_from
    autoencoder latent width (1024; expands ResNet-34's 512)   -> ae_channels
    diffusion steps, linear betas 1e-4..0.02                   -> num_train_timesteps, beta_start, beta_end
    DDIM steps run (the last 5 of 2 x 5 = 10)                  -> inference_steps (official name and meaning)
    time embedding table nn.Embedding(1280, C)                 -> time_embeddings
    KD temperature tau (1) and the KD weight (1.0)             -> tau, kd_weight
    off switch: plain Hinton KD (CE + tau^2 KL of logits)      -> diffusion (False)
The optimizer lives in the experiment's `optim:` block (B1: SGD 0.1 momentum 0.9, wd 1e-4, x0.1 every 30 epochs).

The scheduler (issue #2 of the spec). The official code imports its own scheduling_ddim.DDIMScheduler (a copy of
diffusers' DDIMScheduler with one added method, `add_noise_diff2`) and builds it with num_train_timesteps 1000,
clip_sample False, beta_schedule "linear" (betas 1e-4..0.02 by default). Here the scheduler is diffusers'
DDIMScheduler itself, built with those values (and the defaults set_alpha_to_one True, timestep_spacing "leading",
steps_offset 0): `set_timesteps(10)` gives 900, 800, ..., 0 and the last 5 are run; `step(eta=0,
use_clipped_model_output=True)` is the DDIM update, as official; its `add_noise` gives L_ddim's q(z_k | z), the
official call too. Diffusers has no `add_noise_diff2`, the official start point of the student's denoising: in the
official scheduling_ddim.py it takes the adapter's gamma as its "alpha_prod" and returns gamma s' + (1 - gamma) eps
(the square roots of add_noise are commented out there), the linear mix that the pure function `noisy_start` computes.

Other differences from the official code, with reasons:
- The logits of student and teacher are computed from their average-pooled spatial maps (one forward pass each);
  for the CNNs here (ResNets, small_cnn, WRN, the NAS spaces) that equals backbone(x) (trainers._common.backbones.
  feature_map). The official code reads both from forward hooks on `layer4` and `fc`.
- Student and teacher maps must have the same spatial size (as official, which has no resizing); a mismatch raises.
- The diffusion losses, the DDIM update and L_kd are computed in fp32 under the orchestrator's bf16 autocast (the
  convolutions of the nets run in bf16); the official code trains in fp32.
- `teacher_from` empty builds a randomly initialised teacher: only the contract tests (TINY) do that; `check`
  refuses it for a run.
- The official KD wrapper logs its loss parts every 50 iterations; here they are train metrics (`ce`, `kd_feat`,
  `kd_logit`, `ddim_feat`, `ddim_logit`, `ae`, `gamma_feat`, `gamma_logit` the mean adaptive-noise weight, `acc` the
  student's and `teacher_acc` the teacher's batch accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import nn

from trainers import supervised
from trainers._common.backbones import Classifier, build_backbone, check_arch, feature_map
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec


@dataclass
class Config:
    """Paper defaults: B1, ImageNet ResNet-34 -> ResNet-18, ae_channels 1024, 1000 steps, 5 of 10 DDIM steps, tau 1."""

    arch: str = "resnet18"  # the student
    teacher_arch: str = "resnet34"  # the teacher, as in its supervised run
    teacher_from: str = ""  # the teacher's supervised checkpoint directory (model.pt), model.pt, mlflow:<id>, run:<name>
    diffusion: bool = True  # False: plain KD, CE + kd_weight * tau^2 KL(teacher || student) on logits, nothing else
    ae_channels: int = 1024  # latent width of the autoencoder on the teacher's feature map
    num_train_timesteps: int = 1000  # diffusion steps of L_ddim
    beta_start: float = 1.0e-4  # linear beta schedule
    beta_end: float = 0.02
    inference_steps: int = 5  # DDIM steps run on the student: the last half of a 2 * inference_steps schedule
    time_embeddings: int = 1280  # rows of the time embedding table (official nn.Embedding(1280, C))
    tau: float = 1.0  # KD temperature at the logit location (KL scaled by tau^2)
    kd_weight: float = 1.0  # weight of every distillation loss (official kd_loss_weight)


TINY = Config(arch="small_cnn", teacher_arch="small_cnn", ae_channels=16)


# ---------------------------------------------------------------------------------------------- networks


class Bottleneck(nn.Module):
    """Residual 1x1-3x3-1x1 block with BN, width channels // reduction: (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        mid = max(1, channels // reduction)
        self.block = nn.Sequential(
            nn.Conv2d(channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 1), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _mlp(channels: int, expansion: int) -> list[nn.Module]:
    """1x1 conv to expansion * channels, BN, ReLU, 1x1 conv back: the 1x1 (logit) variant of a block."""
    return [nn.Conv2d(channels, channels * expansion, 1), nn.BatchNorm2d(channels * expansion), nn.ReLU(inplace=True),
            nn.Conv2d(channels * expansion, channels, 1)]


class DiffusionNet(nn.Module):
    """eps_theta(x, k): the time embedding added to the input, then (3x3) 2 Bottlenecks + 1x1 conv + BN, or (1x1)
    two 4x-expansion MLPs of 1x1 convs (official DiffusionModel). x (B, C, h, w), k (B,) or () -> (B, C, h, w)."""

    def __init__(self, channels: int, kernel_size: int, time_embeddings: int):
        super().__init__()
        self.time_embedding = nn.Embedding(time_embeddings, channels)
        if kernel_size == 3:
            self.pred = nn.Sequential(Bottleneck(channels), Bottleneck(channels), nn.Conv2d(channels, channels, 1),
                                      nn.BatchNorm2d(channels))
        else:
            self.pred = nn.Sequential(*_mlp(channels, 4), nn.BatchNorm2d(channels), *_mlp(channels, 4))

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.pred(x + self.time_embedding(k.long())[..., None, None])


class NoiseAdapter(nn.Module):
    """Adaptive noise matching: gamma = softmax(Linear(pool(f(s))))[:, 0] (official NoiseAdapter), f a Bottleneck of
    reduction 8 (3x3) or a 2x-expansion 1x1 MLP + BN (1x1). s (B, C, h, w) -> gamma (B,) in (0, 1)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        if kernel_size == 3:
            self.feat = nn.Sequential(Bottleneck(channels, reduction=8), nn.AdaptiveAvgPool2d(1))
        else:
            self.feat = nn.Sequential(*_mlp(channels, 2), nn.BatchNorm2d(channels), nn.AdaptiveAvgPool2d(1))
        self.pred = nn.Linear(channels, 2)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.pred(self.feat(s).flatten(1)).softmax(1)[:, 0]


class AutoEncoder(nn.Module):
    """Linear autoencoder on the teacher's map: encoder 1x1 conv + BN to `latent` channels, decoder 1x1 conv back.
    t (B, C, h, w) -> (h (B, latent, h, w), reconstruction (B, C, h, w))."""

    def __init__(self, channels: int, latent: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(channels, latent, 1), nn.BatchNorm2d(latent))
        self.decoder = nn.Conv2d(latent, channels, 1)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(t)
        return hidden, self.decoder(hidden)


class LocationOutput(NamedTuple):
    student: torch.Tensor  # s^: the denoised, projected student (B, C, h, w)
    target: torch.Tensor  # z: the teacher's (latent) features, detached (B, C, h, w)
    ddim: torch.Tensor  # L_ddim
    ae: torch.Tensor | None  # L_ae (feature location) or None
    gamma: torch.Tensor  # (B,)


class Location(nn.Module):
    """One distillation location (the official DiffKD module): trans, autoencoder (optional), eps_theta, noise
    adapter, proj, and the DDIM scheduler (plain Python state, rebuilt from the Config, not checkpointed)."""

    def __init__(self, student_channels: int, teacher_channels: int, kernel_size: int, ae_channels: int | None,
                 cfg: Config):
        super().__init__()
        self.ae = AutoEncoder(teacher_channels, ae_channels) if ae_channels else None
        channels = ae_channels or teacher_channels
        self.trans = nn.Conv2d(student_channels, channels, 1)
        self.net = DiffusionNet(channels, kernel_size, cfg.time_embeddings)
        self.noise_adapter = NoiseAdapter(channels, kernel_size)
        self.proj = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        self.scheduler = ddim_scheduler(cfg)
        self.inference_steps = cfg.inference_steps

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> LocationOutput:
        """s (B, Cs, h, w) the student's, t (B, Ct, h, w) the teacher's (no grad) output at this location."""
        ae = None
        if self.ae is not None:
            hidden, reconstruction = self.ae(t)
            ae = F.mse_loss(reconstruction.float(), t.float())
            t = hidden.detach()
        s = self.trans(s).float()
        gamma = self.noise_adapter(s).float()
        x = noisy_start(s, torch.randn_like(s), gamma)
        denoised = ddim_sample(self.net, x, self.scheduler, self.inference_steps)
        return LocationOutput(self.proj(denoised).float(), t.float(), ddim_loss(self.net, t.float(), self.scheduler),
                              ae, gamma)


class DiffKD(nn.Module):
    """`student` (trained; forward = its logits), `teacher` (frozen, always in eval mode), and the two locations
    `feature` (3x3, autoencoder) and `logit` (1x1); both None with diffusion off (plain KD)."""

    def __init__(self, student: Classifier, teacher: Classifier, num_classes: int, cfg: Config):
        super().__init__()
        self.student, self.teacher = student, teacher
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.feature = self.logit = None
        if cfg.diffusion:
            self.feature = Location(student.num_features, teacher.num_features, 3, cfg.ae_channels, cfg)
            self.logit = Location(num_classes, num_classes, 1, None, cfg)
        self.teacher.eval()

    def train(self, mode: bool = True) -> DiffKD:
        super().train(mode)
        self.teacher.eval()  # frozen batch-norm statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.student(x)


def ddim_scheduler(cfg: Config) -> DDIMScheduler:
    """diffusers' DDIM with the official arguments, its 2 * inference_steps timesteps set (900, ..., 0 for 5)."""
    scheduler = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                              beta_end=cfg.beta_end, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(2 * cfg.inference_steps)
    return scheduler


def load_teacher(cfg: Config, info: DataInfo) -> Classifier:
    """The teacher backbone, loaded strictly from the supervised checkpoint (its model.pt is the Classifier's state)."""
    teacher = build_backbone(cfg.teacher_arch, info.in_channels, info.num_classes)
    if cfg.teacher_from:
        state = torch.load(supervised.model_file(cfg.teacher_from), map_location="cpu", weights_only=True)
        try:
            teacher.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"teacher_from {cfg.teacher_from}: not a supervised checkpoint of teacher_arch "
                             f"{cfg.teacher_arch!r}: {err}") from None
    return teacher


def build(cfg: Config, info: DataInfo) -> nn.Module:
    student = build_backbone(cfg.arch, info.in_channels, info.num_classes)
    return DiffKD(student, load_teacher(cfg, info), info.num_classes, cfg)


def check(cfg: Config) -> None:
    check_arch(cfg.arch)
    try:
        check_arch(cfg.teacher_arch)
    except ConfigError as err:
        raise ConfigError("teacher_arch", err.expected, err.found) from None
    if not cfg.teacher_from or not supervised.model_file(cfg.teacher_from).is_file():
        raise ConfigError("teacher_from", "the teacher's supervised checkpoint directory (holding model.pt), a "
                          "model.pt file, mlflow:<run_id> or run:<name>", cfg.teacher_from)
    if not 1 <= 2 * cfg.inference_steps <= cfg.num_train_timesteps:
        raise ConfigError("inference_steps", "1 <= 2 * inference_steps <= num_train_timesteps", cfg.inference_steps)
    if cfg.tau <= 0:
        raise ConfigError("tau", "a temperature > 0", cfg.tau)
    if cfg.ae_channels < 1:
        raise ConfigError("ae_channels", "a latent width >= 1", cfg.ae_channels)
    if cfg.time_embeddings < cfg.num_train_timesteps:
        raise ConfigError("time_embeddings", f"at least num_train_timesteps ({cfg.num_train_timesteps}) rows",
                          cfg.time_embeddings)


# ---------------------------------------------------------------------------------------------- pure functions


def kd_kl(z_s: torch.Tensor, z_t: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau)) over dim 1, summed over classes and averaged over the other
    positions (the official KLDivergence): z (B, K) or (B, K, 1, 1) -> scalar."""
    log_p_s = F.log_softmax(z_s.float() / tau, dim=1)
    log_p_t = F.log_softmax(z_t.float() / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean() * tau**2


def noisy_start(s: torch.Tensor, eps: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Adaptive noise matching's start point gamma s + (1 - gamma) eps: s, eps (B, C, h, w), gamma (B,)."""
    gamma = gamma.view(-1, *([1] * (s.ndim - 1)))
    return gamma * s + (1 - gamma) * eps


def sampling_timesteps(scheduler: DDIMScheduler, steps: int) -> torch.Tensor:
    """The DDIM timesteps run: the last `steps` of the scheduler's schedule (400, 300, 200, 100, 0 by default)."""
    return scheduler.timesteps[-steps:]


def ddim_sample(net: nn.Module, x: torch.Tensor, scheduler: DDIMScheduler, steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from x (B, C, h, w) over the last `steps` timesteps; differentiable throughout."""
    for k in sampling_timesteps(scheduler, steps):
        eps = net(x, k.to(x.device))
        x = scheduler.step(eps.float(), k, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


def ddim_loss(net: nn.Module, z: torch.Tensor, scheduler: DDIMScheduler) -> torch.Tensor:
    """L_ddim = MSE(eps_theta(sqrt(a_k) z + sqrt(1 - a_k) eps, k), eps), k ~ U[0, T) per sample: z (B, C, h, w)."""
    eps = torch.randn_like(z)
    k = torch.randint(0, scheduler.config.num_train_timesteps, (z.size(0),), device=z.device)
    return F.mse_loss(net(scheduler.add_noise(z, eps, k), k).float(), eps)


# ---------------------------------------------------------------------------------------------- steps


def _check_same_size(s_map: torch.Tensor, t_map: torch.Tensor) -> None:
    if s_map.shape[2:] != t_map.shape[2:]:
        raise ValueError(f"DiffKD: the student's feature map {tuple(s_map.shape)} and the teacher's "
                         f"{tuple(t_map.shape)} differ in spatial size (choose backbones with the same stride)")


def train_step(model: nn.Module, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = batch["x"], batch["y"]
    with torch.no_grad():
        t_map = feature_map(model.teacher, x)  # (B, Ct, h, w)
        t_logits = model.teacher.head(t_map.mean((2, 3)))  # (B, K)
    s_map = feature_map(model.student, x)  # (B, Cs, h, w)
    s_logits = model.student.head(s_map.mean((2, 3)))  # (B, K)
    ce = F.cross_entropy(s_logits.float(), y)
    metrics = {"ce": ce, "acc": (s_logits.argmax(1) == y).float().mean(),
               "teacher_acc": (t_logits.argmax(1) == y).float().mean()}
    if not cfg.diffusion:
        metrics["kd_logit"] = kd_kl(s_logits, t_logits, cfg.tau)
        return ce + cfg.kd_weight * metrics["kd_logit"], {k: v.detach() for k, v in metrics.items()}
    _check_same_size(s_map, t_map)
    feature = model.feature(s_map, t_map)
    logit = model.logit(s_logits[..., None, None], t_logits[..., None, None])  # (B, K, 1, 1)
    metrics.update(kd_feat=F.mse_loss(feature.student, feature.target), ddim_feat=feature.ddim, ae=feature.ae,
                   kd_logit=kd_kl(logit.student, logit.target, cfg.tau), ddim_logit=logit.ddim,
                   gamma_feat=feature.gamma.mean(), gamma_logit=logit.gamma.mean())
    distill = sum(metrics[k] for k in ("kd_feat", "ddim_feat", "ae", "kd_logit", "ddim_logit"))
    return ce + cfg.kd_weight * distill, {k: v.detach() for k, v in metrics.items()}


def eval_step(model: nn.Module, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """The student's logits (supervised's eval)."""
    return supervised.eval_step(model.student, batch, cfg)


SPEC = TrainerSpec(
    name="diffkd",
    paper="DiffKD: Knowledge Diffusion for Distillation (Huang et al., NeurIPS 2023)",
    Config=Config,
    TINY=TINY,
    views="plain",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    check=check,
    path_fields=("teacher_from",),
)
