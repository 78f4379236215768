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
        return SpacePrompt(task=TASK, operations=OPERATIONS, skeleton=_skeleton(self),
                           answer_format=_answer_format(self), answer_name="operation ID list")


# GENIUS's prompt (mingkai-zheng/GENIUS nas_bench_macro.py) in this project's words: the same parts in the same order
# and layout (the operation catalogue with each block's implementation, the layer dictionary with its columns
# aligned, the answer format). What differs: the sentences are worded anew; the implementations are listings written
# for the prompt (same layers, arguments and shortcut rule as the official ones and as `Identity` and
# `InvertedResidual` above, not the source of either); the catalogue's "stride expansion=3" lacks no comma here.
TASK = ("Your task is to help me choose the best operations for a model architecture that has some undefined layers, "
        "given a set of available operations. The model will be trained and tested on CIFAR10, and the goal is to "
        "maximize the model's performance on CIFAR10.")

OPERATIONS = """We define the 3 available operations as follows:
0: Identity(in_channels, out_channels, stride)
1: InvertedResidual(in_channels, out_channels, stride, expansion=3, kernel_size=3)
2: InvertedResidual(in_channels, out_channels, stride, expansion=6, kernel_size=5)

The Identity is implemented as follows:
class Identity(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:  # a 1x1 conv + BN where the shape changes
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        return x if self.downsample is None else self.downsample(x)

The InvertedResidual is implemented as follows:
class InvertedResidual(nn.Module):
    def __init__(self, in_channels, out_channels, stride, expansion, kernel_size):
        super().__init__()
        hidden = in_channels * expansion
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, groups=hidden,
                      bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.conv(x)
        return out + x if self.residual else out"""


def _skeleton(space: NasBenchMacro) -> str:
    """The layer dictionary, columns aligned as in the official prompt, then which layers are to be chosen."""
    shapes, head, last = space.layer_shapes(), space.head_channels, len(space.layer_shapes()) + 2
    width = len(f"layer{last + 2}:") + 1  # the label column, e.g. "layer1:  " and "layer10: "
    channels = len(str(max(c for shape in shapes for c in shape[:2])))  # the widest searched layer's width
    rows = [f"{'layer1:':<{width}}{{defined: True,  operation: nn.Conv2d(in_channels=3,  out_channels="
            f"{space.stem_channels}, kernel_size=3, padding=1, bias=False)}},"]
    for number, (c_in, c_out, stride) in enumerate(shapes, start=2):
        rows.append(f"{f'layer{number}:':<{width}}{{defined: False, downsample: {str(stride == 2):<5}, "
                    f"in_channels: {f'{c_in},':<{channels + 1}} out_channels: {c_out:<{channels}}, stride: {stride}}},")
    rows += [f"{f'layer{last}:':<{width}}{{defined: True,  operation: nn.Conv2d(in_channels={shapes[-1][1]}, "
             f"out_channels={head}, kernel_size=1, bias=False, stride=1)}},",
             f"{f'layer{last + 1}:':<{width}}{{defined: True,  operation: nn.AdaptiveAvgPool2d(output_size=1)}},",
             f"{f'layer{last + 2}:':<{width}}{{defined: True,  operation: nn.Linear(in_features={head}, "
             f"out_features={space.num_classes_for_counts})}},"]
    return ("The model architecture is defined as follows.\n{\n" + "\n".join(f"    {row}" for row in rows) + "\n}\n\n"
            f"The layers still undefined are layer2 - layer{last - 1}; the in_channels and out_channels of every layer "
            "are already fixed. To maximize the model's performance on CIFAR10, please give me the operation you "
            "suggest for the undefined layers only.")


def _answer_format(space: NasBenchMacro) -> str:
    last = len(space.layer_shapes()) + 1
    return ("Your response should be an operation ID list for the undefined layers, for example:\n"
            f"[1, 2, ..., 0] means operation 1 for layer2, operation 2 for layer3, ..., operation 0 for layer{last}.")


SPACE = NasBenchMacro()

# The ground-truth space of the weight-sharing searches on CPU (benchmarks/ranking.py): the same operations in two
# stages of two layers, 8 -> 16 -> 32 channels, a 128-channel head, 16 px digits. 3^4 = 81 codes, all distinct
# networks (a stage's only non-first layer is its last), small enough that every one is trained stand-alone.
MACRO_DIGITS = NasBenchMacro("macro_digits", stages=(2, 2), stem_channels=8, head_channels=128, input_size=16)
