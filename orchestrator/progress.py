"""Progress on the driver: step, loss, throughput and ETA, as a bar on a terminal and as lines in a log.

Rank 0 posts its latest numbers to a tiny `ProgressBoard` actor (fire and forget); a thread on the driver
polls it and draws them.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import ray

log = logging.getLogger("orchestrator")


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}

    def post(self, latest: dict[str, Any]) -> None:
        self.latest = latest

    def read(self) -> dict[str, Any]:
        return self.latest


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def describe(latest: dict[str, Any], total: int) -> str:
    step = latest.get("step", 0)
    rate = latest.get("steps_per_s", 0.0)
    eta = format_eta((total - step) / rate) if rate > 0 else "?"
    loss = latest.get("train/loss")
    loss_txt = f" loss {loss:.4f}" if loss is not None else ""
    return f"step {step}/{total}{loss_txt} {latest.get('samples_per_s', 0.0):.0f} samples/s eta {eta}"


class ProgressWatcher(threading.Thread):
    """Polls the board until `stop()`: a tqdm bar (with its own rate and ETA) on a TTY, else one log line
    (step, loss, samples/s, ETA) every `line_every` seconds."""

    def __init__(self, board: Any, total: int, poll_s: float = 0.5, line_every: float = 10.0):
        super().__init__(daemon=True)
        self.board, self.total, self.poll_s, self.line_every = board, total, poll_s, line_every
        self._stop_event = threading.Event()
        self.latest: dict[str, Any] = {}

    def run(self) -> None:
        bar = None
        last_line = 0.0
        while not self._stop_event.wait(self.poll_s):
            try:
                self.latest = ray.get(self.board.read.remote(), timeout=5) or self.latest
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                continue
            if not self.latest:
                continue
            if sys.stderr.isatty():
                bar = bar or self._make_bar(self.latest.get("step", 0))
                bar.update(self.latest.get("step", 0) - bar.n)
                bar.set_postfix_str(f"loss {self.latest.get('train/loss', float('nan')):.4f} "
                                    f"{self.latest.get('samples_per_s', 0.0):.0f} samples/s", refresh=True)
            elif time.monotonic() - last_line >= self.line_every:
                log.info(describe(self.latest, self.total))
                last_line = time.monotonic()
        if bar is not None:
            bar.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def _make_bar(self, first_step: int) -> Any:
        """Made at the first report, so that tqdm's rate and ETA count training, not Ray's start-up."""
        from tqdm import tqdm

        return tqdm(total=self.total, initial=first_step, unit="step", dynamic_ncols=True, file=sys.stderr)
