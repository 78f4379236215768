"""NAS-Bench-Macro (Su et al., CVPR 2021; ../shared/papers/methods_nas_gen_llm.md section 2).

8 searchable layers x 3 operations = 3^8 = 6561 codes such as "01201201", on CIFAR-10 (32 px):

    stem      conv3x3(3 -> 32) + BN + ReLU
    stage 1   2 layers, 64 channels   (the first layer of each stage has stride 2 and doubles the width)
    stage 2   3 layers, 128 channels
    stage 3   3 layers, 256 channels
    head      conv1x1(256 -> 1280) + BN + ReLU, global average pool, linear(1280 -> classes)

Operations: 0 identity (a 1x1 conv + BN where the stride or width changes), 1 inverted residual expansion 3
kernel 3, 2 inverted residual expansion 6 kernel 5. The benchmark trained only canonical networks: an identity
that is not the first layer of its stage is moved to the end of the stage (`canonical`), which leaves 3969
distinct networks; the table copies each canonical entry to all its codes.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from trainers._common.backbones import Classifier
from trainers.nas.space import SearchSpace, SpacePrompt

STAGES = (2, 3, 3)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class Identity(nn.Module):
    """Operation 0: the input itself, or a 1x1 conv + BN where the stride or the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        changes_shape = stride != 1 or c_in != c_out
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                        nn.BatchNorm2d(c_out)) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (x expansion) -> k x k depthwise (stride) -> 1x1 project; residual when the
    shape is kept. Operation 1: expansion 3, kernel 3; operation 2: expansion 6, kernel 5."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, kernel_size: int):
        super().__init__()
        hidden = c_in * expansion
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size, stride, kernel_size // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.use_shortcut = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x if self.use_shortcut else self.conv(x)


def operation(option: int, c_in: int, c_out: int, stride: int) -> nn.Module:
    if option == 0:
        return Identity(c_in, c_out, stride)
    expansion, kernel_size = {1: (3, 3), 2: (6, 5)}[option]
    return InvertedResidual(c_in, c_out, stride, expansion, kernel_size)


def layer_shapes(stages: tuple[int, ...] = STAGES, stem_channels: int = STEM_CHANNELS) -> list[tuple[int, int, int]]:
    """(in_channels, out_channels, stride) of each searchable layer."""
    shapes, channels = [], stem_channels
    for depth in stages:
        for index in range(depth):
            stride = 2 if index == 0 else 1
            shapes.append((channels, channels * stride, stride))
            channels *= stride
    return shapes


