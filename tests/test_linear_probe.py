"""The evaluation protocols (linear probe and kNN on a frozen encoder) and `mlflow:<run_id>` references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from orchestrator import checkpoint as ckpt_io
from orchestrator import references
from orchestrator import spec as spec_mod
from orchestrator.spec import SpecError
from trainers import linear_probe as probe
from trainers._common.backbones import build_backbone
from trainers._common.contract import DataInfo

INFO = DataInfo(num_classes=3, image_size=16, in_channels=1, num_train=6, num_labeled=6)


def test_knn_votes_are_weighted_by_exp_similarity_over_t() -> None:
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 1, 1, -1])  # the last entry is not filled: it never votes
    query = torch.tensor([[1.0, 0.0]])
    votes = probe.knn_predict(query, bank, labels, num_classes=2, k=3, t=0.5)
    # neighbours by cosine: entry 0 (1.0, class 0), entry 1 (0.8, class 1), entry 2 (0.0, class 1)
    expected = torch.tensor([[math.exp(1.0 / 0.5), math.exp(0.8 / 0.5) + math.exp(0.0 / 0.5)]])
    torch.testing.assert_close(votes, expected)
    assert probe.knn_predict(query, bank, labels, num_classes=2, k=1, t=0.5).argmax(1).item() == 0


def test_only_the_linear_head_learns_and_batch_norm_stays_frozen() -> None:
    torch.manual_seed(0)
    model = probe.build(probe.TINY, INFO)
    before = {k: v.clone() for k, v in model.encoder.encoder.state_dict().items()}
    head = model.encoder.head.weight.clone()  # the linear classifier (after the feature norm)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    batch = {"x": torch.randn(6, 1, 16, 16), "y": torch.tensor([0, 1, 2, 0, 1, 2]), "idx": torch.arange(6)}
    for step in range(3):
        loss, _ = probe.train_step(model, batch, probe.TINY, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.encoder.encoder.state_dict().items())  # incl. BN stats
    assert not torch.equal(head, model.encoder.head.weight)
    assert model.bank_labels.tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(model.bank.norm(dim=1), torch.ones(6))


def test_eval_reports_linear_and_knn_accuracy() -> None:
    model = probe.build(probe.TINY, INFO)
    batch = {"x": torch.randn(6, 1, 16, 16), "y": torch.tensor([0, 1, 2, 0, 1, 2]), "idx": torch.arange(6)}
    assert "knn_acc" not in probe.eval_step(model.eval(), batch, probe.TINY)  # an empty bank does not vote
    probe.train_step(model.train(), batch, probe.TINY, 0)
    sums = probe.eval_step(model.eval(), batch, probe.TINY)
    assert {"acc", "loss", "n", "knn_acc"} <= set(sums) and sums["n"] == 6
    knn_1 = probe.eval_step(model, batch, probe.Config(arch="small_cnn", knn_k=1))
    assert knn_1["knn_acc"] == 6  # each training image is its own nearest neighbour


@pytest.mark.parametrize("prefix", ["encoder.encoder.", "encoder."])
def test_the_encoder_is_loaded_from_a_representation_or_a_supervised_checkpoint(tmp_path: Path, prefix: str) -> None:
    """Representation methods keep their backbone at model.encoder (keys encoder.encoder.*); supervised's model is
    the backbone itself (keys encoder.*)."""
    source = build_backbone("small_cnn", 1, 3)
    state = {f"{prefix}{k}": v for k, v in source.encoder.state_dict().items()}
    state |= {"projector.weight": torch.ones(2)} if prefix == "encoder.encoder." else {"head.weight": torch.ones(2)}
    torch.save(state, tmp_path / "model.pt")
    model = probe.build(probe.Config(arch="small_cnn", init_from=str(tmp_path)), INFO)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.encoder.state_dict()[key], value)
    with pytest.raises(ValueError, match="does not fit arch 'wrn28_2'"):
        probe.build(probe.Config(arch="wrn28_2", init_from=str(tmp_path)), INFO)


def write_run(run_dir: Path, uri: str, complete: tuple[int, ...], broken: tuple[int, ...] = ()) -> str:
    """An orchestrator run directory with checkpoints, and its MLflow run (tagged with run_dir)."""
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("pretrain"), tags={"run_dir": str(run_dir)})
    for step in complete + broken:
        directory = run_dir / f"checkpoint_{step:09d}"
        directory.mkdir(parents=True)
        ckpt_io.save_main(directory, {"w": torch.ones(1)}, {"step": step})
        ckpt_io.save_rank_manifest(directory, 0, 1, step)
        if step in broken:
            (directory / "model.pt").write_bytes(b"half")
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": run.info.run_id}))
    return run.info.run_id


PROBE = """
name: probe
method: linear_probe
data: {dataset: digits, image_size: 16}
config: {arch: small_cnn, init_from: "INIT"}
optim: {name: sgd, lr: 0.1, steps: 10, batch_size: 32}
"""


def probe_file(tmp_path: Path, init_from: str) -> Path:
    path = tmp_path / "probe.yaml"
    path.write_text(PROBE.replace("INIT", init_from))
    return path


def test_an_mlflow_run_id_resolves_to_its_latest_complete_checkpoint(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir = tmp_path / "runs" / "pretrain"
    run_id = write_run(run_dir, uri, complete=(10, 20), broken=(30,))
    file = probe_file(tmp_path, f"mlflow:{run_id}")
    spec = references.resolve(spec_mod.load(file), file)
    assert spec.method_config().init_from == str(run_dir / "checkpoint_000000020")  # 30 was half-written
    assert spec.tracking.tags == {"source.config.init_from": run_id, "source_run_id": run_id,
                                  "mlflow.parentRunId": run_id}
    by_path = probe_file(tmp_path, str(run_dir / "checkpoint_000000010"))
    assert references.resolve(spec_mod.load(by_path), by_path).tracking.tags["source_run_id"] == run_id
    by_name = references.resolve(spec_mod.load(probe_file(tmp_path, "run:pretrain"), [f"storage_path={run_dir.parent}"]),
                                 file)
    assert by_name.method_config().init_from == spec.method_config().init_from
    assert by_name.tracking.tags["source_run_id"] == run_id


def test_bad_references_name_the_key(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    file = probe_file(tmp_path, "mlflow:0123456789abcdef")
    with pytest.raises(SpecError, match=r"config\.init_from: expected the id of a run in the MLflow store"):
        references.resolve(spec_mod.load(file), file)
    empty = write_run(tmp_path / "runs" / "empty", uri, complete=(), broken=(5,))
    file = probe_file(tmp_path, f"mlflow:{empty}")
    with pytest.raises(SpecError, match=r"config\.init_from: expected a run with a complete checkpoint"):
        references.resolve(spec_mod.load(file), file)
    file = probe_file(tmp_path, "run:never-ran")
    with pytest.raises(SpecError, match=r"config\.init_from: expected a run with a complete checkpoint in .*never-ran "
                       r"\(run that experiment first\), found 'run:never-ran'"):
        references.resolve(spec_mod.load(file, [f"storage_path={tmp_path}"]), file)


def test_a_registered_model_version_resolves_to_the_run_that_logged_it(tmp_path: Path, monkeypatch) -> None:
    """models:/NAME/VERSION, models:/NAME@ALIAS and models:/NAME/latest name the version's run, like mlflow:<id>;
    an unknown name or version is refused naming the key."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir = tmp_path / "runs" / "pretrain"
    run_id = write_run(run_dir, uri, complete=(10, 20), broken=())
    client = MlflowClient(uri)
    client.create_registered_model("encoder")
    client.create_model_version("encoder", f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("encoder", "champion", "1")
    for reference in ("models:/encoder/1", "models:/encoder@champion", "models:/encoder/latest"):
        file = probe_file(tmp_path, reference)
        spec = references.resolve(spec_mod.load(file), file)
        assert spec.method_config().init_from == str(run_dir / "checkpoint_000000020")
        assert spec.tracking.tags["source.config.init_from"] == run_id
    for reference in ("models:/encoder/7", "models:/nothing/1", "models:/encoder"):
        file = probe_file(tmp_path, reference)
        with pytest.raises(SpecError, match=r"config\.init_from: expected a registered model version"):
            references.resolve(spec_mod.load(file), file)
