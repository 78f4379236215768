"""One writer per run: an exclusive lock file in the run (or sweep) directory, held by the driver.

`orchestrator run | sweep | search` takes it (`hold`) after the experiment file is validated and before Ray
starts; a second launch of the same `storage_path/name` finds it and stops with RunLocked (exit 2), naming the
holder. Ray's workers never touch it. `LOCK_FILE` is JSON: the holder's host, pid, start time, heartbeat (seconds
since the epoch) and a token of its own; a daemon thread rewrites the heartbeat every HEARTBEAT_S. A lock is
abandoned, and taken over with a warning in the log, when its holder ran on this host and that process is gone
(psutil; a reused pid is told apart by its start time), or ran on another host and its heartbeat is older than
STALE_AFTER_S by this host's clock (so the hosts' clocks must agree to well within STALE_AFTER_S). A holder on
this host that is alive keeps its lock however old its heartbeat: it may be stopped (SIGSTOP), not dead.

Atomic creation, by storage:
- a local path (NFS included, and file:// URIs): the holder's file is written under a unique temporary name, then
  hard-linked to LOCK_FILE. link() is atomic on NFS too, and a link whose reply was lost is recognised by the
  temporary file's link count of 2 (the classic NFS-safe lock). A filesystem without hard links gets
  O_CREAT|O_EXCL. Heartbeats replace the file by rename, so a reader never sees half of it.
- any other pyarrow filesystem (s3://, gs://, hdfs://, ...): pyarrow offers no create-if-absent (no conditional
  write), so the lock is written when absent and read back after READ_BACK_S; the launch whose token it reads
  back holds it. Two launches that both find it absent within one READ_BACK_S of each other can both win; launches
  further apart cannot.
An abandoned lock is taken over by renaming it aside (on a local path only one launch can) and checking that what
was moved is the abandoned holder's lock, not a new one, which is put back; elsewhere it is deleted after the
same check, then created as above.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import psutil
import pyarrow.fs as pafs

from orchestrator.storage import RunDir

log = logging.getLogger("orchestrator")

LOCK_FILE = "orchestrator.lock"
HEARTBEAT_S = 10.0  # how often the holder rewrites its heartbeat
STALE_AFTER_S = 60.0  # a holder on another host whose heartbeat is older than this is taken to be gone
READ_BACK_S = 1.0  # filesystems without an atomic create: the wait before the lock is read back


class RunLocked(Exception):
    """The run directory is locked by a driver that is alive."""


@dataclass
class Holder:
    host: str
    pid: int
    started: float
    heartbeat: float
    token: str

    @classmethod
    def me(cls) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)

    @classmethod
    def parse(cls, text: bytes, written: float) -> Holder:
        """The holder a lock file names; an unreadable one counts as another host's, last written at `written`."""
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return cls("(unreadable lock file)", 0, written, written, "")

    def describe(self) -> str:
        return (f"host {self.host} pid {self.pid} since {_utc(self.started)} "
                f"(last heartbeat {time.time() - self.heartbeat:.0f} s ago)")

    def abandoned(self) -> str | None:
        """Why this holder no longer holds the lock, or None while it does."""
        if self.host == socket.gethostname():
            return None if _alive(self.pid, self.started) else f"process {self.pid} on this host is gone"
        age = time.time() - self.heartbeat
        return f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:.0f} s)" if age > STALE_AFTER_S else None


class RunLock:
    """The lock of one run directory: acquire, a heartbeat thread while held, release."""

    def __init__(self, run_dir: RunDir, heartbeat_s: float = HEARTBEAT_S):
        self.fs, self.path = run_dir.fs, f"{run_dir.path}/{LOCK_FILE}"
        self.run, self.display = run_dir.display, f"{run_dir.display}/{LOCK_FILE}"
        self.local = isinstance(run_dir.fs, pafs.LocalFileSystem)
        self.me, self.heartbeat_s = Holder.me(), heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, taking over an abandoned one; RunLocked when a live driver holds it."""
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        for _ in range(3):
            if self._create_local() if self.local else self._create_remote():
                self._start_heartbeat()
                return
            holder = self.holder()
            if holder is None:
                continue
            reason = holder.abandoned()
            if reason is None:
                raise RunLocked(f"{self.run} is being run by {holder.describe()}: wait for it to end or stop that "
                                f"process (lock {self.display})")
            log.warning("taking over the lock %s of %s: %s", self.display, holder.describe(), reason)
            self._discard(holder)
        raise RunLocked(f"{self.run}: other launches keep taking the lock {self.display}; try again")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._mine():
            self.fs.delete_file(self.path)

    def holder(self) -> Holder | None:
        """Who holds the lock now; None when there is no lock."""
        return self._read(self.path)

    def _read(self, path: str) -> Holder | None:
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        try:
            with self.fs.open_input_stream(path) as stream:
                text = stream.read()
        except FileNotFoundError:
            return None
        return Holder.parse(text, info.mtime.timestamp() if info.mtime else 0.0)

    def _mine(self) -> bool:
        holder = self.holder()
        return holder is not None and holder.token == self.me.token

    def _create_local(self) -> bool:
        temporary = f"{self.path}.{self.me.token}"
        _write_local(temporary, self.me)
        try:
            os.link(temporary, self.path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            os.unlink(temporary)
            return self._create_exclusive()
        won = os.stat(temporary).st_nlink == 2
        os.unlink(temporary)
        return won

    def _create_exclusive(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as file:
            file.write(json.dumps(asdict(self.me)))
        return True

    def _create_remote(self) -> bool:
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return False
        self._write()
        time.sleep(READ_BACK_S)
        return self._mine()

    def _write(self) -> None:
        if self.local:
            _write_local(self.path, self.me)
            return
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(json.dumps(asdict(self.me)).encode())

    def _discard(self, holder: Holder) -> None:
        """Remove the abandoned lock of `holder`, unless another launch has replaced it meanwhile."""
        if not self.local:
            current = self.holder()
            if current is not None and current.token == holder.token:
                self.fs.delete_file(self.path)
            return
        aside = f"{self.path}.abandoned.{self.me.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved is not None and moved.token != holder.token:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        os.unlink(aside)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self.holder()
                if holder is None or holder.token != self.me.token:
                    log.error("the lock %s is no longer this driver's (%s): another driver may now write this run",
                              self.display, holder.describe() if holder else "removed")
                    return
                self.me.heartbeat = time.time()
                self._write()
            except OSError as err:
                log.warning("could not renew the lock %s: %s", self.display, err)


@contextlib.contextmanager
def hold(storage_path: str, name: str) -> Iterator[RunLock]:
    """The lock of `storage_path/name`, held (with its heartbeat) until the block ends, however it ends."""
    lock = RunLock(RunDir(storage_path, name))
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def _write_local(path: str, holder: Holder) -> None:
    """Written whole under a temporary name, then renamed over `path`."""
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "w") as file:
        file.write(json.dumps(asdict(holder)))
    os.replace(temporary, path)


def _alive(pid: int, started: float) -> bool:
    """Whether process `pid` of this host is running and is the one that took the lock at `started`."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= started + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
