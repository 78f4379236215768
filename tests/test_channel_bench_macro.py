"""Channel-Bench-Macro spaces: codes, channel lists, the built networks, their MACs and parameters, the prompt.

Expected counts are written out layer by layer from the official model.py (xiusu/Channel-Bench-Macro), and
`TABLE` holds entries of the benchmark files (Results_ResNet.json / Results_MobileNet.json, as copied into
mingkai-zheng/GENIUS@969d4f9 benchmark/), whose `flops` and `params` the spaces must reproduce exactly.
"""

from __future__ import annotations

import inspect
import random

import pytest
import torch

from trainers.nas import get_space, parse_arch_value
from trainers.nas.channel_bench_macro import MOBILENET, RESNET
from trainers.nas.space import InvalidArchitecture

RESNET_MAX = (256, 256, 256, 512, 512, 512, 512)
MOBILENET_MAX = (128, 768, 768, 768, 256, 1536, 1024)
TABLE = {  # space -> code -> (flops, params) as stored in the benchmark file
    "channel_bench_res": {"4432214": (794495488, 6208394), "2421221": (368937472, 3106698),
                          "1421132": (222217472, 2144586), "4243334": (992677632, 10192394),
                          "4322341": (756748032, 7389834), "1441144": (316589312, 3177802)},
    "channel_bench_mob": {"4432214": (122923008, 716234), "2421221": (60799488, 446858),
                          "1421132": (36422656, 312298), "4243334": (146888704, 1172938),
                          "4322341": (125315584, 1053130), "1441144": (49068032, 434922)},
}
SPACES = (RESNET, MOBILENET)


