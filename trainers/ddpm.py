"""A small class-conditional DDPM with classifier-free guidance: the orchestrator's own stand-in for SAU's generator.

Spec: ../shared/papers/methods_ssl.md section 8 (SAU fills the rare classes of a long-tailed set with images of a
large pre-trained generator, GLIDE: 100 sampling steps, guidance 3.0). So that the whole chain runs on a CPU with no
downloads, this method trains its own generator on the balanced data; a separate generation step loads it as a
diffusers pipeline (`pipeline_from_state`, or `ClassConditionalPipeline.from_pretrained` after `save_pretrained`).

Papers and code followed: DDPM (Ho, Jain, Abbeel; NeurIPS 2020; github.com/hojonathanho/diffusion) for the network,
the noise schedule and the loss; classifier-free guidance (Ho, Salimans; 2022) for the conditioning; DDIM (Song,
Meng, Ermon; ICLR 2021) for sampling; diffusers' UNet2DModel, DDPMScheduler, DDIMScheduler and DiTPipeline (whose
call signature ClassConditionalPipeline mirrors). Pixels x_0 in [-1, 1], t ~ U{0..T-1}, eps ~ N(0, I):

    x_t   = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                   (scheduler.add_noise)
    L     = || eps - eps_theta(x_t, t, c) ||^2   (mean over pixels and the batch; "simple" loss of DDPM)
    c     = the label y, replaced by the null class K (= num_classes) with probability p_uncond
    guided eps = eps_theta(x_t, t, K) + s (eps_theta(x_t, t, c) - eps_theta(x_t, t, K))   (s = 1 + w of the paper)

Symbol -> Config field:
    UNet widths per level (DDPM CIFAR-10: 128 x (1, 2, 2, 2))          -> block_out_channels
    residual blocks per level (2)                                    -> layers_per_block
    self-attention at the 16x16 level (index 1) and in the middle    -> attention_levels, mid_attention
    dropout (0.1 on CIFAR-10)                                        -> dropout
    GroupNorm groups (32)                                            -> norm_num_groups
    T = 1000, beta_1..beta_T linear from 1e-4 to 0.02                -> num_train_timesteps, beta_schedule, beta_*
    eps-prediction (DDPM; "v_prediction" as an option)               -> prediction_type
    p_uncond (0.1 or 0.2 in the CFG paper; 0.1 here)                 -> class_dropout
    EMA of the weights (0.9999 in DDPM)                              -> ema_decay
    sampling steps and guidance scale s (GLIDE in SAU: 100, 3.0)     -> num_inference_steps, guidance_scale
The optimizer lives in the experiment's `optim:` block (DDPM: Adam lr 2e-4, batch 128, 5000 warm-up steps, grad clip
1.0, 800k steps).

The module (`DDPM`) holds the trained UNet, its EMA copy (what eval and sampling use), the DDPMScheduler that noises
the training batches, the dataset's per-channel mean and std as buffers (the batches come normalised; the DDPM
trains on pixels: x_0 = 2 (x std + mean) - 1), and `pipeline_config`, a uint8 buffer holding the JSON of the UNet
config, the scheduler config and the sampling defaults: its state_dict (the orchestrator's model.pt) alone rebuilds
the pipeline, without the experiment file.

Sampler: DDIM (eta 0) built from the training schedule, with "trailing" timestep spacing (Lin et al. 2024) so that
the first step is t = T - 1, the step the sampler's pure noise matches. DDIM rather than DDPM's ancestral sampler
because it keeps its quality at 10-50 steps where the ancestral sampler needs hundreds (DDIM paper, Table 1), and
it is deterministic given the initial noise. Outputs are clipped to [-1, 1] at every step (clip_sample, as diffusers).

Differences from the official code, with reasons:
- diffusers' UNet2DModel instead of the TF UNet: the same layout (ResNet blocks with time embedding, attention
  at chosen levels and in the middle, GroupNorm, SiLU) but attention is single-head (attention_head_dim None),
  upsampling by nearest + conv as official, and the class embedding is added to the time embedding
  (diffusers' num_class_embeds; the CFG paper does not publish code).
- The EMA decay is warmed up as diffusers' EMAModel: decay_k = min(ema_decay, (1 + k) / (10 + k)), so that short
  runs (the digits file: a few thousand steps) do not average in the random initialisation.
- eval_step reports the EMA network's conditional loss at a fixed noise seed per batch, not a likelihood bound.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers._common.ema import ema_update, make_teacher


@dataclass
class Config:
    """DDPM's CIFAR-10 model and schedule, class-conditional with classifier-free guidance (module docstring)."""

    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)  # UNet width per resolution level
    layers_per_block: int = 2  # residual blocks per level
    attention_levels: tuple[int, ...] = (1,)  # levels (0 = full resolution) whose blocks get self-attention
    mid_attention: bool = True  # self-attention between the two middle residual blocks
    dropout: float = 0.1
    norm_num_groups: int = 32  # GroupNorm groups; divides every width
    num_train_timesteps: int = 1000  # T
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"  # squaredcos: improved DDPM
    beta_start: float = 1e-4  # beta_1 (linear schedules)
    beta_end: float = 0.02  # beta_T (linear schedules)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # what the UNet predicts
    class_dropout: float = 0.1  # p_uncond: probability of training on the null class instead of the label
    ema_decay: float = 0.9999  # EMA of the UNet weights (warmed up; module docstring)
    num_inference_steps: int = 50  # DDIM steps of the pipeline's default
    guidance_scale: float = 3.0  # s of the pipeline's default (1 = no guidance); GLIDE's 3.0 in SAU


