"""Vision-transformer search spaces of ViTAS (../shared/papers/methods_nas_gen_llm.md section 4; official v1 code
github.com/xiusu/ViTAS, core/search_space/ops.py and config/search/vit_tiny_search_1G_search.yaml).

A member is a DeiT-like ViT: a patch embedding (conv p x p, stride p) of width E, a class token and a learned
position embedding, a sequence of pre-norm blocks, a final LayerNorm, and a linear classifier on the class token
(the official `Norm(classifier='token')`; DeiT's pooling). A block is

    x = x + proj(MHSA(qkv(LN(x))))          qkv: E -> 3 d (q, k, v of d channels each), `heads` heads of d / heads
    x = x + fc2(GELU(fc1(LN(x))))           fc1: E -> m, fc2: m -> E

or an identity ("id"). As in ViTAS the attention width d is searched independently of the embedding width E.

A code is `stem_positions` digits (patch size, embedding width) followed by `block_positions` digits per block, the
first of which is 0 for an identity block. Two codes whose non-identity blocks come in the same order are the same
network; `canonical` (identity shifting) moves the identity blocks to the end and zeroes their other digits.

Spaces:
- "vit_digits" (16 px, 1-channel digits, patch 4 -> 16 tokens; the CPU ranking benchmark's ground truth). Code
  "ebbb": e in 0, 1, 2 -> E = 24, 36, 48; then 3 blocks, each 0 identity, 1 = 2 heads and MLP ratio 2 (m = 2 E),
  2 = 4 heads and MLP ratio 4 (m = 4 E); head dim 8 (d = 8 x heads). 3^4 = 81 codes, 45 canonical networks.
- "vitas_deit" (ImageNet, 224 px, 1000 classes): the official 1G search space. Code of 2 + 16 x 3 = 50 digits:
      position 0        patch size 0, 1, 2 -> 14, 16, 32
      position 1        embedding width ratio r = (digit + 1) / 10 of 384: E = round(384 r) = 38, 77, ..., 384
      per block i (positions 2 + 3i, 3 + 3i, 4 + 3i):
        heads digit     0 identity, 1..4 -> 3, 6, 12, 16 heads
        qkv digit       d = 480 (digit + 1) / 10 = 48, 96, ..., 480 channels each of q, k, v (q + k + v = 1440 r,
                        the official qkv width 1440; every d is divisible by every head count)
        MLP digit       m = 1440 (digit + 1) / 10 = 144, ..., 1440
  Example: "15" + "124" * 12 + "000" * 4 is patch 16, E 230, 12 blocks of 3 heads, d 144 (qkv 432), m 720: the
  README's block-level 1.3G model (ViTAS-C; `flops` 1265 M, DeiT-Ti's count 1253 M).

FLOPs (`flops`): multiply-accumulates of the patch embedding, every linear layer and the two attention matmuls
(QK^T and AV: 2 T^2 d per block, T = tokens + 1), at one image of the space's size and channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainers._common.backbones import Classifier
from trainers.nas.space import SearchSpace

LN_EPS = 1e-6  # the official DynamicLayerNorm / timm ViT


@dataclass(frozen=True)
class BlockArch:
    heads: int
    qkv_dim: int  # d: channels of each of q, k and v (heads x head dim)
    mlp_dim: int  # m


@dataclass(frozen=True)
class ViTArch:
    patch: int
    embed: int  # E
    blocks: tuple[BlockArch | None, ...]  # None = identity


# ---------------------------------------------------------------------------------------------- shared functions


def embed_tokens(patches: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    """Patch embeddings (B, E, S/p, S/p) -> tokens (B, 1 + (S/p)^2, E): class token first, plus the position
    embedding."""
    tokens = patches.flatten(2).transpose(1, 2)  # (B, N, E)
    return torch.cat([cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + pos_embed


def attend(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention of (B, T, 3d) = [q | k | v] -> (B, T, d); scale 1 / sqrt(d / heads)."""
    b, t, _ = qkv.shape
    q, k, v = (part.reshape(b, t, heads, -1).transpose(1, 2) for part in qkv.chunk(3, dim=-1))  # (B, h, T, d/h)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)


# ---------------------------------------------------------------------------------------------- stand-alone ViT