class NasBenchMacro(SearchSpace):
    """The benchmark's space; other stage depths and widths give smaller spaces of the same operations."""

    def __init__(self, name: str = "nas_bench_macro", stages: tuple[int, ...] = STAGES,
                 stem_channels: int = STEM_CHANNELS, head_channels: int = HEAD_CHANNELS, input_size: int = 32):
        self.name, self.stages, self.input_size = name, stages, input_size
        self.stem_channels, self.head_channels = stem_channels, head_channels
        self.choices = (3,) * sum(stages)

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        return layer_shapes(self.stages, self.stem_channels)

    def canonical(self, code: str) -> str:
        """Identity layers after the first of a stage moved to the stage's end (the benchmark's get_real_arch)."""
        self.decode(code)
        out, start = "", 0
        for depth in self.stages:
            first, rest = code[start], code[start + 1:start + depth]
            kept = rest.replace("0", "")
            out += first + kept + "0" * (len(rest) - len(kept))
            start += depth
        return out

    def build(self, code: str, num_classes: int, in_channels: int = 3) -> Classifier:
        options = self.decode(code)
        stem, head = self.stem_channels, self.head_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem),
                                   nn.ReLU(inplace=True)]
        layers += [operation(o, *shape) for o, shape in zip(options, self.layer_shapes())]
        channels = self.layer_shapes()[-1][1]
        layers += [nn.Conv2d(channels, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU(inplace=True),
                   nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return Classifier(nn.Sequential(*layers), head, num_classes)

    def supernet_parts(self, num_classes: int, in_channels: int = 3) -> tuple[nn.Module, list[list[nn.Module]],
                                                                                nn.Module, int]:
        """What a weight-sharing supernet (trainers/nas/supernet.py) is made of: (stem, candidates[position][option],
        tail, num_features), the same modules as `build` makes, so a path stem -> candidates[i][options[i]] -> tail
        -> a linear head of `num_classes` is the network of the code. The head is the supernet's own."""
        stem, head = self.stem_channels, self.head_channels
        stem_layers = nn.Sequential(nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem),
                                    nn.ReLU(inplace=True))
        candidates = [[operation(o, *shape) for o in range(n)] for n, shape in zip(self.choices, self.layer_shapes())]
        tail = nn.Sequential(nn.Conv2d(self.layer_shapes()[-1][1], head, 1, bias=False), nn.BatchNorm2d(head),
                             nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return stem_layers, candidates, tail, head

    def prompt(self) -> SpacePrompt:
        return SpacePrompt(task=TASK, operations=_operations(), skeleton=_skeleton(self), answer_format=ANSWER_FORMAT)


TASK = ("Your task is to assist me in selecting the best operations for a given model architecture, which "
        "includes some undefined layers and available operations. The model will be trained and tested on "
        "CIFAR10, and your objective will be to maximize the model's performance on CIFAR10.")

ANSWER_FORMAT = ("Your response should be an operation ID list for the undefined layers. For example:\n"
                 "[1, 2, ..., 0] means we use operation 1 for layer2, operation 2 for layer3, ..., operation 0 "
                 "for layer9.")


def _operations() -> str:
    return ("We define the 3 available operations as the following:\n"
            "0: Identity(c_in, c_out, stride)\n"
            "1: InvertedResidual(c_in, c_out, stride, expansion=3, kernel_size=3)\n"
            "2: InvertedResidual(c_in, c_out, stride, expansion=6, kernel_size=5)\n\n"
            f"The implementation of the Identity is as follows:\n{inspect.getsource(Identity)}\n"
            f"The implementation of the InvertedResidual is as follows:\n{inspect.getsource(InvertedResidual)}")


def _skeleton(space: NasBenchMacro) -> str:
    shapes, head = space.layer_shapes(), space.head_channels
    rows = [f"    layer1: {{defined: True, operation: nn.Conv2d(in_channels=3, out_channels={space.stem_channels}, "
            "kernel_size=3, padding=1, bias=False)}"]
    for number, (c_in, c_out, stride) in enumerate(shapes, start=2):
        rows.append(f"    layer{number}: {{defined: False, downsample: {stride == 2}, in_channels: {c_in}, "
                    f"out_channels: {c_out}, stride: {stride}}}")
    last = len(shapes) + 2
    rows += [f"    layer{last}: {{defined: True, operation: nn.Conv2d(in_channels={shapes[-1][1]}, "
             f"out_channels={head}, kernel_size=1, bias=False, stride=1)}}",
             f"    layer{last + 1}: {{defined: True, operation: nn.AdaptiveAvgPool2d(output_size=1)}}",
             f"    layer{last + 2}: {{defined: True, operation: nn.Linear(in_features={head}, "
             "out_features=10)}"]
    return ("The model architecture will be defined as the following.\n{\n" + ",\n".join(rows) + "\n}\n\n"
            f"The currently undefined layers are layer2 - layer{last - 1}, and the in_channels and out_channels "
            "have already been defined for each layer. To maximize the model's performance on CIFAR10, please "
            "provide me with your suggested operation for the undefined layers only.")


SPACE = NasBenchMacro()

# The ground-truth space of the weight-sharing searches on CPU (benchmarks/ranking.py): the same operations in two
# stages of two layers, 8 -> 16 -> 32 channels, a 128-channel head, 16 px digits. 3^4 = 81 codes, all distinct
# networks (a stage's only non-first layer is its last), small enough that every one is trained stand-alone.
MACRO_DIGITS = NasBenchMacro("macro_digits", stages=(2, 2), stem_channels=8, head_channels=128, input_size=16)
