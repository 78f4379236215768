"""GENIUS's MobileNet-like ImageNet space (Zheng et al., arXiv 2304.10970; ../shared/papers/methods_nas_gen_llm.md
section 1, "ImageNet variant"), written from the official imagenet/network/genius.py and op.py (timm 0.6.12 blocks)
and the prompts in imagenet/chat_history.

30 searchable layers x 7 operations, one digit each (7^30 codes); 224 px inputs, 1000 classes. The 36 layers of the
prompt's skeleton:

    layer0       conv3x3(3 -> 16, stride 2) + BN + h-swish                        (B, 16, 112, 112)
    layer1       depthwise-separable 3x3 block, 16 -> 16, SE, residual            (B, 16, 112, 112)
    layer2-31    5 stages of 6 searchable layers, widths 24, 40, 80, 96, 192;
                 the first layer of a stage has the stage's stride (2, 2, 2, 1, 2) (B, 192, 7, 7)
    layer32      conv1x1(192 -> 320) + BN + h-swish                               (B, 320, 7, 7)
    layer33      global average pool                                              (B, 320, 1, 1)
    layer34      conv1x1(320 -> 1280, bias) + h-swish, flatten, dropout 0.2       (B, 1280)
    layer35      linear(1280 -> classes): the Classifier's head                    (B, classes)

Operations (official OPS_LIST order): 0 skip; 1 IR k3 e4; 2 IR k5 e4; 3 IR k7 e4; 4 IR k3 e6; 5 IR k5 e6; 6 IR k7 e6,
where IR is an inverted residual (1x1 expand, k x k depthwise, squeeze-excite, 1x1 project) with h-swish, SE ratio
0.25 of the expanded width (rounded to a multiple of 8; ReLU inside, hard-sigmoid gate) and a residual when the
shape is kept. Skip: every stage changes the width, so on the first layer of a stage skip is a 1x1 conv (with the
stage's stride) + BN; on the other layers the official code leaves the layer out. Hence codes that differ only in
where a stage's skips sit after its first layer build the same network: `canonical` moves them to the stage's end
(the official build also gives drop-path rates by the index among the kept layers, so even those agree).

Counting follows the paper, whose FLOPs windows and reported sizes the search must agree with: `flops` are conv and
linear multiply-accumulates plus 4 operations per BN output element (thop's rule for an affine BN; space.count_macs
with BN_OPS), not the plain MACs of the CIFAR benchmarks; activations, pooling, SE means and additions are not
counted; 1000-class head. Every searchable entry of the official prompt's per-layer table equals ours, and so do the
nine FLOPs figures of the 401M chat, rounded. Because layers are chained, flops(code) = fixed layers + the sum over
searchable layers of `layer_flops_table()[layer][option]` (each entry counted on that module alone at its input
shape), and likewise params with `layer_params_table()`. Measured (README: GENIUS-329 329 MFLOPs, 7.0 M params;
GENIUS-401 401 MFLOPs, 7.5 M params): GENIUS-329 329.40 MFLOPs (306.97 plain MACs), 6.967 M params; GENIUS-401
401.48 MFLOPs (372.26 MACs), 7.452 M params. The official prompt's fixed-layer values follow no single rule
(layer0 = 5.419 counts no BN; layer32 = 3.049 and layer34 = 0.419 are unexplained): the prompt shows ours.

Every conv is padded by kernel_size // 2, which is what timm's default padding gives for these kernels and strides.
Deviations from the official code: the classifier is the Classifier's linear head, so the dropout before it sits at
the end of the encoder (`features` are dropped out in training); drop-path is not implemented (the official default
rate is 0); the prompt describes layer1 as a depthwise conv, as the official prompt does, although it is the whole
depthwise-separable block.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from trainers._common.backbones import Classifier
from trainers.nas.nas_bench_macro import Identity as Skip
from trainers.nas.space import SearchSpace, SpacePrompt, count_macs

INPUT_SIZE = 224
NUM_CLASSES = 1000
STEM_CHANNELS = 16
STAGE_CHANNELS = (24, 40, 80, 96, 192)
STAGE_STRIDES = (2, 2, 2, 1, 2)
LAYERS_PER_STAGE = 6
LAST_CHANNELS = 320  # layer32
HEAD_CHANNELS = 1280  # layer34: the features the classifier sees
SE_RATIO = 0.25
DROPOUT = 0.2
BN_OPS = 4  # FLOPs per BN output element in GENIUS's counts (thop's affine BN rule); 0 gives plain MACs
OPERATIONS = (None, (3, 4), (5, 4), (7, 4), (3, 6), (5, 6), (7, 6))  # option -> (kernel size, expansion); 0 skip
WINDOW_329 = (270, 330)  # MFLOPs window of the GENIUS-329 search (in the official counting, see above)
WINDOW_401 = (370, 430)  # and of GENIUS-401


def make_divisible(value: float, divisor: int = 8) -> int:
    """The nearest multiple of `divisor` (at least `divisor`), not more than 10% below `value` (timm's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcite(nn.Module):
    """x * hard_sigmoid(conv(relu(conv(mean over H, W of x)))), squeezed to SE_RATIO of the channels."""

    def __init__(self, channels: int):
        super().__init__()
        reduced = make_divisible(channels * SE_RATIO)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        scale = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))  # (B, C, 1, 1)
        return x * nn.functional.hardsigmoid(scale)


