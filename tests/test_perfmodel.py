"""The performance model: operator decomposition, micro-benchmarks, regressors, composition, and `plan`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from orchestrator import cli
from orchestrator import spec as spec_mod
from orchestrator.launch import TrainStep
from orchestrator.perfmodel import microbench
from orchestrator.perfmodel import plan as plan_mod
from orchestrator.perfmodel import trace as trace_mod
from orchestrator.perfmodel.compose import Breakdown, Overheads, dispatch_calls, step_time, zero3_gathers
from orchestrator.perfmodel.ops import COMPUTE, FEATURES, cost, micro_batch_ops
from orchestrator.perfmodel.profile import CALIBRATION, draw_grid, read_table, write_table
from orchestrator.perfmodel.regress import FittedModel, KindModel, calibration_workload, node_factors
from orchestrator.perfmodel.trace import Recorder, traced_ops
from orchestrator.perfmodel.workload import Workload, from_spec
from orchestrator.spec import SpecError
from trainers.lm import Config, LanguageModel, train_step

REPO = Path(__file__).resolve().parents[1]
LM = REPO / "experiments" / "lm"
SMALL = Workload(d_model=64, n_layers=2, n_heads=4, vocab=512, seq_len=32, batch=8)


class Constant:
    """A predictor answering a fixed time per operator kind (1 ms unless given), no overheads, and the busy factor
    as every operator's contention."""

    hardware, devices_per_node, busy_factor, sync_skew, overheads = "constant", 8, 1.0, 0.0, Overheads()

    def __init__(self, **seconds: float):
        self.seconds = seconds

    def predict(self, kind: str, key: str, shapes: np.ndarray) -> np.ndarray:
        return np.full(len(shapes), self.seconds.get(kind, 1e-3))

    def contention(self, kind: str, key: str, shapes: np.ndarray) -> np.ndarray:
        return np.full(len(shapes), self.busy_factor)


def law_rows(kinds: tuple[str, ...], n: int = 8, seed: int = 0) -> list[dict]:
    """Profile rows of `kinds` whose times follow t = 10 us + (FLOPs + bytes) / 10 G exactly (n < 10 shapes per
    kind: the analytic regressor, no cross-validation); collectives over 2 ranks of one node."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind in kinds:
        collective = kind in ("allreduce", "allgather", "reduce_scatter", "sendrecv")
        for _ in range(n):
            if collective:
                shape = [int(2 ** rng.uniform(10, 26)), 2]
            else:
                shape = [int(np.exp(rng.uniform(np.log(2), np.log(4096)))) for _ in FEATURES[kind]]
            flops, moved = cost(kind, tuple(shape), 4)
            rows.append({"kind": kind, "shape": shape, "tier": "intra" if collective else "", "dtype": "float32",
                         "ranks": 2 if collective else 1, "seconds": 1e-5 + (flops + moved) / 1e10})
    return rows


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_matches_the_trainers_model(tie: bool) -> None:
    model = LanguageModel(Config(d_model=96, n_layers=3, n_heads=4, tie_embeddings=tie), 1000)
    w = Workload(d_model=96, n_layers=3, n_heads=4, vocab=1000, seq_len=16, batch=4, tie_embeddings=tie)
    assert w.params() == sum(p.numel() for p in model.parameters())


def test_gemm_flops_are_two_matmuls_backward_for_one_forward() -> None:
    """Per layer: forward GEMM FLOPs = 2 T (4 d^2 + 2 d h); the backward's are twice that; the head's 2 T d V."""
    w = SMALL
    tokens, d, h = w.micro_batch * w.seq_len, w.d_model, w.hidden
    flops: dict[str, float] = {}
    for op in micro_batch_ops(w, "intra"):
        if op.kind == "gemm":
            flops[op.part] = flops.get(op.part, 0.0) + op.count * cost("gemm", op.shape, 4)[0]
    assert flops["layer_fwd"] == 2 * tokens * (4 * d * d + 2 * d * h)
    assert flops["layer_bwd"] == 2 * flops["layer_fwd"]
    assert flops["last_fwd"] == 2 * tokens * d * w.vocab and flops["last_bwd"] == 2 * flops["last_fwd"]


def test_the_traced_step_has_the_analytic_kernels_and_the_work_they_miss() -> None:
    """The trace of the real step has exactly the analytic list's GEMMs (FLOPs per part), attention and
    LayerNorm calls, plus what that list leaves out: the head split/merge copies, the residual gradients'
    accumulation, RoPE's elementwise work, and calls without a kernel (views)."""
    w = SMALL.with_layout(batch=4)
    traced, analytic = traced_ops(w), micro_batch_ops(w, "intra")

    def per_part(ops: tuple | list, kind: str, measure=lambda op: 1.0) -> dict[str, float]:
        found: dict[str, float] = {}
        for op in ops:
            if op.kind == kind:
                found[op.part] = found.get(op.part, 0.0) + op.count * measure(op)
        return found

    flops = lambda op: cost("gemm", op.shape, 4)[0]
    assert per_part(traced, "gemm", flops) == per_part(analytic, "gemm", flops)
    for kind in ("sdpa_fwd", "sdpa_bwd", "layernorm_fwd", "layernorm_bwd", "embedding_bwd", "cross_entropy_fwd"):
        assert per_part(traced, kind) == per_part(analytic, kind), kind
    elementwise = per_part(traced, "add", lambda op: op.shape[0])
    tokens_d = w.micro_batch * w.seq_len * w.d_model
    assert elementwise["layer_fwd"] > 4 * tokens_d and elementwise["layer_bwd"] > 4 * tokens_d
    assert sum(per_part(traced, "dispatch").values()) > 50
    deeper = traced_ops(w.with_layout(n_layers=5))  # the per-block calls do not depend on the depth
    assert sorted(map(repr, deeper)) == sorted(map(repr, traced))


