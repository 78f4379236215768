"""`orchestrator profile`: sample every operator over a grid of shapes on this hardware, and the collectives over
the cluster's tiers, into one Parquet table.

Shapes are drawn log-uniformly (seeded) inside each kind's range, skipping any whose work is over the range's cap,
so one sample never takes more than about a second. Every sample runs in Ray actors (the driver needs no device).
Compute operators are timed alone on a node. A fixed reference training step is timed alone, on every rank of a
node at once, and with its gradient all-reduce: on a CPU node the ranks share cores, memory bandwidth and the CPU
time of Ray's own processes, and a synchronous step waits for its slowest rank, which isolated operators do not
show (measured here: about +10% and +4% on 2 cores); regress.node_factors turns these into two factors.
Collectives are sampled across actors placed on one node ("intra": STRICT_PACK) and, when the cluster has several
nodes, one actor per node ("inter": STRICT_SPREAD).

Table columns: kind, shape (list of ints, ops.FEATURES order), tier ("" for compute), dtype, ranks, seconds,
hardware.
The table's metadata holds the hardware string, the threads per process and the devices per node.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from orchestrator.perfmodel import microbench
from orchestrator.perfmodel.ops import COLLECTIVES, COMPUTE, cost

log = logging.getLogger("orchestrator.profile")


@dataclass(frozen=True)
class Range:
    """Log-uniform bounds per feature (a tuple of choices for a discrete one) and a cap on `work(shape)`."""

    bounds: tuple[Any, ...]
    cap: float


def _work(kind: str, shape: tuple[int, ...]) -> float:
    """The size a range caps: FLOPs plus elements moved."""
    flops, moved = cost(kind, shape, 1)
    return flops + moved


def ranges(device: str, cap_scale: float = 1.0) -> dict[str, Range]:
    """Sampling ranges: past the sizes of one device's share of a step (the LM head's (tokens, vocab) GEMM and
    cross-entropy included), each sample capped at roughly a tenth of a second on a CPU core (x cap_scale)."""
    big = device == "cuda"
    flops = (2e13 if big else 2e10) * cap_scale  # GEMM and attention FLOPs
    work = (1e12 if big else 6e8) * cap_scale  # FLOPs + elements moved, for the rest
    dims = (16, 16384 if big else 8192)
    rows, width = (16, 2**17), (32, 16384)
    attn = ((1, 512), (32, 8192 if big else 2048), (16, 32, 64, 128))
    vocab = (256, 2**17)
    return {
        "gemm": Range((dims, dims, dims), flops),
        "sdpa_fwd": Range(attn, flops / 2), "sdpa_bwd": Range(attn, flops / 4),
        "rope_fwd": Range(attn, work), "rope_bwd": Range(attn, work),
        "layernorm_fwd": Range((rows, width), work), "layernorm_bwd": Range((rows, width), work),
        "gelu_fwd": Range(((1e3, work / 10),), work), "gelu_bwd": Range(((1e3, work / 10),), work),
        "add": Range(((1e3, work / 10),), work),
        "embedding_fwd": Range((rows, width, vocab), work), "embedding_bwd": Range((rows, width, vocab), work),
        "cross_entropy_fwd": Range((rows, vocab), work), "cross_entropy_bwd": Range((rows, vocab), work),
        "adamw": Range(((1e4, work / 20), (1, 512)), work), "grad_norm": Range(((1e4, work / 20), (1, 512)), work),
    }


SAMPLES_SCALE = {"gemm": 3}  # the GEMMs are most of a step: more shapes


def draw_shapes(kind: str, spec: Range, n: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """n distinct shapes drawn log-uniformly inside `spec`, with work at most spec.cap."""
    shapes: list[tuple[int, ...]] = []
    for _ in range(n * 50):
        shape = tuple(int(rng.choice(b)) if len(b) > 2 else round(math.exp(rng.uniform(*np.log(b))))
                      for b in spec.bounds)
        if kind in ("adamw", "grad_norm") and shape[1] > shape[0] // 64:
            continue
        if _work(kind, shape) <= spec.cap and shape not in shapes:
            shapes.append(shape)
        if len(shapes) == n:
            break
    return shapes


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model} ({torch.get_num_threads()} threads)"


def device_memory(device: torch.device, per_node: int) -> float:
    """Bytes one rank may use: the GPU's memory, or this machine's memory shared by the ranks of a node."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / max(1, per_node)


