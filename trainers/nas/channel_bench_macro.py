"""Channel-Bench-Macro (Su et al., BCNet, TPAMI 2022; ../shared/papers/methods_nas_gen_llm.md section 2).

Two width-search spaces on CIFAR-10 (32 px). 7 widths are searched independently; digit d in 1..4 of a code
such as "4344424" means d/4 of that width's maximum, so each space has 4^7 = 16384 codes. The layout follows the
official model.py (xiusu/Channel-Bench-Macro, classes ResNet and MobileNet); w[i] is the i-th searched width:

ResNet (`RESNET`, max widths 256 256 256 512 512 512 512)
    stem      conv3x3(3 -> w0, stride 2) + BN + ReLU                    32 px -> 16 px
    block 1   conv3x3(w0 -> w1) + BN + ReLU + conv3x3(w1 -> w0) + BN, + x, ReLU
    block 2   the same with hidden width w2
    block 3   conv3x3(w0 -> w3, stride 2) ... conv3x3(w3 -> w4), ReLU, no shortcut   16 px -> 8 px
    block 4   hidden w5, width w4, + x
    block 5   hidden w6, width w4, + x
    head      global average pool, linear(w4 -> classes)

MobileNet (`MOBILENET`, max widths 128 768 768 768 256 1536 1024)
    stem      conv3x3(3 -> w0, stride 2) + BN + ReLU                    32 px -> 16 px
    block 1   inverted residual w0 -> hidden w1 -> w0 (1x1, depthwise 3x3, 1x1 linear), + x
    block 2   the same with hidden width w2
    block 3   w0 -> hidden w3 -> w4, depthwise stride 2, no shortcut     16 px -> 8 px
    block 4   w4 -> hidden w5 -> w4, + x
    head      conv1x1(w4 -> w6) + BN + ReLU, global average pool, linear(w6 -> classes)

So w0 (and w4) is the width of a whole residual stage, skip connections included, and the other widths are
the hidden widths of single blocks (MobileNet: the expanded width; ResNet: the first conv's output).

Counting convention: the table's `flops` is the official utils.count_FLOPs at (3, 32, 32), i.e. multiply-
accumulates of every conv (C_in/groups * k * k per output element) and of the linear layer (in * out, bias not
counted); BN, ReLU, additions and pooling are not counted. Its `params` is every parameter, BN affine and the
linear bias included, as an integer. `count_macs` and the base class's parameter sum give exactly these numbers
(in millions), checked against table entries in tests/test_channel_bench_macro.py. Every code is trained and
tabulated, so `canonical` is the identity.

Deviations from the official code, none of which changes a count or the function computed: the ReLU after each
ResNet block lives inside the block rather than in the network's forward; the module names differ (the linear
head is `Classifier.head`), so official state dicts do not load as they are. The official README's table says
stage 2 runs at 16 px; the code (and the table's FLOPs) has it at 8 px, which is what is built here.

GENIUS's prompt (mingkai-zheng/GENIUS channel_bench_res.py / channel_bench_mob.py) in this project's words: the same
parts in the same order (task; the layer dictionary; the block's implementation; the channel options per index, the
MobileNet ones in aligned columns as there; the objective and the answer format with the official example list) and
the block names and arguments the official prompt uses (BottleneckResidualBlock with bottleneck_channels for the
ResNet, InvertedResidual for the MobileNet). What differs: the sentences are worded anew; the block implementations
are listings written for the prompt (same layers and shortcut rule as the official ones and as the blocks above, not
the source of either); the stem shows its stride 2, which GENIUS's prompt leaves out although the network has it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trainers._common.backbones import Classifier
from trainers.nas.space import InvalidArchitecture, SearchSpace, SpacePrompt

LEVELS = 4  # digit d means d / LEVELS of the maximum width
STEM_STRIDE = 2
RESNET_MAX_WIDTHS = (256, 256, 256, 512, 512, 512, 512)
MOBILENET_MAX_WIDTHS = (128, 768, 768, 768, 256, 1536, 1024)
# Each block as (input width, hidden width, output width, stride), widths given as indices into the 7 widths.
RESNET_BLOCKS = ((0, 1, 0, 1), (0, 2, 0, 1), (0, 3, 4, 2), (4, 5, 4, 1), (4, 6, 4, 1))
MOBILENET_BLOCKS = ((0, 1, 0, 1), (0, 2, 0, 1), (0, 3, 4, 2), (4, 5, 4, 1))
MOBILENET_HEAD = (4, 6)  # the 1x1 head conv: (input width, output width) indices


class ResidualBlock(nn.Module):
    """Two 3x3 convs: in_channels -> hidden_channels (stride) -> out_channels; the input is added back when the
    stride is 1 and the widths match, and a ReLU follows."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, stride, padding=1, bias=False),
            nn.BatchNorm2d(hidden_channels), nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, 3, 1, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)
        return self.relu(self.block(x) + x) if self.use_shortcut else self.relu(self.block(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block with an explicit hidden width: 1x1 conv in_channels -> hidden_channels, 3x3 depthwise
    (stride), 1x1 linear conv -> out_channels; the input is added back when the stride is 1 and the widths match."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 1, bias=False), nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, hidden_channels, 3, stride, padding=1, groups=hidden_channels, bias=False),
            nn.BatchNorm2d(hidden_channels), nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.use_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)
        return self.conv(x) + x if self.use_shortcut else self.conv(x)


RESIDUAL_LISTING = """class BottleneckResidualBlock(nn.Module):
    def __init__(self, in_channels, bottleneck_channels, out_channels, stride):
        super().__init__()
        self.residual = stride == 1
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, bottleneck_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(bottleneck_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck_channels, out_channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.block(x)
        return self.relu(out + x) if self.residual else self.relu(out)"""

INVERTED_LISTING = """class InvertedResidual(nn.Module):
    def __init__(self, in_channels, out_channels, bottleneck_channels, stride):
        super().__init__()
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(bottleneck_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride, padding=1,
                      groups=bottleneck_channels, bias=False),
            nn.BatchNorm2d(bottleneck_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        out = self.conv(x)
        return out + x if self.residual else out"""


def stem(in_channels: int, width: int) -> list[nn.Module]:
    """(B, in_channels, 32, 32) -> (B, width, 16, 16)."""
    return [nn.Conv2d(in_channels, width, 3, STEM_STRIDE, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True)]


class ChannelBenchMacro(SearchSpace):
    """What the two spaces share: codes of 7 digits 1..4, widths, the prompt; subclasses define the network."""

    max_widths: tuple[int, ...]
    blocks: tuple[tuple[int, int, int, int], ...]
    block_type: type[nn.Module]
    prompt_block: str  # the block's name in GENIUS's prompt
    block_listing: str  # the block's implementation as the prompt shows it
    aligned_options: bool  # the channel options in aligned columns (the official MobileNet prompt)
    ask_better: bool  # the experiments block asks for "a better channel list" (MobileNet), or "a channel list"
    answer_example: tuple[tuple[int, int], ...]  # (position, option) of the three numbers of the example answer
    choices = (LEVELS,) * 7
    first_digit = 1
    input_size = 32

    def widths(self, code: str) -> tuple[int, ...]:
        """Code -> the 7 channel numbers, e.g. RESNET "4344424" -> (256, 192, 256, 512, 512, 256, 512)."""
        return tuple((o + 1) * m // LEVELS for o, m in zip(self.decode(code), self.max_widths))

    def candidates(self, position: int) -> tuple[int, ...]:
        """The widths position `position` may take, smallest first."""
        return tuple(d * self.max_widths[position] // LEVELS for d in range(1, LEVELS + 1))

    def from_channels(self, channels: Sequence[int]) -> str:
        """A channel list (what GENIUS's answers contain) -> code; each number must be one of its candidates."""
        well_formed = isinstance(channels, (list, tuple)) and len(channels) == len(self.choices)
        if not well_formed or any(isinstance(c, bool) or not isinstance(c, int) for c in channels):
            raise InvalidArchitecture(f"{self.name} takes a list of {len(self.choices)} integers, got {channels!r}")
        digits = []
        for position, width in enumerate(channels):
            allowed = self.candidates(position)
            if width not in allowed:
                raise InvalidArchitecture(f"channels[{position}] = {width} in {list(channels)!r}; {self.name} "
                                          f"allows {list(allowed)} there")
            digits.append(allowed.index(width) + self.first_digit)
        return self.from_digits(digits)

    def answer_list(self, code: str) -> list[int]:
        return list(self.widths(code))

    def from_answer(self, values: Sequence[int]) -> str:
        return self.from_channels(values)

    def encoder_blocks(self, widths: Sequence[int]) -> list[nn.Module]:
        """The searched blocks at 16 px, then at 8 px after the stride-2 block."""
        return [self.block_type(widths[i], widths[h], widths[o], stride) for i, h, o, stride in self.blocks]

    def prompt(self) -> SpacePrompt:
        return SpacePrompt(task=TASK, operations=self._operations(), skeleton=self._skeleton(),
                           answer_format=self._answer_format(), answer_name="channel list", ask_better=self.ask_better,
                           order=("task", "skeleton", "operations", "answer_format"))

    def _operations(self) -> str:
        """The block's implementation, then the channel numbers each index of `channels` may take."""
        rows = [f"    channels[{i}]: {self._options(i)}," for i in range(len(self.choices))]
        return (f"The {self.prompt_block} is implemented as follows:\n{self.block_listing}\n\n"
                "For the `channels` variable, the channel numbers available at each index are:\n{\n"
                + "\n".join(rows) + "\n}")

    def _options(self, position: int) -> str:
        """The candidates of a position as a list, e.g. "[32,  64,  96,  128]" with `aligned_options`."""
        *first, last = self.candidates(position)
        numbers = [f"{width},".ljust(4 if self.aligned_options else 0) for width in first]
        return "[" + " ".join(numbers + [str(last)]) + "]"

    def _skeleton_rows(self) -> list[str]:
        rows = [f"nn.Conv2d(in_channels=3, out_channels=channels[0], kernel_size=3, stride={STEM_STRIDE}, "
                "padding=1, bias=False)"]
        rows += [f"{self.prompt_block}(in_channels=channels[{i}], bottleneck_channels=channels[{h}], "
                 f"out_channels=channels[{o}], stride={stride})" for i, h, o, stride in self.blocks]
        return rows

    def _skeleton(self) -> str:
        rows = [f"    layer{n}: {row}," for n, row in enumerate(self._skeleton_rows(), start=1)]
        return "The model architecture is defined as follows.\n{\n" + "\n".join(rows) + "\n}"

    def _answer_format(self) -> str:
        example = [self.candidates(position)[option] for position, option in self.answer_example]
        return ("Your objective is to choose the best number of channels for each layer from the options given above, "
                "to maximize the model's performance on CIFAR10.\n"
                f"Your response should be a channel list of {len(self.choices)} numbers (e.g. [{example[0]}, "
                f"{example[1]}, ..., {example[2]}]).")


class ChannelBenchResNet(ChannelBenchMacro):
    name = "channel_bench_res"
    max_widths = RESNET_MAX_WIDTHS
    blocks = RESNET_BLOCKS
    block_type = ResidualBlock
    prompt_block, block_listing = "BottleneckResidualBlock", RESIDUAL_LISTING
    aligned_options, ask_better = False, False
    answer_example = ((0, 0), (1, 2), (6, 1))  # (position, option) of the official example [64, 192, ..., 256]

    def build(self, code: str, num_classes: int, in_channels: int = 3) -> Classifier:
        widths = self.widths(code)
        features = widths[self.blocks[-1][2]]
        layers = [*stem(in_channels, widths[0]), *self.encoder_blocks(widths), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return Classifier(nn.Sequential(*layers), features, num_classes)  # (B, C, 32, 32) -> (B, w4) features

    def _skeleton_rows(self) -> list[str]:
        features = self.blocks[-1][2]
        return super()._skeleton_rows() + [
            "nn.AdaptiveAvgPool2d(output_size=1)",
            f"nn.Linear(in_features=channels[{features}], out_features={self.num_classes_for_counts})"]


class ChannelBenchMobileNet(ChannelBenchMacro):
    name = "channel_bench_mob"
    max_widths = MOBILENET_MAX_WIDTHS
    blocks = MOBILENET_BLOCKS
    block_type = InvertedResidual
    prompt_block, block_listing = "InvertedResidual", INVERTED_LISTING
    aligned_options, ask_better = True, True
    answer_example = ((0, 1), (1, 2), (6, 0))  # (position, option) of the official example [64, 576, ..., 256]

    def build(self, code: str, num_classes: int, in_channels: int = 3) -> Classifier:
        widths = self.widths(code)
        c_in, c_out = (widths[i] for i in MOBILENET_HEAD)
        head = [nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers = [*stem(in_channels, widths[0]), *self.encoder_blocks(widths), *head, nn.AdaptiveAvgPool2d(1),
                  nn.Flatten()]
        return Classifier(nn.Sequential(*layers), c_out, num_classes)  # (B, C, 32, 32) -> (B, w6) features

    def _skeleton_rows(self) -> list[str]:
        c_in, c_out = MOBILENET_HEAD
        return super()._skeleton_rows() + [
            f"nn.Conv2d(channels[{c_in}], channels[{c_out}], kernel_size=1, stride = 1, padding=0, bias=False)",
            "nn.AdaptiveAvgPool2d(output_size=1)",
            f"nn.Linear(in_features=channels[{c_out}], out_features={self.num_classes_for_counts})"]


TASK = ("Your task is to help me choose the best channel numbers for a model architecture. The model will be "
        "trained and tested on CIFAR10, and the goal is to maximize the model's performance on CIFAR10.")

RESNET = ChannelBenchResNet()
MOBILENET = ChannelBenchMobileNet()