def _calls_without_hooks(layers: int) -> Counter:
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = Config(d_model=32, n_layers=layers, n_heads=2, activation_checkpointing=True)
    recorder = Recorder()
    with FakeTensorMode():
        model = LanguageModel(cfg, 100)
        ids = torch.randint(100, (3, 16))
        with recorder:
            loss, _ = train_step(model, {"input_ids": ids, "labels": ids}, cfg, 0)
            recorder.phase = "bwd"
            (loss / 2).backward()
            torch.zeros(()).add_(loss.detach().float())
    return Counter(call[:5] for call in recorder.calls)


def test_the_hooks_find_one_blocks_calls_and_micro_batch_sizes_interpolate() -> None:
    """What the hooks call the block's part is what a second block adds to the step (with activation
    checkpointing, whose recompute runs inside the backward pass); traces at micro-batch 1 and 2 give 3 exactly."""
    sizes = (32, 2, 4.0, 100, 16, True, True)
    traced = trace_mod.record(*sizes, 3)
    block = Counter(call[:5] for call in traced if call[5] == "block")
    assert block == _calls_without_hooks(2) - _calls_without_hooks(1)
    assert trace_mod.calls(sizes, 3) == traced


def test_a_13b_step_is_traced_on_fake_tensors() -> None:
    w = Workload(d_model=5120, n_layers=40, n_heads=40, vocab=50257, seq_len=2048, batch=512, dp=128, grad_accum=2,
                 dtype="bfloat16", checkpointing=True)
    gemms = [op for op in traced_ops(w) if op.kind == "gemm" and op.part == "layer_bwd"]
    # checkpointing reruns the forward's GEMMs but the last (torch's non-reentrant recompute stops once every saved
    # tensor is back: the MLP's output is not one), then the 12 of the backward
    assert sum(op.count for op in gemms) == 5 + 12
    assert dispatch_calls(w) > dispatch_calls(w.with_layout(grad_accum=1))


def test_tensor_parallel_splits_the_gemms_and_adds_two_all_reduces_per_pass() -> None:
    one, four = (micro_batch_ops(SMALL.with_layout(tp=tp), "intra") for tp in (1, 4))
    gemm = lambda ops: sum(cost("gemm", o.shape, 4)[0] for o in ops if o.kind == "gemm" and o.part.startswith("layer"))
    assert gemm(four) == gemm(one) / 4
    reduces = [o for o in four if o.kind == "allreduce" and o.part.startswith("layer")]
    assert sum(o.count for o in reduces) == 4 and all(o.shape[1] == 4 for o in reduces)
    assert not [o for o in one if o.kind == "allreduce"]


