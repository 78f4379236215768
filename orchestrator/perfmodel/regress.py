"""Per-operator regressors fitted on a profile table, and the spec-sheet roofline used without one.

For every operator kind (per dtype; collectives per tier) three candidates are fitted and compared by 5-fold
cross-validation, and the one with the lowest time-weighted error predicts (the simpler one when within half a
point):

    analytic  t = c0 + c1 FLOPs + c2 bytes (c >= 0, least squares on relative error): latency plus the work at a
              fitted throughput, the additive roofline; for collectives c0 + c1 log2(world) + c2 ring-bytes
    forest    a random forest on log features (the shape, log FLOPs, log bytes) predicting log t: captures BLAS
              tiling and algorithm switches, but is flat outside the sampled range
    hybrid    the analytic model times a forest fitted on log(t / analytic): the forest's corrections inside the
              range, the analytic slope outside it

Two more fits make a step out of the operators (both from the profile's own samples, never from a validated run):
the contention of each operator kind when the node's every rank runs at once, as a function of its size
(`ContentionModel`), and what a real step costs beyond its operators (`fit_overheads`: per traced call without a
kernel, per micro-batch, per step, and per module under ZeRO-3), by least squares on the profile's calibration
steps.

`Datasheet` predicts from a device's published peak throughput and bandwidths (with fixed efficiencies) when no
profile of the hardware exists, e.g. planning a cluster of GPUs from a laptop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import nnls
from sklearn.ensemble import RandomForestRegressor
from sklearn.model_selection import KFold

from orchestrator.perfmodel.compose import Overheads, dispatch_calls, step_time
from orchestrator.perfmodel.ops import COLLECTIVES, cost
from orchestrator.perfmodel.workload import Workload

CANDIDATES = ("analytic", "hybrid", "forest")  # simplest first: a tie within TIE points goes to the simpler
TIE = 0.5
WORD = {"float32": 4, "bfloat16": 2, "float16": 2}


def _cost_matrix(kind: str, shapes: np.ndarray, word: int) -> np.ndarray:  # (N, F) -> (N, 2) FLOPs, bytes
    return np.array([cost(kind, tuple(int(v) for v in shape), word) for shape in shapes], dtype=float)


def _analytic_basis(kind: str, shapes: np.ndarray, word: int) -> np.ndarray:  # (N, 3)
    costs = _cost_matrix(kind, shapes, word)
    if kind in COLLECTIVES:
        return np.column_stack([np.ones(len(shapes)), np.log2(shapes[:, 1]), costs[:, 1]])
    if kind in ("adamw", "grad_norm"):  # per-tensor launch cost instead of FLOPs (a fixed multiple of the bytes)
        return np.column_stack([np.ones(len(shapes)), shapes[:, 1], costs[:, 1]])
    return np.column_stack([np.ones(len(shapes)), costs])


def _forest_features(kind: str, shapes: np.ndarray, word: int) -> np.ndarray:
    costs = _cost_matrix(kind, shapes, word)
    return np.log(np.column_stack([shapes, np.maximum(costs, 1.0)]).astype(float))


@dataclass
class KindModel:
    """One operator kind's fitted regressor."""

    kind: str
    word: int
    choice: str = "hybrid"
    coef: np.ndarray = field(default_factory=lambda: np.zeros(3))
    forest: Any = None  # on log t (choice forest) or on log(t / analytic) (choice hybrid)
    cv: dict[str, dict[str, float]] = field(default_factory=dict)

    def fit(self, shapes: np.ndarray, seconds: np.ndarray, choice: str) -> KindModel:
        self.choice = choice
        basis = _analytic_basis(self.kind, shapes, self.word)
        self.coef = nnls(basis / seconds[:, None], np.ones(len(seconds)))[0]  # minimise relative error
        if choice != "analytic":
            target = np.log(seconds) - (np.log(self._analytic(shapes)) if choice == "hybrid" else 0.0)
            self.forest = RandomForestRegressor(n_estimators=60, min_samples_leaf=2, random_state=0)
            self.forest.fit(_forest_features(self.kind, shapes, self.word), target)
        return self

    def _analytic(self, shapes: np.ndarray) -> np.ndarray:
        return np.maximum(_analytic_basis(self.kind, shapes, self.word) @ self.coef, 1e-7)

    def predict(self, shapes: np.ndarray) -> np.ndarray:  # (N, F) -> (N,) seconds
        if self.choice == "analytic":
            return self._analytic(shapes)
        correction = self.forest.predict(_forest_features(self.kind, shapes, self.word))
        return np.exp(correction) * (self._analytic(shapes) if self.choice == "hybrid" else 1.0)


