"""ViTAS: cyclic channel sharing, identity shifting, superformer paths against stand-alone ViTs, FLOPs, the loss,
saving and reloading, the experiment files."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator import spec as experiment_spec
from trainers import DataInfo, vitas
from trainers.nas import get_space
from trainers.nas.space import count_macs
from trainers.nas.supernet import load_supernet
from trainers.nas.vit import VIT_DIGITS, VITAS_DEIT, ViTSpace
from trainers.path_eval import build_supernet

EXPERIMENTS = [Path(__file__).parents[1] / "experiments" / "vitas" / f"{name}.yaml"
               for name in ("digits", "digits_baseline", "imagenet_deit_1g")]  # the superformer's own files
DIGIT_CODES = ["".join(c) for c in itertools.product("012", repeat=4)]


def superformer(sharing: str = "cyclic", shifting: bool = True, space: str = "vit_digits") -> vitas.Superformer:
    torch.manual_seed(0)
    cfg = vitas.Config(space=space, channel_sharing=sharing, identity_shifting=shifting, cutmix_alpha=0.0)
    return vitas.Superformer(get_space(space), cfg).eval()


def channel_uses(space: ViTSpace, sharing: str) -> torch.Tensor:
    """How many widths of the space use each embedding channel: (C,)."""
    total = space.embed_widths[-1]
    sets = vitas.embedding_channels(space.embed_widths, total, sharing)
    for width, idx in zip(space.embed_widths, sets):
        assert len(idx) == width and len(idx.unique()) == width and int(idx.max()) < total
    return torch.bincount(torch.cat(sets), minlength=total)


def standalone(model: vitas.Superformer, code: str) -> torch.nn.Module:
    """space.build(path) with the superformer's sliced weights copied in, block i of the path from block i."""
    space, path = model.space, model.path(code)
    arch = space.arch(path)
    net = space.build(path, space.num_classes_for_counts, space.in_channels).eval()
    idx, stem = getattr(model, f"channels_{arch.embed}"), model.stems[str(arch.patch)]
    state = {"encoder.stem.proj.weight": stem.proj.weight[idx], "encoder.stem.proj.bias": stem.proj.bias[idx],
             "encoder.stem.cls_token": stem.cls_token[..., idx], "encoder.stem.pos_embed": stem.pos_embed[..., idx],
             "encoder.norm.weight": model.norm.weight[idx], "encoder.norm.bias": model.norm.bias[idx],
             "head.weight": model.head.weight[:, idx], "head.bias": model.head.bias}
    kept = [(block, b) for block, b in zip(model.blocks, arch.blocks) if b is not None]
    for j, (block, b) in enumerate(kept):
        rows = vitas.qkv_rows(b.qkv_dim, block.proj.in_features)
        d, m, prefix = b.qkv_dim, b.mlp_dim, f"encoder.blocks.{j}."
        state |= {prefix + "norm1.weight": block.norm1.weight[idx], prefix + "norm1.bias": block.norm1.bias[idx],
                  prefix + "qkv.weight": block.qkv.weight[rows][:, idx], prefix + "qkv.bias": block.qkv.bias[rows],
                  prefix + "proj.weight": block.proj.weight[idx, :d], prefix + "proj.bias": block.proj.bias[idx],
                  prefix + "norm2.weight": block.norm2.weight[idx], prefix + "norm2.bias": block.norm2.bias[idx],
                  prefix + "fc1.weight": block.fc1.weight[:m][:, idx], prefix + "fc1.bias": block.fc1.bias[:m],
                  prefix + "fc2.weight": block.fc2.weight[idx, :m], prefix + "fc2.bias": block.fc2.bias[idx]}
    net.load_state_dict(state)
    return net


# ---------------------------------------------------------------------------------------------- cyclic sharing


@pytest.mark.parametrize("space", [VIT_DIGITS, VITAS_DEIT], ids=lambda s: s.name)
def test_cyclic_sharing_balances_channel_use_and_left_slicing_does_not(space: ViTSpace):
    cyclic, left = channel_uses(space, "cyclic"), channel_uses(space, "left")
    assert int(cyclic.max() - cyclic.min()) <= 1
    assert int(left.max() - left.min()) == len(space.embed_widths) - 1
    assert int(cyclic.sum()) == int(left.sum()) == sum(space.embed_widths)


