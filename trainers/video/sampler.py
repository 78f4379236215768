"""ConFiner's sampler (../shared/papers/methods_nas_gen_llm.md section 6): structure control by a few-step
expert, then coordinated denoising in which experts take turns within one DDIM trajectory; and ConFiner-Long's
windows for videos longer than an expert's clip.

**The handover.** A step of expert A at its timestep t_A predicts (x0, eps) for the current sample. The next step
belongs to expert B at its matched timestep t_B; the update writes x = sqrt(a_B) x0 + sqrt(1 - a_B) eps with B's
a_B = alpha_bar_B(t_B), i.e. DDIM (eta = 0) whose target level is read from B's schedule. So the clean sample
that B's schedule implies for the new x is exactly A's x0 ("timestep 0 as the hinge"), and with one expert the
sampler is that expert's DDIM sampler. Experts whose VAEs differ do not share latents: then x0 goes through
pixels (A decodes, B encodes) and B's sample is re-noised with fresh noise.

**The matching rule: equal noise level.** t_B is B's timestep whose log-SNR log(a/(1-a)) is nearest the
trajectory's level at that step. B's input is then noised as B was trained to see at t_B, whatever its
schedule; matching the fractional position t/T instead would hand B a sample noisier or cleaner than t_B says
when the two schedules differ. For experts with one schedule (SD-1.5, ModelScope and AnimateDiff all use the
scaled-linear betas 0.00085-0.012 over 1000 steps) the two rules agree. The trajectory's levels are the
reference expert's (the temporal expert's) DDIM timesteps, truncated at `strength` as SDEdit does.

**ConFiner-Long** (one latent of all frames, denoised in windows of `size` frames, `stride` apart):
- consistency initialisation: each window's initial noise is a permutation of the first window's frames (the
  block of frames that enters a window takes a shuffle of the block that left it), so every window starts from
  the same noise statistics and overlapping frames share their noise;
- coherence guidance: a frame covered by several windows takes (1 - w) times the prediction of the window whose
  centre is nearest plus w times the mean of all of them (w = `coherence`; 1 is the plain average, 0 a hard cut);
- staggered refinement: on odd steps the windows are shifted by stride // 2, so the seams between windows move
  from step to step (except at the video's two ends, where the windows are clamped into the video).
A frame-wise (image) expert needs no windows: it denoises the frames in chunks of `size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainers.video.experts import Expert


@dataclass(frozen=True)
class Layout:
    """How a video of `frames` frames is cut into windows of `size` frames, `stride` apart."""

    frames: int
    size: int
    stride: int
    staggered: bool = True
    coherence: float = 1.0
    window_batch: int = 4  # windows per denoiser call

    def starts(self, step: int) -> list[int]:
        """The first frames of the windows on `step` (odd steps shifted by stride // 2 when staggered)."""
        if self.frames <= self.size:
            return [0]
        offset = (step % 2) * (self.stride // 2) if self.staggered else 0
        return sorted({min(max(s, 0), self.frames - self.size) for s in range(offset - self.stride, self.frames,
                                                                             self.stride)})


@dataclass(frozen=True)
class Step:
    """One denoising step: which expert, at its timestep t, on a sample at its level alpha = alpha_bar(t), and the
    level the update targets (the next step's expert's alpha at its matched timestep, or the final level)."""

    expert: int
    t: int
    alpha: float
    alpha_next: float


def fuse(parts: list[torch.Tensor], starts: list[int], frames: int, coherence: float) -> torch.Tensor:
    """Window predictions parts[i] (B, C, size, h, w) starting at starts[i] -> (B, C, frames, h, w): coherence
    guidance over the frames that several windows cover."""
    size = parts[0].shape[2]
    total = parts[0].new_zeros(parts[0].shape[:2] + (frames,) + parts[0].shape[3:])
    count = parts[0].new_zeros(frames)
    for part, start in zip(parts, starts):
        total[:, :, start:start + size] += part
        count[start:start + size] += 1
    mean = total / count.view(1, 1, -1, 1, 1)
    centres = torch.tensor([s + (size - 1) / 2 for s in starts])
    owner = (torch.arange(frames)[:, None] - centres[None]).abs().argmin(dim=1)  # (frames,): nearest window
    own = torch.stack([parts[int(w)][:, :, f - starts[int(w)]] for f, w in enumerate(owner)], dim=2)
    return (1 - coherence) * own + coherence * mean


def windowed_output(expert: Expert, x: torch.Tensor, t: float | torch.Tensor, text: torch.Tensor, layout: Layout,
                    step: int) -> torch.Tensor:
    """The expert's output for the whole video x (B, C, F, h, w): a clip expert over the step's windows (fused),
    a frame-wise expert over chunks of layout.size frames."""
    if not expert.video:
        return torch.cat([expert.model_output(x[:, :, s:s + layout.size], t, text)
                          for s in range(0, x.shape[2], layout.size)], dim=2)
    starts = layout.starts(step)
    parts: list[torch.Tensor] = []
    for first in range(0, len(starts), layout.window_batch):
        group = starts[first:first + layout.window_batch]
        clips = torch.cat([x[:, :, s:s + layout.size] for s in group])  # (len(group)·B, C, size, h, w)
        parts.extend(expert.model_output(clips, t, text).split(x.shape[0]))
    return fuse(parts, starts, x.shape[2], layout.coherence)


def initial_noise(shape: tuple[int, ...], layout: Layout, consistent: bool, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise (B, C, F, h, w); with `consistent`, frames past the first window repeat a shuffle of the
    block of frames `size` earlier (each window's noise is then a permutation of the first window's)."""
    frames = shape[2]
    if not consistent or frames <= layout.size:
        return torch.randn(shape, generator=generator)
    noise = torch.randn(shape[:2] + (layout.size,) + shape[3:], generator=generator)
    for start in range(layout.size, frames, layout.stride):
        n = min(layout.stride, frames - start)
        left = torch.arange(start - layout.size, start - layout.size + n)
        block = noise[:, :, left[torch.randperm(n, generator=generator)]]
        noise = torch.cat([noise, block], dim=2)
    return noise


def ddim_timesteps(scheduler_config: dict, steps: int, strength: float) -> tuple[list[int], float]:
    """The timesteps that DDIM with `steps` steps visits when started at `strength` (1: from pure noise; SDEdit
    runs the last int(steps·strength) of them), and its final level (alpha_bar(0), or 1 with set_alpha_to_one)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    run = min(int(steps * strength), steps)
    return [int(t) for t in scheduler.timesteps[steps - run:]], float(scheduler.final_alpha_cumprod)


def match_timestep(alphas_cumprod: torch.Tensor, level: float) -> int:
    """The timestep of a schedule whose noise level is nearest `level` in log-SNR."""
    snr = torch.log(alphas_cumprod / (1 - alphas_cumprod))
    return int((snr - math.log(level / (1 - level))).abs().argmin())


def plan(experts: list[Expert], allocation: list[int], reference: Expert, timesteps: list[int],
         final_alpha: float) -> list[Step]:
    """The coordinated trajectory: step k at the reference's level alpha_ref(timesteps[k]) is taken by expert
    allocation[k mod len] at its matched timestep."""
    chosen = [allocation[k % len(allocation)] for k in range(len(timesteps))]
    matched = [match_timestep(experts[e].alphas_cumprod, reference.alpha(t)) for e, t in zip(chosen, timesteps)]
    alphas = [experts[e].alpha(t) for e, t in zip(chosen, matched)]
    return [Step(e, t, a, alphas[k + 1] if k + 1 < len(alphas) else final_alpha)
            for k, (e, t, a) in enumerate(zip(chosen, matched, alphas))]


def control_stage(expert: Expert, noise: torch.Tensor, text: torch.Tensor, steps: int, layout: Layout) -> torch.Tensor:
    """The control expert's own sampler (its scheduler, `steps` steps) from `noise`: the structure latents."""
    scheduler = type(expert.pipeline.scheduler).from_config(expert.pipeline.scheduler.config)
    scheduler.set_timesteps(steps, device=expert.device)
    x = noise.to(expert.device) * scheduler.init_noise_sigma
    for k, t in enumerate(scheduler.timesteps):
        out = windowed_output(expert, scheduler.scale_model_input(x, t), t, text, layout, k)
        x = scheduler.step(out, t, x).prev_sample
    return x


Trace = Callable[[int, Step, torch.Tensor, torch.Tensor], None]


def coordinated_denoising(experts: list[Expert], texts: list[torch.Tensor], steps: list[Step], x: torch.Tensor,
                          layout: Layout, generator: torch.Generator, trace: Trace | None = None) -> torch.Tensor:
    """Run `steps` from x (at steps[0]'s level, in its expert's latent space); returns the sample at the final
    level, in the last step's expert's latent space. `trace(k, step, x0, x_next)` sees each step's clean estimate
    (in its expert's latent space) and the sample it hands on."""
    spaces = [e.latent_space for e in experts]
    for k, step in enumerate(steps):
        expert = experts[step.expert]
        out = windowed_output(expert, x, step.t, texts[step.expert], layout, k)
        x0, eps = expert.split(x, out, step.alpha)
        handed = x0
        if k + 1 < len(steps) and spaces[steps[k + 1].expert] != spaces[step.expert]:
            successor = experts[steps[k + 1].expert]
            handed = successor.encode(expert.decode(x0))
            eps = torch.randn(handed.shape, generator=generator).to(handed.device)
        x = step.alpha_next ** 0.5 * handed + (1 - step.alpha_next) ** 0.5 * eps
        if trace is not None:
            trace(k, step, x0, x)
    return x
