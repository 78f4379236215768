"""Ray Train callbacks that run on the Train controller, kept free of torch and of the rest of the orchestrator.

Ray pickles a run's callbacks to its controller actor, a fresh process that imports the modules the callbacks'
classes live in. Importing torch there (about 2 s of CPU) lay on the path to every run's first step, so these
classes import only Ray, and the orchestrator's error classes only once an error has arrived (unpickling it
imported them already).
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback


class NoRetryOnDeterministicErrors(UserCallback):
    """Re-raises a worker's NonFiniteLossError, DataFileError (an unreadable dataset file) or CheckpointWriteError
    (disk full, ...): errors a retry would meet again. An error raised by a controller callback becomes a
    ControllerError, which the default failure policy raises at once instead of restarting the workers. Other
    worker errors are left to `FailureConfig.max_failures`."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        from orchestrator.checkpoint import CheckpointWriteError
        from orchestrator.data.sources import DataFileError
        from orchestrator.divergence import NonFiniteLossError

        for error in worker_exceptions.values():
            if isinstance(error, (NonFiniteLossError, DataFileError, CheckpointWriteError)):
                raise error


class TrialReporter(UserCallback):
    """Hands rank 0's report and the persisted checkpoint to a sweep's trial driver through a queue of size 1, so
    training waits for Tune as it would under `tune.report`."""

    def __init__(self, reports: Any):
        self.reports = reports

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.reports.put((dict(metrics[0]), checkpoint))