class DepthwiseSeparable(nn.Module):
    """layer1: k x k depthwise + BN + h-swish -> SE -> 1x1 conv + BN, plus the input."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False),
            nn.BatchNorm2d(channels), nn.Hardswish(inplace=True), SqueezeExcite(channels),
            nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x


class InvertedResidual(nn.Module):
    """1x1 expand (x expansion) + BN + h-swish -> k x k depthwise (stride) + BN + h-swish -> SE -> 1x1 project + BN;
    the input is added when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernel_size: int, expansion: int):
        super().__init__()
        hidden = make_divisible(c_in * expansion)
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size, stride, kernel_size // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.Hardswish(inplace=True), SqueezeExcite(hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.use_shortcut = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x if self.use_shortcut else self.conv(x)


def operation(option: int, c_in: int, c_out: int, stride: int) -> nn.Module:
    """Option 0 is a 1x1 conv + BN where the shape changes and the identity elsewhere (where build omits it)."""
    if option == 0:
        return Skip(c_in, c_out, stride)
    kernel_size, expansion = OPERATIONS[option]
    return InvertedResidual(c_in, c_out, stride, kernel_size, expansion)


def layer_shapes() -> list[tuple[int, int, int, int]]:
    """(in_channels, out_channels, stride, input resolution) of each searchable layer at 224 px."""
    shapes, channels, size = [], STEM_CHANNELS, INPUT_SIZE // 2
    for width, stride in zip(STAGE_CHANNELS, STAGE_STRIDES):
        shapes.append((channels, width, stride, size))
        size //= stride
        shapes += [(width, width, 1, size)] * (LAYERS_PER_STAGE - 1)
        channels = width
    return shapes


