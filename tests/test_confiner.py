"""ConFiner: the sampler's invariants against diffusers' own pipelines, the handover between experts, the cost
count, ConFiner-Long's windows, the metrics, the media files and the resumable, sharded job. The experts are tiny
random pipelines saved with save_pretrained and loaded with from_pretrained (trainers/video/tiny.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from mlflow.tracking import MlflowClient

from orchestrator import spec as experiment_spec
from orchestrator.cli import main
from orchestrator.method_run import MethodContext
from orchestrator.storage import RunDir
from trainers import confiner
from trainers._common.contract import ConfigError
from trainers.video import media, metrics, sampler, tiny
from trainers.video.experts import Expert

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments" / "confiner").glob("*.yaml"))
PROMPT = "a red ball rolls"


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("experts")
    return {kind: tiny.save(kind, folder) for kind in tiny.KINDS}


def expert(dirs: dict[str, Path], kind: str, role: str, guidance: float) -> Expert:
    return Expert.load(role, str(dirs[kind]), guidance, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def experts(expert_dirs) -> dict[str, Expert]:
    return {"control": expert(expert_dirs, "animatediff", "control", 1.0),
            "spatial": expert(expert_dirs, "text_to_image", "spatial", 7.5),
            "temporal": expert(expert_dirs, "text_to_video", "temporal", 9.0)}


def noise(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def own_ddim(e: Expert, x: torch.Tensor, steps: int, layout: sampler.Layout) -> torch.Tensor:
    """The coordinated sampler with one expert, from pure noise."""
    timesteps, final = sampler.ddim_timesteps(e.pipeline.scheduler.config, steps, 1.0)
    plan = sampler.plan([e], [0], e, timesteps, final)
    with torch.no_grad():
        return sampler.coordinated_denoising([e], [e.text(PROMPT, "")], plan, x, layout, torch.Generator())


def test_with_one_video_expert_the_sampler_is_that_pipelines_ddim(experts) -> None:
    e = experts["temporal"]
    x = noise((1, 4, 4, 16, 16))
    ours = own_ddim(e, x, 5, sampler.Layout(frames=4, size=4, stride=2))
    theirs = e.pipeline(PROMPT, num_frames=4, height=16, width=16, num_inference_steps=5, guidance_scale=9.0,
                        latents=x.clone(), output_type="latent").frames
    assert e.nfe == 10  # 5 steps, conditional and unconditional
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_with_one_image_expert_the_sampler_is_stable_diffusion_on_every_frame(experts) -> None:
    e = experts["spatial"]
    x = noise((1, 4, 3, 16, 16))
    ours = own_ddim(e, x, 4, sampler.Layout(frames=3, size=3, stride=3))
    theirs = e.pipeline(PROMPT, num_images_per_prompt=3, height=16, width=16, num_inference_steps=4,
                        guidance_scale=7.5, latents=x[0].permute(1, 0, 2, 3).clone(), output_type="latent").images
    torch.testing.assert_close(ours[0].permute(1, 0, 2, 3), theirs, rtol=1e-4, atol=1e-5)


def test_the_control_stage_is_the_control_pipelines_own_sampler(experts) -> None:
    e = experts["control"]
    x = noise((1, 4, 4, 16, 16))
    with torch.no_grad():
        ours = sampler.control_stage(e, x, e.text(PROMPT, ""), 3, sampler.Layout(frames=4, size=4, stride=2))
    theirs = e.pipeline(PROMPT, num_frames=4, height=16, width=16, num_inference_steps=3, guidance_scale=1.0,
                        latents=x.clone(), output_type="latent").frames
    assert type(e.pipeline.scheduler).__name__ == "EulerDiscreteScheduler" and e.nfe == 3  # no guidance: 1 each
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def with_schedule(e: Expert, **betas) -> Expert:
    """A copy of expert `e` whose noise schedule is another DDIM schedule."""
    pipeline = copy.copy(e.pipeline)
    pipeline.scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **betas)
    return Expert(e.role, e.path, pipeline, e.guidance_scale)


def test_timesteps_are_matched_by_noise_level_across_different_schedules(experts) -> None:
    spatial = experts["spatial"]
    temporal = with_schedule(experts["temporal"], beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    timesteps, final = sampler.ddim_timesteps(temporal.pipeline.scheduler.config, 10, 0.6)
    assert timesteps == [501, 401, 301, 201, 101, 1]  # SDEdit: the last int(10 x 0.6) of DDIM's 10 steps
    steps = sampler.plan([spatial, temporal], [1, 0], temporal, timesteps, final)
    assert [s.expert for s in steps] == [1, 0, 1, 0, 1, 0]
    for k, step in enumerate(steps):
        level = temporal.alpha(timesteps[k])
        own = [spatial, temporal][step.expert]
        assert step.alpha == own.alpha(step.t)
        gaps = (torch.log(own.alphas_cumprod / (1 - own.alphas_cumprod)) - np.log(level / (1 - level))).abs()
        assert gaps[step.t] == gaps.min()  # nearest log-SNR
        assert step.alpha_next == (steps[k + 1].alpha if k + 1 < len(steps) else final)
    assert steps[1].t != timesteps[1]  # the schedules differ: t/T matching would have picked 401


def test_the_switch_between_experts_preserves_the_predicted_clean_sample(experts) -> None:
    """Expert B is made to predict exactly the noise A predicted: B then recovers A's clean sample only if the
    handover re-noised A's x0 at B's level for B's timestep."""
    a = experts["spatial"]
    b = with_schedule(experts["temporal"], beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    timesteps, final = sampler.ddim_timesteps(b.pipeline.scheduler.config, 10, 0.5)
    steps = sampler.plan([a, b], [0, 1], b, timesteps, final)
    predicted: list[torch.Tensor] = []
    original = a.model_output

    def a_output(x, t, text):
        out = original(x, t, text)
        predicted.append(out)
        return out

    a.model_output, b.model_output = a_output, lambda x, t, text: predicted[-1]
    clean: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            sampler.coordinated_denoising([a, b], [a.text(PROMPT, ""), None], steps, noise((1, 4, 3, 16, 16)),
                                          sampler.Layout(3, 3, 3), torch.Generator(),
                                          trace=lambda k, step, x0, x: clean.append(x0))
    finally:
        del a.model_output
    assert abs(steps[0].alpha_next - a.alpha(steps[0].t)) > 0.01  # B's level is not A's
    for k in range(0, len(steps) - 1, 2):  # A's step k, then B's step k + 1
        torch.testing.assert_close(clean[k + 1], clean[k], rtol=1e-4, atol=1e-4)


def test_experts_with_different_vaes_hand_over_through_pixels(experts) -> None:
    from diffusers import AutoencoderKL

    a = experts["spatial"]
    pipeline = copy.copy(experts["temporal"].pipeline)
    torch.manual_seed(7)
    pipeline.vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                 up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
    b = Expert("temporal", "other-vae", pipeline, 9.0)
    assert a.latent_space == experts["control"].latent_space == experts["temporal"].latent_space != b.latent_space
    timesteps, final = sampler.ddim_timesteps(b.pipeline.scheduler.config, 4, 0.5)
    steps = sampler.plan([a, b], [0, 1], b, timesteps, final)
    clean: list[torch.Tensor] = []
    with torch.no_grad():
        sampler.coordinated_denoising([a, b], [a.text(PROMPT, ""), b.text(PROMPT, "")], steps,
                                      noise((1, 4, 2, 16, 16)), sampler.Layout(2, 2, 2), torch.Generator(),
                                      trace=lambda k, step, x0, x: clean.append((x0, x)))
        x0, handed = clean[0]
        expected = b.encode(a.decode(x0))
    residual = (handed - steps[0].alpha_next ** 0.5 * expected) / (1 - steps[0].alpha_next) ** 0.5
    assert abs(float(residual.mean())) < 0.1 and abs(float(residual.std()) - 1) < 0.1  # fresh N(0, 1) noise ...
    assert not torch.allclose(expected, x0, atol=0.1)  # ... around B's encoding of A's decoded clean video


def count_passes(e: Expert) -> list[int]:
    """Clips through the expert's UNet per call (a frame-wise UNet's batch counts frames: divided by its clip)."""
    seen: list[int] = []
    e.pipeline.unet.register_forward_hook(lambda module, args, kwargs_out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("frames", [4, 10])
def test_the_evaluation_count_matches_the_schedule(expert_dirs, frames: int) -> None:
    cfg = dataclasses.replace(confiner.TINY, frames=frames, segment_frames=4, overlap=2, control_steps=3,
                              refine_steps=6, strength=0.5, allocation=["temporal", "temporal", "spatial"])
    cfg = dataclasses.replace(cfg, **{role: str(expert_dirs[kind]) for role, kind in
                                      (("control", "animatediff"), ("spatial", "text_to_image"),
                                       ("temporal", "text_to_video"))})
    chain = confiner.Chain(cfg, torch.device("cpu"))
    passes = {role: count_passes(e) for role, e in chain.experts.items()}
    _, nfe = chain.confiner(PROMPT, seed=1)
    layout = chain.layout
    windows = [len(layout.starts(k)) for k in range(6)]  # (frames - 4) / 2 + 1 windows, shifted on odd steps
    chunks = -(-frames // 4)  # the spatial expert's chunks of 4 frames
    refine = [("temporal", "temporal", "spatial")[k % 3] for k in range(3)]  # int(6 x 0.5) = 3 steps
    expected = {"control": sum(windows[:3]),  # one pass per window, no guidance
                "temporal": 2 * sum(windows[k] for k, r in enumerate(refine) if r == "temporal"),
                "spatial": 2 * chunks * refine.count("spatial")}
    assert {role: e.nfe for role, e in chain.experts.items()} == expected
    assert nfe == sum(expected.values())
    assert sum(passes["control"]) == expected["control"] and sum(passes["temporal"]) == expected["temporal"]
    assert sum(passes["spatial"]) == 2 * frames * refine.count("spatial")  # frames, in clips of 4
    assert chain.baseline_nfe() == 2 * sum(len(layout.starts(k)) for k in range(cfg.baseline_steps))
    _, measured = chain.baseline(PROMPT, seed=1)
    assert measured == chain.baseline_nfe()


def test_windows_cover_the_video_overlap_as_specified_and_stagger() -> None:
    layout = sampler.Layout(frames=20, size=8, stride=4)
    assert layout.starts(0) == [0, 4, 8, 12]  # overlap 8 - 4 = 4 frames between neighbours
    assert layout.starts(1) == [0, 2, 6, 10, 12]  # shifted by stride // 2, clamped into the video
    assert sampler.Layout(20, 8, 4, staggered=False).starts(1) == [0, 4, 8, 12]
    assert sampler.Layout(8, 8, 4).starts(1) == [0]
    for step in range(2):
        covered = torch.zeros(20)
        for start in layout.starts(step):
            covered[start:start + 8] += 1
        assert covered.min() >= 1
    interior = [s for s in layout.starts(1) if 0 < s < 12]
    assert all(s % 4 == 2 for s in interior) and not set(interior) & set(layout.starts(0))  # the seams moved


def test_coherence_guidance_averages_shared_frames_or_cuts_at_the_nearest_centre() -> None:
    parts = [torch.full((1, 1, 4, 1, 1), 1.0), torch.full((1, 1, 4, 1, 1), 3.0)]  # windows at 0 and 2 of 6 frames
    mean = sampler.fuse(parts, [0, 2], 6, coherence=1.0).flatten().tolist()
    cut = sampler.fuse(parts, [0, 2], 6, coherence=0.0).flatten().tolist()
    half = sampler.fuse(parts, [0, 2], 6, coherence=0.5).flatten().tolist()
    assert mean == [1, 1, 2, 2, 3, 3]
    assert cut == [1, 1, 1, 3, 3, 3]  # frame 2 is nearer window 0's centre (1.5) than window 1's (3.5)
    assert half == [1, 1, 1.5, 2.5, 3, 3]


def test_consistency_initialisation_makes_every_window_a_permutation_of_the_first() -> None:
    layout = sampler.Layout(frames=14, size=6, stride=4)
    x = sampler.initial_noise((1, 2, 14, 3, 3), layout, True, torch.Generator().manual_seed(0))
    first = {tuple(x[0, :, f].flatten().tolist()) for f in range(6)}
    for start in (4, 8):
        assert {tuple(x[0, :, f].flatten().tolist()) for f in range(start, start + 6)} == first
    independent = sampler.initial_noise((1, 2, 14, 3, 3), layout, False, torch.Generator().manual_seed(0))
    assert not {tuple(independent[0, :, f].flatten().tolist()) for f in range(8, 14)} <= first


def test_long_video_windows_share_their_overlapping_frames(experts) -> None:
    e = experts["temporal"]
    clips: list[torch.Tensor] = []
    original = e.model_output

    def record(x, t, text):
        clips.append(x.clone())
        return original(x, t, text)

    e.model_output = record
    try:
        layout = sampler.Layout(frames=10, size=4, stride=2, staggered=False, window_batch=8)
        x = own_ddim(e, noise((1, 4, 10, 16, 16)), 2, layout)
    finally:
        del e.model_output
    windows = clips[0]  # the first step's 4 windows, stacked
    assert windows.shape[0] == 4 and x.shape[2] == 10
    for i in range(3):
        torch.testing.assert_close(windows[i, :, 2:], windows[i + 1, :, :2])  # 2 frames shared with the next


def test_metrics_on_constructed_videos() -> None:
    still = np.repeat(np.random.default_rng(0).random((1, 16, 16, 3)), 6, axis=0)
    flicker = np.random.default_rng(1).random((6, 16, 16, 3))
    ramp = np.linspace(0, 1, 7)[:, None, None, None] * np.ones((7, 8, 8, 3))
    assert metrics.consistency(metrics.thumbnail_features(still)) == pytest.approx(1.0)
    assert abs(metrics.consistency(metrics.thumbnail_features(flicker))) < 0.1
    assert metrics.motion_smoothness(ramp) == pytest.approx(1.0)  # linear motion is perfectly interpolable
    assert metrics.motion_smoothness(flicker) < 0.8
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert metrics.consistency(features) == pytest.approx(((1 + 1) / 2 + (0 + 0) / 2) / 2)


def test_clip_score_from_a_local_clip_directory(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer, _ = tiny.text_components(tmp_path / "tok")
    config = CLIPConfig(text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 16,
                                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                     "pad_token_id": tokenizer.eos_token_id,
                                     "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                                     "max_position_embeddings": 16},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                       "num_hidden_layers": 1, "image_size": 16, "patch_size": 8},
                        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        tmp_path / "clip")
    clip = metrics.Clip(str(tmp_path / "clip"), torch.device("cpu"))
    frames = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    image = torch.nn.functional.normalize(clip.image_features(frames), dim=1)
    text = torch.nn.functional.normalize(clip.text_features("a cat"), dim=0)
    assert clip.score(frames, "a cat") == pytest.approx(float(100 * (image @ text).mean()), abs=1e-4)
    scores = metrics.video_metrics(frames, "a cat", clip)
    assert set(scores) == {"temporal_consistency", "motion_smoothness", "clip_score"}
    assert scores["temporal_consistency"] == pytest.approx(metrics.consistency(clip.image_features(frames)))


def test_mp4_round_trip_and_contact_sheets() -> None:
    frames = media.to_uint8(np.linspace(0, 1, 5)[:, None, None, None] * np.ones((5, 15, 17, 3)))
    decoded = media.read_mp4(media.mp4(frames, fps=8))
    assert decoded.shape == (5, 16, 18, 3)  # odd sizes padded to even for yuv420p
    assert np.abs(decoded[:, :15, :17].astype(int) - frames).mean() < 3
    assert len(media.sheet_frames(frames, 3)) == 3 and (media.sheet_frames(frames, 3)[[0, -1]] == frames[[0, -1]]).all()
    sheet = np.asarray(media.Image.open(media.io.BytesIO(media.contact_sheet([frames[:2], frames[:3]]))))
    assert sheet.shape == (30, 51, 3)
    stacked = np.asarray(media.Image.open(media.io.BytesIO(media.stack([media.png(frames[0]), media.png(frames[1])]))))
    assert stacked.shape == (30, 17, 3)


def run_job(tmp_path: Path, cfg: confiner.Config, rank: int = 0, world: int = 1) -> dict[str, float]:
    return confiner.run(cfg, MethodContext(RunDir(str(tmp_path), "job"), logger=None, rank=rank, world_size=world))


def test_the_job_writes_videos_skips_finished_ones_and_gathers_shards(tmp_path: Path) -> None:
    cfg = dataclasses.replace(confiner.TINY, prompts=["a", "b", "c"], save_frames=True)
    assert run_job(tmp_path, cfg, rank=1, world=2) == {"new_videos": 1.0}  # video 1 of 0..2
    assert sorted(p.name for p in (tmp_path / "job" / "videos").iterdir()) == ["p0001-v0"]
    assert run_job(tmp_path, cfg, rank=0, world=2) == {"new_videos": 2.0}
    gathered = run_job(tmp_path, cfg)
    assert gathered["new_videos"] == 0.0 and gathered["videos"] == 3.0
    video = tmp_path / "job" / "videos" / "p0002-v0"
    result = json.loads((video / "result.json").read_text())
    assert result["prompt"] == "c" and result["seed"] == confiner.image_seed(0, 2, 0)
    assert set(result["experts"]) == {"control", "spatial", "temporal"}
    assert result["cost_ratio"] == pytest.approx(result["nfe"] / result["baseline_nfe"])
    assert media.read_mp4((video / "video.mp4").read_bytes()).shape == (4, 16, 16, 3)
    assert len(list((video / "frames").iterdir())) == 4
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert [v["id"] for v in summary["videos"]] == ["p0000-v0", "p0001-v0", "p0002-v0"]
    assert gathered["temporal_consistency"] == pytest.approx(np.mean([v["temporal_consistency"]
                                                                      for v in summary["videos"]]))
    (video / "result.json").unlink()
    assert run_job(tmp_path, cfg)["new_videos"] == 1.0


def test_a_video_is_regenerated_exactly_from_its_seed(tmp_path: Path) -> None:
    cfg = dataclasses.replace(confiner.TINY, prompts=["a", "b"], frames=6, segment_frames=4, overlap=2)
    run_job(tmp_path / "first", cfg)
    alone = dataclasses.replace(cfg, prompts=["b"])
    chain = confiner.Chain(alone, torch.device("cpu"))
    result = json.loads((tmp_path / "first" / "job" / "videos" / "p0001-v0" / "result.json").read_text())
    frames, nfe = chain.confiner("b", result["seed"])
    again = metrics.video_metrics(confiner.to_unit(frames), "b", None)
    assert nfe == result["nfe"] and again["temporal_consistency"] == result["temporal_consistency"]
    assert again["motion_smoothness"] == result["motion_smoothness"]


def test_bad_configs_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config.spatial: expected a diffusers pipeline directory"):
        confiner.check(dataclasses.replace(confiner.TINY, spatial=str(tmp_path)))
    with pytest.raises(ConfigError, match="config.control: expected tiny://<kind>"):
        confiner.check(dataclasses.replace(confiner.TINY, control="tiny://sdxl"))
    with pytest.raises(ConfigError, match="config.allocation"):
        confiner.check(dataclasses.replace(confiner.TINY, allocation=["control"]))
    with pytest.raises(ConfigError, match="config.strength"):
        confiner.check(dataclasses.replace(confiner.TINY, refine_steps=4, strength=0.2))
    with pytest.raises(ConfigError, match="config.overlap"):
        confiner.check(dataclasses.replace(confiner.TINY, overlap=4))
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    with pytest.raises(ConfigError, match=r"prompts.jsonl line 2"):
        confiner.load_prompts(dataclasses.replace(confiner.TINY, prompts=[], prompts_file=str(bad)))


def test_an_unsupported_denoiser_is_refused_by_name(expert_dirs) -> None:
    pipeline = DiffusionPipeline.from_pretrained(expert_dirs["text_to_image"])
    pipeline.scheduler = type("FlowSchedule", (), {"config": {}})()
    with pytest.raises(ValueError, match="has no alphas_cumprod"):
        Expert("spatial", "flow", pipeline, 7.5)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_validate(path: Path) -> None:
    spec = experiment_spec.load(path)
    assert spec.method == "confiner"


@pytest.mark.ray
def test_the_cpu_setting_generates_videos_under_ray_with_artifacts_in_mlflow(ray_cluster, mlflow_uri, tmp_path) -> None:
    """Two workers take a prompt shard each, a gathering pass writes the summary; everything lands in MLflow."""
    file = Path(__file__).parents[1] / "experiments" / "confiner" / "tiny_cpu.yaml"
    assert main(["run", str(file), "--set", f"storage_path={tmp_path / 'runs'}", "config.baseline_steps=5",
                 "config.frames=12"]) == 0  # ConFiner-Long: windows of 8 overlapping by 4
    run_dir = tmp_path / "runs" / "confiner-tiny"
    client = MlflowClient(mlflow_uri)
    run = client.get_run(json.loads((run_dir / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["resources.workers"] == "2"
    # 12 frames: windows at 0, 4 on even steps and 0, 2, 4 on odd (staggered) steps; the spatial expert takes
    # 2 chunks of 8 frames. Control 4 steps: 2 + 3 + 2 + 3; refinement, the last 5 of 10 DDIM steps, guided:
    # temporal on steps 0, 2, 4 (2 windows each), spatial on steps 1, 3. Baseline: 5 guided steps, 2 + 3 + 2 + 3 + 2.
    nfe, baseline = 10 + 2 * 3 * 2 + 2 * 2 * 2, 2 * 12
    assert run.data.metrics["videos"] == 3 and run.data.metrics["nfe"] == nfe
    assert run.data.metrics["cost_ratio"] == pytest.approx(nfe / baseline)
    assert 0 < run.data.metrics["motion_smoothness"] <= 1 and "baseline_temporal_consistency" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "video/temporal_consistency")) == 3  # one per video
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "samples.png", "final_metrics.json", "experiment.yaml"} <= artifacts
    videos = {a.path for a in client.list_artifacts(run.info.run_id, "videos/p0001-v0")}
    assert videos == {f"videos/p0001-v0/{f}" for f in ("video.mp4", "baseline.mp4", "sheet.png", "result.json")}
    local = client.download_artifacts(run.info.run_id, "videos/p0001-v0/video.mp4", str(tmp_path))
    assert media.read_mp4(Path(local).read_bytes()).shape == (12, 32, 32, 3)
    result = json.loads((run_dir / "videos" / "p0001-v0" / "result.json").read_text())
    assert result["experts"]["temporal"] == "TextToVideoSDPipeline:tiny://text_to_video"
