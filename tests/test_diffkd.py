"""DiffKD: the KD loss by hand, the adaptive-noise start point, the DDIM loop, the diffusion net learning, the
autoencoder, the frozen teacher, plain KD, check() and the experiment files."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import trainers
from orchestrator import checkpoint as ckpt_io
from orchestrator import references
from orchestrator import spec as experiment_spec
from orchestrator.data import build_data
from orchestrator.spec import DataSpec
from trainers import diffkd
from trainers._common.backbones import build_backbone, check_arch
from trainers._common.contract import ConfigError

REPO = Path(__file__).parents[1]
EXPERIMENTS = sorted((REPO / "experiments" / "diffkd").glob("*.yaml"))


@functools.cache
def digits_batch(size: int = 8) -> tuple[dict[str, torch.Tensor], trainers.DataInfo]:
    data = build_data(DataSpec(dataset="digits", image_size=16), seed=0, views="plain")
    return torch.utils.data.default_collate([data.train[i] for i in range(size)]), data.info


def write_teacher(directory: Path, arch: str = "small_cnn") -> dict[str, torch.Tensor]:
    """A supervised checkpoint directory: model.pt is the Classifier's state_dict (random weights, BN stats moved)."""
    torch.manual_seed(1)
    teacher = build_backbone(arch, 1, 10)
    teacher(torch.randn(4, 1, 16, 16))  # running statistics differ from a fresh BN
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), directory / "model.pt")
    return teacher.state_dict()


def tiny(tmp_path: Path, **changes) -> diffkd.Config:
    write_teacher(tmp_path / "teacher")
    return dataclasses.replace(diffkd.TINY, teacher_from=str(tmp_path / "teacher"), **changes)


# ---------------------------------------------------------------------------------------------- losses by hand


def test_kd_kl_by_hand_with_tau_scaling():
    # tau = 2: teacher logits (2 ln 3, 0) / 2 -> p_t = (3/4, 1/4); student logits (0, 0) -> p_s = (1/2, 1/2).
    z_t = torch.tensor([[2 * math.log(3.0), 0.0], [0.0, 0.0]])
    z_s = torch.zeros(2, 2)
    kl_first = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    expected = 2.0**2 * (kl_first + 0.0) / 2  # tau^2 x the mean over the batch (the second row has KL 0)
    torch.testing.assert_close(diffkd.kd_kl(z_s, z_t, tau=2.0), torch.tensor(expected))
    torch.testing.assert_close(diffkd.kd_kl(z_s[..., None, None], z_t[..., None, None], 2.0), torch.tensor(expected))
    assert diffkd.kd_kl(z_t, z_t, 2.0).abs() < 1e-7


def test_adaptive_noise_start_point_is_the_linear_mix():
    s = torch.full((3, 2, 1, 1), 2.0)
    eps = torch.full((3, 2, 1, 1), -4.0)
    gamma = torch.tensor([1.0, 0.0, 0.25])
    start = diffkd.noisy_start(s, eps, gamma)
    torch.testing.assert_close(start[:, 0, 0, 0], torch.tensor([2.0, -4.0, 0.25 * 2.0 + 0.75 * -4.0]))


# ---------------------------------------------------------------------------------------------- DDIM


