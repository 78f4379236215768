"""A diffusion expert: one diffusers pipeline directory, used through its components (text encoder, denoiser,
VAE, noise schedule) rather than its `__call__`, so that several experts can share one sampling trajectory.

Supported denoisers: UNet3DConditionModel (ModelScope T2V, ZeroScope) and UNetMotionModel (AnimateDiff) denoise
a clip (B, C, F, h, w) jointly; UNet2DConditionModel (Stable Diffusion) denoises each frame on its own. The
schedule must be of the DDPM family (it has `alphas_cumprod`; ε-, v- or x0-prediction); flow-matching models have
none and are refused by name.

`nfe` counts network evaluations per video: one per denoiser pass over one clip of a video, two under
classifier-free guidance (its conditional and unconditional passes), whether they run batched or not.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

VIDEO_DENOISERS = ("UNet3DConditionModel", "UNetMotionModel")
IMAGE_DENOISERS = ("UNet2DConditionModel",)
TINY_PREFIX = "tiny://"
DECODE_CHUNK = 8  # frames per VAE pass


def load_pipeline(path: str, dtype: torch.dtype) -> Any:
    """The pipeline of a diffusers directory; `tiny://<kind>` builds a tiny random one (trainers.video.tiny) once
    per machine and loads it from its directory the same way."""
    from diffusers import DiffusionPipeline

    if path.startswith(TINY_PREFIX):
        import tempfile

        from trainers.video import tiny

        path = str(tiny.save(path.removeprefix(TINY_PREFIX), Path(tempfile.gettempdir()) / "confiner-tiny-experts"))
    return DiffusionPipeline.from_pretrained(path, dtype=dtype, low_cpu_mem_usage=False)  # no `accelerate` needed


def check_directory(path: str) -> str | None:
    """Why `path` cannot be an expert (None when it can): checked before Ray starts."""
    if path.startswith(TINY_PREFIX):
        from trainers.video import tiny

        kind = path.removeprefix(TINY_PREFIX)
        return None if kind in tiny.KINDS else f"tiny://<kind> with a kind in {', '.join(tiny.KINDS)}"
    if not (Path(path) / "model_index.json").is_file():
        return "a diffusers pipeline directory (holding model_index.json, as save_pretrained writes it)"
    index = json.loads((Path(path) / "model_index.json").read_text())
    missing = [c for c in ("unet", "vae", "scheduler", "text_encoder", "tokenizer") if c not in index]
    if missing:
        return f"a pipeline with a UNet, VAE, scheduler, text encoder and tokenizer ({index.get('_class_name')} " \
               f"has no {', '.join(missing)})"
    return None


class Expert:
    """One expert: its role in the chain (control, spatial, temporal), its pipeline and its guidance scale."""

    def __init__(self, role: str, path: str, pipeline: Any, guidance_scale: float):
        self.role, self.path, self.pipeline, self.guidance_scale = role, path, pipeline, guidance_scale
        denoiser = type(pipeline.unet).__name__
        if denoiser not in VIDEO_DENOISERS + IMAGE_DENOISERS:
            raise ValueError(f"expert {role} ({path}): denoiser {denoiser} is not supported (supported: "
                             f"{', '.join(VIDEO_DENOISERS + IMAGE_DENOISERS)})")
        if not hasattr(pipeline.scheduler, "alphas_cumprod"):
            raise ValueError(f"expert {role} ({path}): scheduler {type(pipeline.scheduler).__name__} has no "
                             "alphas_cumprod (a flow-matching schedule); ConFiner hands over through the DDPM "
                             "family's x_t = sqrt(a) x0 + sqrt(1 - a) eps")
        if pipeline.scheduler.config.get("thresholding", False):
            raise ValueError(f"expert {role} ({path}): dynamic thresholding is not supported")
        self.video = denoiser in VIDEO_DENOISERS
        self.text_per_frame = denoiser != "UNet3DConditionModel"  # the others take one text row per frame
        self.alphas_cumprod = pipeline.scheduler.alphas_cumprod.to(torch.float64)  # (T,)
        self.prediction_type = pipeline.scheduler.config.get("prediction_type", "epsilon")
        self.clip_sample = pipeline.scheduler.config.get("clip_sample", False)
        self.clip_range = pipeline.scheduler.config.get("clip_sample_range", 1.0)
        self.nfe = 0

    @classmethod
    def load(cls, role: str, path: str, guidance_scale: float, device: torch.device, dtype: torch.dtype) -> Expert:
        pipeline = load_pipeline(path, dtype)
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        return cls(role, path, pipeline, guidance_scale)

    @property
    def name(self) -> str:
        return f"{type(self.pipeline).__name__}:{self.path}"

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.unet.dtype

    def text(self, prompt: str, negative_prompt: str) -> torch.Tensor:
        """The prompt's embeddings (1, L, D), or (2, L, D) as [negative, prompt] under guidance."""
        positive, negative = self.pipeline.encode_prompt(prompt, self.device, 1, self.cfg,
                                                         negative_prompt=negative_prompt or None)[:2]
        return torch.cat([negative, positive]) if self.cfg else positive

    def model_output(self, x: torch.Tensor, t: float | torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The guided network output for clips x (N, C, F, h, w) at timestep t, counting N (or 2N) evaluations."""
        n, frames = x.shape[0], x.shape[2]
        passes = 2 if self.cfg else 1
        inputs = torch.cat([x] * passes).to(self.dtype)  # (passes·N, C, F, h, w)
        embeds = text.repeat_interleave(n, dim=0)  # (passes·N, L, D): [negative × N, prompt × N]
        timestep = torch.as_tensor(t, device=self.device)
        if self.text_per_frame:
            embeds = embeds.repeat_interleave(frames, dim=0)  # (passes·N·F, L, D)
        if self.video:
            out = self.pipeline.unet(inputs, timestep, encoder_hidden_states=embeds).sample
        else:
            flat = inputs.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (passes·N·F, C, h, w)
            out = self.pipeline.unet(flat, timestep, encoder_hidden_states=embeds).sample
            out = out.unflatten(0, (passes * n, frames)).permute(0, 2, 1, 3, 4)
        self.nfe += passes * n
        out = out.float()
        if self.cfg:
            uncond, cond = out.chunk(2)
            return uncond + self.guidance_scale * (cond - uncond)
        return out

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t])

    def split(self, x: torch.Tensor, out: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps): the clean sample and the noise that the output predicts for x = sqrt(a)·x0 + sqrt(1-a)·eps."""
        a, s = alpha ** 0.5, (1 - alpha) ** 0.5
        if self.prediction_type == "epsilon":
            x0, eps = (x - s * out) / a, out
        elif self.prediction_type == "v_prediction":
            x0, eps = a * x - s * out, a * out + s * x
        elif self.prediction_type == "sample":
            x0, eps = out, (x - a * out) / s
        else:
            raise ValueError(f"expert {self.role}: prediction_type {self.prediction_type!r} is not supported")
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
            eps = (x - a * x0) / s
        return x0, eps

    @functools.cached_property
    def latent_space(self) -> str:
        """A fingerprint of the VAE (its class, config and weights): experts with equal ones share latents. A
        VAE loaded from another directory with the same weights shares them too."""
        vae = self.pipeline.vae
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}  # not _name_or_path
        digest = hashlib.sha1(f"{type(vae).__name__}{json.dumps(config, sort_keys=True, default=str)}".encode())
        for tensor in vae.state_dict().values():
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames (B, F, 3, H, W) in [-1, 1] -> latents (B, C, F, h, w): the posterior mean, scaled."""
        vae = self.pipeline.vae
        flat = pixels.flatten(0, 1).to(self.device, vae.dtype)
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in flat.split(DECODE_CHUNK)])
        latents = latents.float() * vae.config.scaling_factor
        return latents.unflatten(0, pixels.shape[:2]).permute(0, 2, 1, 3, 4)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F, h, w) -> frames (B, F, 3, H, W) in [-1, 1]."""
        vae = self.pipeline.vae
        flat = latents.permute(0, 2, 1, 3, 4).flatten(0, 1) / vae.config.scaling_factor
        frames = torch.cat([vae.decode(chunk.to(vae.dtype)).sample for chunk in flat.split(DECODE_CHUNK)])
        return frames.float().unflatten(0, latents.shape[:1] + latents.shape[2:3])

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        scale = 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)
        if height % scale or width % scale:
            raise ValueError(f"expert {self.role}: height and width must be multiples of {scale}")
        return 1, self.pipeline.unet.config.in_channels, frames, height // scale, width // scale
