"""ViTAS: Vision Transformer Architecture Search (Su et al., ECCV 2022; ../shared/papers/methods_nas_gen_llm.md
section 4). The superformer: one set of weights for every ViT of a search space (trainers/nas/vit.py), trained one
uniformly sampled path per step; the NAS searchers then rank paths by their accuracy (trainers.nas.supernet).

Superformer weights (width C = the space's largest embedding width): one patch-embedding conv, class token and
position embedding per patch size (the official code's private class tokens); `depth` blocks at the largest qkv
width d_max and MLP width m_max; a final LayerNorm and a C -> classes classifier. A path of embedding width E, block
widths (heads, d, m) uses:

    embedding channels   I(E), |I(E)| = E: rows or columns of every weight that reads or writes the embedding
                         (patch-embed out, class token, position embedding, every LayerNorm, qkv in, proj out,
                         fc1 in, fc2 out, classifier in); tokens are (B, T, E) in the order of I(E)
    q, k, v              the first d channels of each (heads split them: head j is channels [j d/h, (j+1) d/h))
    MLP hidden           the first m channels

Cyclic weight sharing (v2, our reading of "enabling each channel to contribute more evenly to all candidate
architectures"; no public code): the widths w_1 < ... < w_n of the space, in increasing order, take consecutive
windows of the C channels on a circle, I(w_i) = {(o_i + j) mod C : 0 <= j < w_i}, o_i = (w_1 + ... + w_{i-1}) mod C,
so every channel is used by floor or ceil of (w_1 + ... + w_n) / C widths (`channel_sharing: cyclic`). Left slicing
I(w) = {0, ..., w-1} (AutoSlim; `channel_sharing: left`) uses channel 0 in all n widths and the last ones in one.
Only the embedding is shared cyclically; q/k/v and MLP widths are left-sliced.

Identity shifting (v2, our reading, the spec's [inferred]): the path run for a code is `space.canonical(code)`
(identity blocks moved to the end), so all depth patterns of one network train and evaluate one set of weights;
with `identity_shifting: false` block i of the code runs block i's weights (plain one-shot superformer).

Config -> recipe (official v1 search config vit_tiny_search_1G_search.yaml and tools/trainer/imagenet/trainer.py):
    space                          -> space ("vitas_deit": the 1G space; "vit_digits" for CPU checks)
    v2 cyclic sharing, shifting    -> channel_sharing, identity_shifting
    CutMix alpha 1.0 (prob 1, "batch" mode: each image mixed with the batch's reversed order) -> cutmix_alpha
    label smoothing 0.1 (timm Mixup's; 0.9 / 0.1/(K-1) without mixing) -> label_smoothing
    stochastic depth (none in the search config; 0.1 in retraining) -> drop_path (rate of the last block position,
                                                                       linear in the position as DeiT)
The optimizer is the experiment's `optim:` block (official: AdamW lr 1e-3, wd 0.05 without decay on biases and
norms, batch 1024, 5 warm-up epochs then cosine, 300 epochs). Weak augmentation (official "deit_xaa_xcj": DeiT's
pipeline without RandAugment and colour jitter) is the "plain" view (random resized crop + flip).

Differences from the official v1 code, with reasons:
- v1 slices "left" and "right" (BCNet) and sums both outputs; v2 replaces this by cyclic sharing, which we implement.
- v1 shares v and keeps private q/k per head count (`qkv: 2`); v2 does not say, and here q, k and v are shared by
  all head counts (one superformer weight per block, as every other width).
- v1 draws an identity block with a probability tuned so that the mean FLOPs meet the search window; here a path is
  uniform over codes (`trainers.nas.supernet.path_rng`), which is 1/5 per block in vitas_deit.
- v1 adds random erasing (0.25) to its weak augmentation; the orchestrator's "plain" view has none.
- CutMix draws its ratio and box from torch's generator of the rank, as timm draws them from numpy's.
- The class token is the pooled feature and the position embedding is sliced per channel (v1's `pos_embed[0, -1]`
  slice, a single position for every token, is a bug we do not copy).

eval_step reports the accuracy of three fixed paths: the largest (every digit at its last option), the middle
(every digit at its middle option) and the smallest non-trivial one (first options, every block its smallest
non-identity option). The superformer has no batch norm: no recalibration is needed before ranking.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers.nas import get_space
from trainers.nas.supernet import Supernet, path_rng
from trainers.nas.vit import LN_EPS, Block, BlockArch, PatchStem, ViTSpace, attend, embed_tokens, init_vit


@dataclass
class Config:
    """The official 1G search on ImageNet with the v2 mechanisms on: cyclic sharing, identity shifting."""

    space: str = "vitas_deit"  # a ViT space of trainers/nas/vit.py
    channel_sharing: Literal["cyclic", "left"] = "cyclic"
    identity_shifting: bool = True
    label_smoothing: float = 0.1
    cutmix_alpha: float = 1.0  # 0 = no CutMix
    drop_path: float = 0.0  # stochastic-depth rate of the last block position


TINY = Config(space="vit_digits", cutmix_alpha=0.0)


def embedding_channels(widths: tuple[int, ...], total: int, sharing: str) -> list[torch.Tensor]:
    """The channel index set I(w) of each width w (increasing) among `total` channels: cyclic windows or left."""
    if sharing == "left":
        return [torch.arange(w) for w in widths]
    offsets = itertools.accumulate((0,) + widths[:-1])
    return [(offset + torch.arange(w)) % total for w, offset in zip(widths, offsets)]


def qkv_rows(d: int, d_max: int) -> torch.Tensor:
    """Rows of the (3 d_max, C) qkv weight of a path with d channels each of q, k, v: (3d,)."""
    return torch.cat([torch.arange(d) + part * d_max for part in range(3)])


def sliced_layer_norm(x: torch.Tensor, norm: nn.LayerNorm, idx: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (len(idx),), norm.weight[idx], norm.bias[idx], LN_EPS)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: each sample's residual branch (B, T, E) kept with probability 1 - rate, scaled up."""
    if rate == 0 or not training:
        return x
    keep = torch.rand(len(x), 1, 1, device=x.device) >= rate
    return x * keep / (1 - rate)


