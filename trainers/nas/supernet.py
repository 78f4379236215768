"""What the weight-sharing searches share (K-shot NAS, ViTAS; ../shared/papers/methods_nas_gen_llm.md sections 3-4).

A supernet holds the weights of every member of one search space; `forward(x, code)` runs the member `code` (a
"path"). Its training method samples a path per step (`path_rng`: the same path on every rank, so DDP reduces
gradients of one graph, and the same path again after a resume). A trained supernet ranks architectures by the
accuracy each path reaches with the shared weights: `path_accuracy`, after `recalibrate_bn` (SPOS: batch-norm
statistics collected during training mix all paths, so every path gets its own, from training batches).

A supernet records how to rebuild itself in its state dict (`get_extra_state`: the method's name, the space and
the method's Config), so a search reads one model.pt and needs nothing else (`load_supernet`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.nas.space import SearchSpace

Batch = dict[str, torch.Tensor]


class Supernet(nn.Module):
    """Base of the supernets: `space` is the space whose codes `forward(x, code)` accepts."""

    method: str  # the trainers/ registry name of the method that trains it

    def __init__(self, space: SearchSpace, cfg: Any):
        super().__init__()
        self.space, self.cfg = space, cfg

    def forward(self, x: torch.Tensor, code: str) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        raise NotImplementedError

    def get_extra_state(self) -> dict[str, Any]:
        return {"method": self.method, "space": self.space.name, "config": dataclasses.asdict(self.cfg)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = self.get_extra_state()
        if state["method"] != mine["method"] or state["space"] != mine["space"]:
            raise ValueError(f"a {state['method']} supernet of space {state['space']} cannot be loaded into a "
                             f"{mine['method']} supernet of space {mine['space']}")


def path_rng(step: int, salt: str = "path") -> random.Random:
    """The RNG a method draws step `step`'s path from: a function of the step only, so every rank and every resume
    draws the same path."""
    return random.Random(f"{salt}-{step}")


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: Supernet, code: str, batches: Iterable[Batch]) -> int:
    """Reset every batch norm's running statistics and re-estimate them as the plain average over `batches` of
    path `code` (momentum None); returns the images seen. The model is left in eval mode."""
    norms = _norms(model)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    for batch in batches:
        model(batch["x"], code)
        seen += len(batch["x"])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
    return seen


@torch.no_grad()
def path_accuracy(model: Supernet, code: str, batches: Iterable[Batch]) -> float:
    """Top-1 accuracy of path `code` over `batches` (eval mode)."""
    model.eval()
    correct = total = 0
    for batch in batches:
        correct += int((model(batch["x"], code).argmax(1) == batch["y"]).sum())
        total += len(batch["y"])
    if total == 0:
        raise ValueError("no evaluation images")
    return correct / total


def load_supernet(model_file: str | Path, build: Callable[[str, dict[str, Any]], Supernet]) -> Supernet:
    """The supernet saved in `model_file` (an orchestrator model.pt): `build(method, config)` makes an empty one
    from the recorded method name and Config fields, which is then loaded strictly."""
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    extra = state.get("_extra_state")
    if not isinstance(extra, dict) or "method" not in extra:
        raise ValueError(f"{model_file}: not a supernet (its state dict records no method; train one with "
                         "kshot_nas or vitas)")
    model = build(extra["method"], extra["config"])
    model.load_state_dict(state)
    return model
