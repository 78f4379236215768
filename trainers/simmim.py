"""SimMIM (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022) on a Swin encoder: the
dense baseline that GreenMIM is compared against.

    M          = random mask over units of s x s pixels (s = 32 for Swin: the encoder's total stride)
    e_i        = PatchEmbed(x)_i, replaced by a learnable mask token [M] where patch i lies in a masked unit
    z          = Swin(e)                  standard (shifted) window attention over ALL tokens, masked ones included
    x_hat      = PixelShuffle_s(Conv1x1(z))                   linear decoder: (B, D, H/s, W/s) -> (B, C, H, W)
    L          = sum_{masked pixels, channels} |x_hat - x| / (#masked pixels + 1e-5) / C     (the official L1)

Paper symbol -> Config field:
    Swin-B (patch 4, C = 128, depths 2-2-18-2, heads 4-8-16-32), window -> the Swin fields, the same as
                                                   trainers/greenmim.py so the two methods compare at equal encoders
    image size                                  -> the experiment's data.image_size
    mask ratio 0.6, mask patch 32 px            -> mask_ratio; the unit is patch_size * 2 ** (len(depths) - 1)
    batch-wise vs sample-wise masks             -> batch_wise_mask
    AdamW, wd 0.05, warm-up, cosine             -> the experiment's optim block

The encoder is timm's SwinTransformer (num_classes=0) under `encoder.`, so trainers.greenmim.timm_swin_state_dict and
trainers/supervised.py `init_from` hand it to fine-tuning unchanged.

Deviations from the official code (microsoft/SimMIM), with reasons:
- The Swin defaults are GreenMIM's (224 px, window 7) instead of SimMIM's pre-training recipe (192 px, window 6),
  so that the speed and memory comparison with GreenMIM runs the same encoder; mask_ratio keeps SimMIM's 0.6.
- Masks are batch-wise by default (one mask for the whole batch, as GreenMIM needs): GreenMIM's author reports
  83.31 (batch-wise) vs 83.38 (sample-wise) for SimMIM fine-tuning (GreenMIM issue #2). batch_wise_mask=False
  draws one mask per sample, as the official data loader does.
- Masks are drawn in the step from torch's generator instead of by the data loader with numpy; the count of
  masked units is L - int(L (1 - ratio)) (GreenMIM's rule), which equals SimMIM's ceil(L ratio).
- The encoder is timm's Swin (LayerNorm eps 1e-5, trunc-normal 0.02 init, like the official Swin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from trainers import greenmim
from trainers._common.contract import Batch, DataInfo, TrainerSpec


@dataclass
class Config:
    """Paper defaults (mask ratio 0.6 on 32-px units, L1 on masked pixels) on GreenMIM's Swin-B (224 px, window 7)."""

    patch_size: int = 4
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0  # the official pre-training value
    mask_ratio: float = 0.6
    batch_wise_mask: bool = True


# 16-px digits (the contract tests): GreenMIM's TINY encoder.
TINY = Config(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)


class SimMIM(nn.Module):
    """timm Swin with a mask token at its input and a 1x1-conv + pixel-shuffle decoder."""

    def __init__(self, cfg: Config, image_size: int, in_channels: int):
        super().__init__()
        self.unit, self.units = greenmim.mask_unit(cfg), greenmim.units_per_side(cfg, image_size)
        self.patch_size = cfg.patch_size
        self.encoder = SwinTransformer(
            img_size=image_size, patch_size=cfg.patch_size, in_chans=in_channels, num_classes=0,
            embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads, window_size=cfg.window_size,
            mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(self.encoder.num_features, self.unit**2 * in_channels, kernel_size=1),
            nn.PixelShuffle(self.unit))

    def forward(self, x: Tensor, patch_mask: Tensor) -> Tensor:
        """x (B, C, H, W), patch_mask (B or 1, H/p, W/p) bool, True = masked -> reconstruction (B, C, H, W)."""
        z = self.encoder.patch_embed(x)  # (B, H/p, W/p, D), channels last
        w = patch_mask[..., None].to(z.dtype)  # (B or 1, H/p, W/p, 1)
        z = z * (1 - w) + self.mask_token.to(z.dtype) * w
        z = self.encoder.norm(self.encoder.layers(z))  # (B, H/s, W/s, D_final)
        return self.decoder(z.permute(0, 3, 1, 2).contiguous())  # NCHW, so the conv grads have standard strides


def build(cfg: Config, info: DataInfo) -> nn.Module:
    return SimMIM(cfg, info.image_size, info.in_channels)


def masked_l1(x: Tensor, x_rec: Tensor, pixel_mask: Tensor) -> Tensor:
    """SimMIM's loss: x, x_rec (B, C, H, W), pixel_mask (B or 1, H, W) bool -> mean |x_rec - x| over masked pixels
    and channels (with the official 1e-5 in the denominator)."""
    m = pixel_mask[:, None].to(torch.float32).expand(x.shape[0], 1, *pixel_mask.shape[1:])  # (B, 1, H, W)
    l1 = F.l1_loss(x_rec.float(), x.float(), reduction="none")  # (B, C, H, W)
    return (l1 * m).sum() / (m.sum() + 1e-5) / x.shape[1]


def unit_masks(model: SimMIM, cfg: Config, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """(1 or B, h, w) bool unit masks, True = masked: one for the batch, or one per sample."""
    count = 1 if cfg.batch_wise_mask else batch_size
    return torch.stack([greenmim.random_unit_mask(model.units, cfg.mask_ratio, generator) for _ in range(count)])


def _loss(model: SimMIM, x: Tensor, units: Tensor) -> Tensor:
    patch_mask = greenmim.upsample_mask(units, model.unit // model.patch_size)  # (1 or B, H/p, W/p)
    pixel_mask = greenmim.upsample_mask(units, model.unit)  # (1 or B, H, W)
    return masked_l1(x, model(x, patch_mask), pixel_mask)


def train_step(model: nn.Module, batch: Batch, cfg: Config, step: int) -> tuple[Tensor, dict[str, Tensor]]:
    x = batch["x"]  # (B, C, H, W)
    units = unit_masks(model, cfg, x.shape[0]).to(x.device)  # (1 or B, h, w)
    return _loss(model, x, units), {"mask_ratio": units.float().mean()}


def eval_step(model: nn.Module, batch: Batch, cfg: Config) -> dict[str, Tensor]:
    """Masked L1 with fixed masks (generator seeded 0), so every evaluation sees the same masking."""
    x = batch["x"]
    units = unit_masks(model, cfg, x.shape[0], torch.Generator().manual_seed(0)).to(x.device)
    n = torch.tensor(x.shape[0], device=x.device)
    return {"loss": _loss(model, x, units) * n, "n": n}


SPEC = TrainerSpec(
    name="simmim",
    paper="SimMIM: A Simple Framework for Masked Image Modeling (Xie et al., CVPR 2022), Swin encoder",
    Config=Config,
    TINY=TINY,
    views="plain",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    param_groups=greenmim.param_groups,  # the official skip list: no decay on biases, norms, tables, mask token
    check=greenmim.check_swin,
)