def sliced_block(block: Block, x: torch.Tensor, idx: torch.Tensor, arch: BlockArch, rate: float,
                 training: bool) -> torch.Tensor:
    """Block `arch` of the path, from the max-size `block`: (B, T, E) -> (B, T, E), E = |idx|."""
    d, m = arch.qkv_dim, arch.mlp_dim
    rows = qkv_rows(d, block.proj.in_features).to(idx.device)
    qkv = F.linear(sliced_layer_norm(x, block.norm1, idx), block.qkv.weight[rows[:, None], idx], block.qkv.bias[rows])
    attn = F.linear(attend(qkv, arch.heads), block.proj.weight[idx, :d], block.proj.bias[idx])  # (B, T, E)
    x = x + drop_path(attn, rate, training)
    hidden = F.gelu(F.linear(sliced_layer_norm(x, block.norm2, idx), block.fc1.weight[:m, idx], block.fc1.bias[:m]))
    return x + drop_path(F.linear(hidden, block.fc2.weight[idx, :m], block.fc2.bias[idx]), rate, training)


class Superformer(Supernet):
    """Max-size ViT weights of `space`; `forward(x, code)` runs the path of `code` with its sliced weights."""

    method = "vitas"

    def __init__(self, space: ViTSpace, cfg: Config):
        super().__init__(space, cfg)
        c, top = space.embed_widths[-1], space.max_block
        self.stems = nn.ModuleDict({str(p): PatchStem(space.in_channels, c, p, space.input_size)
                                    for p in space.patch_sizes})
        self.blocks = nn.ModuleList(Block(c, top) for _ in range(space.depth))
        self.norm = nn.LayerNorm(c, eps=LN_EPS)
        self.head = nn.Linear(c, space.num_classes_for_counts)
        for width, idx in zip(space.embed_widths, embedding_channels(space.embed_widths, c, cfg.channel_sharing)):
            self.register_buffer(f"channels_{width}", idx, persistent=False)
        init_vit(self)

    def path(self, code: str) -> str:
        """The code whose weights run: its canonical form with identity shifting, else the code itself."""
        return self.space.canonical(code) if self.cfg.identity_shifting else self.space.validate(code)

    def forward(self, x: torch.Tensor, code: str) -> torch.Tensor:  # (B, C, S, S) -> (B, classes)
        arch = self.space.arch(self.path(code))
        idx = getattr(self, f"channels_{arch.embed}")  # (E,)
        stem = self.stems[str(arch.patch)]
        patches = F.conv2d(x, stem.proj.weight[idx], stem.proj.bias[idx], stride=arch.patch)  # (B, E, S/p, S/p)
        tokens = embed_tokens(patches, stem.cls_token[..., idx], stem.pos_embed[..., idx])  # (B, T, E)
        rates = torch.linspace(0, self.cfg.drop_path, len(self.blocks)).tolist()
        for block, block_arch, rate in zip(self.blocks, arch.blocks, rates):
            if block_arch is not None:
                tokens = sliced_block(block, tokens, idx, block_arch, rate, self.training)
        cls = sliced_layer_norm(tokens, self.norm, idx)[:, 0]  # (B, E)
        return F.linear(cls, self.head.weight[:, idx], self.head.bias)


