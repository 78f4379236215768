"""Long-tailed data: generated images joining the training set (data.generated), the generate method that writes
them, and class re-weighting."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from orchestrator import references
from orchestrator import spec as spec_mod
from orchestrator.data import build_data, generated
from orchestrator.data.sources import DataFileError, load_source
from orchestrator.method_run import MethodContext
from orchestrator.spec import DataSpec, SpecError

LT = {"dataset": "digits", "image_size": 16, "imbalance_factor": 10.0, "loader_workers": 0}


def png(value: int, size: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, per_class: int, classes: range = range(10), size: int = 16, manifest: bool = True,
                 mode: str = "L") -> None:
    """One shard per class named as the generate method names them; pixel value 200 + class."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for c in classes:
        name = f"class{c:04d}-00000.parquet"
        table = pa.table({"image": pa.array([png(200 + c, size, mode)] * per_class, pa.binary()),
                          "label": pa.array([c] * per_class, pa.int64())})
        pq.write_table(table, folder / name)
        shards.append({"file": name, "label": c, "rows": per_class})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"shards": shards}))


def test_generated_images_fill_every_class_up_to_the_head_count(tmp_path: Path) -> None:
    write_shards(tmp_path / "gen", per_class=200)
    real = build_data(DataSpec(**LT), seed=0, views="plain")
    mixed = build_data(DataSpec(**LT, generated=str(tmp_path / "gen")), seed=0, views="sau")
    counts = np.asarray(real.info.class_counts)
    assert counts[0] > counts[-1] and mixed.info.class_counts == real.info.class_counts  # real counts only
    assert len(mixed.train) == len(real.train) + int((counts.max() - counts).sum()) == 10 * counts.max()
    labels = np.asarray([int(mixed.train.pool.labels[j]) for j in range(len(mixed.train))])
    assert np.bincount(labels).tolist() == [counts.max()] * 10
    syn = mixed.train.is_syn
    assert not syn[: len(real.train)].any() and syn[len(real.train):].all()
    record = mixed.artifacts["split.json"]["generated"]
    assert record["class_counts"] == {str(c): int(counts.max() - counts[c]) for c in range(10)}
    assert record["available"] == 2000
    everything = build_data(DataSpec(**LT, generated=str(tmp_path / "gen"), generated_fill="all"), 0, "plain")
    assert len(everything.train) == len(real.train) + 2000


def test_a_generated_image_is_decoded_like_the_real_ones(tmp_path: Path) -> None:
    """RGB PNGs of 32 px join 1-channel digits trained at 16 px: grayscale, Lanczos-resized to 16 px (not through the
    native 8 px), then augmented alike."""
    write_shards(tmp_path / "gen", per_class=200, size=32, mode="RGB")
    bundle = build_data(DataSpec(**LT, generated=str(tmp_path / "gen")), seed=0, views="sau")
    last = len(bundle.train) - 1
    raw = bundle.train.pool.image(last)
    assert raw.shape == (1, 16, 16) and raw.dtype == torch.uint8
    item = bundle.train[last]
    assert item["is_syn"].item() is True and item["y"].item() == bundle.train.pool.labels[last]
    shapes = {k: tuple(v.shape) for k, v in item.items() if k.startswith("x")}
    assert shapes == {f"x{k}": (1, 16, 16) for k in (1, 2, 3)}
    assert bundle.train[0]["is_syn"].item() is False


