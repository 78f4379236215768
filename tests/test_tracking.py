"""MLflow tracking on a real (temporary sqlite) store: runs reopen, steps never repeat, secrets never leave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import tracking
from orchestrator.storage import RunDir


def test_secrets_are_redacted_at_any_depth() -> None:
    tree = {"optim": {"lr": 0.1}, "config": {"api_key": "sk-123", "llm": {"auth_token": "t", "model": "m"}},
            "tracking": {"tags": {"MY_PASSWORD": "p", "team": "vision"}}, "empty_token": ""}
    flat = tracking.flatten(tree)
    assert flat["optim.lr"] == 0.1 and flat["config.llm.model"] == "m" and flat["tracking.tags.team"] == "vision"
    assert flat["config.api_key"] == flat["config.llm.auth_token"] == flat["tracking.tags.MY_PASSWORD"] == "***"
    assert "sk-123" not in repr(tracking.redact(tree))


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000") == f"sqlite:///{tmp_path / 'other.db'}"
    assert tracking.display_uri("https://user:pw@mlflow.lab:5000") == "https://mlflow.lab:5000"


def test_reopened_run_skips_logged_steps(mlflow_uri: str, tmp_path: Path) -> None:
    tracker = tracking.Tracker(mlflow_uri)
    run_dir = RunDir(str(tmp_path), "r")
    run_id, resumed = tracker.open_run(run_dir, "unit", {"method": "supervised"})
    assert not resumed and tracker.client.get_run(run_id).info.run_name == "r"
    location = tracker.client.get_experiment_by_name("unit").artifact_location
    assert location == (tmp_path / "mlartifacts" / "unit").as_uri()  # beside the database, not in the cwd
    first = tracking.MetricLogger(mlflow_uri, run_id)
    for step in (10, 20, 30):
        first.log({"train/loss": 1.0 / step}, step)

    again, resumed = tracker.open_run(RunDir(str(tmp_path), "r"), "unit", {})
    assert (again, resumed) == (run_id, True)
    second = tracking.MetricLogger(mlflow_uri, run_id)  # a resumed worker replays steps 20 and 30
    for step in (20, 30, 40):
        second.log({"train/loss": 1.0 / step, "eval/acc": 0.5}, step)
    history = tracker.client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [10, 20, 30, 40]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "eval/acc")] == [20, 30, 40]


def test_experiments_open_on_the_runs_table_and_a_set_kind_is_kept(mlflow_uri: str, tmp_path: Path) -> None:
    """MLflow 3's UI shows an experiment as model training (the runs table) by its experimentKind tag: the
    orchestrator sets it on the experiments it creates and on older ones without it, never over a kind set."""
    tracker = tracking.Tracker(mlflow_uri)
    key, training = tracking.EXPERIMENT_KIND
    tracker.open_run(RunDir(str(tmp_path), "a"), "fresh", {})
    assert tracker.client.get_experiment_by_name("fresh").tags[key] == training == "custom_model_development"
    older = tracker.client.create_experiment("older")
    chosen = tracker.client.create_experiment("chosen", tags={key: "genai_development"})
    assert tracker.experiment_id("older") == older and tracker.experiment_id("chosen") == chosen
    assert tracker.client.get_experiment(older).tags[key] == training
    assert tracker.client.get_experiment(chosen).tags[key] == "genai_development"


def test_params_are_logged_once_and_truncated(mlflow_uri: str, tmp_path: Path) -> None:
    tracker = tracking.Tracker(mlflow_uri)
    run_id, _ = tracker.open_run(RunDir(str(tmp_path), "p"), "unit", {})
    tracker.log_params(run_id, {"a": 1, "long": "x" * 7000})
    tracker.log_params(run_id, {"a": 1, "b": [1, 2]})
    params = tracker.client.get_run(run_id).data.params
    assert params["a"] == "1" and params["b"] == "[1, 2]" and len(params["long"]) == 6000


@pytest.mark.parametrize("as_uri", [False, True])
def test_run_dir_files_on_a_path_or_a_filesystem_uri(tmp_path: Path, as_uri: bool) -> None:
    run_dir = RunDir(f"file://{tmp_path}" if as_uri else str(tmp_path), "exp")
    assert run_dir.read("experiment.yaml") is None
    run_dir.write("experiment.yaml", "name: exp\n")
    assert run_dir.read("experiment.yaml") == "name: exp\n"
    assert (tmp_path / "exp" / "experiment.yaml").read_text() == "name: exp\n"


def test_searcher_keys_tokens_and_uri_passwords_are_logged_as_stars(mlflow_uri: str, tmp_path: Path) -> None:
    """What the driver logs for a run (params, experiment.yaml in MLflow and in the run directory), without Ray."""
    from orchestrator import spec as spec_mod
    from orchestrator.launch import check_same_experiment, open_mlflow_run

    sweep_file = Path(__file__).resolve().parents[1] / "experiments" / "supervised" / "digits_sweep.yaml"
    spec = spec_mod.load(sweep_file, ["tune.searcher={name: optuna, api_key: sk-secret-1}",
                                      "tracking.tags={HF_TOKEN: hf-secret-2, team: vision}",
                                      "tracking.tracking_uri=https://alice:secret-3@mlflow.lab:5000"])
    run_dir = RunDir(str(tmp_path), "sweep")
    check_same_experiment(spec, run_dir)
    tracker = tracking.Tracker(mlflow_uri)
    run_id, _ = open_mlflow_run(tracker, spec, run_dir, str(sweep_file))
    run = tracker.client.get_run(run_id)
    assert run.data.params["tune.searcher.api_key"] == "***" and run.data.params["tune.searcher.name"] == "optuna"
    assert run.data.params["tracking.tracking_uri"] == "https://***@mlflow.lab:5000"
    assert run.data.tags["HF_TOKEN"] == "***" and run.data.tags["team"] == "vision"
    logged = tracker.client.download_artifacts(run_id, "experiment.yaml", str(tmp_path))
    texts = [Path(logged).read_text(), run_dir.read("experiment.yaml")]
    assert all("api_key: '***'" in text for text in texts)
    everything = repr(run.data.params) + repr(run.data.tags) + "".join(texts)
    assert not any(f"secret-{i}" in everything for i in (1, 2, 3))


# Fake credentials of each shape, written in two parts so that no secret scanner takes this file for a leak.
CREDENTIALS = {
    "openai": "sk-" + "abcdefghij0123456789ABCDEFGH",
    "openai project": "sk-" + "proj-Ab3_cD4-eF5gH6iJ7kL8mN9",
    "hugging face": "hf" + "_AbCdEfGhIjKlMnOpQrStUvWxYz",
    "github": "gh" + "p_0123456789abcdefghijABCDEFGHIJ",
    "github oauth": "gh" + "o_0123456789abcdefghijABCDEF",
    "github fine-grained": "github" + "_pat_11ABCDEFG0123456789_abcdefghijklmnop",
    "gitlab": "gl" + "pat-aB3dE6gH9jK2mN5pQ8sT",
    "slack bot": "xo" + "xb-123456789012-abcdefABCDEF",
    "slack user": "xo" + "xp-123456789012-abcdefABCDEF",
    "aws key id": "AK" + "IAIOSFODNN7EXAMPLE",
    "aws session key id": "AS" + "IAY34FZKBOKMUTVV7A",
    "jwt": "ey" + "JhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
}


@pytest.mark.parametrize("kind", CREDENTIALS)
def test_credentials_are_redacted_by_their_shape_alone_or_inside_text(kind: str) -> None:
    token = CREDENTIALS[kind]
    assert tracking.redact_text(token) == "***"
    assert tracking.redact({"note": f"my key {token} here", "list": [token]}) == {"note": "my key *** here",
                                                                                  "list": ["***"]}


def test_bearer_tokens_and_uri_passwords_are_redacted() -> None:
    assert tracking.redact_text("Authorization: Bearer abc.DEF-123_456~789/xyz=") == "Authorization: Bearer ***"
    assert tracking.redact_text("s3://key:pass@host/bucket") == "s3://***@host/bucket"


@pytest.mark.parametrize("value", ["sketch-model", "hf", "skip-connections", "sk-learn-compatible-models",
                                   "hf_transformers_cache", "ghost_bottleneck_v2", "xoxo-goodbye", "0.001",
                                   "/data/imagenet/train-00001-of-01024", "Bearer of bad news everywhere",
                                   "AKIA1234", "eyJ.notajwt", "resnet50_sk-attention", "s3://bucket/runs/exp-1"])
def test_ordinary_values_are_kept(value: str) -> None:
    assert tracking.redact_text(value) == value
    assert tracking.redact({"optim": {"lr": 3e-4, "name": value}}) == {"optim": {"lr": 3e-4, "name": value}}


def test_values_of_secret_named_environment_variables_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAB_API_KEY", "plainvalue-of-the-lab")  # no token shape: known only from the environment
    monkeypatch.setenv("HF_TOKEN", "short")  # too short to look for
    monkeypatch.setenv("LAB_NOTE", "notasecretvalue")  # not named like a secret
    tree = {"a": "plainvalue-of-the-lab", "b": "url?k=plainvalue-of-the-lab&x=1", "c": "short", "d": "notasecretvalue"}
    assert tracking.redact(tree) == {"a": "***", "b": "url?k=***&x=1", "c": "short", "d": "notasecretvalue"}
    assert tracking.redact_text("say plainvalue-of-the-lab and a-key-given-here", ["a-key-given-here", "tiny"]) == \
        "say *** and ***"


SECRET_TAGS = {"openai_key": CREDENTIALS["openai project"], "hf": CREDENTIALS["hugging face"],
               "note": f"my key {CREDENTIALS['openai']} here", "env": "envsecret-abc-42", "team": "vision"}


def _secrets_in(texts: list[str]) -> list[str]:
    secrets = [CREDENTIALS["openai project"], CREDENTIALS["hugging face"], CREDENTIALS["openai"], "envsecret-abc-42"]
    return [secret for secret in secrets if any(secret in text for text in texts)]


def _store_texts(tmp_path: Path) -> list[str]:
    """Every byte the MLflow store (database and artifacts) and the run directories hold, as text."""
    return [path.read_bytes().decode("latin-1") for path in tmp_path.rglob("*") if path.is_file()]


def test_secret_values_reach_no_writer_of_a_run(mlflow_uri: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Tags with secret-looking values through the driver's writers (no Ray): MLflow params, tags, run name,
    experiment.yaml in MLflow and in the run directory."""
    from orchestrator import spec as spec_mod
    from orchestrator.launch import check_same_experiment, open_mlflow_run

    monkeypatch.setenv("MY_SERVICE_TOKEN", "envsecret-abc-42")
    quickstart = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    spec = spec_mod.load(quickstart, [f"tracking.tags={SECRET_TAGS}", f"storage_path={tmp_path / 'runs'}"])
    run_dir = RunDir(spec.storage_path, spec.name)
    check_same_experiment(spec, run_dir)
    tracker = tracking.Tracker(mlflow_uri)
    run_id, _ = open_mlflow_run(tracker, spec, run_dir, str(quickstart))
    run = tracker.client.get_run(run_id)
    assert run.data.tags["openai_key"] == run.data.tags["hf"] == "***" and run.data.tags["team"] == "vision"
    assert run.data.tags["note"] == "my key *** here" and run.data.params["tracking.tags.env"] == "***"
    logged = Path(tracker.client.download_artifacts(run_id, "experiment.yaml", str(tmp_path / "download")))
    texts = [repr(run.data.params), repr(run.data.tags), run.info.run_name, logged.read_text(), *_store_texts(tmp_path)]
    assert "team: vision" in run_dir.read("experiment.yaml") and _secrets_in(texts) == []
    assert "vision" in (tmp_path / "mlflow.db").read_bytes().decode("latin-1")  # the store is read as it is