def cross_validate(kind: str, word: int, shapes: np.ndarray, seconds: np.ndarray,
                   folds: int = 5) -> dict[str, dict[str, float]]:
    """Per candidate, on held-out folds: the mean absolute percentage error (mape) and the time-weighted one
    (wape = sum |error| / sum t, in %: the error a sum of such operators would have, which the choice uses, so
    that microsecond-sized shapes do not outvote the ones a step spends its time in)."""
    errors = {name: np.zeros(len(seconds)) for name in CANDIDATES}
    splits = KFold(n_splits=min(folds, len(seconds)), shuffle=True, random_state=0).split(shapes)
    for train, test in splits:
        for name in CANDIDATES:
            model = KindModel(kind, word).fit(shapes[train], seconds[train], name)
            errors[name][test] = model.predict(shapes[test]) - seconds[test]
    return {name: {"mape": 100.0 * float(np.mean(np.abs(e) / seconds)),
                   "wape": 100.0 * float(np.abs(e).sum() / seconds.sum())} for name, e in errors.items()}


@dataclass
class ContentionModel:
    """How much slower an operator kind runs with the node's every rank running it at once, against alone:
    log(t_busy / t_alone) = c0 + c1 log(bytes) + c2 log(FLOPs), least squares over the profile's paired shapes,
    never below 1."""

    kind: str
    word: int
    coef: np.ndarray

    @classmethod
    def fit(cls, kind: str, word: int, shapes: np.ndarray, ratio: np.ndarray) -> ContentionModel:
        if len(ratio) < 6:
            return cls(kind, word, np.array([np.log(np.median(ratio)), 0.0, 0.0]))
        coef = np.linalg.lstsq(cls._basis(kind, word, shapes), np.log(ratio), rcond=None)[0]
        return cls(kind, word, coef)

    @staticmethod
    def _basis(kind: str, word: int, shapes: np.ndarray) -> np.ndarray:  # (N, 3)
        costs = np.maximum(_cost_matrix(kind, shapes, word), 1.0)
        return np.column_stack([np.ones(len(shapes)), np.log(costs[:, 1]), np.log(costs[:, 0])])

    def factor(self, shapes: np.ndarray) -> np.ndarray:
        return np.maximum(1.0, np.exp(self._basis(self.kind, self.word, shapes) @ self.coef))