class ConstantNoise(torch.nn.Module):
    """eps_theta that predicts `scale` everywhere and records the timesteps it is called at."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(k))
        return self.scale * torch.ones_like(x)


def test_ddim_runs_the_last_5_of_10_timesteps_and_is_differentiable():
    scheduler = diffkd.ddim_scheduler(diffkd.Config())
    assert diffkd.sampling_timesteps(scheduler, 5).tolist() == [400, 300, 200, 100, 0]
    net = ConstantNoise()
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    out = diffkd.ddim_sample(net, x, scheduler, 5)
    assert net.calls == [400, 300, 200, 100, 0]
    # eta 0 by hand with alpha_bar from linear betas 1e-4..0.02 (alpha_bar = 1 before t = 0)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    expected = x.detach().double()
    for t in (400, 300, 200, 100, 0):
        prev = alpha_bar[t - 100] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = (expected - (1 - alpha_bar[t]).sqrt() * 0.5) / alpha_bar[t].sqrt()
        expected = prev.sqrt() * x0 + (1 - prev).sqrt() * 0.5
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and net.scale.grad.abs() > 0


def test_the_diffusion_net_learns_to_denoise_fixed_features():
    torch.manual_seed(0)
    cfg = diffkd.Config()
    scheduler = diffkd.ddim_scheduler(cfg)
    net = diffkd.DiffusionNet(16, 3, cfg.time_embeddings)
    z = torch.randn(1, 16, 4, 4).expand(32, -1, -1, -1) + 0.1 * torch.randn(32, 16, 4, 4)  # fixed features
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = diffkd.ddim_loss(net, z, scheduler)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_the_autoencoder_expands_the_teacher_channels_to_ae_channels():
    torch.manual_seed(0)
    location = diffkd.Location(8, 16, 3, 32, diffkd.Config())
    assert location.ae.encoder[0].out_channels == 32 and location.trans.out_channels == 32
    t = torch.randn(4, 16, 3, 3)
    hidden, reconstruction = location.ae(t)
    assert hidden.shape == (4, 32, 3, 3) and reconstruction.shape == t.shape
    out = location(torch.randn(4, 8, 3, 3), t)
    assert out.student.shape == out.target.shape == (4, 32, 3, 3) and out.gamma.shape == (4,)
    assert not out.target.requires_grad  # the latent target is detached
    torch.testing.assert_close(out.ae, F.mse_loss(reconstruction, t))
    logit = diffkd.Location(10, 10, 1, None, diffkd.Config())
    assert logit.ae is None and logit(torch.randn(4, 10, 1, 1), torch.randn(4, 10, 1, 1)).ae is None


# ---------------------------------------------------------------------------------------------- the module


def test_the_teacher_is_loaded_frozen_and_stays_in_eval_mode(tmp_path: Path):
    cfg = tiny(tmp_path)
    batch, info = digits_batch()
    model = diffkd.build(cfg, info).train()
    saved = torch.load(tmp_path / "teacher" / "model.pt", weights_only=True)
    assert not model.teacher.training and model.student.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss, _ = diffkd.train_step(model, batch, cfg, 0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert all(torch.equal(saved[k], v) for k, v in model.teacher.state_dict().items())  # weights and BN stats
    assert "teacher.head.weight" in model.state_dict()  # checkpointed with the module
    with pytest.raises(ValueError, match="teacher_from .* teacher_arch 'wrn10_1'"):
        diffkd.build(dataclasses.replace(cfg, teacher_arch="wrn10_1"), info)


def test_a_tiny_step_is_finite_with_gradients_on_the_student_side_only(tmp_path: Path):
    cfg = tiny(tmp_path)
    batch, info = digits_batch()
    torch.manual_seed(0)
    model = diffkd.build(cfg, info).train()
    loss, metrics = diffkd.train_step(model, batch, cfg, 0)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == name.startswith("teacher."), name
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert {"ce", "kd_feat", "kd_logit", "ddim_feat", "ddim_logit", "ae", "gamma_feat", "gamma_logit", "acc",
            "teacher_acc"} == set(metrics)
    parts = sum(metrics[k] for k in ("ce", "kd_feat", "kd_logit", "ddim_feat", "ddim_logit", "ae"))
    torch.testing.assert_close(loss.detach(), parts)
    assert 0 < metrics["gamma_feat"] < 1 and 0 < metrics["gamma_logit"] < 1


def test_diffusion_off_is_exactly_ce_plus_kd(tmp_path: Path):
    cfg = tiny(tmp_path, diffusion=False, tau=2.0)
    batch, info = digits_batch()
    model = diffkd.build(cfg, info).train()
    assert model.feature is None and model.logit is None
    assert all(n.startswith(("student.", "teacher.")) for n, _ in model.named_parameters())
    loss, metrics = diffkd.train_step(model, batch, cfg, 0)
    assert set(metrics) == {"ce", "kd_logit", "acc", "teacher_acc"}
    s_logits, t_logits = model.student(batch["x"]), model.teacher(batch["x"])
    p_t = F.softmax(t_logits / 2.0, dim=1)
    kd = 4.0 * (p_t * (p_t.log() - F.log_softmax(s_logits / 2.0, dim=1))).sum(1).mean()
    torch.testing.assert_close(loss, F.cross_entropy(s_logits, batch["y"]) + kd)


def test_eval_step_scores_the_student(tmp_path: Path):
    cfg = tiny(tmp_path)
    batch, info = digits_batch()
    model = diffkd.build(cfg, info).eval()
    with torch.no_grad():
        sums = diffkd.eval_step(model, batch, cfg)
        expected = (model.student(batch["x"]).argmax(1) == batch["y"]).sum()
    assert sums["n"] == 8 and sums["acc"] == expected


def test_check_refuses_a_missing_teacher(tmp_path: Path):
    cfg = tiny(tmp_path)
    diffkd.check(cfg)
    diffkd.check(dataclasses.replace(cfg, teacher_from=str(tmp_path / "teacher" / "model.pt")))
    for missing in ("", str(tmp_path / "nowhere"), str(tmp_path)):
        with pytest.raises(ConfigError, match="config.teacher_from") as err:
            diffkd.check(dataclasses.replace(cfg, teacher_from=missing))
        assert err.value.field == "teacher_from"
    with pytest.raises(ConfigError, match="config.teacher_arch"):
        diffkd.check(dataclasses.replace(cfg, teacher_arch="wrn3_1"))


# ---------------------------------------------------------------------------------------------- experiment files


def fake_run(run_dir: Path, arch: str) -> Path:
    """An orchestrator run directory with one complete checkpoint of a supervised `arch`."""
    directory = run_dir / "checkpoint_000000100"
    directory.mkdir(parents=True)
    ckpt_io.save_main(directory, build_backbone(arch, 1, 10).state_dict(), {"step": 100})
    ckpt_io.save_rank_manifest(directory, 0, 1, 100)
    return directory


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_validate_and_their_teacher_reference_resolves(path: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(trainers.TRAINERS, "diffkd", "trainers.diffkd")
    loaded = experiment_spec.load(path)
    cfg = loaded.method_config()
    assert loaded.method == "diffkd" and cfg.teacher_from.startswith("run:")
    check_arch(cfg.teacher_arch)
    teacher_run = cfg.teacher_from.removeprefix("run:")
    checkpoint = fake_run(tmp_path / teacher_run, "small_cnn")
    resolved = references.resolve(experiment_spec.load(path, [f"storage_path={tmp_path}"]), path)
    assert resolved.method_config().teacher_from == str(checkpoint)
    diffkd.check(resolved.method_config())


@pytest.mark.parametrize("distill_file, student_file", [("digits.yaml", "digits_student.yaml"),
                                                       ("digits_100_steps.yaml", "digits_student_100_steps.yaml")])
def test_the_digits_chain_shares_the_students_budget(distill_file: str, student_file: str):
    distill = experiment_spec.load(REPO / "experiments" / "diffkd" / distill_file)
    alone = experiment_spec.load(REPO / "experiments" / "supervised" / student_file)
    teacher = experiment_spec.load(REPO / "experiments" / "supervised" / "digits_teacher.yaml")
    assert distill.optim == alone.optim and distill.data == alone.data
    assert distill.method_config().arch == alone.method_config().arch
    assert distill.method_config().teacher_arch == teacher.method_config().arch
    assert distill.method_config().teacher_from == f"run:{teacher.name}"