def test_secret_values_reach_no_writer_of_a_sweep(mlflow_uri: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's parent run, a child run opened as a trial opens it, its name and its `tune.overrides` tag."""
    from orchestrator import spec as spec_mod
    from orchestrator import tune

    monkeypatch.setenv("MY_SERVICE_TOKEN", "envsecret-abc-42")
    sweep_file = Path(__file__).resolve().parents[1] / "experiments" / "supervised" / "digits_sweep.yaml"
    spec = spec_mod.load(sweep_file, [f"tracking.tags={SECRET_TAGS}", f"storage_path={tmp_path / 'runs'}"])
    tracker = tracking.Tracker(mlflow_uri)
    parent_id, _ = tune._open_parent_run(tracker, spec, RunDir(spec.storage_path, spec.name), str(sweep_file))
    config = {"optim.lr": 0.1, "tracking.tags.note": CREDENTIALS["openai"], "tracking.tags.env": "envsecret-abc-42"}
    child = tune.trial_spec(spec, config)
    child_id, _ = tune.open_mlflow_run(tracker, child, RunDir(f"{spec.storage_path}/{spec.name}/runs", "t0"),
                                       str(sweep_file), run_name=tune._child_name("t0", config),
                                       extra_tags={"mlflow.parentRunId": parent_id})
    tune._log_start(tracker, child_id, "t0", config, tune.StartPoint(None, "fresh", None, 0))
    runs = [tracker.client.get_run(run_id) for run_id in (parent_id, child_id)]
    assert runs[1].info.run_name == "t0 lr=0.1 note=*** env=***"
    assert json.loads(runs[1].data.tags["tune.overrides"])["tracking.tags.note"] == "***"
    texts = [repr(r.data.params) + repr(r.data.tags) + r.info.run_name for r in runs] + _store_texts(tmp_path)
    assert _secrets_in(texts) == []


def test_an_experiment_file_logged_as_text_keeps_its_header_and_hides_its_secrets() -> None:
    text = (f"# planned from lm.yaml\n# 2 lines\nname: x\nsearcher: {{api_key: k-1}}\n"
            f"tags: {{note: {CREDENTIALS['github']}}}\n")
    assert tracking.redact_yaml(text) == ("# planned from lm.yaml\n# 2 lines\nname: x\nsearcher:\n  api_key: '***'\n"
                                          "tags:\n  note: '***'\n")


def test_the_background_logger_writes_in_order_and_flush_waits(mlflow_uri: str, tmp_path: Path) -> None:
    """Rank 0's writes run on a thread; after `flush` everything queued is in MLflow, stamped when it was logged."""
    tracker = tracking.Tracker(mlflow_uri)
    run_id, _ = tracker.open_run(RunDir(str(tmp_path), "r"), "unit", {})
    with tracking.background_logger(mlflow_uri, run_id) as logger:
        for step in (10, 20, 30):
            logger.log({"train/loss": 1.0 / step}, step)
        logger.set_tag("stopped_reason", "none")
        logger.log_dict({"vocab_size": 7}, "corpus.json")
        logger.flush()
        history = tracker.client.get_metric_history(run_id, "train/loss")
        assert [m.step for m in sorted(history, key=lambda m: m.timestamp)] == [10, 20, 30]
        assert tracker.client.get_run(run_id).data.tags["stopped_reason"] == "none"
        logger.log({"train/loss": 0.01}, 40)
    assert max(m.step for m in tracker.client.get_metric_history(run_id, "train/loss")) == 40  # closed: flushed


def test_a_failed_write_is_raised_by_the_next_call_unless_another_error_is_on_its_way(
        mlflow_uri: str, tmp_path: Path) -> None:
    logger = tracking.BackgroundLogger(mlflow_uri, "no-such-run")
    with pytest.raises(Exception, match="no-such-run"):
        logger.flush()  # opening the logger read the run
    with pytest.raises(Exception, match="no-such-run"):
        logger.log({"train/loss": 1.0}, 1)
    with pytest.raises(ValueError, match="the step loop's own error"):
        with tracking.background_logger(mlflow_uri, "no-such-run") as failing:
            failing.log({"train/loss": 1.0}, 1)
            raise ValueError("the step loop's own error")