class PatchStem(nn.Module):
    """Patch embedding, class token and position embedding of one patch size: (B, C, S, S) -> (B, T, E)."""

    def __init__(self, in_channels: int, embed: int, patch: int, image_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, embed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embed_tokens(self.proj(x), self.cls_token, self.pos_embed)


class Block(nn.Module):
    """Pre-norm transformer block of embedding width E: (B, T, E) -> (B, T, E)."""

    def __init__(self, embed: int, arch: BlockArch):
        super().__init__()
        self.heads = arch.heads
        self.norm1 = nn.LayerNorm(embed, eps=LN_EPS)
        self.qkv = nn.Linear(embed, 3 * arch.qkv_dim)
        self.proj = nn.Linear(arch.qkv_dim, embed)
        self.norm2 = nn.LayerNorm(embed, eps=LN_EPS)
        self.fc1 = nn.Linear(embed, arch.mlp_dim)
        self.fc2 = nn.Linear(arch.mlp_dim, embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(attend(self.qkv(self.norm1(x)), self.heads))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTEncoder(nn.Module):
    """(B, C, S, S) -> (B, E): the class token after the final LayerNorm. Identity blocks are left out."""

    def __init__(self, arch: ViTArch, in_channels: int, image_size: int):
        super().__init__()
        self.stem = PatchStem(in_channels, arch.embed, arch.patch, image_size)
        self.blocks = nn.Sequential(*(Block(arch.embed, b) for b in arch.blocks if b is not None))
        self.norm = nn.LayerNorm(arch.embed, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.stem(x)))[:, 0]


def init_vit(module: nn.Module) -> None:
    """DeiT's initialisation: linear weights, class tokens and position embeddings truncated normal (std 0.02),
    linear biases 0, LayerNorm 1 / 0; the patch-embedding conv keeps torch's default."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchStem):
            nn.init.trunc_normal_(m.cls_token, std=0.02)
            nn.init.trunc_normal_(m.pos_embed, std=0.02)


def vit_macs(arch: ViTArch, in_channels: int, image_size: int, num_classes: int) -> int:
    """Multiply-accumulates of one image: patch embedding, linear layers, and QK^T + AV."""
    n = (image_size // arch.patch) ** 2
    t, e = n + 1, arch.embed
    macs = n * e * in_channels * arch.patch ** 2 + e * num_classes
    for b in arch.blocks:
        if b is not None:
            macs += t * e * 3 * b.qkv_dim + 2 * t * t * b.qkv_dim + t * b.qkv_dim * e + 2 * t * e * b.mlp_dim
    return macs


# ---------------------------------------------------------------------------------------------- spaces


class ViTSpace(SearchSpace):
    """Base of the ViT spaces: subclasses set the attributes below and define `arch(code)`."""

    in_channels: int
    patch_sizes: tuple[int, ...]
    embed_widths: tuple[int, ...]  # increasing; the last is the superformer's width C
    depth: int
    max_block: BlockArch  # the largest heads, d and m of any block
    stem_positions: int  # code digits before the blocks
    block_positions: int  # code digits per block; the first is 0 for an identity block

    def arch(self, code: str) -> ViTArch:
        raise NotImplementedError

    def block_codes(self, code: str) -> list[str]:
        start, size = self.stem_positions, self.block_positions
        return [code[start + i * size:start + (i + 1) * size] for i in range(self.depth)]

    def canonical(self, code: str) -> str:
        """Identity shifting: the identity blocks moved to the end, their other digits set to 0."""
        self.decode(code)
        kept = [block for block in self.block_codes(code) if block[0] != "0"]
        identity = "0" * self.block_positions
        return code[:self.stem_positions] + "".join(kept) + identity * (self.depth - len(kept))

    def build(self, code: str, num_classes: int, in_channels: int = 3) -> Classifier:
        arch = self.arch(code)
        model = Classifier(ViTEncoder(arch, in_channels, self.input_size), arch.embed, num_classes)
        init_vit(model)
        return model

    def flops(self, code: str) -> float:
        return vit_macs(self.arch(code), self.in_channels, self.input_size, self.num_classes_for_counts) / 1e6

    def params(self, code: str) -> float:
        model = self.build(self.canonical(code), self.num_classes_for_counts, self.in_channels)
        return sum(p.numel() for p in model.parameters()) / 1e6


class ViTDigits(ViTSpace):
    name = "vit_digits"
    input_size = 16
    in_channels = 1
    patch_sizes = (4,)
    embed_widths = (24, 36, 48)
    depth = 3
    head_dim = 8
    block_options = ((2, 2), (4, 4))  # digit 1, 2 -> (heads, MLP ratio)
    max_block = BlockArch(heads=4, qkv_dim=32, mlp_dim=4 * 48)
    stem_positions, block_positions = 1, 1
    choices = (3,) * 4

    def arch(self, code: str) -> ViTArch:
        embed_option, *blocks = self.decode(code)
        embed = self.embed_widths[embed_option]
        return ViTArch(self.patch_sizes[0], embed, tuple(self._block(option, embed) for option in blocks))

    def _block(self, option: int, embed: int) -> BlockArch | None:
        if option == 0:
            return None
        heads, mlp_ratio = self.block_options[option - 1]
        return BlockArch(heads, heads * self.head_dim, mlp_ratio * embed)


class ViTASDeiT(ViTSpace):
    name = "vitas_deit"
    input_size = 224
    in_channels = 3
    num_classes_for_counts = 1000
    patch_sizes = (14, 16, 32)
    embed_widths = tuple(round(384 * (digit + 1) / 10) for digit in range(10))  # 38, 77, ..., 384
    depth = 16
    heads = (3, 6, 12, 16)
    max_block = BlockArch(heads=16, qkv_dim=480, mlp_dim=1440)
    stem_positions, block_positions = 2, 3
    choices = (3, 10) + (5, 10, 10) * 16

    def arch(self, code: str) -> ViTArch:
        options = self.decode(code)
        blocks = tuple(self._block(*options[2 + 3 * i:5 + 3 * i]) for i in range(self.depth))
        return ViTArch(self.patch_sizes[options[0]], self.embed_widths[options[1]], blocks)

    def _block(self, heads: int, qkv: int, mlp: int) -> BlockArch | None:
        if heads == 0:
            return None
        return BlockArch(self.heads[heads - 1], 48 * (qkv + 1), 144 * (mlp + 1))


VIT_DIGITS = ViTDigits()
VITAS_DEIT = ViTASDeiT()
