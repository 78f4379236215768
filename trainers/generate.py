"""Generating a synthetic training set with a diffusion pipeline: the generation step of SAU's chain
(../shared/papers/methods_ssl.md section 8: GLIDE fills each long-tailed class up to the head count).

The pipeline comes from a local directory (`pipeline`):
- a diffusers pipeline saved with `save_pretrained` (it holds model_index.json): a text-to-image pipeline (its call
  takes `prompt`: Stable Diffusion, GLIDE-like, ...) is prompted with `prompt_template` filled with each class
  name, or with the prompts of `prompts_file` (JSON lines {"label": c, "prompt": "..."}; image i of class c takes
  the class's prompt i mod its count: the paper's 500 GPT-written prompts per class); a class-conditional one (its
  call takes `class_labels`: diffusers' DiTPipeline, or this project's trainers.ddpm.ClassConditionalPipeline) is
  given the class index;
- or a checkpoint of the `ddpm` method (a directory holding model.pt, e.g. `run:ddpm-digits`, which the orchestrator
  resolves to that run's latest complete checkpoint): its state rebuilds the pipeline (trainers.ddpm).

For each class in `classes`, `images_per_class` images are generated in shards of `shard_size` images. Every image
has its own seed, drawn from (seed, class, index) by numpy's SeedSequence and recorded with it, so any image can be
regenerated alone. The images are downsized with Lanczos to `output_size` when it is set (the paper's 32 px for
CIFAR), encoded as PNG (grayscale when the pipeline makes 1-channel images) and written as Parquet shards
`generated/class<c>-<k>.parquet` of the run directory with the provenance columns

    image (PNG bytes), label, class_name, prompt ("" for class labels), model, seed, num_inference_steps,
    guidance_scale (the values sampled with: the Config's, else the pipeline's defaults)

A shard is written whole or not at all, and a resumed run skips the shards that exist. `generated/manifest.json`,
written last, lists every shard with its row count: a training run that reads `data.generated` trusts only a
directory with a manifest. The manifest and a contact sheet (`generated/samples.png`, up to 8 images per class)
are logged to MLflow; the shards stay in the run directory (its `run_dir` tag says where).
"""

from __future__ import annotations

import inspect
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from trainers._common.contract import ConfigError, RunContext, TrainerSpec

OUT = "generated"
SHEET_PER_CLASS = 8


@dataclass
class Config:
    """Which pipeline generates how many images of which classes, and how it samples them."""

    pipeline: str = ""  # a diffusers pipeline directory, or a `ddpm` checkpoint (run:<name>, mlflow:<id>)
    classes: list[int] = field(default_factory=list)  # [] = every class of class_names, or of the pipeline
    class_names: list[str] = field(default_factory=list)  # index -> name; text-to-image pipelines need them
    prompt_template: str = "a photo of a {name}"  # text-to-image only
    prompts_file: str = ""  # text-to-image: JSON lines {"label", "prompt"} instead of the template
    images_per_class: int = 500  # the paper's CIFAR-100 fill: up to the head count of 500
    shard_size: int = 256
    batch_size: int = 64
    num_inference_steps: int | None = None  # None: the pipeline's default
    guidance_scale: float | None = None  # None: the pipeline's default (GLIDE in the paper: 3.0)
    output_size: int | None = None  # Lanczos-downsize to this square size (None: as generated)
    seed: int = 0


TINY = Config(images_per_class=4, shard_size=3, batch_size=2, num_inference_steps=2)


def check(cfg: Config) -> None:
    path = Path(cfg.pipeline)
    if not ((path / "model_index.json").is_file() or (path / "model.pt").is_file() or path.suffix == ".pt"):
        raise ConfigError("pipeline", "a diffusers pipeline directory (with model_index.json) or a checkpoint of the "
                          "ddpm method (a directory holding model.pt, run:<name> or mlflow:<run_id>)", cfg.pipeline)
    if cfg.images_per_class < 1 or cfg.shard_size < 1 or cfg.batch_size < 1:
        raise ConfigError("images_per_class", "images_per_class, shard_size and batch_size >= 1",
                          (cfg.images_per_class, cfg.shard_size, cfg.batch_size))
    if cfg.prompts_file and not Path(cfg.prompts_file).is_file():
        raise ConfigError("prompts_file", 'a JSON-lines file of {"label", "prompt"}', cfg.prompts_file)
    if any(c < 0 for c in cfg.classes) or (cfg.class_names and any(c >= len(cfg.class_names) for c in cfg.classes)):
        raise ConfigError("classes", f"class indices in 0..{len(cfg.class_names) - 1}", cfg.classes)


