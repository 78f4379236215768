"""ConFiner: training-free video generation with a chain of diffusion experts (Li et al., arXiv 2408.13423;
../shared/papers/methods_nas_gen_llm.md section 6), and the batch job that runs it over a prompt set.

The chain (trainers/video/sampler.py has the sampler and its rules):
1. structure control: the control expert (a text-to-video pipeline; the paper's choice is AnimateDiff-Lightning)
   samples the video in `control_steps` steps with its own scheduler;
2. the structure latents are noised to the level where refinement starts (SDEdit: DDIM with `refine_steps`
   steps on the temporal expert's schedule runs its last int(refine_steps x strength) steps);
3. coordinated denoising: the spatial expert (text-to-image, frame by frame) and the temporal expert
   (text-to-video) take the steps in the order `allocation` (cycled), handing the sample over through its
   predicted clean video at matched noise levels.
Videos longer than `segment_frames` are ConFiner-Long: windows of `segment_frames` frames overlapping by
`overlap`, with consistency initialisation, coherence guidance and staggered refinement.

The job: each prompt of `prompts` and `prompts_file` (text: one prompt per line; .jsonl: {"prompt": ...} per
line) gets `videos_per_prompt` videos, each with its own seed drawn from (seed, prompt, video). Video <id> is
written to the run directory as `videos/<id>/video.mp4`, `sheet.png` (a contact sheet of `sheet_frames` frames),
`frames/NNNN.png` (with `save_frames`) and `result.json` (prompt, seed, experts, cost, metrics), the last written
last: a video with a result is done, and a resumed run skips it. Its metrics are logged as `video/<metric>` at
step = its index; the run's `<metric>` values are the means over all videos. Under Ray with `resources.workers` > 1 each
worker takes every workers-th video (one prompt shard per GPU); a last pass gathers the results into
`summary.json` and `samples.png`. Each video's files and metrics go to MLflow as it finishes.

Cost: `nfe` counts network evaluations per video (trainers/video/experts.py); `baseline_nfe` is what the
temporal expert alone spends sampling the same video with DDIM in `baseline_steps` steps (the paper compares
against such a T2V model's own sampling), and `cost_ratio` = nfe / baseline_nfe. With `baseline` the job also
samples that baseline video and scores it (`baseline_*` metrics).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers._common.contract import ConfigError, RunContext, TrainerSpec
from trainers.generate import image_seed
from trainers.video import media, metrics, sampler
from trainers.video.experts import Expert, check_directory

ROLES = ("control", "spatial", "temporal")
REFINERS = ("spatial", "temporal")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SUMMARY_ROWS = 16  # videos on the run's contact sheet


@dataclass
class Config:
    """The experts, the chain's schedule, ConFiner-Long's windows, and the prompt set."""

    control: str = ""  # text-to-video pipeline directory (paper: AnimateDiff-Lightning), or tiny://animatediff
    spatial: str = ""  # text-to-image pipeline directory (SD-1.5), or tiny://text_to_image
    temporal: str = ""  # text-to-video pipeline directory (ModelScope T2V), or tiny://text_to_video
    control_steps: int = 4  # AnimateDiff-Lightning's 4-step distillation
    control_guidance: float = 1.0  # Lightning samples without classifier-free guidance
    spatial_guidance: float = 7.5
    temporal_guidance: float = 9.0
    refine_steps: int = 10  # DDIM steps of the full refinement schedule
    strength: float = 0.5  # refinement runs the last int(refine_steps x strength) of them
    allocation: list[str] = field(default_factory=lambda: ["temporal", "spatial"])  # cycled over the steps
    prompts: list[str] = field(default_factory=list)
    prompts_file: str = ""
    negative_prompt: str = ""
    videos_per_prompt: int = 1
    height: int = 512
    width: int = 512
    frames: int = 16
    segment_frames: int = 16  # an expert's clip length
    overlap: int = 8  # frames shared by adjacent windows (ConFiner-Long)
    consistency_init: bool = True
    coherence: float = 1.0  # coherence guidance weight on shared frames (0: hard cut, 1: average)
    staggered: bool = True
    window_batch: int = 4
    baseline: bool = False  # also sample and score the temporal expert alone
    baseline_steps: int = 50
    fps: int = 8
    save_frames: bool = False
    sheet_frames: int = 8
    clip_model: str = ""  # a local CLIP model directory: CLIP score and CLIP-feature consistency
    dtype: str = "float32"  # float16 / bfloat16 on GPUs
    seed: int = 0


TINY = Config(control="tiny://animatediff", spatial="tiny://text_to_image", temporal="tiny://text_to_video",
              control_steps=2, refine_steps=4, prompts=["a red ball"], height=16, width=16, frames=4,
              segment_frames=4, overlap=2, baseline_steps=4, sheet_frames=4)


def check(cfg: Config) -> None:
    for role in ROLES:
        if (problem := check_directory(getattr(cfg, role))) is not None:
            raise ConfigError(role, problem, getattr(cfg, role))
    if not cfg.allocation or any(a not in REFINERS for a in cfg.allocation):
        raise ConfigError("allocation", f"a non-empty list of {' and '.join(REFINERS)}", cfg.allocation)
    if not 0 < cfg.strength <= 1 or int(cfg.refine_steps * cfg.strength) < 1:
        raise ConfigError("strength", "0 < strength <= 1 with int(refine_steps x strength) >= 1 refinement steps",
                          cfg.strength)
    if not 0 <= cfg.overlap < cfg.segment_frames:
        raise ConfigError("overlap", f"0 <= overlap < segment_frames = {cfg.segment_frames}", cfg.overlap)
    if not 0 <= cfg.coherence <= 1:
        raise ConfigError("coherence", "a weight in [0, 1]", cfg.coherence)
    if min(cfg.frames, cfg.control_steps, cfg.videos_per_prompt, cfg.window_batch, cfg.baseline_steps) < 1:
        raise ConfigError("frames", "frames, control_steps, videos_per_prompt, window_batch, baseline_steps >= 1",
                          (cfg.frames, cfg.control_steps, cfg.videos_per_prompt, cfg.window_batch, cfg.baseline_steps))
    if cfg.dtype not in DTYPES:
        raise ConfigError("dtype", f"one of {', '.join(DTYPES)}", cfg.dtype)
    if cfg.prompts_file and not Path(cfg.prompts_file).is_file():
        raise ConfigError("prompts_file", "a text file (one prompt per line) or JSON lines {\"prompt\": ...}",
                          cfg.prompts_file)
    if not cfg.prompts and not cfg.prompts_file:
        raise ConfigError("prompts", "prompts, or a prompts_file", [])
    if cfg.clip_model and not (Path(cfg.clip_model) / "config.json").is_file():
        raise ConfigError("clip_model", "a CLIP model directory (holding config.json)", cfg.clip_model)


def load_prompts(cfg: Config) -> list[str]:
    """The Config's prompts, then the file's (a .jsonl file's "prompt" fields, else its non-empty lines)."""
    prompts = list(cfg.prompts)
    if not cfg.prompts_file:
        return prompts
    lines = [(n, line) for n, line in enumerate(Path(cfg.prompts_file).read_text().splitlines(), 1) if line.strip()]
    if not cfg.prompts_file.endswith(".jsonl"):
        return prompts + [line.strip() for _, line in lines]
    for n, line in lines:
        try:
            prompts.append(str(json.loads(line)["prompt"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError("prompts_file", 'JSON lines {"prompt": "<text>"}',
                              f"{cfg.prompts_file} line {n}: {line[:80]} ({err})") from None
    return prompts


def layout(cfg: Config) -> sampler.Layout:
    return sampler.Layout(cfg.frames, cfg.segment_frames, cfg.segment_frames - cfg.overlap, cfg.staggered,
                          cfg.coherence, cfg.window_batch)


class Chain:
    """The three experts, loaded once, and the sampling of one video."""

    def __init__(self, cfg: Config, device: torch.device):
        dtype = DTYPES[cfg.dtype]
        self.cfg, self.layout = cfg, layout(cfg)
        self.experts = {role: Expert.load(role, getattr(cfg, role), getattr(cfg, f"{role}_guidance"), device, dtype)
                        for role in ROLES}

    def names(self) -> dict[str, str]:
        return {role: expert.name for role, expert in self.experts.items()}

    def refine_plan(self) -> tuple[list[Expert], list[sampler.Step]]:
        cfg, temporal = self.cfg, self.experts["temporal"]
        refiners = [self.experts[role] for role in REFINERS]
        timesteps, final = sampler.ddim_timesteps(temporal.pipeline.scheduler.config, cfg.refine_steps, cfg.strength)
        steps = sampler.plan(refiners, [REFINERS.index(a) for a in cfg.allocation], temporal, timesteps, final)
        return refiners, steps

    @torch.no_grad()
    def confiner(self, prompt: str, seed: int) -> tuple[torch.Tensor, int]:
        """Frames (F, 3, H, W) in [-1, 1] and the network evaluations spent."""
        cfg, control = self.cfg, self.experts["control"]
        generator = torch.Generator().manual_seed(seed)
        for expert in self.experts.values():
            expert.nfe = 0
        shape = control.latent_shape(cfg.frames, cfg.height, cfg.width)
        noise = sampler.initial_noise(shape, self.layout, cfg.consistency_init, generator)
        text = control.text(prompt, cfg.negative_prompt)
        structure = sampler.control_stage(control, noise, text, cfg.control_steps, self.layout)
        refiners, steps = self.refine_plan()
        first = refiners[steps[0].expert]
        if first.latent_space != control.latent_space:
            structure = first.encode(control.decode(structure))
        fresh = sampler.initial_noise(tuple(structure.shape), self.layout, cfg.consistency_init, generator)
        x = steps[0].alpha ** 0.5 * structure + (1 - steps[0].alpha) ** 0.5 * fresh.to(structure.device)
        texts = [expert.text(prompt, cfg.negative_prompt) for expert in refiners]
        x = sampler.coordinated_denoising(refiners, texts, steps, x, self.layout, generator)
        frames = refiners[steps[-1].expert].decode(x)[0]
        return frames, sum(expert.nfe for expert in self.experts.values())

    @torch.no_grad()
    def baseline(self, prompt: str, seed: int) -> tuple[torch.Tensor, int]:
        """The temporal expert alone: DDIM from noise in `baseline_steps` steps (over the same windows)."""
        cfg, temporal = self.cfg, self.experts["temporal"]
        generator = torch.Generator().manual_seed(seed)
        temporal.nfe = 0
        noise = sampler.initial_noise(temporal.latent_shape(cfg.frames, cfg.height, cfg.width), self.layout,
                                      cfg.consistency_init, generator).to(temporal.device)
        timesteps, final = sampler.ddim_timesteps(temporal.pipeline.scheduler.config, cfg.baseline_steps, 1.0)
        steps = sampler.plan([temporal], [0], temporal, timesteps, final)
        texts = [temporal.text(prompt, cfg.negative_prompt)]
        x = sampler.coordinated_denoising([temporal], texts, steps, noise, self.layout, generator)
        return temporal.decode(x)[0], temporal.nfe

    def baseline_nfe(self) -> int:
        """Evaluations of the baseline: baseline_steps passes over each step's windows, doubled under guidance."""
        temporal = self.experts["temporal"]
        passes = 2 if temporal.cfg else 1
        return passes * sum(len(self.layout.starts(k)) for k in range(self.cfg.baseline_steps))


def to_unit(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] -> (F, H, W, 3) in [0, 1]."""
    return ((frames.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def timed(sample: Any, prompt: str, seed: int) -> tuple[np.ndarray, int, float]:
    started = time.perf_counter()
    frames, nfe = sample(prompt, seed)
    return to_unit(frames), nfe, time.perf_counter() - started


def make_video(chain: Chain, clip: Any, cfg: Config, job: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Sample, score and write video `job["id"]`; returns its result (written last)."""
    frames, nfe, seconds = timed(chain.confiner, job["prompt"], job["seed"])
    baseline_nfe = chain.baseline_nfe()
    result = {**job, "experts": chain.names(), "frames": cfg.frames, "nfe": nfe, "baseline_nfe": baseline_nfe,
              "cost_ratio": nfe / baseline_nfe, "seconds": seconds,
              **metrics.video_metrics(frames, job["prompt"], clip)}
    pixels = media.to_uint8(frames)
    folder = f"videos/{job['id']}"
    files = {f"{folder}/video.mp4": media.mp4(pixels, cfg.fps),
             f"{folder}/sheet.png": media.contact_sheet([media.sheet_frames(pixels, cfg.sheet_frames)])}
    if cfg.save_frames:
        files.update({f"{folder}/frames/{i:04d}.png": media.png(frame) for i, frame in enumerate(pixels)})
    if cfg.baseline:
        base, base_nfe, base_seconds = timed(chain.baseline, job["prompt"], job["seed"])
        scores = metrics.video_metrics(base, job["prompt"], clip)
        result.update({"baseline_measured_nfe": base_nfe, "baseline_seconds": base_seconds,
                       **{f"baseline_{k}": v for k, v in scores.items()}})
        files[f"{folder}/baseline.mp4"] = media.mp4(media.to_uint8(base), cfg.fps)
    files[f"{folder}/result.json"] = json.dumps(result, indent=1).encode()
    for name, data in files.items():
        ctx.write_file(name, data)
        if "/frames/" not in name:
            ctx.log_artifact(name, data)
    return result


def jobs_of(cfg: Config) -> list[dict[str, Any]]:
    """Every video of the job: its id, prompt and seed."""
    return [{"id": f"p{p:04d}-v{v}", "prompt": prompt, "seed": image_seed(cfg.seed, p, v)}
            for p, prompt in enumerate(load_prompts(cfg)) for v in range(cfg.videos_per_prompt)]


NUMERIC = ("nfe", "baseline_nfe", "cost_ratio", "seconds", "temporal_consistency", "motion_smoothness",
           "clip_score", "baseline_seconds", "baseline_temporal_consistency", "baseline_motion_smoothness",
           "baseline_clip_score")


def summarize(cfg: Config, results: list[dict[str, Any]], ctx: RunContext) -> dict[str, float]:
    """Means over the videos, `summary.json` (every result) and `samples.png` (one row per video)."""
    means = {key: float(np.mean([r[key] for r in results])) for key in NUMERIC if key in results[0]}
    summary = json.dumps({"config": asdict(cfg), "means": means, "videos": results}, indent=1).encode()
    ctx.write_file("summary.json", summary)
    ctx.log_artifact("summary.json", summary)
    sheets = [ctx.read_file(f"videos/{r['id']}/sheet.png") for r in results[:SUMMARY_ROWS]]
    ctx.log_artifact("samples.png", media.stack(sheets))
    summary_metrics = {"videos": float(len(results)), **means}
    ctx.report(summary_metrics, step=len(results))
    return summary_metrics


def run(cfg: Config, ctx: RunContext) -> dict[str, float]:
    jobs = jobs_of(cfg)
    rank, world = ctx.rank, ctx.world_size
    chain = clip = None
    made = 0
    for index, job in enumerate(jobs):
        if index % world != rank or ctx.read_file(f"videos/{job['id']}/result.json") is not None:
            continue
        if chain is None:
            chain = Chain(cfg, ctx.device)
            clip = metrics.Clip(cfg.clip_model, ctx.device) if cfg.clip_model else None
        result = make_video(chain, clip, cfg, job, ctx)
        made += 1
        ctx.report({f"video/{k}": float(result[k]) for k in NUMERIC if k in result}, step=index)
    if world > 1:
        return {"new_videos": float(made)}
    results = [json.loads(ctx.read_file(f"videos/{job['id']}/result.json")) for job in jobs]
    return {**summarize(cfg, results, ctx), "new_videos": float(made)}


SPEC = TrainerSpec(
    name="confiner",
    paper="ConFiner: training-free video generation with a chain of diffusion experts (arXiv 2408.13423)",
    Config=Config,
    TINY=TINY,
    run=run,
    check=check,
    path_fields=("control", "spatial", "temporal", "prompts_file", "clip_model"),
    sharded=True,
)
