"""One architecture evaluated with a trained supernet's shared weights: the trial of a weight-sharing search.

A K-shot NAS or ViTAS supernet (trainers/kshot_nas.py, trainers/vitas.py) ranks the members of its space without
training them: a search (`orchestrator search`, an `architecture` space on `config.arch`) runs this method once per
candidate. Following SPOS, which K-shot NAS evaluates paths like, the path's batch-norm statistics are re-estimated
first (`calib_batches` training batches, plain average; the supernet's own statistics mix all paths), then the
path's top-1 accuracy on the experiment's evaluation set is the candidate's `eval/acc`. A superformer has only
layer norms: nothing is recalibrated.

`supernet_from` names the supernet: its run's checkpoint directory, its model.pt, `run:<name>` or
`mlflow:<run_id>`; the supernet records its method, space and Config in the checkpoint, so nothing else is
repeated here. The architecture must belong to the supernet's space.

Reported: eval/acc, eval/mflops and eval/params_m of the stand-alone network, eval/calib_images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

import trainers
from trainers._common.contract import ConfigError, DataInfo, RunContext, TrainerSpec
from trainers.nas import InvalidArchitecture, parse_arch_value
from trainers.nas.supernet import Supernet, load_supernet, path_accuracy, recalibrate_bn
from trainers.supervised import model_file


@dataclass
class Config:
    """Which architecture to evaluate with which supernet, and how many batches recalibrate and evaluate it."""

    supernet_from: str = ""  # the supernet's checkpoint directory, model.pt, run:<name> or mlflow:<run_id>
    arch: str = "macro_digits:0000"  # <space>:<code>; the searcher sets it per trial
    calib_batches: int = 20  # training batches that re-estimate the path's BN statistics (0: keep the supernet's)
    batch_size: int = 64  # calibration and evaluation batch size
    eval_batches: int = 0  # evaluation batches (0: the whole evaluation set)


TINY = Config(calib_batches=2, batch_size=16, eval_batches=2)


def check(cfg: Config) -> None:
    try:
        parse_arch_value(cfg.arch)
    except (KeyError, InvalidArchitecture) as err:
        raise ConfigError("arch", "<space>:<code> of a known space", f"{cfg.arch} ({err.args[0]})") from None
    if not cfg.supernet_from or not model_file(cfg.supernet_from).is_file():
        raise ConfigError("supernet_from", "the supernet run's checkpoint directory (holding model.pt), a model.pt "
                          "file, run:<name> or mlflow:<run_id>", cfg.supernet_from)
    for field in ("calib_batches", "eval_batches"):
        if getattr(cfg, field) < 0:
            raise ConfigError(field, "a number >= 0", getattr(cfg, field))
    if cfg.batch_size < 1:
        raise ConfigError("batch_size", "a number >= 1", cfg.batch_size)


def build_supernet(method: str, config: dict[str, Any], info: DataInfo) -> Supernet:
    """An empty supernet of `method` with the recorded Config fields."""
    spec = trainers.get(method)
    fields = {f.name for f in dataclasses.fields(spec.Config)}
    return spec.build(spec.Config(**{k: v for k, v in config.items() if k in fields}), info)


def batches(dataset: Any, batch_size: int, limit: int, shuffle: bool, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Up to `limit` batches (0: all) of `dataset`."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(seed))
    for index, batch in enumerate(loader):
        if limit and index == limit:
            return
        yield batch


def evaluate(model: Supernet, code: str, data: Any, cfg: Config, device: torch.device) -> tuple[float, int]:
    """(accuracy of path `code` on data.test, calibration images seen). Every candidate recalibrates on the same
    images with the same augmentations (shuffle and torch's RNG seeded with 0), so candidates differ only in
    themselves."""
    seen = 0
    if cfg.calib_batches:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            seen = recalibrate_bn(model, code, _on(batches(data.train, cfg.batch_size, cfg.calib_batches, True, 0),
                                                  device))
    accuracy = path_accuracy(model, code, _on(batches(data.test, cfg.batch_size, cfg.eval_batches, False, 0), device))
    return accuracy, seen


def run(cfg: Config, ctx: RunContext) -> dict[str, float]:
    space, code = parse_arch_value(cfg.arch)
    data = ctx.data()
    model = load_supernet(model_file(cfg.supernet_from), lambda m, c: build_supernet(m, c, data.info))
    if model.space.name != space.name:
        raise ValueError(f"arch {cfg.arch}: the supernet {cfg.supernet_from} covers space {model.space.name}, "
                         f"not {space.name}")
    accuracy, seen = evaluate(model.to(ctx.device), code, data, cfg, ctx.device)
    metrics = {"eval/acc": accuracy, "eval/mflops": space.flops(code), "eval/params_m": space.params(code),
               "eval/calib_images": float(seen)}
    ctx.report(metrics, step=1)
    return metrics


def _on(loader: Iterator[dict[str, torch.Tensor]], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    for batch in loader:
        yield {k: v.to(device) for k, v in batch.items()}


SPEC = TrainerSpec(
    name="path_eval",
    paper="weight-sharing path evaluation (SPOS BN recalibration; K-shot NAS, ViTAS)",
    Config=Config,
    TINY=TINY,
    run=run,
    check=check,
    path_fields=("supernet_from",),
)