@pytest.mark.parametrize("kind", COMPUTE)
def test_every_operator_runs_at_a_small_shape(kind: str) -> None:
    shape = {"gemm": (8, 16, 32), "adamw": (4096, 4), "grad_norm": (4096, 4)}.get(kind)
    if shape is None:
        defaults = {"bh": 2, "s": 16, "dh": 8, "rows": 8, "d": 16, "numel": 64, "tokens": 8, "vocab": 300}
        shape = tuple(defaults[name] for name in FEATURES[kind])
    call = microbench.compute_call(kind, shape, torch.float32, torch.device("cpu"))
    assert microbench.seconds_per_call(call, torch.device("cpu"), warmup=1, iters=2) > 0


def test_backward_operator_times_the_gradient_not_the_forward() -> None:
    out = microbench.compute_call("sdpa_bwd", (2, 16, 8), torch.float32, torch.device("cpu"))()
    assert len(out) == 3 and all(g.shape == (1, 2, 16, 8) for g in out)


def test_profile_table_round_trip_and_a_foreign_parquet_is_refused(tmp_path: Path) -> None:
    grid = draw_grid("cpu", samples=3, kinds=("gemm", "gelu_fwd"), cap_scale=1e-4)
    assert [kind for kind, _ in grid] == ["gemm"] * 9 + ["gelu_fwd"] * 3  # 3 x more GEMM shapes
    assert grid == draw_grid("cpu", samples=3, kinds=("gemm", "gelu_fwd"), cap_scale=1e-4)  # seeded
    rows = [{"kind": kind, "shape": list(shape), "tier": "", "dtype": "float32", "ranks": 1, "seconds": 1e-3}
            for kind, shape in grid]
    path = write_table(rows, tmp_path / "p.parquet", {"hardware": "test cpu", "device": "cpu"})
    read, meta = read_table(path)
    assert read[0]["shape"] == rows[0]["shape"] and meta["hardware"] == "test cpu"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="other.parquet is not a profile table"):
        read_table(tmp_path / "other.parquet")
    with pytest.raises(FileNotFoundError, match="orchestrator profile"):
        read_table(tmp_path / "missing.parquet")


def test_regressors_recover_a_roofline_law_and_only_the_analytic_ones_extrapolate() -> None:
    """On times that follow t = 20 us + FLOPs / 10 GFLOP/s exactly, the analytic fit is exact; outside the sampled
    range a forest stays flat while the hybrid (analytic x forest correction) follows the law."""
    rng = np.random.default_rng(0)
    shapes = np.exp(rng.uniform(np.log(16), np.log(512), size=(60, 3))).round()
    law = lambda s: 2e-5 + np.array([cost("gemm", tuple(r), 4)[0] for r in s]) / 1e10
    big = np.array([[4096.0, 4096.0, 4096.0]])
    fitted = {name: KindModel("gemm", 4).fit(shapes, law(shapes), name) for name in ("analytic", "forest", "hybrid")}
    assert fitted["analytic"].predict(shapes) == pytest.approx(law(shapes), rel=1e-6)
    assert fitted["analytic"].predict(big) == pytest.approx(law(big), rel=1e-6)
    assert fitted["hybrid"].predict(big) == pytest.approx(law(big), rel=0.05)
    assert fitted["forest"].predict(big)[0] < 0.1 * law(big)[0]


def test_fitted_model_chooses_per_operator_by_cross_validation() -> None:
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(30):
        m, n, k = (int(v) for v in np.exp(rng.uniform(np.log(16), np.log(256), 3)))
        rows.append({"kind": "gemm", "shape": [m, n, k], "tier": "", "dtype": "float32",
                     "seconds": 1e-5 + 2 * m * n * k / 1e10})
    model = FittedModel(rows, {"hardware": "law", "device": "cpu"})
    (summary,) = model.summary()
    assert summary["choice"] == "analytic" and summary["cv_wape_analytic"] < 1e-3
    with pytest.raises(KeyError, match="no samples of sdpa_fwd"):
        model.predict("sdpa_fwd", "float32", np.array([[1, 2, 3]]))


def test_pipeline_1f1b_has_pp_minus_one_bubbles() -> None:
    """pp = 1: m (t_f + t_b); pp = 2 (equal stages): (m + 1)(t_f + t_b + 2 p2p) over m micro-batches."""
    w = Workload(d_model=64, n_layers=4, n_heads=4, vocab=512, seq_len=32, batch=16, grad_accum=4, clip_grad=False)
    flat = step_time(w, Constant(), overlap=0.0)
    piped = step_time(w.with_layout(pp=2), Constant(), overlap=0.0)
    per_micro = (flat.forward + flat.backward) / 4
    assert piped.forward + piped.backward < per_micro * 4  # each stage holds half the layers
    stage = (piped.forward + piped.backward + piped.pipeline_p2p) / 4
    assert piped.bubble == pytest.approx(stage)
    assert piped.step == pytest.approx(5 * stage + piped.dp_comm + piped.optimizer)


