"""Connecting a command to Ray: the cluster at `--address` (or $RAY_ADDRESS), else a local Ray started for it.

A local Ray lives as long as the command and serves one user, so it starts without what only a shared cluster
uses: metrics recorded in every Ray process and Ray Train's Prometheus metrics (no Prometheus scrapes them), and Ray
Train's preemption watcher, an actor that watches for spot nodes being reclaimed. Ray Train's controller also polls
its workers every 0.5 s instead of 2 s: every run waited on average half an interval after its last step. Each
setting is an environment variable that the user's own environment overrides (RAY_enable_metrics_collection=1
brings the metrics back). Measured on 2 cores: see benchmarks/overhead.py and the README's Benchmarks section.

The dashboard stays, although a local run has no use for its pages: its head process serves Ray's state API, and
Ray Train's placement-group cleaner asks that API whether a run's controller is alive. Without it a controller that
ends without shutting down its workers (a trial paused by PBT, a stopped trial) leaves its workers' CPUs reserved
until the command exits, and the next trials wait for CPUs that never come back.
"""

from __future__ import annotations

import os

LOCAL_SETTINGS = {
    "RAY_enable_metrics_collection": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def init_ray(address: str | None = None, **init_args: object) -> None:
    """Connect to the cluster at `address` ($RAY_ADDRESS when None), or start a local Ray (`init_args` go to
    ray.init: num_cpus, ...). Ray Train v2 is selected either way."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, ignore_reinit_error=True, **init_args)
        return
    for key, value in LOCAL_SETTINGS.items():
        os.environ.setdefault(key, value)  # read by the raylet and every worker it starts
    ray.init(ignore_reinit_error=True, **init_args)