def draw_grid(device: str, samples: int, seed: int = 0, kinds: tuple[str, ...] = COMPUTE,
              cap_scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """The (kind, shape) pairs a profile times: `samples` shapes per kind (more for the GEMMs), seeded."""
    rng = np.random.default_rng(seed)
    return [(kind, shape) for kind in kinds
            for shape in draw_shapes(kind, ranges(device, cap_scale)[kind], samples * SAMPLES_SCALE.get(kind, 1), rng)]


def _row(kind: str, shape: tuple[int, ...], seconds: float, dtype: torch.dtype, ranks: int = 1) -> dict[str, Any]:
    return {"kind": kind, "shape": list(shape), "tier": "", "dtype": str(dtype).removeprefix("torch."),
            "ranks": ranks, "seconds": seconds}


def profile_compute(group: RankGroup, dtype: torch.dtype, grid: list[tuple[str, tuple[int, ...]]]) -> list[dict]:
    """Time every (kind, shape) of `grid` on the ranks of `group` (one: the operator alone on its node), the mean
    over the ranks."""
    import ray

    rows = []
    for kind, shape in grid:
        seconds = ray.get([actor.compute.remote(kind, shape, str(dtype)) for actor in group.actors])
        rows.append(_row(kind, shape, float(np.mean(seconds)), dtype, ranks=len(group.actors)))
    log.info("profiled %d operator shapes on %d rank(s) at once", len(rows), len(group.actors))
    return rows


REFERENCE_STEP = {"cpu": (4096, 512, 2048), "cuda": (16384, 4096, 16384)}  # tokens, width, MLP hidden

# Real steps of small language models (d_model, n_layers, n_heads, seq_len, micro_batch, grad_accum) on the text
# corpus: what a step costs beyond its operators (regress.fit_overheads). None of them is in benchmarks/perfmodel.py.
CALIBRATION = ((32, 1, 2, 32, 4, 1), (64, 2, 2, 64, 8, 2), (96, 3, 3, 48, 16, 1), (48, 2, 2, 256, 2, 1),
               (128, 1, 4, 128, 4, 3), (160, 2, 5, 32, 24, 1), (64, 4, 4, 96, 6, 2), (224, 1, 7, 64, 8, 1))
ZERO3_CALIBRATION = CALIBRATION[1:4]  # on every rank of a node, under DeepSpeed ZeRO-3 and ZeRO-0
CALIBRATION_VOCAB = 8192


def node_reference(group: RankGroup, tokens: int) -> dict[str, float]:
    """The reference step on every rank of a node at once: without communication (busy_s), and with the all-reduce
    of its gradients (sync_s), each the slowest rank's; and that all-reduce alone (allreduce_s)."""
    import ray

    busy = max(ray.get([actor.reference_step.remote(tokens, False) for actor in group.actors]))
    synced = max(ray.get([actor.reference_step.remote(tokens, True) for actor in group.actors]))
    allreduce = max(ray.get([actor.collective.remote("allreduce", synced[1]) for actor in group.actors]))
    return {"busy_s": busy[0], "sync_s": synced[0], "allreduce_s": allreduce}


def calibration_spec(config: tuple[int, ...], world: int, zero: int | None, steps: int, window: int) -> Any:
    """An lm experiment of `config` (see CALIBRATION) on `world` ranks: DDP (zero None) or a DeepSpeed ZeRO stage,
    AdamW with clipping as the lab's recipes, a log line every `window` steps, no evaluation or checkpoint due."""
    from orchestrator import spec as spec_mod

    d, layers, heads, seq, micro, accum = config
    return spec_mod.validate({
        "name": "perfmodel-calibration", "method": "lm", "seed": 0,
        "data": {"dataset": "text", "vocab_size": CALIBRATION_VOCAB, "seq_len": seq, "loader_workers": 0},
        "config": {"d_model": d, "n_layers": layers, "n_heads": heads},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "steps": steps, "batch_size": micro * accum * world,
                  "grad_accum": accum, "clip_grad_norm": 1.0},
        "resources": {"workers": world, "deepspeed": None if zero is None else {"zero_stage": zero}},
        "checkpoint": {"every": steps + 1}, "log_every": window})