class FittedModel:
    """Every operator kind of a profile table, each with its cross-validated choice of regressor; each compute
    kind's contention on a busy node; the step's overheads."""

    def __init__(self, rows: list[dict[str, Any]], meta: dict[str, Any]):
        self.meta = meta
        self.hardware = meta["hardware"]
        self.devices_per_node = int(meta.get("devices_per_node", 1))
        self.busy_factor, self.sync_skew = node_factors(meta.get("reference_step", {}))
        self.models: dict[tuple[str, str], KindModel] = {}
        self.dtypes = sorted({row["dtype"] for row in rows if not row["tier"]})
        operators = [row for row in rows if row["kind"] != "step" and (row["tier"] or row.get("ranks", 1) == 1)]
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in operators:
            groups.setdefault((row["kind"], row["tier"] or row["dtype"]), []).append(row)
        for key, group in sorted(groups.items()):
            shapes = np.array([r["shape"] for r in group], dtype=float)
            seconds = np.array([r["seconds"] for r in group], dtype=float)
            word = WORD[group[0]["dtype"]]
            cv = cross_validate(key[0], word, shapes, seconds) if len(group) >= 10 else {}
            best = min((scores["wape"] for scores in cv.values()), default=math.nan)
            choice = next((name for name in CANDIDATES if cv and cv[name]["wape"] <= best + TIE), "analytic")
            model = KindModel(key[0], word).fit(shapes, seconds, choice)
            model.cv = cv
            self.models[key] = model
        self.contended = fit_contention(rows)
        self.overheads = Overheads()  # the calibration steps' operators are predicted without any
        self.overheads = fit_overheads(self, [row for row in rows if row["kind"] == "step"])

    def predict(self, kind: str, key: str, shapes: np.ndarray) -> np.ndarray:
        """Seconds of `kind` at each shape; `key` is the dtype for compute, the tier for collectives (a profile of
        one node answers the inter tier with its intra samples)."""
        model = self.models.get((kind, key)) or self.models.get((kind, {"inter": "intra"}.get(key, key)))
        if model is None:
            known = sorted({k for k, _ in self.models})
            raise KeyError(f"the profile of {self.hardware} has no samples of {kind} ({key}); it has {known}")
        return model.predict(np.asarray(shapes, dtype=float))

    def contention(self, kind: str, key: str, shapes: np.ndarray) -> np.ndarray:
        """Factor by which each shape of `kind` slows on a node whose every rank is busy: its kind's fit, else the
        reference step's busy factor."""
        shapes = np.asarray(shapes, dtype=float)
        model = self.contended.get((kind, key))
        return model.factor(shapes) if model is not None else np.full(len(shapes), self.busy_factor)

    def summary(self) -> list[dict[str, Any]]:
        return [{"kind": kind, "key": key, "choice": m.choice,
                 **{f"cv_{metric}_{name}": value for name, scores in m.cv.items() for metric, value in scores.items()}}
                for (kind, key), m in self.models.items()]


def fit_contention(rows: list[dict[str, Any]]) -> dict[tuple[str, str], ContentionModel]:
    """Per compute kind and dtype: the shapes timed both alone and on every rank of a node at once."""
    alone = {(r["kind"], r["dtype"], tuple(r["shape"])): r["seconds"] for r in rows
             if not r["tier"] and r.get("ranks", 1) == 1 and r["kind"] != "step"}
    pairs: dict[tuple[str, str], list[tuple[tuple[int, ...], float]]] = {}
    for r in rows:
        single = alone.get((r["kind"], r["dtype"], tuple(r["shape"])))
        if not r["tier"] and r.get("ranks", 1) > 1 and r["kind"] != "step" and single:
            pairs.setdefault((r["kind"], r["dtype"]), []).append((tuple(r["shape"]), r["seconds"] / single))
    return {(kind, dtype): ContentionModel.fit(kind, WORD[dtype], np.array([s for s, _ in found], dtype=float),
                                               np.array([ratio for _, ratio in found]))
            for (kind, dtype), found in pairs.items()}


def calibration_workload(row: dict[str, Any]) -> Workload:
    """The workload of a calibration step row (profile.CALIBRATION): its config, vocabulary and ZeRO stage."""
    d, layers, heads, seq, micro, accum, vocab, zero = row["shape"]
    ranks = int(row["ranks"])
    return Workload(d_model=d, n_layers=layers, n_heads=heads, vocab=vocab, seq_len=seq, batch=micro * accum * ranks,
                    grad_accum=accum, dp=ranks, zero=None if zero < 0 else zero)


def fit_overheads(model: FittedModel, steps: list[dict[str, Any]]) -> Overheads:
    """The step's costs beyond its operators, from the calibration steps (none: zero). One rank: the measured
    step minus its predicted operators = dispatch_s x (calls without a kernel) + micro_s x micro-batches + step_s,
    non-negative least squares. ZeRO-3 on a node's ranks, against the same step under ZeRO-0 (which cancels what
    both share): the difference left after the predicted collectives = module_s x modules x micro-batches."""
    single = [(calibration_workload(r), r["seconds"]) for r in steps if r["ranks"] == 1]
    if len(single) < 3:
        return Overheads()
    basis = np.array([[dispatch_calls(w), w.grad_accum, 1.0] for w, _ in single])
    residual = np.array([seconds - step_time(w, model, 0.0).step for w, seconds in single])
    dispatch_s, micro_s, step_s = nnls(basis, residual)[0]
    model.overheads = Overheads(dispatch_s=dispatch_s, step_s=step_s, micro_s=micro_s)
    multi = {(tuple(r["shape"][:7]), r["ranks"], r["shape"][7]): r for r in steps if r["ranks"] > 1}
    x, y = [], []
    for (config, ranks, zero), row in multi.items():
        twin = multi.get((config, ranks, 0))
        if zero != 3 or twin is None:
            continue
        w3, w0 = calibration_workload(row), calibration_workload(twin)
        x.append(w3.modules() * w3.grad_accum)
        y.append((row["seconds"] - step_time(w3, model, 0.0).step) - (twin["seconds"] - step_time(w0, model, 0.0).step))
    module_s = max(0.0, float(np.dot(x, y) / np.dot(x, x))) if x else 0.0
    return Overheads(dispatch_s=dispatch_s, step_s=step_s, micro_s=micro_s, module_s=module_s)