def test_cyclic_windows_by_hand():
    # widths 24, 36, 48 of 48 channels: offsets 0, 24, 60 mod 48 = 12
    sets = vitas.embedding_channels((24, 36, 48), 48, "cyclic")
    assert sets[0].tolist() == list(range(24))
    assert sets[1].tolist() == list(range(24, 48)) + list(range(12))
    assert sets[2].tolist() == list(range(12, 48)) + list(range(12))
    assert channel_uses(VIT_DIGITS, "cyclic").tolist() == [3] * 12 + [2] * 36


# ---------------------------------------------------------------------------------------------- identity shifting


def test_identity_shifting_gives_45_networks_of_81_codes():
    assert len({VIT_DIGITS.canonical(c) for c in DIGIT_CODES}) == 45
    assert VIT_DIGITS.canonical("1102") == VIT_DIGITS.canonical("1120") == "1120"
    assert VIT_DIGITS.canonical("2012") == "2120" and VIT_DIGITS.canonical("0000") == "0000"


def test_vitas_deit_canonical_zeroes_identity_digits_and_moves_them_last():
    blocks = ["000"] * 16
    blocks[0], blocks[3], blocks[5] = "399", "057", "412"  # block 3 is an identity with leftover digits
    code = "15" + "".join(blocks)
    assert VITAS_DEIT.canonical(code) == "15" + "399" + "412" + "000" * 14
    assert len(VITAS_DEIT.canonical(code)) == len(VITAS_DEIT.choices) == 50


def test_superformer_runs_equivalent_codes_on_one_set_of_weights_only_with_shifting():
    x = torch.randn(4, 1, 16, 16)
    shifted, plain = superformer(shifting=True), superformer(shifting=False)
    with torch.no_grad():
        assert torch.equal(shifted(x, "1102"), shifted(x, "1120"))
        assert not torch.allclose(plain(x, "1102"), plain(x, "1120"))


# ---------------------------------------------------------------------------------------------- paths = stand-alone


@pytest.mark.parametrize("sharing", ["left", "cyclic"])
@pytest.mark.parametrize("shifting", [True, False])
def test_a_path_equals_the_standalone_network_with_its_sliced_weights(sharing: str, shifting: bool):
    model, x = superformer(sharing, shifting), torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        for code in ["2222", "0000", "1102", "2012", "0201"]:
            torch.testing.assert_close(model(x, code), standalone(model, code)(x), rtol=1e-5, atol=1e-5)


def test_a_vitas_deit_path_equals_its_standalone_network():
    model, x = superformer("cyclic", True, "vitas_deit"), torch.randn(1, 3, 224, 224)
    code = "23" + "207" + "000" + "492" + "000" * 13  # patch 32, E 154, blocks (6, 48, 1152) and (16, 480, 432)
    with torch.no_grad():
        torch.testing.assert_close(model(x, code), standalone(model, code)(x), rtol=1e-4, atol=1e-4)


