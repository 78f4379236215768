"""The checkpoints of one run directory: which one a (re)started run resumes from, which are set aside or deleted.

Ray Train v2 writes `checkpoint_{step:09d}` folders into the run directory and lists them in its
`checkpoint_manager_snapshot.json`; the orchestrator verifies them by content (orchestrator/checkpoint.py) and
manages them itself:

- Resume: rank 0 verifies the run's checkpoints newest first and resumes from the first that verifies (the one
  Ray hands back is its newest, which may be the damaged one). Each one that does not verify is renamed
  `<name>.corrupt` (kept, for a post-mortem), and the fallback is logged and tagged `checkpoint_fallback` on the
  MLflow run.
- Keep: after a new checkpoint is written and verified, the newest `checkpoint.keep` verified ones are kept and
  older ones deleted; nothing is deleted while the newest does not verify. Ray's own `num_to_keep` is not used: it
  deletes by age, verified or not.
- Ray refuses to resume a run whose snapshot names a checkpoint folder that is gone (renamed or deleted here):
  `forget_missing` drops those entries from the snapshot before a trainer is built.

Paths are local or any pyarrow filesystem URI, like `storage_path`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from orchestrator import checkpoint as ckpt_io
from orchestrator.storage import filesystem

CHECKPOINT = re.compile(r"checkpoint_(\d+)")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train v2's list of the run's checkpoints


@dataclass
class SetAside:
    name: str
    moved_to: str
    reason: str


class RunCheckpoints:
    """The `checkpoint_*` folders of the run directory `root`, of which the newest `keep` verified ones are kept
    (all when `keep` is None)."""

    def __init__(self, root: str, keep: int | None):
        self.root, self.keep = root.rstrip("/"), keep
        self.fs, self.path = filesystem(self.root)
        self.verified: set[str] = set()  # verified by this process (a checkpoint is not rewritten under its name)

    def names(self) -> list[str]:
        """Newest first."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        found = [i.base_name for i in infos if i.type == pafs.FileType.Directory and CHECKPOINT.fullmatch(i.base_name)]
        return sorted(found, key=lambda name: int(CHECKPOINT.fullmatch(name).group(1)), reverse=True)

    def display(self, name: str) -> str:
        return f"{self.root}/{name}"

    def check(self, name: str) -> None:
        """Raises CorruptCheckpointError when `name` does not verify."""
        if name not in self.verified:
            ckpt_io.verify(f"{self.path}/{name}", self.fs)
            self.verified.add(name)

    def newest_verified(self) -> tuple[str | None, list[SetAside]]:
        """The newest checkpoint that verifies (None when none does), and those newer that did not, set aside."""
        set_aside = []
        for name in self.names():
            try:
                self.check(name)
                return name, set_aside
            except ckpt_io.CorruptCheckpointError as err:
                set_aside.append(self.set_aside(name, str(err)))
        return None, set_aside

    def set_aside(self, name: str, reason: str) -> SetAside:
        """Rename `name` to `name.corrupt` (`.corrupt2`, ... when taken): out of the way of resuming and pruning."""
        target, n = f"{name}.corrupt", 1
        while self.fs.get_file_info(f"{self.path}/{target}").type != pafs.FileType.NotFound:
            n += 1
            target = f"{name}.corrupt{n}"
        self.fs.move(f"{self.path}/{name}", f"{self.path}/{target}")
        self.verified.discard(name)
        return SetAside(name, target, reason)

    def prune(self) -> list[str]:
        """Delete the checkpoints older than the newest `keep` verified ones; nothing when the newest does not
        verify. Returns the names deleted."""
        if self.keep is None:
            return []
        names, kept = self.names(), 0
        for i, name in enumerate(names):
            try:
                self.check(name)
            except ckpt_io.CorruptCheckpointError:
                if i == 0:
                    return []
                continue
            kept += 1
            if kept == self.keep:
                for old in names[i + 1:]:
                    self.remove(old)
                return names[i + 1:]
        return []

    def remove(self, name: str) -> None:
        if self.fs.get_file_info(f"{self.path}/{name}").type != pafs.FileType.NotFound:
            self.fs.delete_dir(f"{self.path}/{name}")
        self.verified.discard(name)


def fallback_message(set_aside: list[SetAside], resumed: str | None) -> str:
    """What the log and the MLflow tag `checkpoint_fallback` say about checkpoints that did not verify."""
    bad = "; ".join(f"{s.name} did not verify ({s.reason}), set aside as {s.moved_to}" for s in set_aside)
    where = f"resuming from {resumed}, the newest that verifies" if resumed else "no checkpoint verifies: starting over"
    return f"{bad}; {where}"


def forget_missing(run_root: str) -> None:
    """Drop the checkpoints that are gone from Ray Train's snapshot of the run at `run_root`, so that Ray resumes
    the run (it refuses a snapshot naming a missing folder). Written against Ray 2.5x's snapshot: parallel lists
    `checkpoint_results` / `checkpoint_report_indices` and `pending_training_results` /
    `pending_validation_specs` of {checkpoint_dir_name, metrics}, and `latest_checkpoint_result`."""
    fs, path = filesystem(run_root.rstrip("/"))
    snapshot_path = f"{path}/{SNAPSHOT}"
    if fs.get_file_info(snapshot_path).type != pafs.FileType.File:
        return
    with fs.open_input_stream(snapshot_path) as stream:
        state = json.loads(stream.read())
    present = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory}
    if all(r["checkpoint_dir_name"] in present for r in state["checkpoint_results"]):
        return
    _drop_missing(state, present)
    with fs.open_output_stream(snapshot_path) as stream:
        stream.write(json.dumps(state).encode())


def _drop_missing(state: dict, present: set[str]) -> None:
    results = list(zip(state["checkpoint_results"], state["checkpoint_report_indices"]))
    kept = [(r, i) for r, i in results if r["checkpoint_dir_name"] in present]
    state["checkpoint_results"] = [r for r, _ in kept]
    state["checkpoint_report_indices"] = [i for _, i in kept]
    pending = list(zip(state["pending_training_results"], state["pending_validation_specs"]))
    pending = [(r, v) for r, v in pending if r["checkpoint_dir_name"] in present]
    state["pending_training_results"] = [r for r, _ in pending]
    state["pending_validation_specs"] = [v for _, v in pending]
    latest = state["latest_checkpoint_result"]
    if latest is not None and latest["checkpoint_dir_name"] not in present:
        state["latest_checkpoint_result"] = state["checkpoint_results"][-1] if kept else None
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        state[key] = [name for name in state.get(key, []) if name in present]