def test_a_folder_without_manifest_is_read_unless_it_is_an_unfinished_generation(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    pq.write_table(pa.table({"image": pa.array([png(9, 8)] * 3, pa.binary()), "label": [9, 9, 9]}), mine / "a.parquet")
    assert generated.load(mine, load_source(DataSpec(**LT)), 16).labels.tolist() == [9, 9, 9]
    write_shards(tmp_path / "half", per_class=2, manifest=False)
    with pytest.raises(DataFileError, match="no manifest.json: the run did not finish"):
        generated.check(tmp_path / "half")
    write_shards(tmp_path / "gen", per_class=2)
    (tmp_path / "gen" / "class0003-00000.parquet").unlink()
    with pytest.raises(DataFileError, match="lists shards that are missing: .*class0003-00000.parquet"):
        generated.check(tmp_path / "gen")


def test_generated_labels_outside_the_dataset_are_refused(tmp_path: Path) -> None:
    write_shards(tmp_path / "gen", per_class=2, classes=range(9, 12))
    with pytest.raises(DataFileError, match=r"labels must be in 0\.\.9 .*found 9\.\.11"):
        build_data(DataSpec(**LT, generated=str(tmp_path / "gen")), seed=0, views="plain")


def test_data_generated_references_a_finished_generate_run(tmp_path: Path) -> None:
    base = tmp_path / "sau.yaml"
    base.write_text("name: sau\nmethod: supervised\ndata: {dataset: digits, generated: 'run:gen'}\n"
                    "config: {arch: small_cnn}\noptim: {steps: 2, batch_size: 4}\n")
    with pytest.raises(SpecError, match=r"data\.generated: expected a generate run that finished"):
        references.resolve(spec_mod.load(base, [f"storage_path={tmp_path}"]), base)
    write_shards(tmp_path / "gen" / "generated", per_class=2)
    (tmp_path / "gen" / "mlflow_run.json").write_text(json.dumps({"run_id": "abc123"}))
    spec = references.resolve(spec_mod.load(base, [f"storage_path={tmp_path}"]), base)
    assert spec.data.generated == str(tmp_path / "gen" / "generated")
    assert spec.tracking.tags["source.data.generated"] == "abc123" == spec.tracking.tags["mlflow.parentRunId"]


def test_generated_data_needs_a_fully_labeled_set() -> None:
    with pytest.raises(ValueError, match="`generated` images join a fully labeled training set"):
        DataSpec(dataset="digits", labeled_per_class=2, generated="x")


def test_class_weights_by_hand() -> None:
    from trainers.supervised import class_weights

    inverse = class_weights((100, 10, 1), "inverse", 0.9999)
    assert torch.allclose(inverse, torch.tensor([1 / 100, 1 / 10, 1.0]) * 3 / (1 / 100 + 1 / 10 + 1))
    beta = 0.9
    effective = torch.tensor([(1 - beta) / (1 - beta**n) for n in (100, 10, 1)])
    assert torch.allclose(class_weights((100, 10, 1), "effective_number", beta), effective * 3 / effective.sum())
    assert torch.allclose(class_weights((5, 5), "inverse", 0.9), torch.ones(2))


def test_weighted_cross_entropy_counts_a_tail_error_more() -> None:
    from trainers import supervised
    from trainers._common.contract import DataInfo

    info = DataInfo(num_classes=2, image_size=8, in_channels=1, num_train=11, num_labeled=11, class_counts=(10, 1))
    cfg = supervised.Config(arch="small_cnn", class_weighting="inverse")
    model = supervised.build(cfg, info)
    assert torch.allclose(model.class_weights, torch.tensor([2 / 11, 20 / 11]))
    batch = {"x": torch.randn(4, 1, 8, 8), "y": torch.tensor([0, 1, 1, 0])}
    loss, _ = supervised.train_step(model, batch, cfg, 0)
    logits = model(batch["x"])
    expected = torch.nn.functional.cross_entropy(logits, batch["y"], weight=model.class_weights)
    unweighted = torch.nn.functional.cross_entropy(logits, batch["y"])
    assert torch.allclose(loss, expected) and not torch.allclose(loss, unweighted)


# ---------------------------------------------------------------------------------------------- the generate method


def tiny_ddpm_state() -> dict[str, torch.Tensor]:
    from trainers import ddpm
    from trainers._common.contract import DataInfo

    torch.manual_seed(0)
    info = DataInfo(num_classes=3, image_size=8, in_channels=1, num_train=9, num_labeled=9, mean=(0.3,), std=(0.2,))
    return ddpm.build(ddpm.TINY, info).state_dict()


def generate_in(run_root: Path, **config) -> tuple[dict[str, float], MethodContext]:
    from orchestrator.storage import RunDir
    from trainers import generate

    ctx = MethodContext(RunDir(str(run_root), "gen"), logger=None)
    cfg = generate.Config(**{"images_per_class": 5, "shard_size": 2, "batch_size": 2, "num_inference_steps": 2,
                             "seed": 7, **config})
    generate.check(cfg)
    return generate.run(cfg, ctx), ctx


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A randomly initialised class-conditional pipeline saved with save_pretrained (the user's directory)."""
    from trainers import ddpm

    folder = tmp_path_factory.mktemp("pipeline")
    ddpm.pipeline_from_state(tiny_ddpm_state()).save_pretrained(folder)
    return folder


def test_generate_writes_shards_with_provenance_that_regenerate_each_image(tmp_path: Path, tiny_pipeline_dir) -> None:
    from trainers import generate

    metrics, _ = generate_in(tmp_path, pipeline=str(tiny_pipeline_dir), classes=[0, 2], class_names=["a", "b", "c"])
    assert metrics == {"generated_images": 10.0, "new_images": 10.0}
    folder = tmp_path / "gen" / "generated"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [(s["file"], s["rows"]) for s in manifest["shards"]] == [
        (f"class{c:04d}-{k:05d}.parquet", rows) for c in (0, 2) for k, rows in enumerate((2, 2, 1))]
    table = pq.read_table(folder / "class0002-00001.parquet")
    row = table.slice(1, 1).to_pylist()[0]  # class 2, image index 3
    assert (row["label"], row["class_name"], row["prompt"]) == (2, "c", "")
    assert row["seed"] == generate.image_seed(7, 2, 3) and row["num_inference_steps"] == 2
    assert row["guidance_scale"] == generate.load_pipeline(str(tiny_pipeline_dir)).config["guidance_scale"]
    assert row["model"].startswith("ClassConditionalPipeline:")
    assert Image.open(io.BytesIO(row["image"])).mode == "L" and Image.open(io.BytesIO(row["image"])).size == (8, 8)
    pipeline = generate.load_pipeline(str(tiny_pipeline_dir))
    again = generate.sample(pipeline, "class", generate.Config(num_inference_steps=2), 2, [row["seed"]], [""],
                            torch.device("cpu"))
    assert generate.to_png(again[0], None) == row["image"]  # one image alone, from its recorded seed


def test_generate_resumes_by_skipping_the_shards_it_wrote(tmp_path: Path, tiny_pipeline_dir) -> None:
    generate_in(tmp_path, pipeline=str(tiny_pipeline_dir), classes=[1])
    folder = tmp_path / "gen" / "generated"
    kept = (folder / "class0001-00000.parquet").read_bytes()
    (folder / "class0001-00002.parquet").unlink()  # as if the process died before the last shard
    (folder / "manifest.json").unlink()
    metrics, _ = generate_in(tmp_path, pipeline=str(tiny_pipeline_dir), classes=[1])
    assert metrics == {"generated_images": 5.0, "new_images": 1.0}
    assert (folder / "class0001-00000.parquet").read_bytes() == kept and (folder / "manifest.json").is_file()
    assert not list(folder.glob("*.partial"))


def test_generate_from_a_ddpm_checkpoint_and_its_images_join_the_data(tmp_path: Path) -> None:
    """A ddpm run's checkpoint (model.pt) is a pipeline too; 8 px grayscale output joins digits-LT."""
    checkpoint_ok = tmp_path / "ok" / "checkpoint_000000010"
    checkpoint_ok.mkdir(parents=True)
    torch.save(tiny_ddpm_state(), checkpoint_ok / "model.pt")
    metrics, _ = generate_in(tmp_path, pipeline=str(checkpoint_ok), images_per_class=200, shard_size=200,
                             batch_size=200, num_inference_steps=1)
    assert metrics["generated_images"] == 600.0  # every class the pipeline knows: 3
    bundle = build_data(DataSpec(**LT, generated=str(tmp_path / "gen" / "generated")), seed=0, views="plain")
    record = bundle.artifacts["split.json"]["generated"]
    counts = np.asarray(bundle.info.class_counts)
    assert [record["class_counts"][str(c)] for c in range(3)] == (counts.max() - counts[:3]).tolist()
    assert sum(record["class_counts"].values()) == int((counts.max() - counts[:3]).sum())


def test_generate_refuses_a_pipeline_it_cannot_load(tmp_path: Path) -> None:
    from trainers import generate
    from trainers._common.contract import ConfigError

    with pytest.raises(ConfigError, match="config.pipeline: expected a diffusers pipeline directory"):
        generate.check(generate.Config(pipeline=str(tmp_path)))


@pytest.fixture(scope="module")
def tiny_text_to_image_dir(tmp_path_factory) -> Path:
    """A randomly initialised Stable Diffusion pipeline (a 1-layer CLIP text encoder with a character-level
    tokenizer, a 16 px UNet, a one-level VAE), saved with save_pretrained: any text-to-image directory a user has."""
    from trainers.video import tiny

    return tiny.save("text_to_image", tmp_path_factory.mktemp("text_to_image"))


def test_generate_prompts_a_text_to_image_pipeline_from_a_prompts_file(tmp_path: Path, tiny_text_to_image_dir) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"label": 1, "prompt": "a red thing"}\n{"label": 1, "prompt": "a blue thing"}\n'
                       '{"label": 0, "prompt": "a green thing"}\n')
    metrics, _ = generate_in(tmp_path, pipeline=str(tiny_text_to_image_dir), prompts_file=str(prompts),
                             images_per_class=3, shard_size=3, output_size=4)
    assert metrics["generated_images"] == 6.0  # classes 0 and 1: those the prompts file has
    table = pq.read_table(tmp_path / "gen" / "generated" / "class0001-00000.parquet").to_pylist()
    assert [row["prompt"] for row in table] == ["a red thing", "a blue thing", "a red thing"]
    assert {Image.open(io.BytesIO(row["image"])).size for row in table} == {(4, 4)}  # Lanczos-downsized from 16 px
    assert table[0]["model"].startswith("StableDiffusionPipeline:") and table[0]["class_name"] == "1"


def test_a_prompts_file_must_cover_every_class_asked_for(tmp_path: Path, tiny_text_to_image_dir) -> None:
    from trainers._common.contract import ConfigError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"label": 0, "prompt": "a green thing"}\n')
    with pytest.raises(ConfigError, match=r"config.prompts_file: expected prompts for every generated class, "
                       r"found 'none for classes \[2\]'"):
        generate_in(tmp_path, pipeline=str(tiny_text_to_image_dir), prompts_file=str(prompts), classes=[0, 2])
    prompts.write_text("label 0: a green thing\n")
    with pytest.raises(ConfigError, match="config.prompts_file: expected JSON lines"):
        generate_in(tmp_path, pipeline=str(tiny_text_to_image_dir), prompts_file=str(prompts))