def load_pipeline(path: str) -> Any:
    """The pipeline of a diffusers directory (from_pretrained) or of a ddpm checkpoint (its model state)."""
    from trainers import ddpm

    directory = Path(path)
    if (directory / "model_index.json").is_file():
        index = json.loads((directory / "model_index.json").read_text())
        if index.get("_class_name") == ddpm.ClassConditionalPipeline.__name__:
            return ddpm.ClassConditionalPipeline.from_pretrained(directory)
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(directory)
    model = directory / "model.pt" if directory.is_dir() else directory
    return ddpm.pipeline_from_state(torch.load(model, map_location="cpu", weights_only=True))


def pipeline_kind(pipeline: Any) -> str:
    """"text" when the pipeline's call takes prompts, "class" when it takes class labels."""
    parameters = inspect.signature(pipeline.__call__).parameters
    if "class_labels" in parameters:
        return "class"
    if "prompt" in parameters:
        return "text"
    raise ValueError(f"pipeline {type(pipeline).__name__}: its call takes neither `prompt` nor `class_labels`")


def pipeline_classes(pipeline: Any) -> int:
    """How many classes a class-conditional pipeline knows (ours: num_class_embeds - 1, the last is the null
    class; DiT: its id2label)."""
    if getattr(pipeline, "labels", None):
        return len(pipeline.labels)
    return int(pipeline.unet.config.num_class_embeds) - 1


def class_count(cfg: Config, prompts: dict[int, list[str]], pipeline: Any) -> int:
    """How many classes "every class" means: the class names', else the prompts file's, else the pipeline's."""
    if cfg.class_names:
        return len(cfg.class_names)
    if prompts:
        return max(prompts) + 1
    return pipeline_classes(pipeline)


def image_seed(seed: int, label: int, index: int) -> int:
    """The seed of the image `index` of class `label`: independent of the shard layout and batch size."""
    return int(np.random.SeedSequence([seed, label, index]).generate_state(1, dtype=np.uint32)[0])


