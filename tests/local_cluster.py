"""A real multi-node Ray cluster on this machine, for tests: a head and worker nodes started with `ray start --block`
on loopback addresses with token authentication, and an MLflow tracking server on loopback.

Every node is its own `ray start --block` process tree, so a test can lose one node (SIGKILL of its raylet, as when
a machine dies) without touching the others or the session's shared Ray instance; `ray stop` is never used because
it stops every Ray process on the machine. Ports are chosen free at start, since Ray's fixed defaults (the
dashboard agent's 52365) collide with the shared instance.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
STARTED = "Ray runtime started"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(process: psutil.Process | subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        root = psutil.Process(process.pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: Path

    def raylet(self) -> psutil.Process:
        return next(p for p in psutil.Process(self.process.pid).children(recursive=True) if p.name() == "raylet")


@dataclass
class LocalCluster:
    """Head and workers with token auth. `env` is what a client (ray job submit, orchestrator submit) needs."""

    root: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    nodes: list[Node] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_TRAIN_V2_ENABLED": "1",
                # a lost node is declared dead after about 3 s instead of Ray's default 15 s
                "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_head(self, cpus: int) -> Node:
        return self._start("head", cpus, ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                                          f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true"])

    def add_worker(self, cpus: int) -> Node:
        return self._start(f"worker{len(self.nodes)}", cpus, [f"--address={self.gcs_address}"])

    def _start(self, name: str, cpus: int, arguments: list[str]) -> Node:
        log = self.root / f"{name}.log"
        # its own temporary directory, as on its own machine: nodes sharing one would share (and garbage-collect)
        # each other's unpacked job working directories; short, for Ray's socket paths
        temp_dir = tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        command = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
                   f"--object-store-memory={200 * 2**20}", f"--dashboard-agent-listen-port={free_port()}",
                   f"--temp-dir={temp_dir}", "--disable-usage-stats", *arguments]
        with log.open("w") as out:
            process = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        node = Node(name, process, log)
        self.nodes.append(node)
        deadline = time.monotonic() + 120
        while STARTED not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start for {name} failed:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        return node

    def lose(self, node: Node) -> None:
        """The machine dies: its raylet is SIGKILLed, then everything else of that node."""
        node.raylet().send_signal(signal.SIGKILL)
        kill_tree(node.process)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            kill_tree(node.process)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class MlflowServer:
    """`mlflow server` on loopback with a SQLite backend and a local artifact root."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--artifacts-destination", str(self.root / "artifacts")]
        with (self.root / "mlflow.log").open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server failed:\n{(self.root / 'mlflow.log').read_text()[-4000:]}")
            time.sleep(0.3)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            kill_tree(self.process)