TINY = Config(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, dropout=0.0, ema_decay=0.9,
              num_inference_steps=4)


# ---------------------------------------------------------------------------------------------- the module


class DDPM(nn.Module):
    """`unet` (trained), `ema_unet` (sampled from), `noise_scheduler` (not a module), mean/std and the pipeline config."""

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, mean: tuple[float, ...], std: tuple[float, ...],
                 sampling: dict[str, Any]):
        super().__init__()
        self.unet = unet
        self.ema_unet = make_teacher(unet)
        self.noise_scheduler = scheduler
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))  # (C,)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))  # (C,)
        config = {"unet": public(unet.config), "scheduler": public(scheduler.config), "sampling": sampling}
        self.register_buffer("pipeline_config", encode_json(config))  # (bytes,) uint8

    @property
    def null_class(self) -> int:
        return self.unet.config.num_class_embeds - 1


def build(cfg: Config, info: DataInfo) -> nn.Module:
    check_data(cfg, info)
    unet = UNet2DModel(**unet_config(cfg, info))
    scheduler = DDPMScheduler(**scheduler_config(cfg))
    sampling = {"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale}
    return DDPM(unet, scheduler, info.mean, info.std, sampling)


def unet_config(cfg: Config, info: DataInfo) -> dict[str, Any]:
    """UNet2DModel arguments: one level per width, attention where cfg says, num_classes + 1 class embeddings."""
    levels = range(len(cfg.block_out_channels))
    down = ["AttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    up = [name.replace("Down", "Up") for name in reversed(down)]
    return {
        "sample_size": info.image_size, "in_channels": info.in_channels, "out_channels": info.in_channels,
        "block_out_channels": tuple(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
        "down_block_types": tuple(down), "up_block_types": tuple(up), "add_attention": cfg.mid_attention,
        "attention_head_dim": None, "dropout": cfg.dropout, "norm_num_groups": cfg.norm_num_groups,
        "num_class_embeds": info.num_classes + 1,  # the last index is the null class of classifier-free guidance
    }


def scheduler_config(cfg: Config) -> dict[str, Any]:
    return {
        "num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": cfg.beta_schedule, "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end, "prediction_type": cfg.prediction_type, "clip_sample": True, "timestep_spacing": "trailing",
    }


def check(cfg: Config) -> None:
    levels = len(cfg.block_out_channels)
    if levels == 0 or min(cfg.block_out_channels) <= 0:
        raise ConfigError("block_out_channels", "one or more positive widths", cfg.block_out_channels)
    if any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
        raise ConfigError("block_out_channels", f"widths divisible by norm_num_groups = {cfg.norm_num_groups}",
                          cfg.block_out_channels)
    if any(not 0 <= i < levels for i in cfg.attention_levels):
        raise ConfigError("attention_levels", f"level indices in 0..{levels - 1}", cfg.attention_levels)
    if not 0 <= cfg.class_dropout < 1:
        raise ConfigError("class_dropout", "a probability in [0, 1)", cfg.class_dropout)
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError("ema_decay", "a decay in [0, 1)", cfg.ema_decay)
    if not 1 <= cfg.num_inference_steps <= cfg.num_train_timesteps:
        raise ConfigError("num_inference_steps", f"1..num_train_timesteps = {cfg.num_train_timesteps}",
                          cfg.num_inference_steps)
    if cfg.guidance_scale < 0:
        raise ConfigError("guidance_scale", "a scale >= 0 (1 = no guidance)", cfg.guidance_scale)


def check_data(cfg: Config, info: DataInfo) -> None:
    """What only the data can reject: the image size against the downsampling, and a missing normalisation."""
    factor = 2 ** (len(cfg.block_out_channels) - 1)  # every level but the last halves the resolution
    if info.image_size % factor:
        raise ValueError(f"ddpm: image_size {info.image_size} is not divisible by 2^(levels - 1) = {factor} "
                         f"(block_out_channels {cfg.block_out_channels})")
    if len(info.mean) != info.in_channels or len(info.std) != info.in_channels:
        raise ValueError(f"ddpm: the data's per-channel mean and std ({info.in_channels} channels) are needed to "
                         f"train on pixels, found mean {info.mean} std {info.std}")


# ---------------------------------------------------------------------------------------------- pure functions


def public(config: Any) -> dict[str, Any]:
    """A diffusers config without its private keys (_class_name, _use_default_values, ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def encode_json(obj: Any) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8)


def decode_json(buffer: torch.Tensor) -> Any:
    return json.loads(bytes(buffer.cpu().tolist()).decode())


def to_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised (B, C, S, S) -> pixels in [-1, 1]: 2 (x std + mean) - 1, mean/std (C,) on the 0..1 scale."""
    return 2 * (x * std[:, None, None] + mean[:, None, None]) - 1


def from_pixels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The inverse of to_pixels: [-1, 1] -> normalised."""
    return ((pixels + 1) / 2 - mean[:, None, None]) / std[:, None, None]


def drop_labels(y: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each label (B,) replaced by `null_class` with probability p (classifier-free guidance training)."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def diffusion_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, t)


def diffusion_loss(unet: UNet2DModel, scheduler: DDPMScheduler, x0: torch.Tensor, y: torch.Tensor,
                   noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the UNet's prediction at x_t: x0, noise (B, C, S, S) fp32 pixels, y and t (B,)."""
    x_t = scheduler.add_noise(x0, noise, t)  # sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
    prediction = unet(x_t, t, class_labels=y).sample  # (B, C, S, S)
    return F.mse_loss(prediction.float(), diffusion_target(scheduler, x0, noise, t))


def classifier_free_guidance(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """pred_uncond + s (pred_cond - pred_uncond): s = 1 is the conditional prediction, s = 0 the unconditional."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


# ---------------------------------------------------------------------------------------------- steps


def train_step(model: DDPM, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x0 = to_pixels(batch["x"].float(), model.mean, model.std)  # (B, C, S, S) in [-1, 1]
    y = drop_labels(batch["y"], cfg.class_dropout, model.null_class)  # (B,)
    noise = torch.randn_like(x0)
    t = torch.randint(0, cfg.num_train_timesteps, y.shape, device=y.device)  # (B,) uniform
    return diffusion_loss(model.unet, model.noise_scheduler, x0, y, noise, t), {}


def eval_step(model: DDPM, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """The EMA UNet's conditional loss, summed over the batch; the noise and timesteps are seeded by the batch's first
    index, so evaluation is deterministic."""
    x0 = to_pixels(batch["x"].float(), model.mean, model.std)
    y = batch["y"]
    generator = torch.Generator(device=x0.device).manual_seed(int(batch["idx"][0]))
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    t = torch.randint(0, cfg.num_train_timesteps, y.shape, device=y.device, generator=generator)
    loss = diffusion_loss(model.ema_unet, model.noise_scheduler, x0, y, noise, t)
    return {"loss": loss * y.numel(), "n": torch.tensor(y.numel(), device=y.device)}


def on_step_end(model: DDPM, cfg: Config, step: int) -> None:
    ema_update(model.ema_unet, model.unet, ema_momentum(cfg.ema_decay, step))


def ema_momentum(decay: float, step: int) -> float:
    """diffusers EMAModel's warm-up: min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step))


# ---------------------------------------------------------------------------------------------- the pipeline


class ClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional sampling with classifier-free guidance; the call signature of diffusers' DiTPipeline.

    The UNet's last class embedding is the null class. `guidance_scale` and `num_inference_steps` default to the
    values the pipeline was built with (the experiment's config), which save_pretrained keeps in model_index.json.
    """

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler, guidance_scale: float = Config.guidance_scale,
                 num_inference_steps: int = Config.num_inference_steps):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)

    @torch.no_grad()
    def __call__(self, class_labels: list[int], guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 num_inference_steps: int | None = None, output_type: str = "np",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Images of the given classes in [0, 1]: numpy (N, H, W, C) for "np", a tensor (N, C, H, W) for "pt",
        PIL images for "pil". guidance_scale 1 runs the conditional UNet alone."""
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self._execution_device)  # (N,)
        size, channels = self.unet.config.sample_size, self.unet.config.in_channels
        x = randn_tensor((len(labels), channels, size, size), generator=generator, device=self._execution_device,
                         dtype=self.unet.dtype)  # x_T
        self.scheduler.set_timesteps(steps, device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            prediction = self.guided_prediction(x, t, labels, scale)
            x = self.scheduler.step(prediction, t, x, generator=generator).prev_sample
        images = (x.float() / 2 + 0.5).clamp(0, 1)  # (N, C, H, W)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def guided_prediction(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
        """The UNet's output at (x_t, t) for `labels`, guided with the null class unless scale is 1."""
        if scale == 1:
            return self.unet(x, t, class_labels=labels).sample
        null = torch.full_like(labels, self.unet.config.num_class_embeds - 1)
        both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample  # (2N, C, H, W)
        pred_cond, pred_uncond = both.chunk(2)
        return classifier_free_guidance(pred_cond, pred_uncond, scale)


def pipeline_from_state(state: dict[str, torch.Tensor]) -> ClassConditionalPipeline:
    """The sampling pipeline of a DDPM module's state_dict (the orchestrator's model.pt): its EMA UNet and a DDIM
    scheduler on the training schedule, with the experiment's sampling defaults."""
    config = decode_json(state["pipeline_config"])
    unet = UNet2DModel.from_config(config["unet"])
    prefix = "ema_unet."
    unet.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    scheduler = DDIMScheduler.from_config(config["scheduler"])
    return ClassConditionalPipeline(unet.eval(), scheduler, **config["sampling"])


SPEC = TrainerSpec(
    name="ddpm",
    paper="DDPM (NeurIPS 2020) + classifier-free guidance; the generator of SAU (ICONIP 2024)",
    Config=Config,
    TINY=TINY,
    views="plain",
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    on_step_end=on_step_end,
    check=check,
)