def profile_calibration(group: RankGroup, configs: tuple[tuple[int, ...], ...], zero: int | None, steps: int,
                        window: int) -> list[dict[str, Any]]:
    """Each config's real step on the group's ranks: rows of kind "step", shape config + (vocab, zero stage or -1
    for DDP), the median seconds per step of its logged windows."""
    import ray

    rows = []
    for config in configs:
        seconds = max(ray.get([actor.calibration_step.remote(config, zero, steps, window) for actor in group.actors]))
        rows.append({"kind": "step", "shape": [*config, CALIBRATION_VOCAB, -1 if zero is None else zero], "tier": "",
                     "dtype": "float32", "ranks": len(group.actors), "seconds": seconds})
    log.info("timed %d calibration steps on %d rank(s), zero %s", len(rows), len(group.actors), zero)
    return rows


def message_sizes(largest: int, points: int) -> list[int]:
    return sorted({int(2 ** e) for e in np.linspace(10, math.log2(largest), points)})


def profile_collectives(group: RankGroup, sizes: list[int]) -> list[dict[str, Any]]:
    """Time every collective at every size over the group's ranks: the slowest rank's time."""
    import ray

    rows = []
    world = len(group.actors)
    for kind in COLLECTIVES:
        if kind == "sendrecv" and world % 2:
            continue
        for nbytes in sizes:
            seconds = max(ray.get([actor.collective.remote(kind, nbytes) for actor in group.actors]))
            rows.append({"kind": kind, "shape": [nbytes, world], "tier": group.tier, "dtype": "float32",
                         "ranks": world, "seconds": seconds})
    log.info("profiled collectives over %d ranks (%s)", world, group.tier)
    return rows


class RankGroup:
    """`world` Ray actors (RankBench) in one process group: packed on one node (tier intra) or one per node (inter)."""

    def __init__(self, tier: str, world: int, use_gpu: bool, threads: int):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.tier = tier
        bundle = {"CPU": threads, **({"GPU": 1} if use_gpu else {})}
        self.placement = placement_group([bundle] * world, strategy="STRICT_PACK" if tier == "intra" else "STRICT_SPREAD")
        ray.get(self.placement.ready(), timeout=120)
        bench = ray.remote(RankBench)
        self.actors = [bench.options(num_cpus=threads, num_gpus=1 if use_gpu else 0,
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(
                                         placement_group=self.placement, placement_group_bundle_index=rank)).remote()
                       for rank in range(world)]
        address = ray.get(self.actors[0].address.remote())
        ray.get([actor.setup.remote(rank, world, address, use_gpu, threads) for rank, actor in enumerate(self.actors)])

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement)