def to_png(image: np.ndarray, output_size: int | None) -> bytes:
    """A (H, W, C) float image in [0, 1] as PNG bytes (mode L for one channel), Lanczos-downsized if asked."""
    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")
    if output_size is not None and picture.size != (output_size, output_size):
        picture = picture.resize((output_size, output_size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def sampling_value(pipeline: Any, name: str, value: float | None) -> float | None:
    """The value the pipeline samples with: the Config's, else the pipeline's own default (its config, else its
    call's default), None when it has neither (recorded as 0 in the provenance columns)."""
    if value is not None:
        return value
    if name in getattr(pipeline, "config", {}):
        return pipeline.config[name]
    default = inspect.signature(pipeline.__call__).parameters.get(name)
    return None if default is None or default.default is inspect.Parameter.empty else default.default


def sample(pipeline: Any, kind: str, cfg: Config, label: int, seeds: list[int], prompts: list[str],
           device: torch.device) -> np.ndarray:
    """Images (N, H, W, C) in [0, 1] of class `label` (text: one prompt per image), one generator per image seeded
    with `seeds`."""
    kwargs: dict[str, Any] = {"generator": [torch.Generator(device).manual_seed(s) for s in seeds],
                              "output_type": "np"}
    for name in ("num_inference_steps", "guidance_scale"):
        if (value := getattr(cfg, name)) is not None:
            kwargs[name] = value
    if kind == "class":
        images = pipeline(class_labels=[label] * len(seeds), **kwargs).images
    else:
        images = pipeline(prompt=prompts, **kwargs).images
    images = np.asarray(images, dtype=np.float32)
    return images[..., None] if images.ndim == 3 else images


def load_prompts(path: str) -> dict[int, list[str]]:
    """A prompts file's prompts per class, in file order."""
    prompts: dict[int, list[str]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                prompts.setdefault(int(row["label"]), []).append(str(row["prompt"]))
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError("prompts_file", 'JSON lines {"label": <class>, "prompt": "<text>"}',
                                  f"{path} line {n}: {line[:80]} ({err})") from None
    return prompts


def prompt_of(cfg: Config, prompts: dict[int, list[str]], label: int, index: int) -> str:
    """The prompt of image `index` of class `label`: from the prompts file when given, else the template."""
    if prompts:
        return prompts[label][index % len(prompts[label])]
    return cfg.prompt_template.format(name=cfg.class_names[label])


def shard_name(label: int, k: int) -> str:
    return f"{OUT}/class{label:04d}-{k:05d}.parquet"


def generate_shard(pipeline: Any, kind: str, cfg: Config, prompts: dict[int, list[str]], label: int, indices: range,
                   device: torch.device, model: str) -> pa.Table:
    """The shard of class `label` holding images `indices`, generated in batches of cfg.batch_size."""
    seeds = [image_seed(cfg.seed, label, i) for i in indices]
    texts = [prompt_of(cfg, prompts, label, i) if kind == "text" else "" for i in indices]
    images = [to_png(image, cfg.output_size) for start in range(0, len(seeds), cfg.batch_size)
              for image in sample(pipeline, kind, cfg, label, seeds[start:start + cfg.batch_size],
                                  texts[start:start + cfg.batch_size], device)]
    n = len(seeds)
    steps = sampling_value(pipeline, "num_inference_steps", cfg.num_inference_steps) or 0
    scale = sampling_value(pipeline, "guidance_scale", cfg.guidance_scale) or 0.0
    return pa.table({
        "image": pa.array(images, pa.binary()),
        "label": pa.array([label] * n, pa.int64()),
        "class_name": [cfg.class_names[label] if cfg.class_names else str(label)] * n,
        "prompt": texts,
        "model": [model] * n,
        "seed": pa.array(seeds, pa.int64()),
        "num_inference_steps": pa.array([int(steps)] * n, pa.int64()),
        "guidance_scale": pa.array([float(scale)] * n, pa.float64()),
    })


def to_parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def contact_sheet(shards: dict[int, bytes]) -> bytes:
    """The first SHEET_PER_CLASS images of each class, one row per class, as a PNG."""
    rows = []
    for label in sorted(shards):
        table = pq.read_table(io.BytesIO(shards[label]), columns=["image"])
        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in table.column("image").to_pylist()]
        rows.append(pictures[:SHEET_PER_CLASS])
    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * SHEET_PER_CLASS, height * len(rows)))
    for r, pictures in enumerate(rows):
        for c, picture in enumerate(pictures):
            sheet.paste(picture, (c * width, r * height))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def run(cfg: Config, ctx: RunContext) -> dict[str, float]:
    pipeline = load_pipeline(cfg.pipeline)
    pipeline.to(ctx.device)
    pipeline.set_progress_bar_config(disable=True)
    kind = pipeline_kind(pipeline)
    prompts = load_prompts(cfg.prompts_file) if cfg.prompts_file else {}
    if kind == "text" and not (cfg.class_names or prompts):
        raise ConfigError("class_names", "the class names that fill prompt_template, or a prompts_file (a "
                          "text-to-image pipeline)", [])
    classes = cfg.classes or list(range(class_count(cfg, prompts, pipeline)))
    if unprompted := [c for c in classes if kind == "text" and prompts and c not in prompts]:
        raise ConfigError("prompts_file", "prompts for every generated class", f"none for classes {unprompted}")
    model = f"{type(pipeline).__name__}:{Path(cfg.pipeline).resolve()}"
    manifest: dict[str, Any] = {"pipeline": model, "kind": kind, "config": cfg.__dict__, "shards": []}
    first_shards: dict[int, bytes] = {}
    started, made = time.perf_counter(), 0
    for label in classes:
        for k, start in enumerate(range(0, cfg.images_per_class, cfg.shard_size)):
            indices = range(start, min(start + cfg.shard_size, cfg.images_per_class))
            name = shard_name(label, k)
            data = ctx.read_file(name)
            if data is None:
                data = to_parquet(generate_shard(pipeline, kind, cfg, prompts, label, indices, ctx.device, model))
                ctx.write_file(name, data)
                made += len(indices)
                elapsed = time.perf_counter() - started
                ctx.report({"generated_images": made, "images_per_s": made / elapsed}, step=made)
            first_shards.setdefault(label, data)
            manifest["shards"].append({"file": name.removeprefix(f"{OUT}/"), "label": label, "rows": len(indices)})
    text = json.dumps(manifest, indent=1).encode()
    ctx.write_file(f"{OUT}/manifest.json", text)
    ctx.log_artifact(f"{OUT}/manifest.json", text)
    ctx.log_artifact(f"{OUT}/samples.png", contact_sheet(first_shards))
    total = len(classes) * cfg.images_per_class
    return {"generated_images": float(total), "new_images": float(made)}


SPEC = TrainerSpec(
    name="generate",
    paper="synthetic training images from a diffusion pipeline (SAU's generation step, ICONIP 2024)",
    Config=Config,
    TINY=TINY,
    run=run,
    check=check,
    path_fields=("pipeline", "prompts_file"),
)
