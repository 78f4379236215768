"""GreenMIM (Huang et al., "Green Hierarchical Vision Transformer for Masked Image Modeling", NeurIPS 2022).

An MAE-style masked autoencoder whose encoder is a hierarchical Swin that sees the visible patches only:

    M          = random batch-wise mask over units of s x s pixels, s = the final stage's patch (32 px for Swin-B)
    z_vis      = GreenSwin(x[~M])         patch embedding, (S)W-MSA by Group Window Attention, 2x2 patch merging,
                                          all on visible tokens; every merge is all-visible or all-masked
    x_hat      = Decoder(z_vis, M)        embed to 512, mask tokens at masked units, sin-cos positions, 1 block
    L          = mean_{u in M} || x_hat_u - norm(x_u) ||^2 / (s^2 C)     norm(.) = per-unit (x - mean) / sqrt(var + eps)

Paper symbol -> Config field:
    image 224 x 224                           -> the experiment's data.image_size (build reads DataInfo.image_size)
    patch 4, C = 128, depths 2-2-18-2, heads  -> patch_size, embed_dim, depths, num_heads (Swin-B)
    M (window, 7), MLP ratio 4                -> window_size, mlp_ratio
    mask ratio 0.75 on 32 x 32-px units       -> mask_ratio; the unit is patch_size * 2 ** (len(depths) - 1)
    g (group size of Group Window Attention)  -> group_size: "optimal" (the paper's DP, lab_kernels.grouping),
                                                 "fixed" (the released code), "masking" or an int
    decoder 1 block, 512-d, 16 heads          -> decoder_depth, decoder_dim, decoder_heads
    normalised-pixel target                   -> norm_pix_loss
    AdamW (0.9, 0.95), wd 0.05, lr = blr * B / 256, 40 warm-up epochs -> the experiment's optim block

The encoder's parameters carry the key names of timm's SwinTransformer (timm >= 0.9: the patch merging of stage i
is `layers.i.downsample`), so `timm_swin_state_dict` hands the encoder to a timm Swin for fine-tuning (see
trainers/supervised.py `init_from`).

Deviations from the official code (LayneH/GreenMIM), with reasons:
- group_size defaults to "optimal", the paper's search over g (lab_kernels.grouping.optimal_group_size); the released
  code hard-codes g = min(M^2, max_i w_i) with a FIXME, which is group_size "fixed".
- Only the visible patches are embedded: the patch conv has stride = kernel, so a matmul of the gathered visible
  patches with the flattened conv weight is exact; the official code embeds all patches and then drops the masked.
- Patch merging sits at the start of the next stage (timm's layout) instead of the end of the previous one, and the
  visible tokens of each 2x2 group are gathered by sorting on (group, slot): the same computation, with timm's keys.
- The mask noise is drawn on the CPU from torch's default generator, so a seed gives the same masks on any device;
  each DDP rank draws its own mask, as in the official code (seeded per rank).
- Masked pairs in attention get -inf instead of -100 (lab_kernels/group_window_attention.py): exact, not approximate.
- The decoder's fixed sin-cos positions are a non-persistent buffer instead of a frozen Parameter (same values,
  not saved in checkpoints); the normalised-pixel target works for any number of channels (the official hard-codes 3).
- LayerNorm eps is 1e-6 as in the official encoder; timm's Swin (and the official fine-tuning, which uses the SimMIM
  code base) uses 1e-5, so fine-tuned features differ from pre-training ones by that eps only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from lab_kernels.group_window_attention import GroupLayout, GroupWindowAttention
from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec

GroupSize = int | Literal["optimal", "fixed", "masking"]


@dataclass
class Config:
    """Paper defaults: GreenMIM with Swin-B (window 7) at 224 px, mask ratio 0.75 on 32-px units, decoder 1 x 512."""

    patch_size: int = 4
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 7  # M
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0  # the official pre-training value
    norm_eps: float = 1e-6
    mask_ratio: float = 0.75
    group_size: GroupSize = "optimal"
    decoder_dim: int = 512
    decoder_depth: int = 1
    decoder_heads: int = 16
    norm_pix_loss: bool = True


# 16-px digits (the contract tests): patch 2, two stages (grids 8 and 4), 4-px units (4 x 4 of them, 4 visible).
TINY = Config(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, decoder_dim=32,
              decoder_heads=2)


def check(cfg: Config) -> None:
    check_swin(cfg)
    if isinstance(cfg.group_size, int) and cfg.group_size <= 0:
        raise ConfigError("group_size", "a positive int, 'optimal', 'fixed' or 'masking'", cfg.group_size)


def check_swin(cfg: Any) -> None:
    """The Swin sizes and mask ratio that GreenMIM and SimMIM share."""
    if len(cfg.num_heads) != len(cfg.depths):
        raise ConfigError("num_heads", f"one head count per stage ({len(cfg.depths)})", cfg.num_heads)
    for i, heads in enumerate(cfg.num_heads):
        if (cfg.embed_dim * 2**i) % heads:
            raise ConfigError("num_heads", "divisors of the stage widths embed_dim * 2**i", cfg.num_heads)
    if not 0 < cfg.mask_ratio < 1:
        raise ConfigError("mask_ratio", "a ratio in (0, 1)", cfg.mask_ratio)


def mask_unit(cfg: Any) -> int:
    """Pixels per side of a mask unit: the final stage's patch, patch_size * 2 ** (stages - 1)."""
    return cfg.patch_size * 2 ** (len(cfg.depths) - 1)