class RankBench:
    """One rank of a profile (a Ray actor): compute operators and collectives, each after a barrier."""

    def address(self) -> str:
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        import ray

        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def setup(self, rank: int, world: int, address: str, use_gpu: bool, threads: int) -> None:
        import torch.distributed as dist

        torch.set_num_threads(threads)
        self.rank, self.world = rank, world
        # DeepSpeed (the ZeRO calibration steps) reads these; each actor sees its one GPU as device 0
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        dist.init_process_group("nccl" if use_gpu else "gloo", init_method=address, rank=rank, world_size=world)

    def describe(self, per_node: int) -> tuple[str, float]:
        """This rank's hardware name and the memory one rank may use."""
        return hardware_name(self.device), device_memory(self.device, per_node)

    def compute(self, kind: str, shape: tuple[int, ...], dtype: str) -> float:
        import torch.distributed as dist

        call = microbench.compute_call(kind, tuple(shape), getattr(torch, dtype.removeprefix("torch.")), self.device)
        dist.barrier()
        return microbench.seconds_per_call(call, self.device)

    def reference_step(self, tokens: int, all_reduce: bool, steps: int = 30) -> tuple[float, int]:
        """(mean seconds per step, gradient bytes) of a fixed MLP training step (Linear-GELU-Linear on `tokens`
        rows, plain SGD), with the gradients all-reduced as one flat buffer when `all_reduce`: a step-level sample
        of how ranks sharing a node, and synchronising, slow each other."""
        import torch.distributed as dist

        _, width, hidden = REFERENCE_STEP[self.device.type]
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width))
        net = net.to(self.device, dtype)
        x = torch.randn(tokens, width, device=self.device, dtype=dtype)
        params = list(net.parameters())

        def step() -> None:
            for p in params:
                p.grad = None
            ((net(x) - x) ** 2).mean().backward()
            if all_reduce:
                dist.all_reduce(torch.cat([p.grad.flatten() for p in params]))
            with torch.no_grad():
                for p in params:
                    p -= 1e-3 * p.grad

        dist.barrier()
        seconds = microbench.seconds_per_call(step, self.device, warmup=3, iters=steps, statistic=statistics.fmean)
        return seconds, sum(p.numel() for p in params) * params[0].element_size()

    def calibration_step(self, config: tuple[int, ...], zero: int | None, steps: int, window: int) -> float:
        """Seconds per step of the real step loop (launch.StepLoop, its engine and data) at `config`: the median of
        its logged windows but the first (start-up)."""
        from orchestrator import launch

        spec = calibration_spec(tuple(config), self.world, zero, steps, window)
        setup = launch.Setup.build(spec, self.device)
        if zero is None:  # one rank: Ray Train's prepare_model adds no DDP wrapper
            step_module = launch.TrainStep(setup.model, setup.method.train_step, setup.cfg)
            engine = launch.TorchEngine(setup, step_module, self.device, self.world)
        else:
            from orchestrator.deepspeed_engine import DeepSpeedEngine

            engine = DeepSpeedEngine(setup, self.device, self.world)
        windows = WindowLog()
        loop = launch.StepLoop(setup, engine, self.device, self.rank, self.world, report=lambda *_: None,
                               logger=windows if self.rank == 0 else None)
        import torch.distributed as dist

        dist.barrier()
        loop.train(launch.Position())
        per_step = [spec.optim.batch_size / rate for rate in windows.samples_per_s[1:]]
        return statistics.median(per_step) if self.rank == 0 else 0.0

    def collective(self, kind: str, nbytes: int) -> float:
        import torch.distributed as dist

        call = microbench.collective_call(kind, nbytes, self.rank, self.world, self.device)
        dist.barrier()
        return microbench.seconds_per_call(call, self.device, warmup=3, iters=10)


class WindowLog:
    """The step loop's logger during calibration: keeps each window's throughput."""

    def __init__(self) -> None:
        self.samples_per_s: list[float] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.samples_per_s.append(metrics["train/samples_per_s"])

    def set_tag(self, key: str, value: str) -> None:
        """A diverged calibration step raises right after tagging; there is no run to tag."""


