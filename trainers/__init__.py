"""Method registry: an explicit name -> module dict, imported lazily so `orchestrator ls` stays fast.

Each module exposes `SPEC = TrainerSpec(...)` (see trainers/_common/contract.py and DESIGN.md).
"""

from __future__ import annotations

import importlib

from trainers._common.contract import Batch, ConfigError, DataInfo, RunContext, TrainerSpec

TRAINERS: dict[str, str] = {
    "supervised": "trainers.supervised",
    "fixmatch": "trainers.fixmatch",
    "simmatch": "trainers.simmatch",
    "simmatchv2": "trainers.simmatchv2",
    "lm": "trainers.lm",
    "sft": "trainers.rl.sft",
    "ppo": "trainers.rl.ppo",
    "grpo": "trainers.rl.grpo",
    "vapo": "trainers.rl.vapo",
    "nas_bench": "trainers.nas_bench",
    "greenmim": "trainers.greenmim",
    "simmim": "trainers.simmim",
    "ressl": "trainers.ressl",
    "wcl": "trainers.wcl",
    "lewel": "trainers.lewel",
    "linear_probe": "trainers.linear_probe",
    "sau": "trainers.sau",
    "cone": "trainers.cone",
    "diffkd": "trainers.diffkd",
    "ddpm": "trainers.ddpm",
    "generate": "trainers.generate",
    "prcl": "trainers.prcl",
    "confiner": "trainers.confiner",
    "kshot_nas": "trainers.kshot_nas",
    "vitas": "trainers.vitas",
    "path_eval": "trainers.path_eval",
}


def get(name: str) -> TrainerSpec:
    """The SPEC of method `name`; KeyError lists the known methods."""
    if name not in TRAINERS:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(sorted(TRAINERS))}")
    return importlib.import_module(TRAINERS[name]).SPEC


__all__ = ["TRAINERS", "get", "Batch", "ConfigError", "DataInfo", "RunContext", "TrainerSpec"]