def test_zero_stages_communicate_as_deepspeed_does() -> None:
    ar, rs, ag = 0.010, 0.004, 0.005
    predictor = Constant(allreduce=ar, reduce_scatter=rs, allgather=ag)
    w = SMALL.with_layout(dp=2, grad_accum=2)
    comm = {z: step_time(w.with_layout(zero=z), predictor, overlap=0.0).dp_comm for z in (0, 1, 2, 3)}
    assert comm[0] == pytest.approx(ar)
    assert comm[1] == pytest.approx(rs + ag)
    assert comm[2] == pytest.approx(2 * rs + ag)  # a reduce-scatter after every micro-batch
    assert comm[3] == pytest.approx(2 * rs)  # every tensor is under DeepSpeed's persistence threshold: kept
    wide = w.with_layout(d_model=256, vocab=1000, zero=3)  # the embedding and the MLP's weights are over it
    assert zero3_gathers(wide) == [4 * 256 * 1000] + [4 * 256 * 1024] * 4  # once per micro-batch: all reused
    assert step_time(wide, predictor, 0.0).dp_comm == pytest.approx(2 * (5 * ag + rs))
    big = w.with_layout(d_model=1024, n_layers=4, zero=None)  # 200 MB of fp32 gradients: 8 DDP buckets of 25 MB
    assert step_time(big, predictor, overlap=1.0).dp_comm == pytest.approx(ar / 8)  # all but the last bucket hide
    assert step_time(big, predictor, overlap=0.0).dp_comm == pytest.approx(ar)
    assert step_time(w.with_layout(zero=None), predictor, overlap=1.0).dp_comm == pytest.approx(ar)  # one bucket


def test_zero3_modules_are_the_models_and_large_models_gather_again_for_backward() -> None:
    assert sum(SMALL.module_params()) == SMALL.params()
    assert sum(SMALL.with_layout(pp=2).module_params()) == SMALL.with_layout(pp=2).stage_params()
    model = LanguageModel(Config(d_model=64, n_layers=3, n_heads=4), 512)
    assert SMALL.with_layout(n_layers=3).modules() == len(list(TrainStep(model, train_step, None).modules()))
    big = Workload(d_model=5120, n_layers=40, n_heads=40, vocab=50257, seq_len=2048, batch=512, dp=128, zero=3)
    forward = sum(p for p in big.module_params() if p > 10**5)  # every module but the norms
    gathered = sum(zero3_gathers(big)) / 4
    assert forward < gathered < 2 * forward  # the last blocks' weights are reused within 1e9 elements


def test_contention_grows_with_the_operators_size_and_defaults_to_the_busy_factor() -> None:
    alone = law_rows(("gelu_fwd", "layernorm_fwd"), n=12)
    busy = [{**r, "ranks": 2, "seconds": r["seconds"] * 1.05 * r["shape"][0] ** 0.02} for r in alone
            if r["kind"] == "gelu_fwd"]
    reference = {"reference_step": {"alone_s": 1.0, "busy_s": 1.2, "sync_s": 1.3, "allreduce_s": 0.05}}
    model = FittedModel(alone + busy, {"hardware": "law", "device": "cpu", **reference})
    small, large = model.contention("gelu_fwd", "float32", np.array([[100.0], [10.0**6]]))
    assert (small, large) == pytest.approx((1.05 * 100**0.02, 1.05 * 10**(6 * 0.02)))
    assert model.contention("layernorm_fwd", "float32", np.array([[8.0, 8.0]]))[0] == pytest.approx(1.2)