def widths(code: str, max_widths: tuple[int, ...]) -> list[int]:
    return [int(d) * m // 4 for d, m in zip(code, max_widths)]


def resnet_counts(code: str) -> tuple[int, int]:
    """(MACs, params) of the ResNet space: stem and blocks 1-2 at 16x16 = 256 positions, blocks 3-5 at 8x8 = 64."""
    c0, c1, c2, c3, c4, c5, c6 = widths(code, RESNET_MAX)
    convs = [  # (C_in * k * k, C_out, output positions)
        (3 * 9, c0, 256),
        (c0 * 9, c1, 256), (c1 * 9, c0, 256), (c0 * 9, c2, 256), (c2 * 9, c0, 256),
        (c0 * 9, c3, 64), (c3 * 9, c4, 64),
        (c4 * 9, c5, 64), (c5 * 9, c4, 64), (c4 * 9, c6, 64), (c6 * 9, c4, 64),
    ]
    macs = sum(k * c_out * positions for k, c_out, positions in convs) + c4 * 10
    params = sum(k * c_out for k, c_out, _ in convs) + 2 * sum(c_out for _, c_out, _ in convs) + c4 * 10 + 10
    return macs, params


def mobilenet_counts(code: str) -> tuple[int, int]:
    """(MACs, params) of the MobileNet space; depthwise convs have 9 weights per channel."""
    c0, c1, c2, c3, c4, c5, c6 = widths(code, MOBILENET_MAX)
    convs = [  # (C_in / groups * k * k, C_out, output positions)
        (3 * 9, c0, 256),
        (c0, c1, 256), (9, c1, 256), (c1, c0, 256),
        (c0, c2, 256), (9, c2, 256), (c2, c0, 256),
        (c0, c3, 256), (9, c3, 64), (c3, c4, 64),
        (c4, c5, 64), (9, c5, 64), (c5, c4, 64),
        (c4, c6, 64),
    ]
    macs = sum(k * c_out * positions for k, c_out, positions in convs) + c6 * 10
    params = sum(k * c_out for k, c_out, _ in convs) + 2 * sum(c_out for _, c_out, _ in convs) + c6 * 10 + 10
    return macs, params


HAND = {"channel_bench_res": resnet_counts, "channel_bench_mob": mobilenet_counts}


def test_registry_returns_both_spaces() -> None:
    assert get_space("channel_bench_res") is RESNET and get_space("channel_bench_mob") is MOBILENET
    assert get_space("nas_bench_macro").name == "nas_bench_macro"
    space, code = parse_arch_value("channel_bench_mob:4444342")
    assert space is MOBILENET and code == "4444342"


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
def test_codes_round_trip(space) -> None:
    assert space.size() == 4 ** 7 and space.choices == (4,) * 7
    assert space.decode("1111111") == (0,) * 7 and space.decode("4344424") == (3, 2, 3, 3, 3, 1, 3)
    rng = random.Random(0)
    for _ in range(50):
        code = space.sample(rng)
        assert space.encode(space.decode(code)) == code == space.canonical(code)
        assert space.from_channels(list(space.widths(code))) == code
        assert space.mutate(code, rng) != code


@pytest.mark.parametrize("code, message", [
    ("444444", "7 positions"), ("44444444", "7 positions"), ("4404444", "allows 1..4"),
    ("4444445", "allows 1..4"), ("44a4444", "allows 1..4"), (4444444, "a string of digits"),
])
@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
def test_invalid_codes_say_why(space, code, message) -> None:
    with pytest.raises(InvalidArchitecture, match=message):
        space.decode(code)


def test_widths_and_channel_lists() -> None:
    assert RESNET.widths("4344424") == (256, 192, 256, 512, 512, 256, 512)
    assert MOBILENET.widths("1111111") == (32, 192, 192, 192, 64, 384, 256)
    assert MOBILENET.from_channels([32, 576, 192, 768, 64, 1536, 1024]) == "1314144"
    with pytest.raises(InvalidArchitecture, match=r"channels\[1\] = 100 .* allows \[64, 128, 192, 256\]"):
        RESNET.from_channels([64, 100, 64, 128, 128, 128, 128])
    with pytest.raises(InvalidArchitecture, match="list of 7 integers"):
        RESNET.from_channels([64, 64, 64, 128, 128, 128])
    with pytest.raises(InvalidArchitecture, match="list of 7 integers"):
        RESNET.from_channels([64, 64, 64, 128, 128, 128, 128.0])


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
@pytest.mark.parametrize("code", ["1111111", "4344424", "4444444"])
def test_build_output_shape(space, code) -> None:
    model = space.build(code, num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)
    assert space.build(code, num_classes=7, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
@pytest.mark.parametrize("code", ["1111111", "4444444", "2413142"])
def test_counts_match_hand_computed_layers(space, code) -> None:
    macs, params = HAND[space.name](code)
    assert round(space.flops(code) * 1e6) == macs
    assert round(space.params(code) * 1e6) == params


def test_extreme_counts() -> None:
    assert resnet_counts("1111111") == (90_096_896, 963_658)
    assert resnet_counts("4444444") == (1_436_226_560, 15_356_170)
    assert mobilenet_counts("1111111") == (14_285_312, 125_418)
    assert mobilenet_counts("4444444") == (211_281_920, 1_804_170)


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
def test_counts_match_benchmark_table(space) -> None:
    for code, (flops, params) in TABLE[space.name].items():
        assert HAND[space.name](code) == (flops, params)
        assert (round(space.flops(code) * 1e6), round(space.params(code) * 1e6)) == (flops, params)


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
def test_wider_layers_cost_more(space) -> None:
    for position in range(7):
        flops = [space.flops("2" * position + str(d) + "2" * (6 - position)) for d in range(1, 5)]
        assert flops == sorted(flops) and len(set(flops)) == 4, (position, flops)
    assert space.flops("1111111") < space.flops("4344424") < space.flops("4444444")


OFFICIAL_OPTIONS = {  # the channel options as GENIUS's prompts show them (MobileNet's in aligned columns)
    "channel_bench_res": ["[64, 128, 192, 256]"] * 3 + ["[128, 256, 384, 512]"] * 4,
    "channel_bench_mob": ["[32,  64,  96,  128]"] + ["[192, 384, 576, 768]"] * 3 + [
        "[64,  128, 192, 256]", "[384, 768, 1152, 1536]", "[256, 512, 768, 1024]"],
}


@pytest.mark.parametrize("space, block, example", [(RESNET, "BottleneckResidualBlock", "[64, 192, ..., 256]"),
                                                   (MOBILENET, "InvertedResidual", "[64, 576, ..., 256]")],
                         ids=["res", "mob"])
def test_prompt_follows_the_official_layout(space, block, example) -> None:
    """GENIUS's order (task, layer dictionary, block implementation, channel options, objective and answer format),
    its block names, options and example answer; the implementation is a listing, not this project's source."""
    prompt = space.prompt()
    text = prompt.text()
    order = ["Your task is", "    layer1: nn.Conv2d(in_channels=3, out_channels=channels[0]", f"class {block}(",
             "    channels[0]: ", "Your objective is", f"channel list of 7 numbers (e.g. {example})."]
    assert [text.index(part) for part in order] == sorted(text.index(part) for part in order)
    for i, options in enumerate(OFFICIAL_OPTIONS[space.name]):
        assert f"\n    channels[{i}]: {options},\n" in prompt.operations
    assert prompt.skeleton.count(f"{block}(in_channels=channels[") == len(space.blocks)
    assert "bottleneck_channels=channels[1]" in prompt.skeleton and "stride=2" in prompt.skeleton
    assert "out_features=10)," in prompt.skeleton and "CIFAR10" in prompt.task
    assert inspect.getsource(space.block_type) not in text and prompt.answer_name == "channel list"
    assert prompt.ask_better is (space is MOBILENET)  # GENIUS's ResNet script asks for "a channel list"