def fixed_layers(in_channels: int = 3, num_classes: int = NUM_CLASSES) -> dict[str, tuple[nn.Module, tuple]]:
    """The layers that are not searched: skeleton name -> (module, input shape at 224 px)."""
    final = INPUT_SIZE // 2 // math.prod(STAGE_STRIDES)  # 7
    return {
        "layer0": (nn.Sequential(nn.Conv2d(in_channels, STEM_CHANNELS, 3, 2, 1, bias=False),
                                 nn.BatchNorm2d(STEM_CHANNELS), nn.Hardswish(inplace=True)),
                   (1, in_channels, INPUT_SIZE, INPUT_SIZE)),
        "layer1": (DepthwiseSeparable(STEM_CHANNELS), (1, STEM_CHANNELS, INPUT_SIZE // 2, INPUT_SIZE // 2)),
        "layer32": (nn.Sequential(nn.Conv2d(STAGE_CHANNELS[-1], LAST_CHANNELS, 1, bias=False),
                                  nn.BatchNorm2d(LAST_CHANNELS), nn.Hardswish(inplace=True)),
                    (1, STAGE_CHANNELS[-1], final, final)),
        "layer33": (nn.AdaptiveAvgPool2d(1), (1, LAST_CHANNELS, final, final)),
        "layer34": (nn.Sequential(nn.Conv2d(LAST_CHANNELS, HEAD_CHANNELS, 1), nn.Hardswish(inplace=True),
                                  nn.Flatten(), nn.Dropout(DROPOUT)),
                    (1, LAST_CHANNELS, 1, 1)),
        "layer35": (nn.Linear(HEAD_CHANNELS, num_classes), (1, HEAD_CHANNELS)),
    }


class _OnMeta(nn.Module):
    """`module` moved to the meta device and fed its input there: only shapes are computed, which counts the MACs
    of the (layer, option) modules at 224 px in about half the time the CPU needs (mostly oneDNN set-up)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.to("meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to("meta"))


@lru_cache(maxsize=1)
def _fixed_counts() -> tuple[dict[str, float], float]:
    """(MFLOPs of each fixed layer, their parameters in millions), 1000-class head."""
    layers = fixed_layers()
    flops = {name: count_macs(_OnMeta(module), shape, BN_OPS) / 1e6 for name, (module, shape) in layers.items()}
    params = sum(p.numel() for module, _ in layers.values() for p in module.parameters()) / 1e6
    return flops, params


@lru_cache(maxsize=1)
def _layer_counts() -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
    """(MFLOPs, M params) of each option at each searchable layer, counted on that module alone (once per distinct
    layer: the layers after the first of a stage are alike)."""
    keys = [(shape, index % LAYERS_PER_STAGE == 0) for index, shape in enumerate(layer_shapes())]
    rows: dict[tuple, tuple[tuple[float, ...], tuple[float, ...]]] = {}
    for index, key in enumerate(keys):
        if key not in rows:
            rows[key] = _option_counts(index)
    return tuple(rows[k][0] for k in keys), tuple(rows[k][1] for k in keys)


def _option_counts(index: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(MFLOPs, M params) of the 7 options at searchable layer `index`."""
    c_in, _, _, size = layer_shapes()[index]
    modules = [_searchable_layer(o, index) for o in range(len(OPERATIONS))]
    flops = tuple(count_macs(_OnMeta(m), (1, c_in, size, size), BN_OPS) / 1e6 for m in modules)
    return flops, tuple(sum(p.numel() for p in m.parameters()) / 1e6 for m in modules)


def _searchable_layer(option: int, index: int) -> nn.Module:
    """The module of `option` at searchable layer `index`; the identity where the official code omits a skip."""
    c_in, c_out, stride, _ = layer_shapes()[index]
    return nn.Identity() if option == 0 and index % LAYERS_PER_STAGE else operation(option, c_in, c_out, stride)


def init_like_timm(model: nn.Module) -> None:
    """timm's efficientnet_init_weights, which the official network calls: convs N(0, 2 / fan_out) with the fan-out
    divided by the groups, linear U(+-1 / sqrt(out_features)), zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)


class GeniusMobileNet(SearchSpace):
    choices = (len(OPERATIONS),) * (len(STAGE_CHANNELS) * LAYERS_PER_STAGE)
    input_size = INPUT_SIZE
    num_classes_for_counts = NUM_CLASSES

    def __init__(self, name: str = "genius_mobilenet", flops_window: tuple[float, float] | None = None):
        self.name, self.flops_window = name, flops_window

    def canonical(self, code: str) -> str:
        """Skips after the first layer of a stage moved to the stage's end (the official build omits them)."""
        self.decode(code)
        stages = [code[start:start + LAYERS_PER_STAGE] for start in range(0, len(code), LAYERS_PER_STAGE)]
        return "".join(s[0] + s[1:].replace("0", "").ljust(LAYERS_PER_STAGE - 1, "0") for s in stages)

    def layer_flops_table(self) -> list[list[float]]:
        """MFLOPs of option j at searchable layer i (30 x 7); 0 for a skip that is left out."""
        return [list(row) for row in _layer_counts()[0]]

    def layer_params_table(self) -> list[list[float]]:
        """Parameters (millions) of option j at searchable layer i (30 x 7)."""
        return [list(row) for row in _layer_counts()[1]]

    def fixed_flops(self) -> float:
        """MFLOPs of the layers that are not searched (layer0, layer1, layer32-35)."""
        return sum(_fixed_counts()[0].values())

    def flops(self, code: str) -> float:
        """MMACs at 224 px: the fixed layers plus each searchable layer's table entry."""
        table = _layer_counts()[0]
        return self.fixed_flops() + sum(table[i][o] for i, o in enumerate(self.decode(code)))

    def params(self, code: str) -> float:
        """Parameters in millions with the 1000-class head."""
        table = _layer_counts()[1]
        return _fixed_counts()[1] + sum(table[i][o] for i, o in enumerate(self.decode(code)))

    def build(self, code: str, num_classes: int, in_channels: int = 3) -> Classifier:
        options = self.decode(code)
        fixed = {name: module for name, (module, _) in fixed_layers(in_channels).items()}
        stages = []
        for start in range(0, len(options), LAYERS_PER_STAGE):
            kept = [i for i in range(start, start + LAYERS_PER_STAGE) if options[i] != 0 or i == start]
            stages.append(nn.Sequential(*(_searchable_layer(options[i], i) for i in kept)))
        encoder = nn.Sequential(fixed["layer0"], fixed["layer1"], *stages, fixed["layer32"], fixed["layer33"],
                                fixed["layer34"])  # (B, 3, 224, 224) -> (B, 1280)
        model = Classifier(encoder, HEAD_CHANNELS, num_classes)
        init_like_timm(model)
        return model

    def supernet_parts(self, num_classes: int, in_channels: int = 3) -> tuple[nn.Module, list[list[nn.Module]],
                                                                                nn.Module, int]:
        """What a weight-sharing supernet (trainers/nas/supernet.py) is made of: (stem = layer0-1,
        candidates[position][option], tail = layer32-34, num_features), the modules `build` makes, initialised as it
        does; a skip that `build` leaves out is an nn.Identity, so a path stem -> candidates[i][options[i]] -> tail ->
        a linear head of `num_classes` is the network of the code. The head is the supernet's own."""
        fixed = {name: module for name, (module, _) in fixed_layers(in_channels, num_classes).items()}
        stem, tail = nn.Sequential(fixed["layer0"], fixed["layer1"]), nn.Sequential(fixed["layer32"],
                                                                                   fixed["layer33"], fixed["layer34"])
        candidates = [[_searchable_layer(o, i) for o in range(n)] for i, n in enumerate(self.choices)]
        for module in (stem, tail, *(m for row in candidates for m in row)):
            init_like_timm(module)
        return stem, candidates, tail, HEAD_CHANNELS

    def prompt(self) -> SpacePrompt:
        return SpacePrompt(task=TASK, operations=_operations(), skeleton=_skeleton(),
                           answer_format=_answer_format(self.flops_window))


TASK = ("Your task is to help me choose the best operations for a given model architecture, which has some undefined "
        "layers, from a set of available operations. The model will be trained and tested on ImageNet, and the goal "
        "is to maximise its accuracy on ImageNet.")


def _operations() -> str:
    rows = ["0: Skip(in_channels, out_channels, stride)"]
    rows += [f"{o}: InvertedResidual(in_channels, out_channels, stride, kernel_size={k}, expansion={e})"
             for o, (k, e) in enumerate(OPERATIONS[1:], start=1)]
    return (f"We define the {len(OPERATIONS)} available operations as follows:\n" + "\n".join(rows) + "\n\n"
            "Skip() skips the layer; where in_channels != out_channels or stride != 1 it is a 1x1 convolution that "
            "maps the input to the expected shape. Every InvertedResidual uses h-swish activations and "
            f"squeeze-and-excitation with ratio {SE_RATIO}.")


def _fixed_rows() -> dict[str, str]:
    flops, last = _fixed_counts()[0], STAGE_CHANNELS[-1]
    rows = {"layer0": f"nn.Conv2d(in_channels=3, out_channels={STEM_CHANNELS}, kernel_size=3, groups=1, stride=2)",
            "layer1": f"nn.Conv2d(in_channels={STEM_CHANNELS}, out_channels={STEM_CHANNELS}, kernel_size=3, "
                      f"groups={STEM_CHANNELS}, stride=1)",
            "layer32": f"nn.Conv2d(in_channels={last}, out_channels={LAST_CHANNELS}, kernel_size=1, stride=1)",
            "layer33": "nn.AdaptiveAvgPool2d(output_size=1)",
            "layer34": f"nn.Conv2d(in_channels={LAST_CHANNELS}, out_channels={HEAD_CHANNELS}, kernel_size=1, "
                       "stride=1)",
            "layer35": f"nn.Linear(in_features={HEAD_CHANNELS}, out_features={NUM_CLASSES})"}
    return {name: f"{{defined: True, operation: {op}, FLOPS: {flops[name]:.4f}}}" for name, op in rows.items()}


def _table_name(index: int) -> str:
    return f"flops_stage{index // LAYERS_PER_STAGE + 1}_{'rest' if index % LAYERS_PER_STAGE else 'first'}"


def _skeleton() -> str:
    fixed, rows = _fixed_rows(), []
    for index, (c_in, c_out, stride, _) in enumerate(layer_shapes()):
        rows.append(f"    layer{index + 2}: {{defined: False, downsample: {stride == 2}, in_channels: {c_in}, "
                    f"out_channels: {c_out}, stride: {stride}, FLOPS: {_table_name(index)}[op_list[{index}]]}}")
    rows = ([f"    {name}: {fixed[name]}" for name in ("layer0", "layer1")] + rows
            + [f"    {name}: {fixed[name]}" for name in ("layer32", "layer33", "layer34", "layer35")])
    last = len(layer_shapes()) + 1
    return ("The model architecture is defined as follows.\n{\n" + ",\n".join(rows) + "\n}\n"
            "Where downsample is True, the width and height of the feature map are halved. FLOPS (millions of "
            "multiply-accumulates) measure the cost of each layer; the table below gives the FLOPS of every "
            "operation in every undefined layer.\n" + _flops_table() + "\n\n"
            f"The {len(layer_shapes())} undefined layers (layer2 - layer{last}) have fixed in_channels, out_channels "
            "and stride, and op_list holds their operation IDs: op_list[i] is the operation of layer i+2, which "
            f"costs {_table_name(0)}[op_list[0]] FLOPS for layer2, and so on. The model's FLOPS are the sum over "
            f"all its layers, {SPACE.fixed_flops():.4f} of them in the defined layers.\n\n"
            f"The undefined layers form {len(STAGE_CHANNELS)} stages:\n" + _stage_lines())


def _flops_table() -> str:
    table, lines = _layer_counts()[0], []
    for start in range(0, len(table), LAYERS_PER_STAGE):
        for index in (start, start + 1):
            lines.append(f"{_table_name(index)} = [" + ", ".join(f"{v:.4f}" for v in table[index]) + "]")
    return "\n".join(lines)


def _stage_lines() -> str:
    return "\n".join(f"Stage {s + 1}: layer{2 + s * LAYERS_PER_STAGE} - layer{1 + (s + 1) * LAYERS_PER_STAGE}"
                     for s in range(len(STAGE_CHANNELS)))


def _answer_format(window: tuple[float, float] | None) -> str:
    n, stages = len(layer_shapes()), len(STAGE_CHANNELS)
    text = ("Think step by step. First analyse the available operations, then decide how to build an effective "
            "model from them, keeping in mind that early stages capture low-level information and later stages "
            "higher-level information: which operation is more powerful and more costly, how to distribute the "
            "operations across the stages, which stages need the more complex operations, and which stages should "
            "be deeper or shallower (Skip controls the depth of a stage).\n"
            f"Then give a list of {n} operation IDs for the undefined layers ({stages} stages) that maximises the "
            "model's accuracy on ImageNet, and explain how the design achieves it. For example, [1, 0, 4, ..., 5] "
            "means operation 1 for layer2, operation 0 for layer3, operation 4 for layer4, ..., operation 5 for "
            f"layer{n + 1}.")
    if window is not None:
        text += (f"\nAlso make sure that the total FLOPS of the model (defined and undefined layers together) lie in "
                 f"[{window[0]:g}, {window[1]:g}].")
    return text


SPACE = GeniusMobileNet()
SPACE_329 = GeniusMobileNet("genius_mobilenet_329", WINDOW_329)
SPACE_401 = GeniusMobileNet("genius_mobilenet_401", WINDOW_401)