def test_overheads_are_fitted_on_the_calibration_steps() -> None:
    """Calibration steps that take the predicted operators plus 3 us per call without a kernel, 2 ms per
    micro-batch, 5 ms per step, and under ZeRO-3 (against ZeRO-0, plus 7 ms both) 40 us per module and
    micro-batch: the fit finds those."""
    kinds = ("gemm", "sdpa_fwd", "sdpa_bwd", "layernorm_fwd", "layernorm_bwd", "gelu_fwd", "gelu_bwd", "add",
             "embedding_fwd", "embedding_bwd", "cross_entropy_fwd", "cross_entropy_bwd", "adamw", "grad_norm",
             "allreduce", "allgather", "reduce_scatter")
    meta = {"hardware": "law", "device": "cpu", "devices_per_node": 2}
    operators = law_rows(kinds)
    bare = FittedModel(operators, meta)
    truth = Overheads(dispatch_s=3e-6, step_s=5e-3, micro_s=2e-3, module_s=4e-5)
    steps = []
    for config in CALIBRATION:
        row = {"kind": "step", "shape": [*config, 512, -1], "tier": "", "dtype": "float32", "ranks": 1}
        w = calibration_workload(row)
        extra = truth.dispatch_s * dispatch_calls(w) + truth.micro_s * w.grad_accum + truth.step_s
        steps.append({**row, "seconds": step_time(w, bare, 0.0).step + extra})
    bare.overheads = Overheads(dispatch_s=truth.dispatch_s, step_s=truth.step_s, micro_s=truth.micro_s)
    for config in CALIBRATION[1:4]:
        for zero in (3, 0):
            row = {"kind": "step", "shape": [*config, 512, zero], "tier": "", "dtype": "float32", "ranks": 2}
            w = calibration_workload(row)
            hooks = truth.module_s * w.modules() * w.grad_accum if zero == 3 else 0.0
            steps.append({**row, "seconds": step_time(w, bare, 0.0).step + 7e-3 + hooks})
    fitted = FittedModel(operators + steps, meta).overheads
    for name in ("dispatch_s", "step_s", "micro_s", "module_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3), name
    assert FittedModel(operators, meta).overheads == Overheads()  # no calibration steps: none


def test_node_factors_from_the_reference_step_slow_multi_rank_steps_only() -> None:
    busy, skew = node_factors({"alone_s": 1.0, "busy_s": 1.1, "sync_s": 1.2, "allreduce_s": 0.05})
    assert busy == pytest.approx(1.1) and skew == pytest.approx(0.05 / 1.1)
    assert node_factors({"alone_s": 1.0}) == (1.0, 0.0)  # a one-rank profile
    slow = Constant()
    slow.busy_factor, slow.sync_skew = busy, skew
    one, two = SMALL.with_layout(clip_grad=False), SMALL.with_layout(dp=2, clip_grad=False)
    assert step_time(one, slow, 0.0).step == pytest.approx(step_time(one, Constant(), 0.0).step)
    fast, slowed = step_time(two, Constant(), 0.0), step_time(two, slow, 0.0)
    assert slowed.forward == pytest.approx(fast.forward * busy * (1 + skew))
    assert slowed.dp_comm == pytest.approx(fast.dp_comm)


def test_memory_falls_with_each_zero_stage_and_with_checkpointing() -> None:
    w = Workload(d_model=5120, n_layers=40, n_heads=40, vocab=50257, seq_len=2048, batch=1024, dp=128,
                 grad_accum=4, dtype="bfloat16")
    totals = [w.with_layout(zero=z).memory_bytes()["total"] for z in (None, 1, 2, 3)]
    assert totals == sorted(totals, reverse=True) and totals[0] > 80 * 2**30 > totals[3]
    assert w.with_layout(checkpointing=True).memory_bytes()["activations"] < w.memory_bytes()["activations"] / 5


def test_from_spec_reads_the_experiment_and_refuses_what_it_does_not_model() -> None:
    w = from_spec(spec_mod.load(LM / "gpt1b_zero3.yaml"))
    assert (w.d_model, w.n_layers, w.seq_len, w.dp, w.zero, w.grad_accum, w.dtype, w.checkpointing) == \
        (2048, 24, 2048, 16, 3, 4, "bfloat16", True)
    with pytest.raises(SpecError, match="config.attention"):
        from_spec(spec_mod.load(LM / "stdlib_complex.yaml"))
    with pytest.raises(SpecError, match="method"):
        from_spec(spec_mod.load(REPO / "experiments" / "quickstart.yaml"))


def test_plan_a_13b_model_on_128_gpus(tmp_path: Path) -> None:
    """Every layout ranked, the best fitting one written as a file that extends the experiment, logged to MLflow."""
    file = LM / "gpt13b_zero3.yaml"
    spec = spec_mod.load(file)
    rows = plan_mod.plan(spec, plan_mod.predictor_for("h100"), devices=128, nodes=16)
    assert len(rows) > 100 and rows[0]["fits"] and not rows[-1]["fits"]
    fitting = [r for r in rows if r["fits"]]
    assert [r["step_s"] for r in fitting] == sorted(r["step_s"] for r in fitting)
    assert all(r["dp"] * r["tp"] * r["pp"] == 128 and r["tp"] <= 8 for r in rows)
    files = plan_mod.write(spec, str(file), [], rows, tmp_path / "plan")
    planned = spec_mod.load(files["override"])
    best = plan_mod.best_runnable(rows)
    assert planned.resources.workers == best["dp"] and planned.optim.grad_accum == best["grad_accum"]
    assert planned.optim.batch_size == spec.optim.batch_size and planned.name == "lm-gpt13b-zero3-planned"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = plan_mod.log_to_mlflow(uri, spec, str(file), "h100", 128, 16, rows, files, 0.5)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    assert run.data.metrics["runnable/step_s"] == pytest.approx(best["step_s"])
    assert {a.path for a in MlflowClient(uri).list_artifacts(run_id)} >= {"plan.csv", "plan.md",
                                                                          "lm-gpt13b-zero3.planned.yaml"}


def test_plan_command_line_errors_name_the_argument(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = str(LM / "gpt13b_zero3.yaml")
    assert cli.main(["plan", file, "--gpus", "128", "--nodes", "3"]) == 2
    assert "--nodes 3" in capsys.readouterr().err
    assert cli.main(["plan", file, "--gpus", "8", "--hardware", "tpu9"]) == 2
    assert "--hardware 'tpu9'" in capsys.readouterr().err
    assert cli.main(["plan", file, "--gpus", "8", "--hardware", str(tmp_path / "none.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_breakdown_step_is_the_sum_of_its_parts() -> None:
    b = Breakdown(forward=1.0, backward=2.0, bubble=0.5, pipeline_p2p=0.1, dp_comm=0.2, optimizer=0.3)
    assert b.step == pytest.approx(4.1)


@pytest.mark.ray
def test_profile_then_plan_on_this_machine(ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    """`orchestrator profile --quick` of this machine (compute alone and on both ranks at once, collectives across
    Ray actors, calibration steps through the real step loop and DeepSpeed), then `plan` of the CPU language model
    on 2 devices with it: a table, an override that `orchestrator check` accepts, an MLflow run."""
    table = tmp_path / "cpu.parquet"
    assert cli.main(["profile", "--quick", "--threads", "2", "--out", str(table)]) == 0  # 4 Ray CPUs: 2 ranks
    assert "wrote" in capsys.readouterr().out
    rows, meta = read_table(table)
    reference = meta["reference_step"]  # the step-level sample: alone, both ranks busy, synchronised
    assert all(reference[k] > 0 for k in ("alone_s", "busy_s", "sync_s", "allreduce_s"))  # their order is noise-prone
    assert {r["kind"] for r in rows} >= set(COMPUTE) | {"allreduce", "allgather", "reduce_scatter", "sendrecv"}
    assert meta["device"] == "cpu" and meta["devices_per_node"] == 2 and meta["threads"] == 2
    steps = [r for r in rows if r["kind"] == "step"]  # real steps: 2 on one rank, ZeRO-3 and ZeRO-0 on both
    assert sorted((r["ranks"], r["shape"][-1]) for r in steps) == [(1, -1), (1, -1), (2, 0), (2, 3)]
    assert all(r["seconds"] > 0 for r in steps)
    assert any(r["ranks"] == 2 and not r["tier"] for r in rows)  # compute with both ranks busy
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    file = str(LM / "stdlib_rope.yaml")
    assert cli.main(["plan", file, "--gpus", "2", "--hardware", str(table), "--out", "plan"]) == 0
    out = capsys.readouterr().out
    assert "lm-stdlib-rope on 2 x" in out and "MLflow run" in out
    override = tmp_path / "plan" / "lm-stdlib-rope.planned.yaml"
    assert cli.main(["check", str(override)]) == 0
    body = yaml.safe_load(override.read_text())
    assert body["resources"]["workers"] in (1, 2) and "s/step" in override.read_text().splitlines()[0]
