"""K-shot NAS: the convex combination of the K atoms, simplex codes, K = 1 as one-shot, the alternation, the channel
regulariser, saving and loading through load_supernet, the space's supernet parts."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import trainers
from orchestrator import spec as experiment_spec
from trainers import kshot_nas
from trainers._common.contract import ConfigError, DataInfo
from trainers.nas import get_space
from trainers.nas.supernet import load_supernet, path_accuracy, path_rng, recalibrate_bn

EXPERIMENTS = [Path(__file__).parents[1] / "experiments" / "kshot_nas" / f"{name}.yaml"
               for name in ("digits", "digits_k1", "imagenet_mobilenet")]  # the supernet runs (not the search files)
INFO = DataInfo(num_classes=10, image_size=16, in_channels=3, num_train=64, num_labeled=64)
SPACE = get_space("macro_digits")


def supernet(**changes) -> kshot_nas.KShotSupernet:
    torch.manual_seed(0)
    return kshot_nas.build(dataclasses.replace(kshot_nas.TINY, **changes), INFO)


def scramble_atoms(model: kshot_nas.KShotSupernet) -> None:
    """Make the K atoms differ (they start identical), so that the code matters."""
    with torch.no_grad():
        for d in model.dictionaries():
            for theta in d.theta.values():
                theta.add_(0.3 * torch.randn_like(theta))


def batch(size: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(size, 3, 16, 16, generator=g), "y": torch.randint(0, 10, (size,), generator=g)}


def path_modules(model: kshot_nas.KShotSupernet, options: tuple[int, ...]) -> list[kshot_nas.Dictionary]:
    return [model.stem, *(row[o] for row, o in zip(model.candidates, options)), model.tail, model.head]


def copy_by_order(target: nn.Module, params: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
    """Copy `params` and `buffers` into `target`'s, in registration order (the shapes must agree)."""
    own_params, own_buffers = list(target.parameters()), list(target.buffers())
    assert [p.shape for p in own_params] == [p.shape for p in params]
    assert [b.shape for b in own_buffers] == [b.shape for b in buffers]
    with torch.no_grad():
        for mine, theirs in zip(own_params + own_buffers, params + buffers):
            mine.copy_(theirs)


def mixed_by_hand(d: kshot_nas.Dictionary, lam: torch.Tensor) -> list[torch.Tensor]:
    """sum_k lam_k theta_k of each parameter of `d`, as an explicit loop over k."""
    out = []
    for name in d.names:
        theta = d.theta[name.replace(".", "-")]
        out.append(sum(lam[k] * theta[k] for k in range(len(lam))).detach())
    return out


# ---------------------------------------------------------------------------------------------- pure functions