def units_per_side(cfg: Any, image_size: int) -> int:
    """Mask units per image side; the image must hold whole units."""
    unit = mask_unit(cfg)
    if image_size % unit:
        raise ValueError(f"image_size {image_size} must be a multiple of the mask unit {unit} "
                         f"(patch_size * 2 ** (stages - 1)), so that every 2x2 merge is all-visible or all-masked")
    return image_size // unit


# ---------------------------------------------------------------------------------------------- masking


def random_unit_mask(units: int, mask_ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """One mask for the whole batch over the units x units grid: (units, units) bool, True = masked.

    Keeps int(L * (1 - mask_ratio)) of the L units, as the official `random_masking` (argsort of uniform noise).
    """
    num_units = units * units
    num_keep = int(num_units * (1 - mask_ratio))
    if num_keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible unit out of {num_units}")
    keep = torch.rand(num_units, generator=generator).argsort()[:num_keep]  # (num_keep,)
    mask = torch.ones(num_units, dtype=torch.bool)
    mask[keep] = False
    return mask.view(units, units)


def upsample_mask(unit_mask: Tensor, factor: int) -> Tensor:
    """(..., h, w) unit mask -> (..., h * factor, w * factor): each unit covers factor x factor patches (or pixels)."""
    return unit_mask.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


# ---------------------------------------------------------------------------------------------- the green encoder


class VisiblePatchEmbed(nn.Module):
    """timm's PatchEmbed (conv with kernel = stride = p, then LayerNorm) on the visible patches only."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, eps: float):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, coords: Tensor) -> Tensor:  # (B, C, H, W), (N, 2) -> (B, N, dim)
        p = self.patch_size
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
        patches = patches[:, coords[:, 0], coords[:, 1]].flatten(2)  # (B, N, C*p*p), the conv weight's order
        return self.norm(F.linear(patches, self.proj.weight.flatten(1), self.proj.bias))


def merge_order(coords: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Gather order of visible tokens into complete 2x2 groups, and the merged tokens' coordinates.

    coords (N, 2) on the (H, W) grid -> order (N,) such that x[:, order].view(B, N/4, 4C) concatenates each group in
    Swin's order (r, c), (r+1, c), (r, c+1), (r+1, c+1), groups row-major; merged coords (N/4, 2) on (H/2, W/2).
    Raises ValueError when a group is only partly visible.
    """
    half = torch.div(coords, 2, rounding_mode="floor")  # (N, 2)
    group = half[:, 0] * (grid[1] // 2) + half[:, 1]  # (N,) row-major id of the 2x2 group
    slot = (coords[:, 1] % 2) * 2 + coords[:, 0] % 2  # (N,) position inside it, Swin's x0..x3
    key, order = torch.sort(group * 4 + slot)  # (N,), distinct keys
    chunks = key.view(-1, 4) if len(key) % 4 == 0 else None  # (N/4, 4): a complete group is 4g, 4g+1, 4g+2, 4g+3
    if chunks is None or not torch.equal(chunks, chunks[:, :1] // 4 * 4 + torch.arange(4, device=key.device)):
        raise ValueError("patch merging needs complete 2x2 groups of visible tokens: the mask unit must be the "
                         "final stage's patch")
    return order, half[order[::4]]


class VisiblePatchMerging(nn.Module):
    """timm's PatchMerging (concat 2x2, LayerNorm, Linear 4C -> 2C) on complete groups of visible tokens."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, coords: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor, tuple[int, int]]:
        order, merged = merge_order(coords, grid)
        b, n, c = x.shape
        x = x.index_select(1, order).reshape(b, n // 4, 4 * c)  # (B, N/4, 4C)
        return self.reduction(self.norm(x)), merged, (grid[0] // 2, grid[1] // 2)


class GreenBlock(nn.Module):
    """A Swin block on visible tokens: x + Attn(LN(x)), then x + MLP(LN(x)); attention by Group Window Attention."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, eps: float,
                 drop_path: float):
        super().__init__()
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = GroupWindowAttention(dim, num_heads, window)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, coords: Tensor, grid: tuple[int, int], layout: GroupLayout) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), coords, grid, layout=layout))  # (B, N, C)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def stage_window(window_size: int, grid: int) -> tuple[int, int]:
    """(window, SW-MSA shift) of a stage as Swin and timm set them: one unshifted window when grid <= window_size."""
    if grid <= window_size:
        return grid, 0
    if grid % window_size:
        raise ValueError(f"stage grid {grid} must be a multiple of window_size {window_size} (or at most it)")
    return window_size, window_size // 2


