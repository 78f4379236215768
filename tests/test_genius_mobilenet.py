"""GENIUS's MobileNet-like ImageNet space: codes, the canonical form, the per-layer MFLOPs table against the whole
network and against the official prompt's table, the published FLOPs and params of GENIUS-329, shapes, the prompt.

OFFICIAL holds the MFLOPs table of the official prompt (mingkai-zheng/GENIUS imagenet/chatting_history/401M.json).
It counts multiply-accumulates plus 4 operations per BN output element (thop's rule for affine BN), as the space does;
the tests also check that rule by adding the BN term to plain MACs counted independently.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainers.nas import arch_value, get_space, parse_arch_value
from trainers.nas.mobilenet_imagenet import SPACE, SPACE_329, SPACE_401, layer_shapes, operation
from trainers.nas.space import InvalidArchitecture, count_macs

GENIUS_329 = [1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 0, 4, 0, 4, 3, 0, 0, 4, 3, 0, 4, 4, 0, 5, 0, 5, 5, 5, 0]
GENIUS_401 = "101011" "110011" "440404" "450505" "650605"  # Experiment7 of the 401M chat
SEARCH_401 = {  # the 401M chat's experiments: code -> FLOPs as the prompt reports them (official counting)
    "101010" "110110" "440440" "450540" "660660": 383, "101011" "101010" "334044" "440444" "550505": 416,
    "101010" "101110" "340303" "450550" "560606": 374, "110110" "111010" "343040" "440440" "560606": 392,
    "110101" "110111" "340404" "440444" "560605": 430, "110101" "111011" "340430" "540450" "565050": 405,
    GENIUS_401: 401, "101011" "110110" "430404" "444044" "650605": 417,
    "101011" "110011" "440430" "545050" "660650": 399,
}
OFFICIAL = {  # stage -> (first layer, other layers): MFLOPs of options 0..6
    1: ([1.5053, 23.7855, 26.9967, 31.8136, 35.5292, 40.3461, 47.5715],
        [0.0, 19.8743, 24.6912, 31.9165, 29.6655, 36.8909, 47.7289]),
    2: ([0.8781, 12.5486, 13.7528, 15.5592, 18.7648, 20.5711, 23.2806],
        [0.0, 12.3059, 14.313, 17.3235, 18.4077, 21.4182, 25.9341]),
    3: ([0.6899, 8.5114, 9.0131, 9.7658, 12.7472, 13.4998, 14.6288],
        [0.0, 11.2154, 12.2189, 13.7242, 16.8301, 18.3354, 20.5933]),
    4: ([1.5805, 12.2314, 13.2349, 14.7402, 18.3479, 19.8532, 22.1111],
        [0.0, 15.8792, 17.0834, 18.8897, 23.8364, 25.6428, 28.3523]),
    5: ([0.9408, 11.495, 11.7961, 12.2477, 17.279, 17.7306, 18.408],
        [0.0, 15.423, 16.0251, 16.9283, 23.3368, 24.24, 25.5948]),
}


def bn_outputs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Elements written by the BN layers in one forward pass, computed on the meta device (shapes only)."""
    total = 0

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel()

    model = model.to("meta").eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(hook)
    model(torch.zeros(shape, device="meta"))
    return total


def test_registry_and_windows() -> None:
    assert get_space("genius_mobilenet") is SPACE and SPACE.flops_window is None
    assert get_space("genius_mobilenet_329") is SPACE_329 and SPACE_329.flops_window == (270, 330)
    assert get_space("genius_mobilenet_401") is SPACE_401 and SPACE_401.flops_window == (370, 430)
    code = SPACE.from_digits(GENIUS_329)
    assert parse_arch_value(arch_value(SPACE_329, code)) == (SPACE_329, code)
    assert SPACE.size() == 7 ** 30


@pytest.mark.parametrize("code, message", [("1" * 29, "30 positions"), ("1" * 29 + "7", "allows 0..6")])
def test_invalid_codes(code: str, message: str) -> None:
    with pytest.raises(InvalidArchitecture, match=message):
        SPACE.validate(code)
    with pytest.raises(InvalidArchitecture):
        SPACE.from_digits(GENIUS_329[:-1] + [7])


def test_layer_shapes() -> None:
    shapes = layer_shapes()
    assert [s[:3] for s in shapes[::6]] == [(16, 24, 2), (24, 40, 2), (40, 80, 2), (80, 96, 1), (96, 192, 2)]
    assert [s[3] for s in shapes[::6]] == [112, 56, 28, 14, 14]
    assert all(s[2] == 1 and s[0] == s[1] for i, s in enumerate(shapes) if i % 6)


