"""NAS-Bench-201 (Dong & Yang, ICLR 2020) as GENIUS searches it (../shared/papers/methods_nas_gen_llm.md sections 1-2).

A cell is a DAG on four feature maps s0..s3 with one operation on each of its 6 edges, numbered as GENIUS's prompt
numbers them:

    s1 = op0(s0)
    s2 = op1(s0) + op2(s1)
    s3 = op3(s0) + op4(s1) + op5(s2)        s3 is the cell's output

Operations: 0 none (zeros), 1 skip_connect, 2 nor_conv_1x1, 3 nor_conv_3x3, 4 avg_pool_3x3; a code is the 6 digits
op0..op5 (5^6 = 15625 cells), e.g. "333333". The benchmark (and the GENIUS JSON subsets) key a cell by the string
"|op0~0|+|op1~0|op2~1|+|op3~0|op4~1|op5~2|" with the official op names (`table_key`, `from_table_key`; the mapping is
GENIUS's nas_bench_201.py: `'|{}~0|+|{}~0|{}~1|+|{}~0|{}~1|{}~2|'.format(*names)`).

The network is the official TinyNetwork (AutoDL-Projects lib/models/cell_infers/tiny_network.py, C=16, N=5) on
CIFAR (32 px); the same cell is used in all 15 cell positions:

    stem       conv3x3(3 -> 16) + BN                                   (B, 16, 32, 32)
    stage 1    5 cells, 16 channels                                    (B, 16, 32, 32)
    reduction  ResNet basic block 16 -> 32, stride 2                   (B, 32, 16, 16)
    stage 2    5 cells, 32 channels
    reduction  ResNet basic block 32 -> 64, stride 2                   (B, 64, 8, 8)
    stage 3    5 cells, 64 channels
    head       BN + ReLU, global average pool, linear(64 -> classes)   (B, classes)

Counting: `flops` are the conv and linear multiply-accumulates (space.count_macs); the official counter
(lib/utils/flop_benchmark.py) also adds the linear bias (10 for CIFAR-10) and, like ours, no BN, pooling or additions.
`params` counts every parameter, BN affine included, in units of 1e6 (the NB201 tables; the later AutoDL counter
divides by 2^20). Measured, 10 classes: all nor_conv_3x3 220.11968 MMACs and 1.531546 M params, all none 7.78304
MMACs and 0.073306 M params; the NB201 API (cifar10-valid, as copied into third-party code) gives 220.11969 / 1.531546
and 7.78305 / 0.073306, the 0.00001 being the linear bias.

Canonical form (`canonical`): an edge is kept only when its operation is not none, a path of non-none edges leads
from s0 to its source (otherwise the source is identically zero) and one leads from its target to s3 (otherwise
nothing it adds reaches the output); every other edge is set to none. One pass suffices: removing such an edge
changes the liveness only of nodes whose other edges are removed too. Caveat: in the official network a conv edge
out of an all-zero node outputs its BN shift, a learned constant, so two codes with the same canonical form are the
same architecture up to such constants (the equivalence the NAS literature uses); the benchmark trained all 15625
codes separately. `flops` and `params` therefore count the code as built and trained (dead edges included, as the
NB201 API does), not its canonical form.

Deviations from the official code: the network returns logits only (the official returns (features, logits)), and
its features come from `features` as in every Classifier; module names differ (no weights are shared with it)."""

from __future__ import annotations

import torch
from torch import nn

from trainers._common.backbones import Classifier
from trainers.nas.space import InvalidArchitecture, SearchSpace, SpacePrompt, network_counts

OP_NAMES = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")  # digit -> official name
EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))  # (target node, source node) of op0..op5
CHANNELS = 16  # C: the first stage's width, doubled by each reduction block
CELLS_PER_STAGE = 5  # N


