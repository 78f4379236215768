"""A corpus of broken inputs, table-driven: broken experiment files (YAML the hardened loader refuses, wrong types
and out-of-range values in every block, unknown names, bad `base:` chains, bad sweeps, storage and MLflow stores
this machine cannot use), bad `--set` overrides, and bad arguments of every command.

Each case runs `orchestrator.cli.main` in-process and must: exit 2, write exactly one line to stderr naming the
problem (the key or the argument; the file for file cases), print no traceback, finish within 5 s, and never
start Ray (`ray.is_initialized()` stays False and no raylet or GCS process is a child of this one). A sample runs
the console script in a fresh process. Semantic checks with a dataset on disk are in test_bad_input.py.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import ray
import yaml

from orchestrator.cli import main

REPO = Path(__file__).resolve().parents[1]
LM = REPO / "experiments" / "lm" / "gpt125m_zero2.yaml"
DELETE = object()
GOOD = {"name": "corpus", "method": "supervised", "data": {"dataset": "digits", "image_size": 16},
        "config": {"arch": "small_cnn"}, "optim": {"name": "sgd", "lr": 0.1, "steps": 10, "batch_size": 32},
        "resources": {"workers": 2}}
TUNE = {"metric": "eval/accuracy", "mode": "max", "space": {"optim.lr": {"loguniform": [0.01, 0.5]}}}
ARCH = {"config.arch": {"architecture": "nas_bench_macro"}}
GOOD_TEXT = yaml.safe_dump(GOOD, sort_keys=False)
BOMB = "\n".join(["  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] +
                 [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)])


@dataclass
class Case:
    what: str
    names: str  # a text the error line must contain: the key or the argument
    changes: dict = field(default_factory=dict)  # merged into GOOD (DELETE removes a key)
    text: str | None = None  # the file's text instead ({good}: GOOD's YAML); bytes for binary files
    overrides: list[str] = field(default_factory=list)
    command: str = "check"
    argv: list[str] | None = None  # the whole command line instead ({file}, {tmp}, {lm})
    env: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # more files under tmp: name -> text (str) or bytes


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and value:
            out[key] = merged(out.get(key) if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = value
    return out


def F(what: str, names: str, changes: dict | None = None, **kw) -> Case:
    return Case(what, names, changes or {}, **kw)


def T(what: str, names: str, text: str | bytes, **kw) -> Case:
    return Case(what, names, text=text, **kw)


def O(what: str, names: str, *overrides: str, command: str = "check") -> Case:
    return Case(what, names, overrides=list(overrides), command=command)


def A(what: str, names: str, *argv: str, **kw) -> Case:
    return Case(what, names, argv=list(argv), **kw)


YAML_CASES = [
    T("unclosed bracket", "valid YAML (line 2)", "name: [unclosed\n"),
    T("tab indentation", "valid YAML (line 2)", "name: x\n\tmethod: supervised\n"),
    T("bad indentation", "valid YAML (line 4)", "name: x\noptim:\n  lr: 1\n bad: 2\n"),
    T("unterminated quote", "valid YAML", "name: 'x\nmethod: supervised\n"),
    T("two documents", "valid YAML", "{good}---\nname: other\n"),
    T("a list at the top level", "a mapping of keys at the top level", "- a\n- list\n"),
    T("a scalar at the top level", "a mapping of keys at the top level", "just text\n"),
    T("an empty file", "a mapping of keys at the top level", ""),
    T("only a comment", "a mapping of keys at the top level", "# nothing here\n"),
    T("duplicate top-level key", "name: expected each key once in a mapping, found it on line 1 and line",
      "{good}name: again\n"),
    T("duplicate nested key", "optim.lr: expected each key once",
      GOOD_TEXT.replace("  lr: 0.1\n", "  lr: 0.1\n  lr: 0.2\n")),
    T("duplicate key in a flow mapping", "config.arch: expected each key once",
      GOOD_TEXT.replace("config:\n  arch: small_cnn\n", "config: {arch: small_cnn, arch: wrn28_2}\n")),
    T("duplicate key in a tune space", "tune.space.optim.lr: expected each key once",
      "{good}tune:\n  metric: eval/accuracy\n  mode: max\n  space:\n    optim.lr: {uniform: [0.1, 0.2]}\n"
      "    optim.lr: {uniform: [0.1, 0.3]}\n", command="sweep"),
    T("billion laughs under tune.searcher", "tune.searcher.a1.0: expected no YAML aliases",
      "{good}tune:\n  metric: eval/accuracy\n  mode: max\n  searcher:\n" + BOMB.replace("  a", "    a") + "\n"),
    T("billion laughs under resources.deepspeed.config", "resources.deepspeed.config.a1.0: expected no YAML aliases",
      GOOD_TEXT.replace("resources:\n  workers: 2\n", "resources:\n  workers: 2\n  deepspeed:\n    config:\n" +
                        BOMB.replace("  a", "      a") + "\n")),
    T("one alias", "name: expected no YAML aliases", "x: &n corpus\nname: *n\nmethod: supervised\n"),
    T("an undefined alias", "expected no YAML aliases", "name: *nowhere\nmethod: supervised\n"),
    T("a merge key", "expected a valid merge value", "{good}<<: {seed: 1}\n"),
    T("a 10,000-deep flow mapping", "expected at most 32 levels of nesting",
      "{good}" + "tracking: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n"),
    T("a 10,000-deep flow sequence", "config.x",
      GOOD_TEXT.replace("  arch: small_cnn\n", "  arch: small_cnn\n  x: " + "[" * 10_000 + "]" * 10_000 + "\n")),
    T("a 10,000-deep complex key", "expected at most 32 levels of nesting", "{" * 10_000 + "}" * 10_000 + "\n"),
    T("40 nested block mappings", "expected at most 32 levels of nesting",
      "{good}" + "".join(f"{'  ' * i}k{i}:\n" for i in range(40)) + "  " * 40 + "leaf: 1\n"),
    T("a complex key", "expected plain keys", "{good}? [a, b]\n: 1\n"),
    T("!!binary name", "name: expected plain values (no YAML tags", "name: !!binary aGVsbG8=\nmethod: supervised\n"),
    T("!!python/object/apply", "tag !!python/object/apply:os.system",
      "name: x\nmethod: !!python/object/apply:os.system [echo hi]\n"),
    T("!!python/name", "config.arch: expected plain values",
      GOOD_TEXT.replace("arch: small_cnn", "arch: !!python/name:os.system")),
    T("a custom tag", "tag !secret on line", "name: !secret x\nmethod: supervised\n"),
    T("!!set", "tag !!set", GOOD_TEXT.replace("config:\n  arch: small_cnn\n", "config: !!set {arch}\n")),
    T("!!omap", "tag !!omap", "name: x\nmethod: supervised\noptim: !!omap [{lr: 1}]\n"),
    T("!!float on a list", "tag", "name: x\nmethod: supervised\nseed: !!python/int 3\n"),
    T("latin-1 text", "expected UTF-8 text, found byte 0xe9 on line 3", b"name: x\nmethod: supervised\n# caf\xe9\n"),
    T("UTF-16 text", "expected UTF-8 text, found byte 0xff on line 1", "name: x\n".encode("utf-16")),
    T("a NUL byte", "special characters are not allowed", "name: x\x00\nmethod: supervised\n"),
    T("a bell character", "special characters are not allowed", "name: x\x07\nmethod: supervised\n"),
    T("random binary", "expected UTF-8 text", bytes(range(256)) * 8),
    T("a gzip file", "expected UTF-8 text", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(range(128, 256))),
    T("a 2 MiB file", "expected an experiment file of at most 64 KiB", "{good}" + "# padding\n" * 220_000),
    T("a 50 MB scalar", "expected an experiment file of at most 64 KiB", "name: " + "x" * 50_000_000 + "\n"),
    T("a 1 MB flow list of numbers", "expected an experiment file of at most 64 KiB",
      "{good}seeds: [" + ",".join(["1"] * 500_000) + "]\n"),
    T("an integer of 5000 digits", "seed: expected a valid int value", "{good}seed: " + "9" * 5000 + "\n"),
    T("an impossible date", "seed: expected a valid timestamp value", "{good}seed: 2024-13-45\n"),
    T("a null key", "None: expected a valid value (keys should be strings)", "{good}~: 1\n"),
    T("a number key", "1: expected a valid value (keys should be strings)", "{good}1: x\n"),
]

BLOCK_CASES = [
    F("name a number", "name: expected a valid string", {"name": 123}),
    F("name with a space", "name: expected a name of letters", {"name": "a b"}),
    F("name with a slash", "name: expected a name of letters", {"name": "../escape"}),
    F("name starting with a dash", "name: expected a name of letters", {"name": "-x"}),
    F("empty name", "name: expected a name of letters", {"name": ""}),
    F("non-ASCII name", "name: expected a name of letters", {"name": "café"}),
    F("300-character name", "name: expected a name of at most 128 characters", {"name": "a" * 300}),
    F("no name", "name: expected this required key", {"name": DELETE}),
    F("no method", "method: expected this required key", {"method": DELETE}),
    F("unknown method", "method: expected one of the known methods", {"method": "supervisd"}),
    F("method a list", "method: expected a valid string", {"method": ["supervised"]}),
    F("unknown top-level key", "epochs: expected a known key", {"epochs": 3}),
    F("negative seed", "seed: expected greater than or equal to 0", {"seed": -1}),
    F("seed 2**64", "seed: expected less than 9223372036854775808", {"seed": 2**64}),
    F("seed 2**63", "seed: expected less than", {"seed": 2**63}),
    F("fractional seed", "seed: expected a valid integer", {"seed": 1.5}),
    F("seed a word", "seed: expected a valid integer", {"seed": "lucky"}),
    F("data a string", "data: expected a valid dictionary", {"data": "digits"}),
    F("unknown dataset", "data.dataset: expected", {"data": {"dataset": "imagenet"}}),
    F("no dataset", "data.dataset: expected this required key", {"data": {"dataset": DELETE}}),
    F("zero image size", "data.image_size: expected greater than 0", {"data": {"image_size": 0}}),
    F("huge image size", "data.image_size: expected less than or equal to 65536", {"data": {"image_size": 10**6}}),
    F("image size a word", "data.image_size: expected a valid integer", {"data": {"image_size": "big"}}),
    F("unknown views", "data.views: expected", {"data": {"views": "three_crop"}}),
    F("labeled fraction above 1", "data.labeled_fraction: expected less than or equal to 1",
      {"data": {"labeled_fraction": 1.5}}),
    F("labeled fraction nan", "data.labeled_fraction: expected a finite number",
      {"data": {"labeled_fraction": float("nan")}}),
    F("imbalance factor below 1", "data.imbalance_factor: expected greater than or equal to 1",
      {"data": {"imbalance_factor": 0.5}}),
    F("zero unlabeled ratio", "data.unlabeled_ratio: expected greater than 0", {"data": {"unlabeled_ratio": 0}}),
    F("negative loader workers", "data.loader_workers: expected greater than or equal to 0",
      {"data": {"loader_workers": -1}}),
    F("100000 loader workers", "data.loader_workers: expected less than or equal to 1024",
      {"data": {"loader_workers": 100_000}}),
    F("unknown data key", "data.image_sise: expected a known key", {"data": {"image_sise": 16}}),
    F("download not a bool", "data.download: expected a valid boolean", {"data": {"download": "maybe"}}),
    F("root a list", "data.root: expected a valid string", {"data": {"root": ["a", "b"]}}),
    F("cifar10 without a root", "data: expected a `root` directory", {"data": {"dataset": "cifar10"}}),
    F("segmentation keys on digits", "data: expected", {"data": {"crop_size": 64}}),
    F("two labeled subsets", "data: expected at most one of",
      {"data": {"labeled_per_class": 4, "labeled_fraction": 0.1}}),
    F("sequence length 2**30", "data.seq_len: expected less than or equal to", {"data": {"seq_len": 2**30}}),
    F("vocabulary of 10", "data.vocab_size: expected greater than 256", {"data": {"vocab_size": 10}}),
    F("optim a list", "optim: expected a valid dictionary", {"optim": []}),
    F("unknown optimizer", "optim.name: expected 'sgd', 'adamw' or 'lars'", {"optim": {"name": "adam"}}),
    F("zero lr", "optim.lr: expected greater than 0", {"optim": {"lr": 0}}),
    F("negative lr", "optim.lr: expected greater than 0", {"optim": {"lr": -1}}),
    F("infinite lr", "optim.lr: expected a finite number", {"optim": {"lr": float("inf")}}),
    F("nan lr", "optim.lr: expected a finite number", {"optim": {"lr": float("nan")}}),
    F("lr a word", "optim.lr: expected a valid number", {"optim": {"lr": "fast"}}),
    F("lr the string inf", "optim.lr: expected a finite number", {"optim": {"lr": "inf"}}),
    F("momentum 1", "optim.momentum: expected less than 1", {"optim": {"momentum": 1.0}}),
    F("negative weight decay", "optim.weight_decay: expected greater than or equal to 0",
      {"optim": {"weight_decay": -0.1}}),
    F("one beta", "optim.betas", {"optim": {"betas": [0.9]}}),
    F("nan beta", "optim.betas.1: expected a finite number", {"optim": {"betas": [0.9, float("nan")]}}),
    F("unknown schedule", "optim.schedule: expected", {"optim": {"schedule": "linear"}}),
    F("negative warmup", "optim.warmup_steps: expected greater than or equal to 0", {"optim": {"warmup_steps": -1}}),
    F("warmup 1e10", "optim.warmup_steps: expected less than or equal to 1000000000",
      {"optim": {"warmup_steps": 10**10}}),
    F("milestones a string", "optim.milestones: expected a valid list", {"optim": {"milestones": "10"}}),
    F("negative milestone", "optim.milestones.0: expected greater than or equal to 0", {"optim": {"milestones": [-5]}}),
    F("zero gamma", "optim.gamma: expected greater than 0", {"optim": {"gamma": 0}}),
    F("zero steps", "optim.steps: expected greater than 0", {"optim": {"steps": 0}}),
    F("1e10 steps", "optim.steps: expected less than or equal to 1000000000", {"optim": {"steps": 10**10}}),
    F("1e30 steps", "optim.steps: expected an integer of at most 19 digits", {"optim": {"steps": 1.0e30}}),
    F("fractional steps", "optim.steps: expected a valid integer", {"optim": {"steps": 10.5}}),
    F("steps a word", "optim.steps: expected a valid integer", {"optim": {"steps": "many"}}),
    F("no steps", "optim.steps: expected this required key", {"optim": {"steps": DELETE}}),
    F("zero batch size", "optim.batch_size: expected greater than 0", {"optim": {"batch_size": 0}}),
    F("batch size 2**30", "optim.batch_size: expected less than or equal to 16777216",
      {"optim": {"batch_size": 2**30}}),
    F("batch not divisible", "optim.batch_size: expected a multiple of resources.workers",
      {"optim": {"batch_size": 33}}),
    F("zero grad accumulation", "optim.grad_accum: expected greater than 0", {"optim": {"grad_accum": 0}}),
    F("zero clipping", "optim.clip_grad_norm: expected greater than 0", {"optim": {"clip_grad_norm": 0}}),
    F("infinite clipping", "optim.clip_grad_norm: expected a finite number",
      {"optim": {"clip_grad_norm": float("inf")}}),
    F("amp a sentence", "optim.amp: expected a valid boolean", {"optim": {"amp": "yes please"}}),
    F("negative poly power", "optim.power: expected greater than 0", {"optim": {"power": -1}}),
    F("misspelt optim key", "optim.lrr: expected a known key; did you mean 'lr'?", {"optim": {"lrr": 0.1}}),
    F("no optim block", "optim: expected a `optim:` block", {"optim": DELETE}),
    F("no data block", "data: expected a `data:` block", {"data": DELETE}),
    F("zero workers", "resources.workers: expected greater than 0", {"resources": {"workers": 0}}),
    F("a million workers", "resources.workers: expected less than or equal to 65536",
      {"resources": {"workers": 10**6}}),
    F("workers a word", "resources.workers: expected a valid integer", {"resources": {"workers": "two"}}),
    F("zero CPUs", "resources.cpus_per_worker: expected greater than 0", {"resources": {"cpus_per_worker": 0}}),
    F("5000 CPUs", "resources.cpus_per_worker: expected less than or equal to 1024",
      {"resources": {"cpus_per_worker": 5000}}),
    F("negative GPUs", "resources.gpus_per_worker: expected greater than or equal to 0",
      {"resources": {"gpus_per_worker": -1}}),
    F("100 GPUs a worker", "resources.gpus_per_worker: expected less than or equal to 64",
      {"resources": {"gpus_per_worker": 100}}),
    F("unknown placement", "resources.placement_strategy: expected", {"resources": {"placement_strategy": "RANDOM"}}),
    F("max failures -2", "resources.max_failures: expected greater than or equal to -1",
      {"resources": {"max_failures": -2}}),
    F("ZeRO stage 4", "resources.deepspeed.zero_stage: expected less than or equal to 3",
      {"resources": {"deepspeed": {"zero_stage": 4}}}),
    F("offload params at stage 2", "resources.deepspeed: expected zero_stage 3 for offload_params",
      {"resources": {"deepspeed": {"zero_stage": 2, "offload_params": True}}}),
    F("deepspeed config a string", "resources.deepspeed.config: expected a valid dictionary",
      {"resources": {"deepspeed": {"config": "ds.json"}}}),
    F("nan in a deepspeed config", "resources.deepspeed.config.gradient_clipping: expected a finite number",
      {"resources": {"deepspeed": {"config": {"gradient_clipping": float("nan")}}}}),
    F("misspelt resources key", "resources.gpus: expected a known key", {"resources": {"gpus": 1}}),
    F("zero eval interval", "eval.every: expected greater than 0", {"eval": {"every": 0}}),
    F("eval interval 1e10", "eval.every: expected less than or equal to 1000000000", {"eval": {"every": 10**10}}),
    F("zero eval batch", "eval.batch_size: expected greater than 0", {"eval": {"batch_size": 0}}),
    F("unknown eval key", "eval.metric: expected a known key", {"eval": {"metric": "acc"}}),
    F("zero checkpoint interval", "checkpoint.every: expected greater than 0", {"checkpoint": {"every": 0}}),
    F("checkpoint interval 1e12", "checkpoint.every: expected less than or equal to",
      {"checkpoint": {"every": 10**12}}),
    F("keep no checkpoint", "checkpoint.keep: expected greater than 0", {"checkpoint": {"keep": 0}}),
    F("keep a million checkpoints", "checkpoint.keep: expected less than or equal to 10000",
      {"checkpoint": {"keep": 10**6}}),
    F("zero log interval", "log_every: expected greater than 0", {"log_every": 0}),
    F("log interval 1e10", "log_every: expected less than or equal to", {"log_every": 10**10}),
    F("a NUL character in data.root", "data.root: expected text without NUL characters",
      {"data": {"dataset": "cifar10", "root": "a\0b"}}),
    F("storage path a number", "storage_path: expected a valid string", {"storage_path": 5}),
    F("tags of numbers", "tracking.tags.run: expected a valid string", {"tracking": {"tags": {"run": 1}}}),
    F("experiment a list", "tracking.experiment: expected a valid string", {"tracking": {"experiment": [1]}}),
    F("misspelt tracking key", "tracking.uri: expected a known key", {"tracking": {"uri": "x"}}),
    F("unknown architecture", "config.arch: expected small_cnn", {"config": {"arch": "resnet5"}}, command="run"),
    F("method config a string", "config: expected a valid dictionary", {"config": "small_cnn"}),
    F("unknown method config field", "config.archh: expected a field of trainers.supervised.Config",
      {"config": {"archh": "small_cnn"}}),
    F("label smoothing a word", "config.label_smoothing: expected a valid number",
      {"config": {"label_smoothing": "lots"}}),
    F("label smoothing nan", "config.label_smoothing: expected a finite number",
      {"config": {"label_smoothing": float("nan")}}),
    F("label smoothing the string inf", "config.label_smoothing: expected a finite number",
      {"config": {"label_smoothing": "inf"}}),
    F("fixmatch threshold a word", "config.p_cutoff: expected a valid number",
      {"method": "fixmatch", "config": {"p_cutoff": "high"}}),
    F("simmatch unknown field", "config.tau_u: expected a field of trainers.simmatch.Config",
      {"method": "simmatch", "config": {"tau_u": 0.1}}),
    F("wcl hidden size a word", "config.hidden_dim: expected a valid integer",
      {"method": "wcl", "config": {"hidden_dim": "wide"}}),
    F("lm heads a word", "config.n_heads: expected a valid integer",
      {"method": "lm", "config": {"arch": DELETE, "n_heads": "many"}}),
    F("a run method on two workers", "resources.workers: expected 1 (method 'generate' runs as one process)",
      {"method": "generate", "config": {"arch": DELETE, "pipeline": "x"}, "data": DELETE, "optim": DELETE}),
]

TUNE_CASES = [
    F("tune a string", "tune: expected a valid dictionary", {"tune": "yes"}, command="sweep"),
    F("tune without a metric", "tune.metric: expected this required key", {"tune": {**TUNE, "metric": DELETE}},
      command="sweep"),
    F("tune metric without a prefix", "tune.metric: expected a metric the trials report",
      {"tune": {**TUNE, "metric": "accuracy"}},
      command="sweep"),
    F("tune mode maximize", "tune.mode: expected 'min' or 'max'",
      {"tune": {**TUNE, "mode": "maximize"}}, command="sweep"),
    F("zero samples", "tune.num_samples: expected greater than 0",
      {"tune": {**TUNE, "num_samples": 0}}, command="sweep"),
    F("ten million samples", "tune.num_samples: expected less than or equal to 1000000",
      {"tune": {**TUNE, "num_samples": 10**7}}, command="sweep"),
    F("an empty space", "tune.space: expected at least one dotted key",
      {"tune": {**TUNE, "space": {}}}, command="sweep"),
    F("an unknown distribution", "tune.space.optim.lr", {"tune": {**TUNE, "space": {"optim.lr": {"normal": [0, 1]}}}},
      command="sweep"),
    F("reversed bounds", "tune.space.optim.lr", {"tune": {**TUNE, "space": {"optim.lr": {"loguniform": [0.5, 0.1]}}}},
      command="sweep"),
    F("a negative log bound", "tune.space.optim.lr",
      {"tune": {**TUNE, "space": {"optim.lr": {"loguniform": [-1, 0.1]}}}}, command="sweep"),
    F("values the experiment refuses", "tune.space.optim.lr: expected values the experiment accepts",
      {"tune": {**TUNE, "space": {"optim.lr": {"uniform": [-1, 0.1]}}}}, command="sweep"),
    F("an empty choice", "tune.space.optim.lr", {"tune": {**TUNE, "space": {"optim.lr": {"choice": []}}}},
      command="sweep"),
    F("a distribution of a number", "tune.space.optim.lr",
      {"tune": {**TUNE, "space": {"optim.lr": {"loguniform": 0.1}}}},
      command="sweep"),
    F("nan in a choice", "tune.space.optim.lr.choice.1: expected a finite number",
      {"tune": {**TUNE, "space": {"optim.lr": {"choice": [0.1, float("nan")]}}}}, command="sweep"),
    F("tuning a key the file lacks", "tune.space.optim.lrr",
      {"tune": {**TUNE, "space": {"optim.lrr": {"choice": [0.1, 0.2]}}}}, command="sweep"),
    F("an unknown scheduler", "tune.scheduler", {"tune": {**TUNE, "scheduler": {"name": "nope"}}}, command="sweep"),
    F("an unknown searcher", "tune.searcher", {"tune": {**TUNE, "searcher": {"name": "nope"}}}, command="sweep"),
    F("grid with optuna", "tune.space.optim.lr: expected choice instead of grid",
      {"tune": {**TUNE, "searcher": {"name": "optuna"}, "space": {"optim.lr": {"grid": [0.1, 0.2]}}}},
      command="sweep"),
    F("zero trial workers", "tune.resources.workers: expected greater than 0",
      {"tune": {**TUNE, "resources": {"workers": 0}}}, command="sweep"),
    F("trial failures -5", "tune.max_failures: expected greater than or equal to -1",
      {"tune": {**TUNE, "max_failures": -5}}, command="sweep"),
    F("zero time budget", "tune.time_budget_s: expected greater than 0", {"tune": {**TUNE, "time_budget_s": 0}},
      command="sweep"),
    F("infinite time budget", "tune.time_budget_s: expected a finite number",
      {"tune": {**TUNE, "time_budget_s": float("inf")}}, command="sweep"),
    F("zero report interval", "tune.report_every: expected greater than 0", {"tune": {**TUNE, "report_every": 0}},
      command="sweep"),
    F("misspelt tune key", "tune.samples: expected a known key", {"tune": {**TUNE, "samples": 4}}, command="sweep"),
    F("a sweep file given to run", "tune: expected no `tune:` block for `orchestrator run`", {"tune": TUNE},
      command="run"),
    F("sweep of a file without tune", "tune: expected a `tune:` block", command="sweep"),
    F("search without an architecture key", "tune.space: expected an architecture key", {"tune": TUNE},
      command="search"),
    F("search with a misspelt search space", "tune.space.config.arch.architecture",
      {"tune": {**TUNE, "space": {"config.arch": {"architecture": "nas_bench_makro"}}}}, command="search"),
    F("search with an unknown searcher", "tune.searcher.name", {"tune": {**TUNE, "space": ARCH,
                                                                          "searcher": {"name": "evolutoin"}}},
      command="search"),
]

BASE_CASES = [
    F("a missing base file", "base: expected an existing file", {"base": "no_such_base.yaml"}),
    F("a base name too long", "base: expected an existing file", {"base": "b" * 5000}),
    F("base a number", "base: expected a path to another experiment file", {"base": 5}),
    F("base a directory", "base: expected an existing file", {"base": "."}),
    F("a base with its own base", "base: expected no `base:` in a base file",
      {"base": "middle.yaml"}, files={"middle.yaml": "base: other.yaml\n", "other.yaml": GOOD_TEXT}),
    F("a base that is itself", "base: expected no `base:` in a base file", {"base": "exp.yaml"}),
    F("a binary base file", "base.bin: expected UTF-8 text",
      {"base": "base.bin"}, files={"base.bin": bytes(range(256))}),
    F("a base file that is a list", "base.yaml: expected a mapping of keys", {"base": "base.yaml"},
      files={"base.yaml": "- a\n"}),
    F("a base file with a duplicate key", "base.yaml: seed: expected each key once", {"base": "base.yaml"},
      files={"base.yaml": "seed: 1\nseed: 2\n"}),
    F("a base file with aliases", "base.yaml: tune.searcher.a1.0: expected no YAML aliases", {"base": "base.yaml"},
      files={"base.yaml": "tune:\n  searcher:\n" + BOMB.replace("  a", "    a") + "\n"}),
    F("a 2 MiB base file", "base.yaml: expected an experiment file of at most 64 KiB", {"base": "base.yaml"},
      files={"base.yaml": "# pad\n" * 400_000}),
    F("a base file with bad YAML", "base.yaml: expected valid YAML", {"base": "base.yaml"},
      files={"base.yaml": "optim: [\n"}),
    F("a base file with a tag", "base.yaml: name: expected plain values", {"base": "base.yaml"},
      files={"base.yaml": "name: !!binary aGk=\n"}),
]

MACHINE_CASES = [
    F("storage below a regular file", "storage_path: expected a directory this machine can create and write",
      {"storage_path": "{tmp}/a_file/runs"}, command="run", files={"a_file": "x"}),
    F("storage that cannot be created", "storage_path: expected a directory", {"storage_path": "/proc/no/such/dir"},
      command="run"),
    F("a bogus storage scheme", "storage_path: expected a directory this machine can create and write, or a URI",
      {"storage_path": "bogus://x/runs"}, command="run"),
    F("a storage path too long", "storage_path: expected a directory", {"storage_path": "{tmp}/" + "d" * 300},
      command="run"),
    F("storage below a regular file for a sweep", "storage_path: expected a directory",
      {"storage_path": "{tmp}/a_file/runs", "tune": TUNE}, command="sweep", files={"a_file": "x"}),
    F("an MLflow server that is not there", "tracking.tracking_uri: expected an MLflow store this machine reaches",
      {"tracking": {"tracking_uri": "http://127.0.0.1:9"}}, command="run"),
    F("an MLflow server with credentials that is not there", "tracking.tracking_uri: expected an MLflow store",
      {"tracking": {"tracking_uri": "http://user:pw@127.0.0.1:9/mlflow"}}, command="run"),
    F("an MLflow server from the environment", "MLFLOW_TRACKING_URI: expected an MLflow store",
      command="run", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
    F("a sqlite store below a regular file", "tracking.tracking_uri: expected an MLflow store",
      {"tracking": {"tracking_uri": "sqlite:///{tmp}/a_file/mlflow.db"}}, command="run", files={"a_file": "x"}),
    F("a sqlite store that is a directory", "tracking.tracking_uri: expected an MLflow store",
      {"tracking": {"tracking_uri": "sqlite:///{tmp}/dir.db"}}, command="run", files={"dir.db/x": "x"}),
    F("a file store below a regular file", "tracking.tracking_uri: expected an MLflow store",
      {"tracking": {"tracking_uri": "{tmp}/a_file/mlruns"}}, command="run", files={"a_file": "x"}),
    F("resuming with another recipe", "runs/corpus/experiment.yaml: seed: expected the same `seed`",
      {"storage_path": "{tmp}/runs"}, command="run",
      files={"runs/corpus/experiment.yaml": yaml.safe_dump(merged(GOOD, {"optim": {"lr": 0.5}}))}),
    F("a missing dataset root", "data.root: expected an existing dataset directory",
      {"data": {"dataset": "cifar10", "root": "{tmp}/nowhere"}}, command="run"),
]

OVERRIDE_CASES = [
    O("no equals sign", "<overrides>: optim.lr: expected an override of the form dotted.key=value", "optim.lr"),
    O("no key", "<overrides>: =3: expected an override of the form", "=3"),
    O("an empty name in the key", "<overrides>: a..b: expected a dotted key of at most 32 non-empty names", "a..b=1"),
    O("a leading dot", "<overrides>: .a: expected a dotted key", ".a=1"),
    O("a trailing dot", "<overrides>: a.: expected a dotted key", "a.=1"),
    O("a key 40 names deep", "expected a dotted key of at most 32", ".".join(["a"] * 40) + "=1"),
    O("into a number", "optim.lr: expected a mapping to set a key inside, found 0.1", "optim.lr.x=1"),
    O("into a string", "name: expected a mapping to set a key inside", "name.first=x"),
    O("a negative lr", "optim.lr: expected greater than 0, found -1", "optim.lr=-1"),
    O("an infinite lr", "optim.lr: expected a finite number", "optim.lr=.inf"),
    O("the word inf", "optim.lr: expected a finite number", "optim.lr=inf"),
    O("the word nan", "optim.lr: expected a finite number", "optim.lr=nan"),
    O("seed 2**64 given with --set", "seed: expected less than 9223372036854775808", "seed=18446744073709551616"),
    O("steps 1e30", "optim.steps: expected a valid integer", "optim.steps=1e30"),
    O("a !!binary name", "<overrides>: name: expected plain values", "name=!!binary aGk="),
    O("a python tag", "<overrides>: config: expected plain values", "config=!!python/object/apply:os.system [ls]"),
    O("aliases", "<overrides>: config.b: expected no YAML aliases", "config={a: &x [1], b: *x}"),
    O("a 10,000-deep value", "<overrides>: config.x", "config.x=" + "[" * 10_000 + "]" * 10_000),
    O("a duplicate key in a value", "<overrides>: optim.lr: expected each key once", "optim={lr: 1, lr: 2}"),
    O("unclosed YAML taken as a string", "resources.workers: expected a valid integer", "resources.workers=[1, 2"),
    O("an unknown key", "epochs: expected a known key", "epochs=3"),
    O("an unknown dataset", "data.dataset: expected", "data.dataset=imagenet"),
    O("replacing optim without steps", "optim.steps: expected this required key", "optim={lr: 0.1}"),
    O("tune a number", "tune: expected a valid dictionary", "tune=3"),
    O("a long name", "name: expected a name of at most 128 characters", "name=" + "a" * 300),
    O("a 100 KiB value", "<overrides>: config.x: expected a value of at most 64 KiB",
      "config.x=[" + ",".join(["1"] * 50_000) + "]"),
    O("a NUL character in the storage path", "storage_path: expected text without NUL characters",
      'storage_path="runs\\0x"', command="run"),
    O("a bad name", "name: expected a name of letters", "name=a/b"),
    O("a bogus storage scheme given with --set", "storage_path: expected a directory",
      "storage_path=bogus://x", command="run"),
    O("an MLflow server that is not there given with --set", "tracking.tracking_uri: expected an MLflow store",
      "tracking.tracking_uri=http://127.0.0.1:9", command="run"),
]

CLI_CASES = [
    A("no command", "the following arguments are required: COMMAND"),
    A("an unknown command", "invalid choice: 'bogus'", "bogus"),
    A("an unknown global option", "unrecognized arguments: --verbose", "check", "{file}", "--verbose"),
    *[A(f"{command} without a file", "the following arguments are required: file", command)
      for command in ("run", "sweep", "search", "check")],
    *[A(f"{command} of a missing file", "missing.yaml: expected an existing experiment file", command,
        "{tmp}/missing.yaml", *extra)
      for command, extra in (("run", ()), ("sweep", ()), ("search", ()), ("check", ()), ("plan", ("--gpus", "8")),
                             ("submit", ("--address", "http://127.0.0.1:9")))],
    *[A(f"{command} of a directory", "expected an existing experiment file, found a directory", command, "{tmp}",
        *extra)
      for command, extra in (("run", ()), ("sweep", ()), ("search", ()), ("check", ()), ("plan", ("--gpus", "8")),
                             ("submit", ("--address", "http://127.0.0.1:9")))],
    A("check of a file name too long", "expected an existing experiment file, found a path this system cannot look up",
      "check", "{tmp}/" + "a" * 5000),
    A("check of a device file", "expected an existing experiment file, found something else", "check", "/dev/zero"),
    A("run with an unknown option", "unrecognized arguments: --steps", "run", "{file}", "--steps", "10"),
    A("sweep with an unknown option", "unrecognized arguments: --trials", "sweep", "{file}", "--trials", "4"),
    A("search with an unknown option", "unrecognized arguments: --fast", "search", "{file}", "--fast"),
    A("--set without a value", "argument --set: expected at least one argument", "check", "{file}", "--set"),
    A("--address without a value", "argument --address: expected one argument", "run", "{file}", "--address"),
    A("submit without an address", "the following arguments are required: --address", "submit", "{file}"),
    A("submit to an address that is not http", "--address: expected an http(s):// address", "submit", "{file}",
      "--address", "head:8265", "--working-dir", "{tmp}", "--set", "storage_path=/shared/runs"),
    A("submit to a dashboard that is not there", "--address: expected an http(s):// address answering", "submit",
      "{file}", "--address", "http://127.0.0.1:9", "--working-dir", "{tmp}", "--set", "storage_path=/shared/runs"),
    A("submit from a missing working directory", "FILE: expected an experiment file inside the working directory",
      "submit", "{file}", "--address", "http://127.0.0.1:9", "--working-dir", "{tmp}/nowhere"),
    A("submit with a relative storage path", "storage_path: expected an absolute path or URI", "submit", "{file}",
      "--address", "http://127.0.0.1:9", "--working-dir", "{tmp}", "--set", "storage_path=runs"),
    A("compare with an unreachable server", "--tracking-uri: expected an MLflow store", "compare", "some-run",
      "--tracking-uri", "http://127.0.0.1:9"),
    A("compare in a store that does not exist", "--tracking-uri: expected an existing MLflow store", "compare",
      "some-run", "--tracking-uri", "sqlite:///{tmp}/none.db"),
    A("compare with an unknown store scheme", "unsupported URI 'bogus://x'", "compare", "some-run",
      "--tracking-uri", "bogus://x"),
    A("compare in a file store below a regular file", "--tracking-uri: expected an MLflow store", "compare",
      "some-run", "--tracking-uri", "{tmp}/a_file/mlruns", files={"a_file": "x"}),
    A("compare in a sqlite store below a regular file", "--tracking-uri: expected an existing MLflow store",
      "compare", "some-run", "--tracking-uri", "sqlite:///{tmp}/a_file/mlflow.db", files={"a_file": "x"}),
    A("compare --metrics without names", "argument --metrics: expected at least one argument", "compare", "x",
      "--metrics"),
    A("compare with an unknown option", "unrecognized arguments: --all", "compare", "--all"),
    A("profile zero samples", "argument --samples: expected a positive integer, found '0'",
      "profile", "--samples", "0"),
    A("profile samples a word", "argument --samples: expected a positive integer, found 'many'", "profile",
      "--samples", "many"),
    A("profile negative threads", "argument --threads: expected a positive integer, found '-1'", "profile",
      "--threads", "-1"),
    A("profile into a directory", "--out: expected a Parquet file to write, found a directory", "profile", "--out",
      "{tmp}"),
    A("profile below a regular file", "--out: expected a directory this machine can create and write", "profile",
      "--out", "{tmp}/a_file/p.parquet", files={"a_file": "x"}),
    A("profile with an unknown option", "unrecognized arguments: --gpus", "profile", "--gpus", "8"),
    A("plan --top -3", "argument --top: expected a positive integer, found '-3'", "plan", "{lm}", "--gpus", "8",
      "--top", "-3"),
    A("plan --top 0", "argument --top: expected a positive integer", "plan", "{lm}", "--gpus", "8", "--top", "0"),
    A("plan --top a word", "argument --top: expected a positive integer", "plan", "{lm}", "--gpus", "8", "--top", "x"),
    A("plan on zero GPUs", "argument --gpus/--devices: expected a positive integer", "plan", "{lm}", "--gpus", "0"),
    A("plan on -8 GPUs", "argument --gpus/--devices: expected a positive integer", "plan", "{lm}", "--gpus", "-8"),
    A("plan on 1.5 GPUs", "argument --gpus/--devices: expected a positive integer", "plan", "{lm}", "--gpus", "1.5"),
    A("plan on zero nodes", "argument --nodes: expected a positive integer", "plan", "{lm}", "--gpus", "8",
      "--nodes", "0"),
    A("plan without --gpus", "the following arguments are required: --gpus/--devices", "plan", "{lm}"),
    A("plan GPUs not a multiple of nodes", "--gpus 8 must be a positive multiple of --nodes 3", "plan", "{lm}",
      "--gpus", "8", "--nodes", "3", "--out", "{tmp}/plan"),
    A("plan on unknown hardware", "nope", "plan", "{lm}", "--gpus", "8", "--hardware", "nope", "--out", "{tmp}/plan"),
    A("plan into a path below a regular file", "--out: expected a directory this machine can create and write",
      "plan", "{lm}", "--gpus", "8", "--out", "{tmp}/a_file/plan", files={"a_file": "x"}),
    A("plan with an unreachable MLflow", "--tracking-uri: expected an MLflow store", "plan", "{lm}", "--gpus", "8",
      "--tracking-uri", "http://127.0.0.1:9"),
    A("plan with an unknown option", "unrecognized arguments: --fast", "plan", "{lm}", "--gpus", "8", "--fast"),
    A("ls of a missing directory", "--experiments: expected a directory of experiment files", "ls", "--experiments",
      "{tmp}/nowhere"),
    A("ls of a file", "--experiments: expected a directory of experiment files", "ls", "--experiments", "{file}"),
    A("ls with an unknown option", "unrecognized arguments: --all", "ls", "--all"),
    A("check with two files", "unrecognized arguments", "check", "{file}", "{file}"),
]

CASES = YAML_CASES + BLOCK_CASES + TUNE_CASES + BASE_CASES + MACHINE_CASES + OVERRIDE_CASES + CLI_CASES


def test_the_corpus_is_large_and_every_case_is_named_once() -> None:
    assert len(CASES) >= 150
    assert len({c.what for c in CASES}) == len(CASES)


@pytest.fixture(scope="module", autouse=True)
def imported() -> None:
    """The modules the commands import lazily, imported once, so a case's time is that of its checks."""
    for module in ("mlflow.tracking", "timm", "orchestrator.launch", "orchestrator.tune"):  # timm: model names
        importlib.import_module(module)