def cluster_shape(use_gpu: bool, threads: int) -> tuple[int, int]:
    """(devices per node on the fullest node, number of nodes) of the running Ray cluster; on CPUs a device is a
    rank of `threads` threads."""
    import ray

    key, per_device = ("GPU", 1) if use_gpu else ("CPU", threads)
    per_node = [int(node["Resources"].get(key, 0)) // per_device for node in ray.nodes() if node["Alive"]]
    return max(per_node), sum(1 for count in per_node if count > 0)


def write_table(rows: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> Path:
    table = pa.Table.from_pylist([{**row, "hardware": meta["hardware"]} for row in rows])
    table = table.replace_schema_metadata({"perfmodel": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_table(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows and metadata of a profile table; a clear error for a file that is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile table {path} does not exist (write one with `orchestrator profile`)")
    table = pq.read_table(path)
    meta = (table.schema.metadata or {}).get(b"perfmodel")
    if meta is None or not {"kind", "shape", "seconds", "dtype", "tier"} <= set(table.column_names):
        raise ValueError(f"{path} is not a profile table of `orchestrator profile` (no perfmodel metadata or columns)")
    return table.to_pylist(), json.loads(meta)


def profile(out: Path, samples: int = 40, collective_points: int = 10, seed: int = 0, threads: int = 1,
            cap_scale: float = 1.0, calibration: tuple[tuple[int, ...], ...] = CALIBRATION,
            zero3_calibration: tuple[tuple[int, ...], ...] = ZERO3_CALIBRATION,
            calibration_steps: tuple[int, int] = (24, 4)) -> Path:
    """Profile the running Ray cluster into `out`: its GPUs when it has any (bf16), else CPU ranks of `threads`
    threads (fp32); compute alone and, on CPUs, with a node's every rank busy; the collectives within and across
    nodes; real steps of small models (`calibration` on one rank, `zero3_calibration` under ZeRO-3 and ZeRO-0 on
    a node's ranks when DeepSpeed is installed), each `calibration_steps` = (steps, steps per logged window).
    The driver needs no device of its own. cap_scale < 1 keeps every sample small (a quick table for tests)."""
    import ray

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    dtype, device = (torch.bfloat16, "cuda") if use_gpu else (torch.float32, "cpu")
    threads = 1 if use_gpu else threads
    grid = draw_grid(device, samples, seed, cap_scale=cap_scale)
    per_node, nodes = cluster_shape(use_gpu, threads)
    sizes = message_sizes(max(2**12, int((2**30 if use_gpu else 2**26) * cap_scale)), collective_points)
    reference_tokens = max(64, int(REFERENCE_STEP[device][0] * cap_scale ** (1 / 3)))
    with RankGroup("intra", 1, use_gpu, threads) as alone:
        rows = profile_compute(alone, dtype, grid)
        hardware, memory = ray.get(alone.actors[0].describe.remote(per_node))
        reference = {"alone_s": ray.get(alone.actors[0].reference_step.remote(reference_tokens, False))[0]}
        rows += profile_calibration(alone, calibration, None, *calibration_steps)
    for world in sorted({w for w in (2, 4, 8) if w < per_node} | ({per_node} if per_node > 1 else set())):
        with RankGroup("intra", world, use_gpu, threads) as group:
            if world == per_node:
                reference.update(node_reference(group, reference_tokens))
                rows += node_calibration(group, grid, dtype, use_gpu, zero3_calibration, calibration_steps)
            rows += profile_collectives(group, sizes)
    if nodes > 1:
        with RankGroup("inter", nodes, use_gpu, threads) as group:
            rows += profile_collectives(group, sizes)
    meta = {"hardware": hardware, "device": device, "threads": threads, "devices_per_node": per_node, "nodes": nodes,
            "memory_bytes": memory, "samples": samples, "seed": seed, "reference_step": reference}
    return write_table(rows, out, meta)


def node_calibration(group: RankGroup, grid: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, use_gpu: bool,
                     zero3_calibration: tuple[tuple[int, ...], ...], calibration_steps: tuple[int, int]) -> list[dict]:
    """On every rank of a node at once: every other shape of the compute grid (CPU ranks share cores and memory
    bandwidth, by how much depends on the operator and its size; GPUs share nothing), and the ZeRO-3 steps with
    their ZeRO-0 twins (what DeepSpeed's per-module hooks cost)."""
    import importlib.util

    rows = [] if use_gpu else profile_compute(group, dtype, grid[::2])
    if importlib.util.find_spec("deepspeed") is None:
        log.warning("DeepSpeed is not installed: no ZeRO-3 calibration steps (the plan prices its hooks at 0)")
        return rows
    for zero in (3, 0):
        rows += profile_calibration(group, zero3_calibration, zero, *calibration_steps)
    return rows
