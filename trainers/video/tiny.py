"""Tiny randomly initialised diffusers experts, built from configs and saved with `save_pretrained`: the CPU
setting of ConFiner and its tests load them through the same `from_pretrained` path as a downloaded model.

Their outputs are noise-like videos (nothing is trained); they exercise every code path at the shapes and
schedulers of the real experts:
- `text_to_image`: a Stable Diffusion pipeline (UNet2DConditionModel, DDIM), the spatial expert's kind;
- `text_to_video`: a ModelScope-style TextToVideoSDPipeline (UNet3DConditionModel, DDIM), the temporal expert's;
- `animatediff`: an AnimateDiffPipeline (a UNet with motion modules, Euler with trailing timesteps, as
  AnimateDiff-Lightning samples), the control expert's.

All three share one VAE and one text encoder (the same seed builds them), so they share a latent space, as SD-1.5,
ModelScope and AnimateDiff do.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

KINDS = ("text_to_image", "text_to_video", "animatediff")
TEXT_WIDTH = 16  # the text encoder's width = the UNets' cross-attention width
MAX_TOKENS = 77  # CLIP's


def byte_symbols() -> list[str]:
    """The 256 symbols of byte-level BPE (printable bytes as themselves, the others shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def text_components(folder: Path) -> tuple[Any, Any]:
    """A character-level CLIP tokenizer (no merges) and a 1-layer CLIP text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate([*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    end = vocab["<|endoftext|>"]
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=TEXT_WIDTH, intermediate_size=32,
                                        num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=MAX_TOKENS,
                                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end))
    return tokenizer, text


def vae() -> Any:
    """A one-level VAE: latents are the image's size, 4 channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16)


def unet(dims: int, seed: int) -> Any:
    """A two-level UNet with cross-attention: 2D (frame by frame, Stable Diffusion's) or 3D (ModelScope's)."""
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    torch.manual_seed(seed)
    blocks = f"{dims}D"
    model = UNet2DConditionModel if dims == 2 else UNet3DConditionModel
    return model(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=(f"CrossAttnDownBlock{blocks}", f"DownBlock{blocks}"),
                 up_block_types=(f"UpBlock{blocks}", f"CrossAttnUpBlock{blocks}"), cross_attention_dim=TEXT_WIDTH,
                 attention_head_dim=2 if dims == 2 else 4, norm_num_groups=4)


def build(kind: str, folder: Path) -> Any:
    """The pipeline `kind` (one of KINDS), randomly initialised."""
    from diffusers import (
        AnimateDiffPipeline,
        DDIMScheduler,
        EulerDiscreteScheduler,
        MotionAdapter,
        StableDiffusionPipeline,
        TextToVideoSDPipeline,
    )

    tokenizer, text = text_components(folder / "tokenizer-source")
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)
    if kind == "text_to_image":
        return StableDiffusionPipeline(vae=vae(), text_encoder=text, tokenizer=tokenizer, unet=unet(2, 1),
                                       scheduler=ddim, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if kind == "text_to_video":
        return TextToVideoSDPipeline(vae=vae(), text_encoder=text, tokenizer=tokenizer, unet=unet(3, 2), scheduler=ddim)
    if kind == "animatediff":
        torch.manual_seed(3)
        adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=4,
                                motion_num_attention_heads=2, motion_max_seq_length=32)
        euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="trailing")
        return AnimateDiffPipeline(vae=vae(), text_encoder=text, tokenizer=tokenizer, unet=unet(2, 3),
                                   motion_adapter=adapter, scheduler=euler, feature_extractor=None,
                                   image_encoder=None)
    raise ValueError(f"tiny expert kind {kind!r}: expected one of {', '.join(KINDS)}")


def save(kind: str, folder: Path) -> Path:
    """Build the pipeline `kind` and save it to `folder/kind` (skipped when already there); returns the directory.
    It is saved to a private directory first and renamed into place, so processes building it at once (two workers
    on one machine) never see half of it."""
    target = Path(folder) / kind
    if not (target / "model_index.json").is_file():
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            build(kind, Path(scratch) / "sources").save_pretrained(Path(scratch) / kind)
            try:
                os.rename(Path(scratch) / kind, target)
            except OSError:  # another process renamed its copy first
                pass
    return target
