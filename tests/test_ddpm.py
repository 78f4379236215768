"""DDPM: the loss and its targets, class dropout, the pixel conversion, guidance, the pipeline and its round trips."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import trainers
from orchestrator import spec as experiment_spec
from trainers import ddpm
from trainers._common.contract import ConfigError, DataInfo

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments" / "ddpm").glob("*.yaml"))
INFO = DataInfo(num_classes=10, image_size=16, in_channels=1, num_train=64, num_labeled=64, mean=(0.3,), std=(0.4,))
INFO_MEAN, INFO_STD = torch.tensor(INFO.mean), torch.tensor(INFO.std)


def tiny_model(seed: int = 0) -> ddpm.DDPM:
    torch.manual_seed(seed)
    return ddpm.build(ddpm.TINY, INFO)


@functools.cache
def fixed_batch(size: int = 16) -> dict[str, torch.Tensor]:
    """Digit-like images: a class-dependent bar on a dark background, normalised with INFO's mean and std."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(size) % 10
    pixels = torch.zeros(size, 1, 16, 16)
    for i, label in enumerate(y.tolist()):
        pixels[i, 0, label : label + 4, 3:13] = 1.0
    pixels = (pixels + 0.05 * torch.rand(pixels.shape, generator=g)).clamp(0, 1)
    return {"x": (pixels - 0.3) / 0.4, "y": y, "idx": torch.arange(size)}


def quiet(pipe: ddpm.ClassConditionalPipeline) -> ddpm.ClassConditionalPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- pure functions


def test_pixel_conversion_by_hand_and_round_trip():
    mean, std = torch.tensor([0.5, 0.25]), torch.tensor([0.25, 0.5])
    x = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)  # channel 0: 0.5 + 2 * 0.25 = 1 -> +1; channel 1: 0.25 - 0.5 < 0
    pixels = ddpm.to_pixels(x, mean, std)
    torch.testing.assert_close(pixels.flatten(), torch.tensor([1.0, -1.5]))
    batch = fixed_batch()["x"]
    pixels = ddpm.to_pixels(batch, INFO_MEAN, INFO_STD)
    assert pixels.min() >= -1 and pixels.max() <= 1
    torch.testing.assert_close(ddpm.from_pixels(pixels, INFO_MEAN, INFO_STD), batch)


def test_class_dropout_replaces_about_the_configured_fraction():
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    dropped = ddpm.drop_labels(y, 0.1, null_class=10, generator=torch.Generator().manual_seed(1))
    is_null = dropped == 10
    assert abs(is_null.float().mean().item() - 0.1) < 0.01  # 3 standard deviations: 0.0064
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(ddpm.drop_labels(y, 0.0, null_class=10), y)


def test_v_target_by_hand():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x0, noise, t = torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.tensor([300])
    abar = scheduler.alphas_cumprod[300].item()
    expected = math.sqrt(abar) * 2.0 - math.sqrt(1 - abar) * 0.5
    assert ddpm.diffusion_target(scheduler, x0, noise, t).item() == pytest.approx(expected, rel=1e-5)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    assert ddpm.diffusion_target(scheduler, x0, noise, t) is noise


def test_diffusion_loss_is_the_mse_at_the_noised_sample():
    """A UNet stand-in that outputs its input: the loss is mean (x_t - eps)^2 with x_t = sqrt(abar) x0 + sqrt(1-abar) eps."""

    class Identity(torch.nn.Module):
        def forward(self, x, t, class_labels):
            return type("Out", (), {"sample": x})()

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0, noise, t = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 1.0), torch.tensor([500])
    abar = scheduler.alphas_cumprod[500].item()
    expected = (math.sqrt(abar) * 0.5 + math.sqrt(1 - abar) - 1.0) ** 2
    loss = ddpm.diffusion_loss(Identity(), scheduler, x0, torch.tensor([3]), noise, t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_classifier_free_guidance_by_hand():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    torch.testing.assert_close(ddpm.classifier_free_guidance(cond, uncond, 3.0), torch.tensor([3.0, -2.0]))
    torch.testing.assert_close(ddpm.classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(ddpm.classifier_free_guidance(cond, uncond, 0.0), uncond)


def test_ema_momentum_warms_up():
    assert ddpm.ema_momentum(0.999, 0) == pytest.approx(0.1)
    assert ddpm.ema_momentum(0.999, 90) == pytest.approx(91 / 100)
    assert ddpm.ema_momentum(0.999, 10**6) == 0.999


# ---------------------------------------------------------------------------------------------- the module


def test_build_sizes_and_null_class():
    model = tiny_model()
    assert model.unet.config.num_class_embeds == 11 and model.null_class == 10
    assert model.unet.config.sample_size == 16 and model.unet.config.in_channels == model.unet.config.out_channels == 1
    assert model.unet.down_blocks[1].attentions and not hasattr(model.unet.down_blocks[0], "attentions")
    assert all(not p.requires_grad for p in model.ema_unet.parameters())


def test_build_rejects_bad_sizes_and_missing_normalisation():
    with pytest.raises(ValueError, match="not divisible"):
        ddpm.build(dataclasses.replace(ddpm.TINY, block_out_channels=(8, 8, 8, 8, 8)), dataclasses.replace(INFO, image_size=12))
    with pytest.raises(ValueError, match="mean and std"):
        ddpm.build(ddpm.TINY, dataclasses.replace(INFO, mean=(), std=()))


def test_check_rejects_bad_values():
    for field, value in [("block_out_channels", (8, 10)), ("attention_levels", (2,)), ("class_dropout", 1.0),
                         ("ema_decay", 1.0), ("num_inference_steps", 0), ("guidance_scale", -1.0)]:
        with pytest.raises(ConfigError, match=field):
            ddpm.check(dataclasses.replace(ddpm.TINY, **{field: value}))
    ddpm.check(ddpm.TINY)
    ddpm.check(ddpm.Config())


def test_loss_is_finite_and_falls_on_a_fixed_batch():
    model = tiny_model()
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=3e-3)
    batch, losses = fixed_batch(), []
    for step in range(25):
        loss, _ = ddpm.train_step(model, batch, ddpm.TINY, step)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ddpm.on_step_end(model, ddpm.TINY, step + 1)
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])