class GreenStage(nn.Module):
    """timm's SwinTransformerStage on visible tokens: patch merging (stages > 0), then blocks alternating W-/SW-MSA."""

    def __init__(self, dim: int, grid: int, depth: int, num_heads: int, cfg: Config, drop_paths: list[float],
                 downsample: bool):
        super().__init__()
        self.downsample = VisiblePatchMerging(dim // 2, cfg.norm_eps) if downsample else None
        window, shift = stage_window(cfg.window_size, grid)
        self.blocks = nn.ModuleList(
            GreenBlock(dim, num_heads, window, shift if i % 2 else 0, cfg.mlp_ratio, cfg.norm_eps, drop_paths[i])
            for i in range(depth))

    def forward(self, x: Tensor, coords: Tensor, grid: tuple[int, int], group_size: GroupSize
                ) -> tuple[Tensor, Tensor, tuple[int, int]]:
        if self.downsample is not None:
            x, coords, grid = self.downsample(x, coords, grid)
        layouts: dict[int, GroupLayout] = {}  # the grouping per shift, made once for the stage's blocks
        for block in self.blocks:
            if block.shift not in layouts:
                layouts[block.shift] = block.attn.plan(coords, grid, block.shift, group_size)
            x = block(x, coords, grid, layouts[block.shift])
        return x, coords, grid


class GreenSwin(nn.Module):
    """Swin on the visible patches: (B, C, H, W) + patch mask -> (B, N_vis_final, num_features), row-major."""

    def __init__(self, cfg: Config, image_size: int, in_channels: int):
        super().__init__()
        self.group_size = cfg.group_size
        self.num_features = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        self.patch_embed = VisiblePatchEmbed(in_channels, cfg.embed_dim, cfg.patch_size, cfg.norm_eps)
        drop_paths = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        grid, first = image_size // cfg.patch_size, 0
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            self.layers.append(GreenStage(cfg.embed_dim * 2**i, grid // 2**i, depth, heads, cfg,
                                          drop_paths[first:first + depth], downsample=i > 0))
            first += depth
        self.norm = nn.LayerNorm(self.num_features, eps=cfg.norm_eps)

    def forward(self, x: Tensor, patch_mask: Tensor) -> Tensor:
        """x (B, C, H, W), patch_mask (H/p, W/p) bool, True = masked -> (B, N_vis_final, D)."""
        coords = (~patch_mask).nonzero()  # (N_vis, 2) row-major
        x = self.patch_embed(x, coords)  # (B, N_vis, C)
        grid = tuple(patch_mask.shape)
        for stage in self.layers:
            x, coords, grid = stage(x, coords, grid, self.group_size)
        return self.norm(x)


def timm_swin_state_dict(model_state: dict[str, Tensor], cfg: Any = None) -> dict[str, Tensor]:
    """The encoder of a greenmim or simmim state dict in the key layout of timm's SwinTransformer (num_classes=0).

    Both methods keep the encoder under `encoder.` with timm's names, so this strips the prefix. With the
    pre-training `cfg` it also checks that the stages hold cfg.depths blocks (timm's strict loading checks the rest).
    """
    state = {k.removeprefix("encoder."): v for k, v in model_state.items() if k.startswith("encoder.")}
    if "patch_embed.proj.weight" not in state:
        raise ValueError("not a greenmim/simmim state dict: no encoder.patch_embed.proj.weight")
    if cfg is not None:
        found = tuple(len({k.split(".")[3] for k in state if k.startswith(f"layers.{i}.blocks.")})
                      for i in range(len(cfg.depths)))
        if found != tuple(cfg.depths):
            raise ValueError(f"the encoder's blocks per stage are {found}, not depths {tuple(cfg.depths)}")
    return state


# ---------------------------------------------------------------------------------------------- the autoencoder


def sincos_2d(dim: int, size: int) -> Tensor:
    """MAE's fixed 2-D sin-cos positions for a size x size grid, row-major: (size^2, dim); first half encodes the
    column, second half the row, each as [sin(pos * omega), cos(pos * omega)], omega_k = 10000^(-k / (dim / 4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")

    def encode(pos: Tensor) -> Tensor:  # (size^2,) -> (size^2, dim/2)
        angle = pos.flatten().double()[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class GreenMIM(nn.Module):
    """Green Swin encoder + MAE decoder on the final-stage units."""

    def __init__(self, cfg: Config, image_size: int, in_channels: int):
        super().__init__()
        self.unit, self.units = mask_unit(cfg), units_per_side(cfg, image_size)
        self.encoder = GreenSwin(cfg, image_size, in_channels)
        norm = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.decoder_embed = nn.Linear(self.encoder.num_features, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(cfg.decoder_dim, self.units)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(cfg.decoder_depth))
        self.decoder_norm = norm(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, self.unit**2 * in_channels)
        init_like_official(self)

    def forward(self, x: Tensor, unit_mask: Tensor) -> Tensor:
        """x (B, C, H, W), unit_mask (h, w) bool, True = masked -> predicted units (B, h*w, s*s*C), row-major."""
        latent = self.encoder(x, upsample_mask(unit_mask, self.unit // self.encoder.patch_embed.patch_size))
        return self.decode(latent, unit_mask.flatten())

    def decode(self, latent: Tensor, masked: Tensor) -> Tensor:
        """latent (B, N_vis, D) of the visible units, masked (L,) bool -> (B, L, s*s*C)."""
        z = self.decoder_embed(latent)  # (B, N_vis, D_dec)
        b, n_vis, d = z.shape
        position = torch.cat([(~masked).nonzero()[:, 0], masked.nonzero()[:, 0]])  # (L,) unit of each token
        z = torch.cat([z, self.mask_token.to(z.dtype).expand(b, len(position) - n_vis, d)], dim=1)
        z = z.index_select(1, position.argsort()) + self.decoder_pos_embed  # (B, L, D_dec), back to row-major
        for block in self.decoder_blocks:
            z = block(z)
        return self.decoder_pred(self.decoder_norm(z))


def init_like_official(model: nn.Module) -> None:
    """MAE's init as GreenMIM applies it to the whole model: Xavier-uniform linears and convs (flattened), zero
    biases, unit LayerNorms, mask token N(0, 0.02); the relative-position tables keep their trunc-normal(0.02)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            with torch.no_grad():
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(model.mask_token, std=0.02)


def build(cfg: Config, info: DataInfo) -> nn.Module:
    return GreenMIM(cfg, info.image_size, info.in_channels)


# ---------------------------------------------------------------------------------------------- loss and steps


def patchify(x: Tensor, unit: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/s)(W/s), s*s*C): units row-major, pixels (row, col, channel) inside a unit."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // unit, unit, w // unit, unit).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, s, s, C)
    return x.reshape(b, (h // unit) * (w // unit), unit * unit * c)


def reconstruction_loss(pred: Tensor, target: Tensor, masked: Tensor, norm_pix: bool) -> Tensor:
    """MSE on the masked units only: pred, target (B, L, P), masked (L,) bool; norm_pix normalises each target unit
    to zero mean and unit variance (unbiased var + 1e-6, as MAE)."""
    target = target.float()
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_unit = (pred.float() - target).pow(2).mean(-1)  # (B, L)
    return per_unit[:, masked].mean()


def _loss(model: GreenMIM, x: Tensor, unit_mask: Tensor, cfg: Config) -> Tensor:
    pred = model(x, unit_mask)  # (B, L, s*s*C)
    return reconstruction_loss(pred, patchify(x, model.unit), unit_mask.flatten(), cfg.norm_pix_loss)


def train_step(model: nn.Module, batch: Batch, cfg: Config, step: int) -> tuple[Tensor, dict[str, Tensor]]:
    x = batch["x"]  # (B, C, H, W)
    unit_mask = random_unit_mask(model.units, cfg.mask_ratio).to(x.device)  # (h, w), one mask for the batch
    loss = _loss(model, x, unit_mask, cfg)
    return loss, {"mask_ratio": unit_mask.float().mean()}


def eval_step(model: nn.Module, batch: Batch, cfg: Config) -> dict[str, Tensor]:
    """Reconstruction loss with one fixed mask (generator seeded 0), so every evaluation sees the same masking."""
    x = batch["x"]
    unit_mask = random_unit_mask(model.units, cfg.mask_ratio, torch.Generator().manual_seed(0)).to(x.device)
    n = torch.tensor(x.shape[0], device=x.device)
    return {"loss": _loss(model, x, unit_mask, cfg) * n, "n": n}


def param_groups(model: nn.Module, cfg: Any) -> list[dict[str, Any]]:
    """The official skip list: no weight decay on biases, norms, relative-position tables and the mask token."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim <= 1 or "relative_position_bias_table" in name or "token" in name
            (no_decay if skip else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


SPEC = TrainerSpec(
    name="greenmim",
    paper="GreenMIM: Green Hierarchical Vision Transformer for Masked Image Modeling (Huang et al., NeurIPS 2022)",
    Config=Config,
    TINY=TINY,
    views="plain",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    param_groups=param_groups,
    check=check,
)