class Zero(nn.Module):
    """Operation 0 (none): zeros of the input's shape; the edge carries nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


class ReLUConvBN(nn.Module):
    """ReLU -> k x k conv (no bias) -> BN; operations 2 (k=1) and 3 (k=3), and the reduction block's convs."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(inplace=False),
                                nn.Conv2d(c_in, c_out, kernel_size, stride, kernel_size // 2, bias=False),
                                nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def operation(option: int, channels: int) -> nn.Module:
    """The module of `option` on an edge of a `channels`-wide cell (every cell edge keeps the shape)."""
    if option == 0:
        return Zero()
    if option == 1:
        return nn.Identity()
    if option == 4:
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    return ReLUConvBN(channels, channels, {2: 1, 3: 3}[option])


class Cell(nn.Module):
    """The searched cell: s1 = op0(s0); s2 = op1(s0) + op2(s1); s3 = op3(s0) + op4(s1) + op5(s2)."""

    def __init__(self, options: tuple[int, ...], channels: int):
        super().__init__()
        self.edges = nn.ModuleList(operation(o, channels) for o in options)

    def forward(self, s0: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        nodes = [s0]
        for target in (1, 2, 3):
            nodes.append(sum(op(nodes[source]) for op, (t, source) in zip(self.edges, EDGES) if t == target))
        return nodes[3]


class ResNetBasicBlock(nn.Module):
    """The fixed reduction between stages: two ReLUConvBN 3x3 (the first with stride 2) plus a shortcut of
    2x2 average pool -> 1x1 conv (no BN)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 2C, H/2, W/2)
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class NasBench201(SearchSpace):
    name = "nas_bench_201"
    choices = (len(OP_NAMES),) * len(EDGES)
    input_size = 32

    def table_key(self, code: str) -> str:
        """Code -> the benchmark's cell string, e.g. "333333" -> "|nor_conv_3x3~0|+|nor_conv_3x3~0|...~2|"."""
        names = [OP_NAMES[o] for o in self.decode(code)]
        nodes = ["|" + "|".join(f"{n}~{s}" for n, (t, s) in zip(names, EDGES) if t == target) + "|"
                 for target in (1, 2, 3)]
        return "+".join(nodes)

    def from_table_key(self, key: str) -> str:
        """The benchmark's cell string -> code; InvalidArchitecture unless it has exactly the layout of table_key."""
        names = [edge.partition("~")[0] for node in key.split("+") for edge in node.strip("|").split("|")]
        if len(names) != len(EDGES) or any(name not in OP_NAMES for name in names):
            raise InvalidArchitecture(f"{key!r} is not a NAS-Bench-201 cell string: it needs {len(EDGES)} edges "
                                      f"named from {OP_NAMES}")
        code = self.encode([OP_NAMES.index(name) for name in names])
        if self.table_key(code) != key:
            raise InvalidArchitecture(f"{key!r} is not a NAS-Bench-201 cell string of the form "
                                      "|op~0|+|op~0|op~1|+|op~0|op~1|op~2|")
        return code

    def canonical(self, code: str) -> str:
        """Edges that cannot reach the output set to none (module docstring): "033333" -> "030303"."""
        options = self.decode(code)
        live = [True, False, False, False]  # a non-none path leads from s0 to the node
        for o, (target, source) in zip(options, EDGES):
            live[target] = live[target] or (o != 0 and live[source])
        used = [False, False, False, True]  # a non-none path leads from the node to s3
        for o, (target, source) in reversed(list(zip(options, EDGES))):
            used[source] = used[source] or (o != 0 and used[target])
        return self.encode([o if live[s] and used[t] else 0 for o, (t, s) in zip(options, EDGES)])

    def flops(self, code: str) -> float:
        """MMACs of the network as built (dead edges included, as the benchmark trained and counted it)."""
        return network_counts(self, self.validate(code))[0]

    def params(self, code: str) -> float:
        return network_counts(self, self.validate(code))[1]

    def build(self, code: str, num_classes: int, in_channels: int = 3) -> Classifier:
        options = self.decode(code)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, CHANNELS, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(CHANNELS)]
        for stage in range(3):
            channels = CHANNELS * 2 ** stage
            if stage > 0:
                layers.append(ResNetBasicBlock(channels // 2, channels))
            layers += [Cell(options, channels) for _ in range(CELLS_PER_STAGE)]
        channels = CHANNELS * 4
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return Classifier(nn.Sequential(*layers), channels, num_classes)

    def prompt(self) -> SpacePrompt:
        return SpacePrompt(task=TASK, operations=OPERATIONS, skeleton=_skeleton(), answer_format=ANSWER_FORMAT,
                           answer_name="list of operation IDs")


# GENIUS's prompt (mingkai-zheng/GENIUS nas_bench_201.py) in this project's words: the same parts in the same order
# (the task, opened by the expert role; the 5 operations with their comments; the block's 6 operations, 4 stages
# and their equations, and the Block class; the step-by-step instructions; the promise of feedback and the request
# not to repeat a design). What differs: the sentences are worded anew, the Block class is a listing written for the
# prompt, "kernal_size" is spelled kernel_size, and the instructions ask for the design as a list of 6 operation IDs
# with an example (the official script had a human type the IDs in).
TASK = ("You are an expert in the field of neural architecture search. Your task is to help me choose the best "
        "operations for designing a neural network block from the available operations. The goal is to maximize "
        "the model's performance.")

OPERATIONS = """The 5 available operations are:
0: Zeroize()     # Outputs a tensor of zeros whatever the input, which cuts the gradient flow between two nodes.
1: nn.Identity() # A skip connection.
2: ReLUConvBN(channels, channels, kernel_size=1, stride=1, padding=0) # Keeps the number of channels.
3: ReLUConvBN(channels, channels, kernel_size=3, stride=1, padding=1) # Keeps the number of channels.
4: nn.AvgPool2d(kernel_size=3, stride=1, padding=1)                   # Keeps the spatial resolution."""

ANSWER_FORMAT = f"""Let's go through this step by step:

First, please analyse the 5 available operations.

Next, please think about the gradient flow implied by the Block class above, for example how the gradient of a later \
stage reaches an earlier one.

Then answer the question: how can a high-performance block be designed from the available operations?

From this analysis, propose a block design made of the given operations that puts performance first, regardless of \
size and complexity. Write the design as a list of {len(EDGES)} operation IDs [op0, op1, ..., op{len(EDGES) - 1}], \
for example [3, 3, 1, 3, 1, 3].

After you suggest a design, I will measure its actual performance and tell you the result; from the results of the \
earlier experiments we can then improve the design together, step by step. Please do not suggest a design that was \
already suggested during this process."""


def _skeleton() -> str:
    """The block's operations, stages and equations, then its implementation."""
    equations = [f"s{target} = " + " + ".join(f"op{i}(s{source})" for i, (t, source) in enumerate(EDGES) if t == target)
                 for target in (1, 2, 3)]
    calls = "\n".join(f"        {equation.replace('op', 'self.op')}" for equation in equations)
    ops = ", ".join(f"op{i}" for i in range(len(EDGES)))
    members = "\n".join(f"        self.op{i} = op_list[{i}]" for i in range(len(EDGES)))
    return (f"The block is defined by {len(EDGES)} operations (op_list = [{ops}]), which act between the stages "
            "of the block. The block has 4 stages, s0, s1, s2 and s3, each a distinct feature map of the network.\n\n"
            "s0 is the input feature map of the block.\n"
            f"s1 is computed as {equations[0]}.\n"
            f"s2 is computed as {equations[1]}.\n"
            f"s3 is computed as {equations[2]}. s3 is the output of the block and the input of the next block.\n\n"
            "So the block is implemented as:\n"
            "class Block(nn.Module):\n"
            "    def __init__(self, channels, op_list):\n"
            "        super().__init__()\n"
            f"{members}\n\n"
            "    def forward(self, s0):\n"
            f"{calls}\n"
            "        return s3")


SPACE = NasBench201()
