"""Will the cluster ever place the workers? Checked on the driver right after `ray.init`, before any trainer starts.

Without this, a run that asks for more than the cluster has (`resources.workers: 64` on a 2-CPU machine) waits for
its placement group forever: Ray Train v2 retries a worker-group start that timed out without limit
(`FailureConfig.controller_failure_limit = -1`). Two guards:

- at once: a worker that fits on no node, or workers that all nodes together cannot hold, stop the run naming the
  resources asked for and those the cluster has. An autoscaling cluster is judged by the most its configuration
  can grow to (what Ray Train checks itself), a fixed cluster by its live nodes.
- bounded: a placement that could fit but does not come within `resources.placement_timeout_s` (the other runs of a
  busy cluster hold it, nodes are still booting) stops with the same account, instead of retrying for ever. A run
  waits for its placement on the driver before its trainer starts; a sweep trial's worker group (Tune queues the
  trials, so waiting there is normal) gets as many of Ray Train's placement attempts as fit in the timeout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

# Ray Train's own wait for one placement attempt before it retries (its RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
RAY_DEFAULT_START_TIMEOUT_S = 60.0


class PlacementError(RuntimeError):
    """The workers asked for cannot be placed on this cluster."""


@dataclass(frozen=True)
class Capacity:
    total: dict[str, float]  # every live node together (or the autoscaler's maximum)
    largest_node: dict[str, float]  # per resource, the most one node has
    nodes: int
    autoscaling: bool

    def describe(self) -> str:
        kind = "can grow to" if self.autoscaling else "has"
        return f"the cluster {kind} {_fmt(self.total)} on {self.nodes} node(s), at most {_fmt(self.largest_node)} on one"


def cluster_capacity() -> Capacity:
    import ray

    alive = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    keys = {key for resources in alive for key in resources}
    largest = {key: max(resources.get(key, 0.0) for resources in alive) for key in keys}
    total = {key: sum(resources.get(key, 0.0) for resources in alive) for key in keys}
    maximum = _autoscaler_maximum()
    if maximum:
        return Capacity({**total, **maximum}, {**largest, **maximum}, len(alive), True)
    return Capacity(total, largest, len(alive), False)


def check_fits(per_worker: dict[str, float], workers: int, what: str) -> None:
    """Raise PlacementError when `workers` workers of `per_worker` resources can never be placed."""
    capacity = cluster_capacity()
    for resource, amount in per_worker.items():
        if amount > capacity.largest_node.get(resource, 0.0) or amount * workers > capacity.total.get(resource, 0.0):
            raise PlacementError(f"{what} asks for {workers} worker(s) x {_fmt(per_worker)} = "
                                 f"{_fmt({k: v * workers for k, v in per_worker.items()})}, but {capacity.describe()}"
                                 ": lower resources.workers or the per-worker resources, or add nodes")


def wait_for_placement(per_worker: dict[str, float], workers: int, strategy: str, timeout_s: float,
                       what: str) -> None:
    """Return once the cluster can place the workers together (a placement group of their bundles, reserved and
    released at once), or raise PlacementError after `timeout_s`."""
    from ray.util.placement_group import placement_group, remove_placement_group

    check_fits(per_worker, workers, what)
    group = placement_group([dict(per_worker)] * workers, strategy=strategy)
    try:
        ready = group.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(group)
    if not ready:
        raise PlacementError(f"{what}: {timed_out_message(per_worker, workers, timeout_s)}")


def controller_failure_limit(timeout_s: float) -> int:
    """Ray Train placement attempts that fit in `timeout_s` (each waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)."""
    attempt_s = float(os.environ.get(START_TIMEOUT_ENV, RAY_DEFAULT_START_TIMEOUT_S))
    return max(1, math.ceil(timeout_s / attempt_s))


def timed_out_message(per_worker: dict[str, float], workers: int, timeout_s: float) -> str:
    """What to say when Ray Train gave up placing the workers after the bounded wait."""
    try:
        account = cluster_capacity().describe()
    except Exception:  # noqa: BLE001 - the cluster may be gone by now; the rest of the message still helps
        account = "the cluster's resources could not be read"
    return (f"the cluster did not place {workers} worker(s) x {_fmt(per_worker)} within resources.placement_timeout_s "
            f"= {timeout_s:g} s ({account}; other runs may hold the rest): free resources or raise the timeout, "
            "then run the same command again to resume")


def _autoscaler_maximum() -> dict[str, float] | None:
    """The most the cluster's autoscaling configuration allows, or None for a fixed cluster."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or None
    except Exception:  # noqa: BLE001 - a private Ray API: without it every cluster counts as fixed
        return None


def _fmt(resources: dict[str, Any]) -> str:
    """CPUs, GPUs and custom resources; not Ray's per-node labels or byte counts."""
    shown = [(k, v) for k, v in sorted(resources.items())
             if not k.startswith(("node:", "accelerator_type:")) and k not in ("memory", "object_store_memory")]
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown) + "}"
