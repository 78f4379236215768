"""Bad input, table-driven: each broken experiment file or dataset gives exactly one error line naming the file,
the key and what was found, exits 2 before Ray starts, and changes nothing already written (an earlier run of the
same name: its run directory with a checkpoint, and the MLflow store, are byte-identical afterwards).

Faults met mid-run are tested where they happen: a NaN loss (test_e2e.py, under Ray; test_divergence.py), an
unreadable image met by a worker (here, through the loader, and the no-retry callback in test_divergence.py).
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from test_data import _png, _write_cifar, _write_stl10

from orchestrator import checkpoint as ckpt_io
from orchestrator.cli import main
from orchestrator.data import build_data
from orchestrator.data.sources import DataFileError
from orchestrator.spec import DataSpec

NAME = "earlier-run"
GOOD = {"name": NAME, "method": "supervised", "data": {"dataset": "digits", "image_size": 16},
        "config": {"arch": "small_cnn"}, "optim": {"name": "sgd", "lr": 0.1, "steps": 10, "batch_size": 32},
        "resources": {"workers": 2}}


def with_changes(base: dict, changes: dict) -> dict:
    merged = {**base}
    for key, value in changes.items():
        merged[key] = with_changes(base[key], value) if isinstance(value, dict) and key in base else value
    return merged


def cifar(root: Path, damage: Callable[[Path], None]) -> dict:
    _write_cifar(root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels",
                 "batches.meta")
    damage(root / "cifar-10-batches-py" / "data_batch_3")
    return {"dataset": "cifar10", "root": str(root)}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def wrong_shape(path: Path) -> None:
    path.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}))


def stl10(root: Path, file: str, keep: int) -> dict:
    _write_stl10(root)
    path = root / "stl10_binary" / file
    path.write_bytes(path.read_bytes()[:keep])
    return {"dataset": "stl10", "root": str(root)}


def image_folder(root: Path, first_image: bytes | None) -> dict:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            if first_image is not None:
                (root / split / name / "0.png").write_bytes(first_image if split == "train" else _png(rng, 8, 8))
    return {"dataset": "imagefolder", "root": str(root)}


def problem_files(root: Path, bad_test_line: str) -> dict:
    good = '{"prompt": "1+1=", "answer": 2}'
    (root / "train.jsonl").write_text(good + "\n")
    (root / "test.jsonl").write_text("\n".join(filter(None, [good, bad_test_line])) + "\n")
    return {"dataset": "jsonl", "root": str(root)}


def parquet(root: Path, label_column: str = "label", corrupt: bool = False) -> dict:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        table = pa.table({"image": pa.array([_png(rng, 8, 8) for _ in range(3)], pa.binary()), "target": [0, 1, 2]})
        pq.write_table(table, root / f"{split}.parquet")
    if corrupt:
        (root / "test.parquet").write_bytes(b"PAR1 this is not a parquet footer")
    return {"dataset": "parquet", "root": str(root), "image_column": "image", "label_column": label_column}


def unfinished_generation(root: Path) -> dict:
    """Digits-LT with `generated` naming a generation run's folder whose manifest was never written."""
    (root / "gen").mkdir()
    table = pa.table({"image": pa.array([_png(np.random.default_rng(0), 8, 8)], pa.binary()), "label": [9]})
    pq.write_table(table, root / "gen" / "class0009-00000.parquet")
    return {"dataset": "digits", "image_size": 16, "imbalance_factor": 10, "generated": str(root / "gen")}


@dataclass
class Case:
    what: str
    message: str  # the whole error line after "error: <file>: " ({root} is the case's data directory)
    changes: dict = field(default_factory=dict)
    data: Callable[[Path], dict] | None = None  # writes files under a directory, returns the `data:` block
    text: str | None = None  # the file's raw text instead of GOOD + changes
    overrides: list[str] = field(default_factory=list)
    command: str = "run"