def test_canonical_moves_skips_within_a_stage() -> None:
    code = SPACE.from_digits(GENIUS_329)
    assert SPACE.canonical(code) == "110000" "111100" "443000" "434400" "555500"
    assert SPACE.canonical("0" + "1" * 29) == "0" + "1" * 29  # a stage's first layer stays where it is
    assert SPACE.canonical("100000" * 5) == "100000" * 5


def test_canonical_codes_build_the_same_network() -> None:
    code = SPACE.from_digits(GENIUS_329)
    shapes = {k: v.shape for k, v in SPACE.build(code, 10).state_dict().items()}
    assert {k: v.shape for k, v in SPACE.build(SPACE.canonical(code), 10).state_dict().items()} == shapes


def test_table_is_the_official_table() -> None:
    """Every entry equals the official prompt's, and equals plain MACs plus 4 per BN output element."""
    table = SPACE.layer_flops_table()
    assert len(table) == 30 and all(len(row) == 7 for row in table)
    for stage, (first, rest) in OFFICIAL.items():
        index = (stage - 1) * 6
        c_in, c_out, stride, size = layer_shapes()[index]
        for option in range(7):  # option 0 after a stage's first layer is the identity: no BN, no MACs
            assert table[index][option] == pytest.approx(first[option], abs=1e-4)
            assert table[index + 1][option] == pytest.approx(rest[option], abs=1e-4)
            module, shape = operation(option, c_in, c_out, stride), (1, c_in, size, size)
            macs = count_macs(module, shape)
            assert table[index][option] == pytest.approx((macs + 4 * bn_outputs(module, shape)) / 1e6)
        assert all(table[i] == table[index + 1] for i in range(index + 2, index + 6))


@pytest.mark.parametrize("digits", [GENIUS_329, [6] * 30, [0] * 30])
def test_flops_and_params_are_the_whole_networks(digits: list[int]) -> None:
    code = SPACE.from_digits(digits)
    model = SPACE.build(code, 1000)
    table = SPACE.layer_flops_table()
    assert SPACE.flops(code) == pytest.approx(SPACE.fixed_flops() + sum(table[i][o] for i, o in enumerate(digits)))
    assert SPACE.flops(code) == pytest.approx(count_macs(model, (1, 3, 224, 224), bn_ops_per_element=4) / 1e6,
                                              abs=1e-6)
    assert SPACE.params(code) == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=1e-9)


def test_genius_329_against_the_paper() -> None:
    """README: 329 MFLOPs, 7.0 M params (plain MACs: 306.97)."""
    code = SPACE.from_digits(GENIUS_329)
    assert SPACE.flops(code) == pytest.approx(329, abs=0.5)
    assert count_macs(SPACE.build(code, 1000), (1, 3, 224, 224)) / 1e6 == pytest.approx(306.968192, abs=1e-6)
    assert SPACE.params(code) == pytest.approx(7.0, abs=0.05)
    assert SPACE_329.within_budget(code) and not SPACE_401.within_budget(code) and SPACE.within_budget(code)


def test_the_401_search_against_the_chat() -> None:
    """README: GENIUS-401 has 401 MFLOPs and 7.5 M params; every FLOPs figure of the chat is ours, rounded, and so
    is its verdict against the 401 window (370, 430)."""
    for code, official in SEARCH_401.items():
        assert round(SPACE.flops(code)) == official
        assert SPACE_401.within_budget(code)
    assert SPACE.params(GENIUS_401) == pytest.approx(7.5, abs=0.05)
    assert SPACE.flops(GENIUS_401) == pytest.approx(401.48, abs=0.01)


def test_output_shapes() -> None:
    model = SPACE.build(SPACE.from_digits(GENIUS_329), num_classes=10, in_channels=1).eval()
    x = torch.zeros(1, 1, 64, 64)
    assert model(x).shape == (1, 10) and model.features(x).shape == (1, 1280)


def test_prompt_has_the_table_and_the_window() -> None:
    prompt = SPACE_329.prompt()
    table = SPACE.layer_flops_table()
    for stage in range(1, 6):
        for name, row in (("first", table[(stage - 1) * 6]), ("rest", table[(stage - 1) * 6 + 1])):
            assert f"flops_stage{stage}_{name} = [" + ", ".join(f"{v:.4f}" for v in row) + "]" in prompt.skeleton
    assert f"{SPACE.fixed_flops():.4f}" in prompt.skeleton and "layer35" in prompt.skeleton
    assert "[270, 330]" in prompt.answer_format and "[370, 430]" in SPACE_401.prompt().answer_format
    assert "FLOPS of the model" not in SPACE.prompt().answer_format
    assert "6: InvertedResidual(in_channels, out_channels, stride, kernel_size=7, expansion=6)" in prompt.operations