def fill(text: str, tmp: Path, file: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{file}", str(file)).replace("{lm}", str(LM))


def write_case(case: Case, tmp: Path) -> Path:
    file = tmp / "exp.yaml"
    for name, content in case.files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        target = tmp / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    if isinstance(case.text, bytes):
        file.write_bytes(case.text)
    elif case.text is not None:
        file.write_text(case.text.replace("{good}", GOOD_TEXT))
    else:
        file.write_text(fill(yaml.safe_dump(merged(GOOD, case.changes), sort_keys=False), tmp, file))
    return file


def ray_children() -> list[str]:
    names = []
    for child in psutil.Process().children(recursive=True):
        try:
            names.append(child.name())
        except psutil.NoSuchProcess:
            continue
    return [n for n in names if "raylet" in n or "gcs_server" in n]


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_exits_2_with_one_line(case: Case, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    file = write_case(case, tmp_path)
    argv = [fill(a, tmp_path, file) for a in case.argv] if case.argv is not None else \
        [case.command, str(file), *(["--set", *case.overrides] if case.overrides else [])]
    started = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and err.endswith("\n") and "error: " in err, err
    assert case.names in err, err
    assert case.argv is not None or f"error: {tmp_path}/" in err or "error: <overrides>: " in err, err
    assert "Traceback" not in out + err
    assert seconds < 5, f"{seconds:.1f} s"
    assert not ray.is_initialized() and ray_children() == []


SAMPLE = ["a 10,000-deep flow mapping", "billion laughs under tune.searcher", "a 50 MB scalar", "!!binary name",
          "seed 2**64", "a sweep file given to run", "an MLflow server that is not there", "a bogus storage scheme",
          "plan --top -3", "300-character name"]


@pytest.mark.parametrize("what", SAMPLE)
def test_the_console_script_too(what: str, tmp_path: Path) -> None:
    """The real command in a fresh process: one line, exit 2, no Ray; the time includes importing torch."""
    case = next(c for c in CASES if c.what == what)
    file = write_case(case, tmp_path)
    argv = [fill(a, tmp_path, file) for a in case.argv] if case.argv is not None else \
        [case.command, str(file), *(["--set", *case.overrides] if case.overrides else [])]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120, check=False)
    seconds = time.perf_counter() - started
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and case.names in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr and "Ray" not in done.stderr
    assert seconds < 60, f"{seconds:.1f} s"