CASES = [
    Case("YAML syntax", "expected valid YAML (line 2): expected ',' or ']', but got '<stream end>'",
         text="name: [unclosed\n"),
    Case("tab-indented YAML", "expected valid YAML (line 2): found character '\\t' that cannot start any token",
         text="name: x\n\tmethod: supervised\n"),
    Case("not a mapping", "expected a mapping of keys at the top level, found ['a', 'list']", text="- a\n- list\n"),
    Case("wrong type", "optim.lr: expected a valid number, unable to parse string as a number, found 'fast'",
         {"optim": {"lr": "fast"}}),
    Case("wrong type in a method's config", "config.label_smoothing: expected a valid number, unable to parse string "
         "as a number, found 'some'", {"config": {"label_smoothing": "some"}}),
    Case("list where a number goes", "optim.steps: expected a valid integer, found [10, 20]",
         {"optim": {"steps": [10, 20]}}),
    Case("unknown top-level key", "epochs: expected a known key (allowed here: name, method, seed, data, config, "
         "optim, resources, eval, checkpoint, log_every, storage_path, tune, repeat, tracking), found an unknown key",
         {"epochs": 3}),
    Case("unknown method", "method: expected one of the known methods ({methods}); did you mean 'fixmatch'?, "
         "found 'fixmatch2'",
         {"method": "fixmatch2"}),
    Case("negative batch size", "optim.batch_size: expected greater than 0, found -64",
         {"optim": {"batch_size": -64}}),
    Case("negative steps", "optim.steps: expected greater than 0, found -5", {"optim": {"steps": -5}}),
    Case("no workers", "resources.workers: expected greater than 0, found 0",
         {"resources": {"workers": 0}}),
    Case("negative image size", "data.image_size: expected greater than 0, found -16",
         {"data": {"image_size": -16}}),
    Case("negative learning rate given with --set", "optim.lr: expected greater than 0, found -1",
         overrides=["optim.lr=-1"]),
    Case("architecture code of the wrong length", "config.arch: expected an architecture <space>:<code> of a known "
         "search space (nas_bench_macro has 8 positions, got 2 in '99'), found nas_bench_macro:99",
         {"config": {"arch": "nas_bench_macro:99"}}),
    Case("unknown backbone", "config.arch: expected small_cnn, wrn<depth>_<widen>, <space>:<code> (trainers/nas) or "
         "a timm model name, found resnet5", {"config": {"arch": "resnet5"}}),
    Case("missing base file", "base: expected an existing file, found '{root}/no_such_base.yaml'",
         {"base": "no_such_base.yaml"}),
    Case("missing data root", "data.root: expected an existing dataset directory (or data.download: true), found "
         "'{root}/nowhere'", data=lambda root: {"dataset": "cifar10", "root": str(root / "nowhere")}),
    Case("data root without the dataset", "data.root: expected readable cifar10 files, found {root}/"
         "cifar-10-batches-py/data_batch_1 not found: check data.root, or set data.download: true (needs internet)",
         data=lambda root: {"dataset": "cifar10", "root": str(root)}),
    Case("truncated CIFAR batch", "data.root: expected readable cifar10 files, found unreadable dataset file {root}/"
         "cifar-10-batches-py/data_batch_3: not a CIFAR python batch (UnpicklingError: pickle data was truncated)",
         data=lambda root: cifar(root, truncate)),
    Case("CIFAR batch that is not a pickle", "data.root: expected readable cifar10 files, found unreadable dataset "
         "file {root}/cifar-10-batches-py/data_batch_3: not a CIFAR python batch (UnpicklingError: invalid load "
         "key, 'n'.)", data=lambda root: cifar(root, lambda p: p.write_bytes(b"not a pickle"))),
    Case("CIFAR batch of the wrong shape", "data.root: expected readable cifar10 files, found unreadable dataset "
         "file {root}/cifar-10-batches-py/data_batch_3: 'data' must be (N, 3072) with N labels, found (4, 100) and "
         "4 labels", data=lambda root: cifar(root, wrong_shape)),
    Case("truncated STL-10 images", "data.root: expected readable stl10 files, found unreadable dataset file "
         "{root}/stl10_binary/test_X.bin: 100000 bytes is not a whole number of 3x96x96 images (truncated?)",
         data=lambda root: stl10(root, "test_X.bin", 100_000)),
    Case("STL-10 labels missing", "data.root: expected readable stl10 files, found unreadable dataset file "
         "{root}/stl10_binary/train_y.bin: expected 20 labels in 1..10 (one per image of train_X.bin), found 5 "
         "with values [1, 2, 3, 4, 5]", data=lambda root: stl10(root, "train_y.bin", 5)),
    Case("corrupt image in an image folder", "data.root: expected readable imagefolder files, found unreadable "
         "dataset file {root}/train/cat/0.png: not a readable image (UnidentifiedImageError: cannot identify image "
         "file '{root}/train/cat/0.png')", data=lambda root: image_folder(root, b"\x89PNG broken")),
    Case("image folder without images", "data.root: expected readable imagefolder files, found {root}/train has no "
         "class folder with images (.bmp, .jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp)",
         data=lambda root: image_folder(root, None)),
    Case("corrupt Parquet shard", "data.root: expected readable parquet files, found unreadable dataset file "
         "{root}/test.parquet: not a Parquet file (...)", data=lambda root: parquet(root, "target", corrupt=True)),
    Case("Parquet without the label column", "data.label_column: expected a column of the Parquet files, found "
         "column 'label' not in {root}/train.parquet (columns: ['image', 'target'])", data=parquet),
    Case("generated images of an unfinished generation run", "data.generated: expected a folder of generated Parquet "
         "shards (or run:<name> of a generate run), found unreadable dataset file {root}/gen: holds shards of a "
         "generation run but no manifest.json: the run did not finish (run it again; it skips the shards it wrote)",
         data=unfinished_generation),
    Case("a teacher run that never ran", "config.teacher_from: expected a run with a complete checkpoint in "
         "...never-ran (run that experiment first), found 'run:never-ran'",
         {"method": "diffkd", "config": {"teacher_arch": "small_cnn", "teacher_from": "run:never-ran"}}),
    Case("a generation pipeline that is not there", "config.pipeline: expected a diffusers pipeline directory (with "
         "model_index.json) or a checkpoint of the ddpm method (a directory holding model.pt, run:<name> or "
         "mlflow:<run_id>), found ...nowhere", text="name: gen\nmethod: generate\nconfig: {pipeline: nowhere}\n"),
    Case("retraining the winner of a search that never ran", "config.arch: expected an architecture search that "
         "finished with a best architecture (...never-searched/search/best.json is missing: run that search first), "
         "found 'best:run:never-searched'", {"config": {"arch": "best:run:never-searched"}}),
    Case("a supernet that is not there", "config.supernet_from: expected the supernet run's checkpoint directory "
         "(holding model.pt), a model.pt file, run:<name> or mlflow:<run_id>, found ...nowhere",
         text="name: search\nmethod: path_eval\ndata: {dataset: digits}\nconfig: {supernet_from: nowhere}\n"),
    Case("a problem file line without its answer", "data.root: expected readable jsonl files, found unreadable "
         "dataset file {root}/test.jsonl: line 2: expected the keys 'prompt' and 'answer', missing ['answer']",
         {"method": "sft"}, data=lambda root: problem_files(root, '{"prompt": "2+2="}'), overrides=["config={}"]),
    Case("an RL policy directory that is not there", "config.policy: expected 'tiny' or a Hugging Face model "
         "directory holding config.json, found ...no_model",
         {"method": "vapo"}, data=lambda root: problem_files(root, ""), overrides=["config={policy: no_model}"]),
    Case("a video expert that is not a pipeline directory", "config.temporal: expected a diffusers pipeline "
         "directory (holding model_index.json, as save_pretrained writes it), found ...no_t2v",
         text="name: video\nmethod: confiner\nconfig: {control: tiny://animatediff, spatial: tiny://text_to_image, "
         "temporal: no_t2v, prompts: [a cat]}\n"),
    Case("a run method that is not sharded on two workers", "resources.workers: expected 1 (method 'generate' runs "
         "as one process), found 2", text="name: gen\nmethod: generate\nconfig: {pipeline: nowhere}\n"
         "resources: {workers: 2}\n"),
    Case("sweep with an unknown search mode", "tune.mode: expected 'min' or 'max', found 'maximize'",
         {"tune": {"metric": "eval/acc", "mode": "maximize", "space": {"optim.lr": {"loguniform": [0.01, 0.1]}}}},
         command="sweep"),
]


