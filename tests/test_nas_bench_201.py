"""NAS-Bench-201 space: codes and the benchmark's cell strings, the canonical form, the built network, its MACs and
parameters against hand counts and the NB201 API's values, the prompt.

The API values (cifar10-valid; min and max over the 15625 cells, as copied into third-party code) are 7.78305 /
220.11969 MFLOPs and 0.073306 / 1.531546 M params, reached by the all-none and all-nor_conv_3x3 cells; the official
counter adds the classifier's 10 bias additions, which count_macs leaves out.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from trainers.nas import get_space, parse_arch_value
from trainers.nas.nas_bench_201 import SPACE
from trainers.nas.space import InvalidArchitecture

NAMES = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]  # GENIUS's struct_dict


def genius_key(code: str) -> str:
    """The string GENIUS's nas_bench_201.py looks up for a typed 6-digit answer."""
    return "|{}~0|+|{}~0|{}~1|+|{}~0|{}~1|{}~2|".format(*[NAMES[int(d)] for d in code])


def hand_counts(cell_conv: int | None) -> tuple[int, int]:
    """(MACs, params) with 10 classes: every cell edge a ReLUConvBN of kernel `cell_conv`, or none when None."""
    macs, params = 32 * 32 * 16 * 27, 16 * 27 + 2 * 16  # stem conv + BN
    for stage, size in enumerate((32, 16, 8)):
        c = 16 * 2 ** stage
        if stage:  # reduction: conv_a (stride 2), conv_b, 2x2 pool + 1x1 conv shortcut
            macs += size * size * c * (c // 2 * 9 + c * 9 + c // 2)
            params += c * (c // 2 * 9 + c * 9 + c // 2) + 2 * 2 * c
        if cell_conv:
            k2 = cell_conv * cell_conv
            macs += 5 * 6 * size * size * c * c * k2
            params += 5 * 6 * (c * c * k2 + 2 * c)
    return macs + 64 * 10, params + 2 * 64 + 64 * 10 + 10  # last BN, linear


def test_registry() -> None:
    assert get_space("nas_bench_201") is SPACE
    space, code = parse_arch_value("nas_bench_201:333333")
    assert space is SPACE and code == "333333" and SPACE.size() == 5 ** 6


def test_table_key_is_genius_mapping_and_round_trips() -> None:
    assert SPACE.table_key("333333") == ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|"
                                         "+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|")
    for digits in itertools.product("01234", repeat=6):
        code = "".join(digits)
        assert SPACE.table_key(code) == genius_key(code)
        assert SPACE.from_table_key(genius_key(code)) == code


@pytest.mark.parametrize("key", [
    "|conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|",  # unknown op
    "|none~0|+|none~0|none~1|+|none~0|none~1|",  # an edge missing
    "|none~0|+|none~1|none~0|+|none~0|none~1|none~2|",  # sources out of order
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2",  # no closing bar
    "none~0+none~0|none~1+none~0|none~1|none~2",
])
def test_from_table_key_rejects_malformed(key: str) -> None:
    with pytest.raises(InvalidArchitecture, match="NAS-Bench-201 cell string"):
        SPACE.from_table_key(key)


@pytest.mark.parametrize("code, message", [("33333", "6 positions"), ("333335", "allows 0..4"),
                                           ("33a333", "allows 0..4"), (333333, "string of digits")])
def test_invalid_codes(code, message: str) -> None:
    with pytest.raises(InvalidArchitecture, match=message):
        SPACE.validate(code)


@pytest.mark.parametrize("code, canonical", [
    ("333333", "333333"), ("000000", "000000"),
    ("033333", "030303"),  # s1 is always zero: the edges out of it carry nothing
    ("300000", "000000"),  # s3 has no input: nothing reaches the output
    ("333000", "000000"),
    ("100100", "000100"),  # s1 never reaches s3, so the edge into it is dead
    ("101001", "101001"),  # a chain s0 -> s1 -> s2 -> s3 of skips
    ("023400", "000400"),  # s1 dead (op2 out of it), s2 unused (op1 into it)
    ("400044", "400040"),  # s2 has no input: the edge out of it carries nothing
])
def test_canonical_hand_cases(code: str, canonical: str) -> None:
    assert SPACE.canonical(code) == canonical
    assert SPACE.canonical(canonical) == canonical


def test_canonical_network_computes_the_same_at_initialisation() -> None:
    """With fresh BN statistics in eval mode a dead edge outputs exact zeros, so dropping it changes nothing."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for code in ("033333", "320300"):  # dead edges out of s1; unused s1 and s2
        full, pruned = SPACE.build(code, 10).eval(), SPACE.build(SPACE.canonical(code), 10).eval()
        kept = pruned.state_dict()
        pruned.load_state_dict({k: v for k, v in full.state_dict().items() if k in kept})
        torch.testing.assert_close(pruned(x), full(x))


def test_counts_match_hand_counts_and_the_api() -> None:
    for code, conv, api_flops, api_params in (("333333", 3, 220.11969, 1.531546), ("000000", None, 7.78305, 0.073306)):
        macs, params = hand_counts(conv)
        assert SPACE.flops(code) == pytest.approx(macs / 1e6, abs=1e-9)
        assert SPACE.params(code) == pytest.approx(params / 1e6, abs=1e-9)
        assert SPACE.flops(code) == pytest.approx(api_flops - 10 / 1e6, abs=1e-6)
        assert SPACE.params(code) == pytest.approx(api_params, abs=1e-9)
    assert SPACE.flops("222222") == pytest.approx(hand_counts(1)[0] / 1e6)
    assert SPACE.flops("111111") == SPACE.flops("444444") == SPACE.flops("000000")


def test_counts_include_dead_edges_as_the_benchmark_does() -> None:
    assert SPACE.canonical("300000") == "000000"
    assert SPACE.flops("300000") > SPACE.flops("000000") and SPACE.params("300000") > SPACE.params("000000")


def test_output_shapes() -> None:
    model = SPACE.build("123024", num_classes=7, in_channels=1)
    x = torch.zeros(2, 1, 16, 16)
    assert model(x).shape == (2, 7) and model.features(x).shape == (2, 64)


def test_prompt_follows_the_official_layout() -> None:
    """GENIUS's NB201 prompt in order: the expert role and task, the 5 operations (one per line, with comments), the
    stages and their equations, the Block class, the step-by-step instructions; plus the list the answer must end
    with (the official script had a human type the IDs). No source of this project's modules is pasted in."""
    prompt = SPACE.prompt()
    text = prompt.text()
    assert prompt.task.startswith("You are an expert in the field of neural architecture search.")
    for digit, op in enumerate(("Zeroize()     #", "nn.Identity() #", "ReLUConvBN(channels, channels, kernel_size=1",
                                "ReLUConvBN(channels, channels, kernel_size=3", "nn.AvgPool2d(kernel_size=3")):
        assert f"\n{digit}: {op}" in prompt.operations
    for line in ("s1 = op0(s0)", "s2 = op1(s0) + op2(s1)", "s3 = op3(s0) + op4(s1) + op5(s2)"):
        assert f"computed as {line}." in prompt.skeleton and f"        {line.replace('op', 'self.op')}\n" in text
    order = ["Your task is", "0: Zeroize()", "op_list = [op0, op1, op2, op3, op4, op5]", "class Block(nn.Module):",
             "step by step", "analyse the 5 available operations", "think about the gradient flow",
             "list of 6 operation IDs",
             "Please do not suggest a design that was already suggested"]
    assert [text.index(part) for part in order] == sorted(text.index(part) for part in order)
    assert "class ReLUConvBN" not in text and "CIFAR" not in text  # the official prompt names no dataset