def test_build_gives_the_networks_widths():
    arch = VIT_DIGITS.arch("1210")
    assert arch.embed == 36 and arch.blocks[2] is None
    assert (arch.blocks[0].heads, arch.blocks[0].qkv_dim, arch.blocks[0].mlp_dim) == (4, 32, 144)
    assert (arch.blocks[1].heads, arch.blocks[1].qkv_dim, arch.blocks[1].mlp_dim) == (2, 16, 72)
    net = VIT_DIGITS.build("1210", 10, 1)
    assert len(net.encoder.blocks) == 2 and net(torch.randn(2, 1, 16, 16)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------- FLOPs


def test_flops_by_hand():
    # "0100": E 24, one block of 2 heads, d 16, m 48; 16 patches + class token = 17 tokens, 10 classes
    patch, qkv, attention = 16 * 24 * 16, 17 * 24 * 48, 2 * 17 * 17 * 16  # conv 4x4x1; QK^T + AV
    proj, mlp, head = 17 * 16 * 24, 2 * 17 * 24 * 48, 24 * 10
    expected = patch + qkv + attention + proj + mlp + head
    assert expected == 80912
    assert VIT_DIGITS.flops("0100") == pytest.approx(expected / 1e6, rel=1e-12)
    convs_and_linears = count_macs(VIT_DIGITS.build("0100", 10, 1), (1, 1, 16, 16))
    assert convs_and_linears + attention == expected


def test_flops_of_the_readme_13g_model_and_equivalent_codes():
    vitas_c = "15" + "124" * 12 + "000" * 4  # patch 16, E 230, 12 x (3 heads, qkv 432, MLP 720)
    assert 1200 < VITAS_DEIT.flops(vitas_c) < 1330
    assert VIT_DIGITS.flops("1102") == VIT_DIGITS.flops("1120") < VIT_DIGITS.flops("1122")


# ---------------------------------------------------------------------------------------------- loss


def test_mixed_cross_entropy_by_hand():
    # logits (0, ln 3) for both images, labels (1, 0); no smoothing: CE = log 4 - log 3 (label 1), log 4 (label 0)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    y = torch.tensor([1, 0])
    own = (math.log(4 / 3) + math.log(4)) / 2  # the reversed labels give the same mean here
    assert vitas.mixed_cross_entropy(logits, y, 1.0, 0.0).item() == pytest.approx(own)
    # smoothing 0.2 over 2 classes: target 0.9 / 0.1
    smooth = (0.9 * math.log(4 / 3) + 0.1 * math.log(4) + 0.9 * math.log(4) + 0.1 * math.log(4 / 3)) / 2
    assert vitas.mixed_cross_entropy(logits, y, 1.0, 0.2).item() == pytest.approx(smooth, rel=1e-6)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # lam 0.75: 0.75 CE(y) + 0.25 CE(y reversed)
    own, reversed_ = F.cross_entropy(logits, y).item(), F.cross_entropy(logits, y.flip(0)).item()
    assert vitas.mixed_cross_entropy(logits, y, 0.75, 0.0).item() == pytest.approx(0.75 * own + 0.25 * reversed_)


def test_cutmix_pastes_a_box_of_the_reversed_batch_and_returns_its_share():
    torch.manual_seed(3)
    x = torch.arange(3, dtype=torch.float32)[:, None, None, None].expand(3, 1, 16, 16).clone()  # image i is all i
    for _ in range(5):
        mixed, lam = vitas.cutmix(x, alpha=1.0)
        own = (mixed == x).float().mean(dim=(1, 2, 3))  # image 1 is its own reverse: skip it
        assert own[0].item() == pytest.approx(lam) and own[2].item() == pytest.approx(lam)
        assert set(mixed[0].unique().tolist()) <= {0.0, 2.0}
    assert vitas.cutmix_box(16, 0.75, 8, 8) == (4, 12, 4, 12) and vitas.cutmix_box(16, 0.75, 0, 15) == (0, 4, 11, 16)


# ---------------------------------------------------------------------------------------------- steps, eval, saving


def test_train_step_uses_the_step_path_and_reports_its_flops():
    model, x = superformer(), torch.randn(8, 1, 16, 16)
    batch = {"x": x, "y": torch.arange(8) % 10}
    loss, metrics = vitas.train_step(model.train(), batch, vitas.TINY, step=1)
    code = VIT_DIGITS.sample(vitas.path_rng(1))
    assert metrics["path_mflops"] == VIT_DIGITS.flops(code)
    expected = F.cross_entropy(model(x, code), batch["y"], label_smoothing=vitas.TINY.label_smoothing)
    torch.testing.assert_close(loss, expected)


def test_monitor_paths_and_eval_step():
    paths = vitas.monitor_paths(VIT_DIGITS)
    assert paths == {"largest": "2222", "middle": "1111", "smallest": "0111"}
    assert vitas.monitor_paths(VITAS_DEIT)["smallest"] == "00" + "100" * 16
    batch = {"x": torch.randn(5, 1, 16, 16), "y": torch.arange(5)}
    with torch.no_grad():
        sums = vitas.eval_step(superformer(), batch, vitas.TINY)
    assert set(sums) == {"n", "acc_largest", "acc_middle", "acc_smallest"} and int(sums["n"]) == 5


def test_a_saved_superformer_reloads_with_the_same_outputs(tmp_path: Path):
    model = superformer("left", False)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    info = DataInfo(num_classes=10, image_size=16, in_channels=1, num_train=8, num_labeled=8)
    loaded = load_supernet(tmp_path / "model.pt", lambda method, fields: build_supernet(method, fields, info)).eval()
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(model.cfg) and loaded.cfg.channel_sharing == "left"
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for code in ["2222", "1020"]:
            assert torch.equal(loaded(x, code), model(x, code))


def test_check_rejects_a_space_that_is_not_a_vit_space():
    vitas.check(vitas.TINY)
    with pytest.raises(vitas.ConfigError, match="config.space"):
        vitas.check(vitas.Config(space="nas_bench_macro"))
    with pytest.raises(vitas.ConfigError, match="config.space"):
        vitas.check(vitas.Config(space="nope"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_load_and_pass_check(path: Path):
    spec = experiment_spec.load(path)
    assert spec.method == "vitas"
    vitas.check(vitas.Config(**spec.config))