def test_eval_step_is_deterministic_and_uses_the_ema_unet():
    model = tiny_model().eval()
    batch = fixed_batch()
    with torch.no_grad():
        first, second = ddpm.eval_step(model, batch, ddpm.TINY), ddpm.eval_step(model, batch, ddpm.TINY)
        assert torch.equal(first["loss"], second["loss"]) and int(first["n"]) == 16
        torch.nn.init.zeros_(model.ema_unet.conv_out.weight)
        torch.nn.init.zeros_(model.ema_unet.conv_out.bias)
        zero_prediction = ddpm.eval_step(model, batch, ddpm.TINY)["loss"] / 16  # mean eps^2, about 1
    assert zero_prediction.item() == pytest.approx(1.0, abs=0.15) and not torch.equal(zero_prediction * 16, first["loss"])


def test_on_step_end_moves_the_ema_towards_the_unet():
    model = tiny_model()
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(1.0)
    before = model.ema_unet.conv_out.bias.clone()
    ddpm.on_step_end(model, ddpm.TINY, 1000)  # momentum 0.9 (TINY.ema_decay)
    torch.testing.assert_close(model.ema_unet.conv_out.bias, before + 0.1)


# ---------------------------------------------------------------------------------------------- the pipeline


def test_pipeline_from_state_has_the_ema_weights_and_the_sampling_defaults():
    model = tiny_model()
    with torch.no_grad():
        model.ema_unet.conv_out.bias.fill_(0.5)  # the EMA and the trained UNet now differ
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = ddpm.pipeline_from_state(state)
    for (key, a), b in zip(pipe.unet.state_dict().items(), model.ema_unet.state_dict().values()):
        assert torch.equal(a, b), key
    assert not torch.equal(pipe.unet.conv_out.bias, model.unet.conv_out.bias)
    assert pipe.config.num_inference_steps == ddpm.TINY.num_inference_steps
    assert pipe.config.guidance_scale == ddpm.TINY.guidance_scale
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.timestep_spacing == "trailing"


def test_pipeline_output_shapes_and_range():
    pipe = quiet(ddpm.pipeline_from_state(tiny_model().state_dict()))
    images = pipe([0, 3, 9], generator=torch.Generator().manual_seed(0)).images
    assert isinstance(images, np.ndarray) and images.shape == (3, 16, 16, 1)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    tensor = pipe([1, 2], num_inference_steps=2, output_type="pt").images
    assert tensor.shape == (2, 1, 16, 16)
    assert len(pipe([5], num_inference_steps=2, output_type="pil").images) == 1


def test_guidance_scale_one_is_the_conditional_prediction():
    torch.manual_seed(0)
    pipe = ddpm.pipeline_from_state(tiny_model().state_dict())
    with torch.no_grad():
        pipe.unet.class_embedding.weight.normal_()  # make the null class differ from the labels
        x, t, labels = torch.randn(3, 1, 16, 16), torch.tensor(500), torch.tensor([1, 4, 7])
        conditional = pipe.unet(x, t, class_labels=labels).sample
        torch.testing.assert_close(pipe.guided_prediction(x, t, labels, 1.0), conditional)
        unconditional = pipe.unet(x, t, class_labels=torch.full_like(labels, 10)).sample
        torch.testing.assert_close(pipe.guided_prediction(x, t, labels, 0.0), unconditional, atol=1e-5, rtol=1e-5)
        guided = pipe.guided_prediction(x, t, labels, 3.0)
    torch.testing.assert_close(guided, unconditional + 3 * (conditional - unconditional), atol=1e-5, rtol=1e-5)


def test_save_pretrained_round_trip_gives_identical_samples(tmp_path: Path):
    pipe = quiet(ddpm.pipeline_from_state(tiny_model().state_dict()))
    pipe.save_pretrained(tmp_path)
    loaded = quiet(ddpm.ClassConditionalPipeline.from_pretrained(tmp_path))
    assert type(loaded) is ddpm.ClassConditionalPipeline and loaded.config.guidance_scale == pipe.config.guidance_scale
    before = pipe([0, 1, 2], generator=torch.Generator().manual_seed(3)).images
    after = loaded([0, 1, 2], generator=torch.Generator().manual_seed(3)).images
    np.testing.assert_array_equal(before, after)
    other_seed = loaded([0, 1, 2], generator=torch.Generator().manual_seed(4)).images
    assert not np.array_equal(before, other_seed)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_load(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(trainers.TRAINERS, "ddpm", "trainers.ddpm")
    loaded = experiment_spec.load(path)
    assert loaded.method == "ddpm" and loaded.views == "plain"
    ddpm.check(loaded.method_config())
