"""Architecture search spaces: an explicit name -> module dict, imported lazily. An entry "module" names the
module's `SPACE`; "module:ATTRIBUTE" names another attribute (one module holding several spaces)."""

from __future__ import annotations

import importlib

from trainers.nas.space import InvalidArchitecture, SearchSpace, SpacePrompt

SPACES: dict[str, str] = {
    "nas_bench_macro": "trainers.nas.nas_bench_macro",
    "macro_digits": "trainers.nas.nas_bench_macro:MACRO_DIGITS",
    "nas_bench_201": "trainers.nas.nas_bench_201",
    "genius_mobilenet": "trainers.nas.mobilenet_imagenet",
    "genius_mobilenet_329": "trainers.nas.mobilenet_imagenet:SPACE_329",
    "genius_mobilenet_401": "trainers.nas.mobilenet_imagenet:SPACE_401",
    "channel_bench_res": "trainers.nas.channel_bench_macro:RESNET",
    "channel_bench_mob": "trainers.nas.channel_bench_macro:MOBILENET",
    "vit_digits": "trainers.nas.vit:VIT_DIGITS",
    "vitas_deit": "trainers.nas.vit:VITAS_DEIT",
}


def get_space(name: str) -> SearchSpace:
    """The space called `name`; KeyError lists the known spaces."""
    if name not in SPACES:
        raise KeyError(f"unknown search space {name!r}; known spaces: {', '.join(sorted(SPACES))}")
    module, _, attribute = SPACES[name].partition(":")
    return getattr(importlib.import_module(module), attribute or "SPACE")


def arch_value(space: SearchSpace, code: str) -> str:
    """How an architecture is written in an experiment (`config.arch`) and in a Tune trial: "<space>:<code>"."""
    return f"{space.name}:{space.validate(code)}"


def parse_arch_value(value: str) -> tuple[SearchSpace, str]:
    """"<space>:<code>" -> (space, code); KeyError for an unknown space, InvalidArchitecture for a bad code."""
    name, sep, code = value.partition(":")
    if not sep:
        raise InvalidArchitecture(f"an architecture is written <space>:<code>, e.g. nas_bench_macro:01201201; "
                                  f"got {value!r}")
    space = get_space(name)
    return space, space.validate(code)


__all__ = ["SPACES", "get_space", "arch_value", "parse_arch_value", "InvalidArchitecture", "SearchSpace", "SpacePrompt"]