def test_convex_combination_by_hand():
    lam, theta = torch.tensor([0.25, 0.75]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (K=2, 2)
    assert torch.equal(kshot_nas.convex_combination(lam, theta), torch.tensor([2.5, 3.5]))


def test_width_regulariser_is_lower_for_codes_further_apart():
    lam = torch.tensor([1.0, 0.0, 0.0])
    near, far = torch.tensor([0.8, 0.2, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    # ||lam - near||^2 = 0.04 + 0.04 = 0.08; ||lam - far||^2 = 1 + 1 = 2; weight 0.5
    assert kshot_nas.width_regulariser(lam, near, 0.5).item() == pytest.approx(-0.04)
    assert kshot_nas.width_regulariser(lam, far, 0.5).item() == pytest.approx(-1.0)
    assert kshot_nas.width_regulariser(lam, lam, 0.5).item() == 0.0


def test_code_entropy_by_hand():
    assert kshot_nas.code_entropy(torch.full((4,), 0.25)).item() == pytest.approx(math.log(4))
    assert kshot_nas.code_entropy(torch.tensor([1.0, 0.0])).item() == 0.0


def test_module_width_of_the_macro_operations():
    # position 0: 8 -> 16 channels, stride 2; position 1: 16 -> 16 (space macro_digits)
    _, candidates, _, _ = SPACE.supernet_parts(10, 3)
    assert [kshot_nas.module_width(m) for m in candidates[0]] == [0.0, 24 / 16, 48 / 16]  # identity is a 1x1 conv
    assert [kshot_nas.module_width(m) for m in candidates[1]] == [0.0, 3.0, 6.0]  # identity is nn.Identity


def test_simplex_step_schedule():
    cfg = dataclasses.replace(kshot_nas.TINY, k=4, warmup_steps=3, simplex_every=2)
    assert [kshot_nas.is_simplex_step(s, cfg) for s in range(8)] == [False] * 3 + [False, True, False, True, False]
    assert not any(kshot_nas.is_simplex_step(s, dataclasses.replace(cfg, k=1)) for s in range(8))


# ---------------------------------------------------------------------------------------------- the supernet


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_path_weights_are_the_convex_combination_of_the_atoms(mode: str):
    model = supernet(k=3)
    scramble_atoms(model)
    options, lam = (2, 1, 0, 2), torch.tensor([0.2, 0.5, 0.3])
    stem, candidates, tail, features = SPACE.supernet_parts(10, 3)
    reference = nn.Sequential(stem, *(row[o] for row, o in zip(candidates, options)), tail, nn.Linear(features, 10))
    dictionaries = path_modules(model, options)
    copy_by_order(reference, [w for d in dictionaries for w in mixed_by_hand(d, lam)],
                  [b for d in dictionaries for b in d.module.buffers()])
    model.train(mode == "train")
    reference.train(mode == "train")
    x = batch()["x"]
    torch.testing.assert_close(model.path(x, options, lam), reference(x), rtol=1e-5, atol=1e-5)
    other = model.path(x, options, torch.tensor([0.6, 0.1, 0.3]))
    assert not torch.allclose(other, reference(x), atol=1e-3), "the code changes the path's weights"


@pytest.mark.parametrize("code", ["0000", "1201", "2222"])
def test_k1_path_is_the_stand_alone_network_with_the_same_weights(code: str):
    model = supernet(k=1).eval()
    options = SPACE.decode(code)
    dictionaries = path_modules(model, options)
    network = SPACE.build(code, 10, 3).eval()
    copy_by_order(network, [theta[0] for d in dictionaries for theta in d.theta.values()],
                  [b for d in dictionaries for b in d.module.buffers()])
    x = batch()["x"]
    torch.testing.assert_close(model(x, code), network(x))
    assert model.pi is None


def test_genius_mobilenet_k1_path_is_the_stand_alone_network():
    """Skips after a stage's first layer are nn.Identity candidates: the path equals `build`, which leaves them out."""
    space = get_space("genius_mobilenet")
    code = "1" + "0" * 5 + "2" + "3" * 5 + "0" * 6 + "456012" + "6" * 6
    torch.manual_seed(0)
    model = kshot_nas.KShotSupernet(space, dataclasses.replace(kshot_nas.TINY, space=space.name, k=1), 5, 3).eval()
    network = space.build(code, 5, 3).eval()
    dictionaries = path_modules(model, space.decode(code))
    copy_by_order(network, [theta[0] for d in dictionaries for theta in d.theta.values()],
                  [b for d in dictionaries for b in d.module.buffers()])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x, code), network(x))


def test_all_k_atoms_start_identical_and_bn_statistics_are_one_copy():
    model = supernet(k=4)
    for d in model.dictionaries():
        for theta in d.theta.values():
            assert theta.shape[0] == 4 and all(torch.equal(theta[0], theta[k]) for k in range(4))
        assert not list(d.module.parameters()), "the stand-alone module holds no weights of its own"
    assert any(name.endswith("running_mean") and value.ndim == 1 for name, value in model.state_dict().items())


def test_independent_atoms_are_k_separate_draws_of_the_spaces_initialisation():
    """atom_init "independent": atom k of every weight is the k-th of K draws of the space's modules; with uniform
    codes a path runs with their mean. BN statistics stay one copy, and the atoms' shapes are those of copies."""
    torch.manual_seed(0)
    model = supernet(k=3, atom_init="independent")
    torch.manual_seed(0)
    draws = [kshot_nas.supernet_draw(model.space, INFO.num_classes, INFO.in_channels) for _ in range(3)]
    stems = [dict(d[0].named_parameters()) for d in draws]
    for name in model.stem.names:
        theta = model.stem.theta[kshot_nas._key(name)]
        torch.testing.assert_close(theta, torch.stack([stem[name] for stem in stems]))
        assert not torch.equal(theta[0], theta[1]) or theta.ndim == 2  # weights differ (BN's affine starts equal)
    heads = torch.stack([d[3].weight for d in draws])
    torch.testing.assert_close(model.head.theta[kshot_nas._key("weight")], heads)
    torch.testing.assert_close(model.head.weights(model.uniform_code())["weight"], heads.mean(0))
    copies = supernet(k=3)

    def shapes(m: nn.Module) -> dict[str, torch.Size]:
        return {name: t.shape for name, t in m.named_parameters()} | {name: t.shape for name, t in m.named_buffers()}

    assert shapes(model) == shapes(copies)


def test_forward_validates_the_code():
    model = supernet()
    with pytest.raises(ValueError, match="macro_digits"):
        model(batch()["x"], "0123")


def test_simplex_codes_lie_in_the_simplex_and_are_uniform_in_warm_up():
    model = supernet(k=5, warmup_steps=10)
    rng = random.Random(0)
    paths = [SPACE.decode(SPACE.sample(rng)) for _ in range(50)]
    for options in paths:
        assert torch.equal(model.code(options), torch.full((5,), 0.2)), "pi is not used before it is trained"
    kshot_nas.on_step_end(model, model.cfg, 10)
    codes = torch.stack([model.code(options) for options in paths])  # (50, 5)
    assert (codes >= 0).all() and torch.allclose(codes.sum(1), torch.ones(50))
    assert codes.std(0).max() > 1e-3, "pi gives each path its own code"
    _, metrics = kshot_nas.train_step(model, batch(), model.cfg, 3)  # a warm-up step
    assert metrics["code_entropy"].item() == pytest.approx(math.log(5))
    assert metrics["code_max"].item() == pytest.approx(0.2)


def test_the_channel_branch_makes_the_code_depend_on_the_width():
    model = supernet(k=3)
    options = (1, 2, 1, 0)
    own, other = model.simplex_code(options), model.simplex_code(options, model.width_encoding((2, 1, 0, 2)))
    assert not torch.allclose(own, other)


# ---------------------------------------------------------------------------------------------- training


def gradients_after(model: kshot_nas.KShotSupernet, step: int) -> tuple[set[str], torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _ = kshot_nas.train_step(model, batch(), model.cfg, step)
    loss.backward()
    return {name for name, p in model.named_parameters() if p.grad is not None}, loss


def test_the_alternation_trains_pi_or_the_atoms_and_warm_up_never_pi():
    model = supernet(k=3, warmup_steps=2, simplex_every=2)
    scramble_atoms(model)
    pi = {name for name, _ in model.named_parameters() if name.startswith("pi.")}
    for step in (0, 1):  # warm-up
        names, _ = gradients_after(model, step)
        assert names and not names & pi
    names, _ = gradients_after(model, 3)  # a simplex step
    assert names == pi
    names, _ = gradients_after(model, 4)  # a supernet step: the shared parts' and the path's atoms only
    options = SPACE.decode(SPACE.sample(path_rng(4)))
    on_path = tuple(f"candidates.{i}.{o}." for i, o in enumerate(options))
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(on_path) or not n.startswith(("pi.", "candidates."))}
    assert names == expected


def test_warm_up_is_k_identical_one_shot_supernets():
    """Uniform codes and lr_scale K: K = 3 trains exactly as K = 1 under SGD without weight decay."""
    data = batch(8)

    def trained(k: int) -> kshot_nas.KShotSupernet:
        model = supernet(k=k, warmup_steps=100)
        groups = [{key: v for key, v in g.items() if key != "lr_scale"} | {"lr": 0.05 * g["lr_scale"]}
                  for g in kshot_nas.param_groups(model, model.cfg)]
        optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
        for step in range(4):
            loss, _ = kshot_nas.train_step(model, data, model.cfg, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return model

    one, three = trained(1), trained(3)
    for d1, d3 in zip(one.dictionaries(), three.dictionaries()):
        for theta1, theta3 in zip(d1.theta.values(), d3.theta.values()):
            assert all(torch.equal(theta3[k], theta3[0]) for k in range(3)), "the atoms stay identical"
            torch.testing.assert_close(theta3[0], theta1[0], rtol=1e-5, atol=1e-6)


def test_a_simplex_step_adds_the_width_regulariser():
    model = supernet(k=3, warmup_steps=0, simplex_every=1, width_reg=10.0)
    scramble_atoms(model)
    loss, metrics = kshot_nas.train_step(model, batch(), model.cfg, 0)
    assert metrics["simplex_step"] == 1.0 and metrics["width_reg"] < 0
    assert loss.item() == pytest.approx((metrics["ce"] + metrics["width_reg"]).item())


def test_path_rng_gives_the_same_path_and_loss_for_the_same_step():
    model = supernet()
    assert SPACE.sample(path_rng(7)) == SPACE.sample(path_rng(7))
    first, second = (kshot_nas.train_step(model.eval(), batch(), model.cfg, 7)[0] for _ in range(2))
    assert torch.equal(first, second)


def test_on_step_end_switches_pi_on_after_the_warm_up():
    model = supernet(warmup_steps=3)
    for step, active in ((1, False), (2, False), (3, True)):
        kshot_nas.on_step_end(model, model.cfg, step)
        assert bool(model.pi_active) is active
    assert bool(supernet(warmup_steps=0).pi_active)


def test_param_groups_scale_the_atoms_lr_by_k_and_skip_decay_on_1d():
    model = supernet(k=3, simplex_lr_scale=0.5)
    groups = kshot_nas.param_groups(model, model.cfg)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()), "every parameter exactly once"
    atoms = {id(t) for d in model.dictionaries() for t in d.theta.values()}
    for g in groups:
        is_atoms = all(id(p) in atoms for p in g["params"])
        assert g["lr_scale"] == (3.0 if is_atoms else 0.5)
        one_d = all(p.ndim - is_atoms < 2 for p in g["params"])  # an atom tensor has one extra dimension
        assert (g.get("weight_decay") == 0.0) == one_d
    assert kshot_nas.param_groups(model, model.cfg)[0]["lr_scale"] == 0.5, "the logged lr is pi's (the base lr)"


def test_training_lowers_the_loss_of_a_fixed_path():
    torch.manual_seed(0)
    model = supernet(k=2, warmup_steps=4, simplex_every=2)
    groups = [{k: v for k, v in g.items() if k != "lr_scale"} | {"lr": 0.05 * g["lr_scale"]}
              for g in kshot_nas.param_groups(model, model.cfg)]
    optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    data = batch(8)
    recalibrate_bn(model, "1212", [data])
    before = nn.functional.cross_entropy(model.eval()(data["x"], "1212"), data["y"]).item()
    model.train()
    for step in range(12):
        loss, _ = kshot_nas.train_step(model, data, model.cfg, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        kshot_nas.on_step_end(model, model.cfg, step + 1)
    recalibrate_bn(model, "1212", [data])
    after = nn.functional.cross_entropy(model(data["x"], "1212"), data["y"]).item()
    assert after < before


# ---------------------------------------------------------------------------------------------- saving and search


def test_a_saved_supernet_reloads_through_load_supernet(tmp_path: Path):
    model = supernet(k=3, warmup_steps=0)
    scramble_atoms(model)
    data = batch(12)
    recalibrate_bn(model, "2101", [data])
    torch.save(model.state_dict(), tmp_path / "model.pt")

    def rebuild(method: str, config: dict) -> kshot_nas.KShotSupernet:
        assert method == "kshot_nas"
        return kshot_nas.build(kshot_nas.Config(**config), INFO)

    loaded = load_supernet(tmp_path / "model.pt", rebuild).eval()
    assert loaded.cfg == model.cfg and bool(loaded.pi_active)
    torch.testing.assert_close(loaded(data["x"], "2101"), model(data["x"], "2101"))
    assert recalibrate_bn(loaded, "0120", [data, batch(12, seed=1)]) == 24
    assert 0.0 <= path_accuracy(loaded, "0120", [data]) <= 1.0


def test_eval_step_counts_the_reference_paths():
    model = supernet().eval()
    data = batch(6)
    with torch.no_grad():
        sums = kshot_nas.eval_step(model, data, model.cfg)
    assert set(sums) == {"acc_largest", "acc_smallest", "n"} and int(sums["n"]) == 6
    assert kshot_nas.reference_codes(SPACE) == {"largest": "2222", "smallest": "0000"}
    assert int(sums["acc_largest"]) == int((model(data["x"], "2222").argmax(1) == data["y"]).sum())


def test_check_rejects_bad_values():
    for changes, field in (({"space": "nas_bench_201"}, "space"), ({"k": 0}, "k"), ({"tau": 0.0}, "tau"),
                           ({"simplex_every": 0}, "simplex_every"), ({"width_reg": -1.0}, "width_reg")):
        with pytest.raises(ConfigError, match=f"config.{field}"):
            kshot_nas.check(dataclasses.replace(kshot_nas.TINY, **changes))
    kshot_nas.check(kshot_nas.Config())


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_load(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(trainers.TRAINERS, "kshot_nas", "trainers.kshot_nas")
    loaded = experiment_spec.load(path)
    assert loaded.method == "kshot_nas"
    kshot_nas.check(loaded.method_config())
