"""DeepSpeed inside a Ray Train worker: the method's module as a DeepSpeed engine (ZeRO stages 0-3).

Ray's recommended pattern (doc/source/train/deepspeed.md): `deepspeed.initialize` inside the worker function, on the
process group Ray Train already set up (gloo on CPU, NCCL on GPU), no `prepare_model`. The optimizer and schedule
are the orchestrator's own (optim.py), handed to DeepSpeed as client objects, so `optim:` means the same with and
without DeepSpeed; DeepSpeed steps both at gradient-accumulation boundaries.

Checkpoints: every rank calls `save_checkpoint` into its own directory (the file names are rank-unique: ZeRO
shards `zero_pp_rank_{r}_mp_rank_00_*`), writes its RNG state and a manifest of its files; Ray merges the ranks'
directories into one checkpoint. Resuming loads the same tag on every rank, after rank 0 has verified every rank's
files against their manifests (size and sha256), with the same number of workers (ZeRO shards are per rank).
DeepSpeed reads its own files with torch.load(weights_only=False) (its TorchCheckpointEngine): only resume from
checkpoints you trust; the RNG files are read by orchestrator.checkpoint, with weights_only=True.

On CPU: DS_ACCELERATOR=cpu, fp32, a torch optimizer (torch's own fused AdamW; no DeepSpeed FusedAdam or CPU-Adam
kernel to compile).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

from orchestrator import checkpoint as ckpt_io
from orchestrator.checkpoint import CheckpointError
from orchestrator.launch import Position, Setup, TrainStep
from orchestrator.spec import ExperimentSpec

TAG = "deepspeed"  # the checkpoint tag: one sub-directory of DeepSpeed files per checkpoint directory


def deepspeed_config(spec: ExperimentSpec, world: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of an experiment: generated from `optim` and `resources.deepspeed`, then the raw
    keys of `resources.deepspeed.config` merged over it."""
    ds, optim = spec.resources.deepspeed, spec.optim
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    generated = {
        "train_batch_size": optim.batch_size,
        "train_micro_batch_size_per_gpu": optim.batch_size // (world * optim.grad_accum),
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.clip_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu and optim.amp},
        "zero_allow_untested_optimizer": True,  # the client optimizer is a torch.optim one
        "steps_per_print": 2**31 - 1,  # the orchestrator logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    return _deep_merge(generated, ds.config)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedEngine:
    """The StepLoop's engine when `resources.deepspeed` is set (launch.TorchEngine is the DDP one)."""

    even_eval_shards = True  # ZeRO-3 gathers parameters collectively inside every forward pass

    def __init__(self, setup: Setup, device: torch.device, world: int):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.setup, self.world, self.device = setup, world, device
        config = deepspeed_config(setup.spec, world, on_gpu=device.type == "cuda")
        self.engine, *_ = deepspeed.initialize(model=TrainStep(setup.model, setup.method.train_step, setup.cfg),
                                               optimizer=setup.optimizer, lr_scheduler=setup.scheduler,
                                               config=config)
        self.autocast = nullcontext  # bf16 is DeepSpeed's (it casts the module); fp32 on CPU

    def optimizer_step(self, batches: Iterator[dict[str, torch.Tensor]], position: Position) -> dict[str, Any]:
        """grad_accum micro-batches; DeepSpeed scales each loss by 1/grad_accum and steps at the boundary. The
        step's loss is the mean over its micro-batches (as in launch.TorchEngine)."""
        metrics: dict[str, Any] = {}
        accum = self.setup.spec.optim.grad_accum
        total = torch.zeros((), device=self.device)
        for _ in range(accum):
            loss, metrics = self.engine(next(batches), position.step)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
            position.micro += 1
        position.step += 1
        return {"loss": total / accum, **metrics, "lr": self.engine.get_lr()[0]}

    def save(self, directory: Path, rank: int, position: Position) -> None:
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False,
                                    client_state={"step": position.step, "micro": position.micro})
        written = ckpt_io.save_rng(directory, rank)
        ckpt_io.save_rank_manifest(directory, rank, self.world, position.step, written)  # reads DeepSpeed's back

    def restore(self, directory: Path, rank: int) -> Position:
        """From a checkpoint rank 0 has verified (launch._resume_point)."""
        manifest = ckpt_io.read_manifest(directory)
        if manifest.get("ranks") != self.world:
            raise CheckpointError(f"checkpoint {directory} was written by {manifest.get('ranks')} DeepSpeed ranks; "
                                  f"resuming needs the same number of workers, found {self.world}")
        _, client_state = self.engine.load_checkpoint(str(directory), tag=TAG)
        rng = ckpt_io.load_rng(directory, rank)
        if rng is not None:
            ckpt_io.restore_rng(rng)
        return Position(client_state["step"], client_state["micro"])