def build(cfg: Config, info: DataInfo) -> nn.Module:
    space = get_space(cfg.space)
    found = (info.num_classes, info.in_channels, info.image_size)
    expected = (space.num_classes_for_counts, space.in_channels, space.input_size)
    if found != expected:
        raise ValueError(f"space {space.name} is for {expected[0]} classes of {expected[1]}-channel {expected[2]} px "
                         f"images; the data has {found[0]} classes of {found[1]}-channel {found[2]} px images")
    return Superformer(space, cfg)


def check(cfg: Config) -> None:
    try:
        space = get_space(cfg.space)
    except KeyError:
        space = None
    if not isinstance(space, ViTSpace):
        raise ConfigError("space", "a ViT search space (vit_digits, vitas_deit)", cfg.space)
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError("label_smoothing", "a value in [0, 1)", cfg.label_smoothing)
    if cfg.cutmix_alpha < 0:
        raise ConfigError("cutmix_alpha", "a value >= 0 (0 = no CutMix)", cfg.cutmix_alpha)
    if not 0 <= cfg.drop_path < 1:
        raise ConfigError("drop_path", "a value in [0, 1)", cfg.drop_path)


# ---------------------------------------------------------------------------------------------- loss


def cutmix_box(size: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """timm's rand_bbox: a box of side size * sqrt(1 - lam) centred at (cy, cx), clipped: (y0, y1, x0, x1)."""
    half = int(size * math.sqrt(1 - lam)) // 2
    return max(cy - half, 0), min(cy + half, size), max(cx - half, 0), min(cx + half, size)


def cutmix(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, float]:
    """CutMix in timm's "batch" mode: image i gets a box of image B-1-i; returns the images and the share lam of
    each image that is its own (after clipping the box)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    size = x.size(-1)
    y0, y1, x0, x1 = cutmix_box(size, lam, *torch.randint(size, (2,)).tolist())
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
    return mixed, 1 - (y1 - y0) * (x1 - x0) / size ** 2


def mixed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, lam: float, smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy against lam y + (1 - lam) y reversed (the mixed targets): (B, K), (B,) -> ()."""
    own = F.cross_entropy(logits, y, label_smoothing=smoothing)
    return own if lam == 1 else lam * own + (1 - lam) * F.cross_entropy(logits, y.flip(0), label_smoothing=smoothing)


def train_step(model: Superformer, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    code = model.space.sample(path_rng(step))  # the same path on every rank and after a resume
    x, lam = cutmix(batch["x"], cfg.cutmix_alpha) if cfg.cutmix_alpha > 0 else (batch["x"], 1.0)
    logits = model(x, code)  # (B, classes)
    loss = mixed_cross_entropy(logits, batch["y"], lam, cfg.label_smoothing)
    acc = (logits.argmax(1) == batch["y"]).float().mean()
    return loss, {"acc": acc.detach(), "path_mflops": model.space.flops(model.path(code))}


# ---------------------------------------------------------------------------------------------- evaluation


def monitor_paths(space: ViTSpace) -> dict[str, str]:
    """The fixed paths whose accuracy eval_step reports: largest, middle and smallest non-trivial."""
    smallest = [0] * space.stem_positions + ([1] + [0] * (space.block_positions - 1)) * space.depth
    return {"largest": space.encode([n - 1 for n in space.choices]),
            "middle": space.encode([n // 2 for n in space.choices]),
            "smallest": space.encode(smallest)}


def eval_step(model: Superformer, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    y = batch["y"]
    sums = {"n": torch.tensor(y.numel(), device=y.device)}
    for name, code in monitor_paths(model.space).items():
        sums[f"acc_{name}"] = (model(batch["x"], code).argmax(1) == y).sum()
    return sums


SPEC = TrainerSpec(
    name="vitas",
    paper="ViTAS: Vision Transformer Architecture Search (ECCV 2022)",
    Config=Config,
    TINY=TINY,
    views="plain",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    check=check,
    dynamic_graph=True,
)
