"""Connecting a command to Ray: the cluster at `--address` (or $RAY_ADDRESS), else a local Ray started for it.

A local Ray lives as long as the command and serves one user, so it starts without what only a shared cluster
uses, unless `--dashboard` asks for the dashboard (and with it the metrics it shows):
- the dashboard and its head processes (Ray's job server; `orchestrator submit` targets a cluster started with
  `ray start --head`, which keeps its own);
- metrics recorded in every Ray process and Ray Train's Prometheus metrics, for a dashboard that is not there;
- Ray Train's preemption watcher, an actor that watches for spot nodes being reclaimed.
Ray Train's controller also polls its workers every 0.5 s instead of 2 s: every run waited on average half an
interval after its last step. Measured on 2 cores (benchmarks/overhead.py): see the README's Benchmarks section.
Each setting is an environment variable that the user's own environment overrides.
"""

from __future__ import annotations

import os

SERVICE_SETTINGS = {
    "RAY_enable_metrics_collection": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
POLL_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def init_ray(address: str | None = None, dashboard: bool = False, **init_args: object) -> None:
    """Connect to the cluster at `address` ($RAY_ADDRESS when None), or start a local Ray (`init_args` go to
    ray.init: num_cpus, ...). Ray Train v2 is selected either way."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, ignore_reinit_error=True, **init_args)
        return
    for key, value in local_settings(dashboard).items():
        os.environ.setdefault(key, value)  # read by the raylet and every worker it starts
    ray.init(include_dashboard=dashboard, ignore_reinit_error=True, **init_args)


def local_settings(dashboard: bool) -> dict[str, str]:
    """The environment of a local Ray for one command (the dashboard keeps the metrics it shows)."""
    return POLL_SETTINGS if dashboard else {**SERVICE_SETTINGS, **POLL_SETTINGS}