def tree_digest(*paths: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in paths for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> tuple[Path, str]:
    """An earlier run named NAME: its run directory with a complete checkpoint, and an MLflow store holding it."""
    root = Path(tmp_path_factory.mktemp("earlier"))
    run_dir = root / "runs" / NAME
    checkpoint = run_dir / "checkpoint_000000050"
    checkpoint.mkdir(parents=True)
    ckpt_io.save_rng(checkpoint, rank=0)
    ckpt_io.save_main(checkpoint, {"w": torch.ones(3)}, {"step": 50})
    (run_dir / "experiment.yaml").write_text(yaml.safe_dump(GOOD))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("supervised"), run_name=NAME)
    client.log_metric(run.info.run_id, "train/loss", 0.5, step=50)
    client.set_terminated(run.info.run_id)
    return root, uri


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_gives_one_message_and_loses_nothing(case: Case, earlier_run, tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    from trainers import TRAINERS

    store, uri = earlier_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    data_root = tmp_path / "data"
    data_root.mkdir()
    changes = {**case.changes, **({"data": case.data(data_root)} if case.data else {})}
    file = tmp_path / "exp.yaml"
    file.write_text(case.text if case.text is not None else yaml.safe_dump(with_changes(GOOD, changes)))
    before = tree_digest(store)

    code = main([case.command, str(file), "--set", f"storage_path={store / 'runs'}", *case.overrides])

    out, err = capsys.readouterr()
    expected = case.message.format(root=data_root if case.data else tmp_path, methods=", ".join(sorted(TRAINERS)))
    prefix, _, rest = expected.partition("...")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {file}: {prefix}") and err.rstrip().endswith(rest), err
    assert tree_digest(store) == before  # the earlier run's checkpoint, run directory and MLflow store


def test_a_corrupt_image_met_mid_run_names_the_file(tmp_path: Path) -> None:
    """Only the first image of each split is checked before Ray starts; a later one fails when a worker reads it,
    with DataFileError naming it (not retried: test_divergence.py)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                (tmp_path / split / name / f"{i}.png").write_bytes(_png(rng, 8, 8))
    truncate(tmp_path / "train" / "dog" / "1.png")
    bundle = build_data(DataSpec(dataset="imagefolder", root=str(tmp_path), image_size=8), seed=0, views="plain")
    errors = []
    for i in range(len(bundle.train)):
        try:
            bundle.train[i]
        except DataFileError as err:
            errors.append(str(err))
    assert len(errors) == 1
    assert re.fullmatch(rf"unreadable dataset file {tmp_path}/train/dog/1\.png: not a readable image \(OSError: "
                        r".*truncated.*\)", errors[0]), errors[0]
