"""What every architecture search space provides (NAS benchmarks, GENIUS, the NAS searchers).

An architecture is written as a *code*: one character per searchable position, the digit of the option chosen
there (NAS-Bench-Macro "01201201", Channel-Bench-Macro "4344424", ...). Codes are what experiment files, Tune
trials, benchmark tables and LLM answers are converted to; `decode` turns one into the option indices.

A space is pure data plus pure functions: no I/O, no Ray. `prompt()` gives the text GENIUS shows a language model
(the operation catalogue and the network skeleton); the searchers only use `choices`, `sample`, `mutate`,
`canonical`, `flops` and `params`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
from torch import nn


class InvalidArchitecture(ValueError):
    """A code or option list that is not a member of the space; the message says why."""


@dataclass(frozen=True)
class SpacePrompt:
    """The space as GENIUS describes it to a language model (GENIUS's user prompt, parts 1-4), with what the
    follow-up requests call the answer; `text()` is the prompt's body in the order of the official prompt."""

    task: str  # what to choose and what is maximised
    operations: str  # the numbered operation catalogue
    skeleton: str  # the macro network: which layers are searchable, channels and strides
    answer_format: str  # the required output format, with an example
    order: tuple[str, ...] = ("task", "operations", "skeleton", "answer_format")  # the parts as the body shows them
    answer_name: str = "list"  # the answer in the experiments block and the suffix, e.g. "operation ID list"
    ask_better: bool = True  # the experiments block asks for "a better <answer_name>" (not Channel-Bench ResNet's)

    def text(self) -> str:
        """The parts in `order`, a blank line between two."""
        return "\n\n".join(getattr(self, part) for part in self.order)


class SearchSpace:
    """Base of the spaces: subclasses set `name`, `choices`, `input_size` and define `build` and `prompt`.

    `choices[i]` is the number of options at position i; option j of position i is written as the digit
    `first_digit + j` (Channel-Bench-Macro counts widths from 1, the others from 0).
    """

    name: str
    choices: tuple[int, ...]
    input_size: int  # the benchmark's image size: FLOPs are counted at (1, 3, input_size, input_size)
    first_digit: int = 0
    flops_window: tuple[float, float] | None = None  # MFLOPs a candidate must lie in (GENIUS's constraint)
    num_classes_for_counts: int = 10  # the benchmark's classes: the head that `flops` and `params` count

    # ----------------------------------------------------------------------------------------------- codes

    def decode(self, code: str) -> tuple[int, ...]:
        """Code -> option index at each position (0-based); InvalidArchitecture names what is wrong."""
        if not isinstance(code, str):
            raise InvalidArchitecture(f"an architecture code is a string of digits, got {code!r}")
        if len(code) != len(self.choices):
            raise InvalidArchitecture(f"{self.name} has {len(self.choices)} positions, got {len(code)} in {code!r}")
        options = []
        for position, (char, n) in enumerate(zip(code, self.choices)):
            if not char.isdigit() or not 0 <= int(char) - self.first_digit < n:
                digits = f"{self.first_digit}..{self.first_digit + n - 1}"
                raise InvalidArchitecture(f"position {position} of {code!r} is {char!r}; {self.name} allows {digits}")
            options.append(int(char) - self.first_digit)
        return tuple(options)

    def encode(self, options: Sequence[int]) -> str:
        """Option indices (0-based) -> code; the inverse of `decode`."""
        code = "".join(str(int(o) + self.first_digit) for o in options)
        self.decode(code)
        return code

    def from_digits(self, digits: Sequence[int]) -> str:
        """The digits as written in a code (what GENIUS's answer lists contain) -> code, validated."""
        if any(isinstance(d, bool) or not isinstance(d, int) for d in digits):
            raise InvalidArchitecture(f"a list of integers, got {list(digits)!r}")
        code = "".join(str(d) if 0 <= d <= 9 else "?" for d in digits)
        self.decode(code)
        return code

    def answer_list(self, code: str) -> list[int]:
        """`code` as the list GENIUS shows a language model and asks it for (default: the code's digits)."""
        return [int(char) for char in self.validate(code)]

    def from_answer(self, values: Sequence[int]) -> str:
        """A language model's list (as `answer_list` writes it) -> code, validated."""
        return self.from_digits(values)

    def table_key(self, code: str) -> str:
        """The key of `code` in the benchmark's own table file (default: the code itself)."""
        return self.validate(code)

    def from_table_key(self, key: str) -> str:
        """The code whose `table_key` is `key` (default: the key is the code); InvalidArchitecture otherwise."""
        return self.validate(key)

    def validate(self, code: str) -> str:
        self.decode(code)
        return code

    def canonical(self, code: str) -> str:
        """The representative of the networks equal to `code` (default: every code is its own network)."""
        return self.validate(code)

    def sample(self, rng: random.Random) -> str:
        return self.encode([rng.randrange(n) for n in self.choices])

    def mutate(self, code: str, rng: random.Random) -> str:
        """`code` with one position changed to another option (regularised evolution's mutation)."""
        options = list(self.decode(code))
        position = rng.choice([i for i, n in enumerate(self.choices) if n > 1])
        options[position] = rng.choice([o for o in range(self.choices[position]) if o != options[position]])
        return self.encode(options)

    def size(self) -> int:
        total = 1
        for n in self.choices:
            total *= n
        return total

    # ----------------------------------------------------------------------------------------------- networks

    def build(self, code: str, num_classes: int, in_channels: int = 3) -> nn.Module:
        """The real network of `code` (a trainers._common.backbones.Classifier)."""
        raise NotImplementedError

    def prompt(self) -> SpacePrompt:
        raise NotImplementedError

    def flops(self, code: str) -> float:
        """Multiply-accumulates of one forward pass at the benchmark's input size, in millions (the "FLOPs" of
        the NAS literature and of the benchmark tables)."""
        return network_counts(self, self.canonical(code))[0]

    def params(self, code: str) -> float:
        """Parameters in millions (10-class head unless the space says otherwise)."""
        return network_counts(self, self.canonical(code))[1]

    def within_budget(self, code: str) -> bool:
        if self.flops_window is None:
            return True
        low, high = self.flops_window
        return low <= self.flops(code) <= high


@lru_cache(maxsize=4096)
def network_counts(space: SearchSpace, code: str) -> tuple[float, float]:
    model = space.build(code, space.num_classes_for_counts)
    macs = count_macs(model, (1, 3, space.input_size, space.input_size))
    params = sum(p.numel() for p in model.parameters())
    return macs / 1e6, params / 1e6


def count_macs(model: nn.Module, input_shape: tuple[int, ...], bn_ops_per_element: int = 0) -> int:
    """Multiply-accumulates of the convolutions and linear layers in one forward pass of a zero input (the
    convention of the NAS benchmarks: activations, pooling and additions are not counted). BN is not counted
    either unless `bn_ops_per_element` says how many operations each BN output element costs (thop counts 4 for an
    affine BN: GENIUS's ImageNet FLOPs do)."""
    total = 0

    def bn_hook(_module: nn.BatchNorm2d, _inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * bn_ops_per_element

    def conv_hook(module: nn.Conv2d, _inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.weight[0].numel()  # (C_in / groups) * kh * kw
        total += output.numel() * kernel

    def linear_hook(module: nn.Linear, _inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, nn.BatchNorm2d) and bn_ops_per_element:
            handles.append(module.register_forward_hook(bn_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(input_shape))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return total