def node_factors(reference: dict[str, float]) -> tuple[float, float]:
    """(busy factor, sync skew) from the profile's reference step (profile.RankBench.reference_step): how much
    slower a compute-bound step runs when every rank of a node runs one (t_busy / t_alone), and what a data-parallel
    step loses beyond its isolated all-reduce to waiting for the slowest rank, as a fraction of its compute
    ((t_sync - t_busy - t_allreduce) / t_busy). (1, 0) without a reference step (a one-rank profile)."""
    if not reference.get("busy_s"):
        return 1.0, 0.0
    busy = reference["busy_s"] / reference["alone_s"]
    skew = (reference["sync_s"] - reference["busy_s"] - reference["allreduce_s"]) / reference["busy_s"]
    return max(1.0, busy), max(0.0, skew)


@dataclass(frozen=True)
class Datasheet:
    """Roofline of a device from its published numbers: t = max(FLOPs / (eff F), bytes / (eff B)) + launch;
    collectives t = latency + ring-bytes / link bandwidth (NVLink inside a node, the NIC across nodes)."""

    hardware: str
    flops: float  # dense bf16 FLOP/s
    hbm: float  # bytes/s
    intra_bw: float  # bytes/s per device inside a node
    inter_bw: float  # bytes/s per device across nodes
    memory: float  # bytes per device
    devices_per_node: int = 8
    busy_factor: float = 1.0  # GPUs do not share their compute with the node's other ranks
    sync_skew: float = 0.0
    gemm_efficiency: float = 0.7
    other_efficiency: float = 0.5
    launch: float = 5e-6
    latency: dict[str, float] = field(default_factory=lambda: {"intra": 1e-5, "inter": 3e-5})
    overheads: Overheads = field(default_factory=Overheads)

    def contention(self, kind: str, key: str, shapes: np.ndarray) -> np.ndarray:
        return np.ones(len(shapes))  # a GPU's kernels do not share it with the node's other ranks

    def predict(self, kind: str, key: str, shapes: np.ndarray) -> np.ndarray:
        shapes = np.asarray(shapes, dtype=float)
        word = WORD.get(key, 4)
        costs = _cost_matrix(kind, shapes, word)
        if kind in COLLECTIVES:
            bandwidth = self.intra_bw if key == "intra" else self.inter_bw
            return self.latency[key] * np.log2(np.maximum(shapes[:, 1], 2)) + costs[:, 1] / bandwidth
        efficiency = self.gemm_efficiency if kind == "gemm" or kind.startswith("sdpa") else self.other_efficiency
        return self.launch + np.maximum(costs[:, 0] / (efficiency * self.flops), costs[:, 1] / (efficiency * self.hbm))


DATASHEETS = {  # vendor peak numbers: dense bf16 tensor-core FLOP/s, HBM, NVLink per GPU, one 200/400 Gb/s NIC per GPU
    "a100": Datasheet("NVIDIA A100-SXM4-80GB (datasheet)", 312e12, 2.04e12, 300e9, 25e9, 80 * 2**30),
    "h100": Datasheet("NVIDIA H100-SXM5-80GB (datasheet)", 989e12, 3.35e12, 450e9, 50e9, 80 * 2**30),
    "h200": Datasheet("NVIDIA H200-SXM-141GB (datasheet)", 989e12, 4.8e12, 450e9, 50e9, 141 * 10**9),
    "gh200": Datasheet("NVIDIA GH200 (datasheet)", 989e12, 4.0e12, 25e9, 25e9, 96 * 2**30, devices_per_node=1),
}
