"""One writer per run: the driver's lock in the run directory, shown without Ray (the CLI takes it before Ray)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import cli, run_lock
from orchestrator.storage import RunDir

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
RACER = """
import os, sys, time
from orchestrator import run_lock
from orchestrator.storage import RunDir
lock = run_lock.RunLock(RunDir(sys.argv[1], "exp"))
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
try:
    lock.acquire()
    print("won", os.getpid(), flush=True)
except run_lock.RunLocked as err:
    print("lost", err, flush=True)
sys.stdin.read()  # holds the lock until the test lets every racer go
"""


def _race_processes(storage: Path, racers: int = 4) -> list[tuple[str, str]]:
    """Processes that acquire the lock of storage/exp at the same moment: what each of them got."""
    go = storage / "go"
    processes = [subprocess.Popen([sys.executable, "-c", RACER, str(storage), str(go)], cwd=ROOT, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(racers)]
    assert [p.stdout.readline() for p in processes] == ["ready\n"] * racers
    go.touch()
    outcomes = [tuple(p.stdout.readline().strip().split(" ", 1)) for p in processes]
    for process in processes:
        process.communicate("", timeout=30)
    return outcomes


def _write_lock(tmp_path: Path, **fields: object) -> Path:
    now = time.time()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now, "token": "t0",
              **fields}
    path = tmp_path / "exp" / run_lock.LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))
    return path


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_one_of_racing_processes_takes_the_lock(tmp_path: Path) -> None:
    outcomes = _race_processes(tmp_path)
    winners = [pid for outcome, pid in outcomes if outcome == "won"]
    assert len(winners) == 1
    assert all(f"pid {winners[0]} " in message for outcome, message in outcomes if outcome == "lost")
    assert json.loads((tmp_path / "exp" / run_lock.LOCK_FILE).read_text())["pid"] == int(winners[0])
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [run_lock.LOCK_FILE]  # no temporary left


def test_one_of_racing_processes_takes_over_an_abandoned_lock(tmp_path: Path) -> None:
    _write_lock(tmp_path, pid=_dead_pid())
    outcomes = _race_processes(tmp_path)
    assert sorted(outcome for outcome, _ in outcomes) == ["lost", "lost", "lost", "won"]


def test_two_acquirers_in_one_process_and_release(tmp_path: Path) -> None:
    with run_lock.hold(str(tmp_path), "exp") as lock:
        assert lock.holder().pid == os.getpid()
        with pytest.raises(run_lock.RunLocked, match=f"host {socket.gethostname()} pid {os.getpid()} since 20"):
            run_lock.RunLock(RunDir(str(tmp_path), "exp")).acquire()
    assert not (tmp_path / "exp" / run_lock.LOCK_FILE).exists()


def test_the_lock_is_released_when_the_run_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), run_lock.hold(str(tmp_path), "exp"):
        raise RuntimeError("the run failed")
    assert not (tmp_path / "exp" / run_lock.LOCK_FILE).exists()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead)
    with caplog.at_level(logging.WARNING, "orchestrator"), run_lock.hold(str(tmp_path), "exp") as lock:
        assert lock.holder().pid == os.getpid()
    assert f"process {dead} on this host is gone" in caplog.text and "taking over the lock" in caplog.text


def test_a_reused_pid_does_not_keep_the_lock(tmp_path: Path) -> None:
    _write_lock(tmp_path, started=time.time() - 10**6)  # this pid's process started after the lock was taken
    with run_lock.hold(str(tmp_path), "exp") as lock:
        assert lock.holder().token != "t0"


def test_a_stale_heartbeat_of_another_host_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = time.time() - run_lock.STALE_AFTER_S - 5
    _write_lock(tmp_path, host="gpu-node-7", pid=1, started=old - 100, heartbeat=old)
    with caplog.at_level(logging.WARNING, "orchestrator"), run_lock.hold(str(tmp_path), "exp") as lock:
        assert lock.holder().host == socket.gethostname()
    assert "host gpu-node-7 pid 1" in caplog.text and "heartbeat is 65 s old" in caplog.text


def test_a_fresh_heartbeat_of_another_host_keeps_the_lock(tmp_path: Path) -> None:
    _write_lock(tmp_path, host="gpu-node-7", pid=1)
    with pytest.raises(run_lock.RunLocked, match=r"host gpu-node-7 pid 1 since .* \(last heartbeat 0 s ago\)"):
        run_lock.RunLock(RunDir(str(tmp_path), "exp")).acquire()


def test_the_heartbeat_advances(tmp_path: Path) -> None:
    lock = run_lock.RunLock(RunDir(str(tmp_path), "exp"), heartbeat_s=0.05)
    lock.acquire()
    first = lock.holder().heartbeat
    time.sleep(0.3)
    second = lock.holder()
    lock.release()
    assert second.heartbeat > first and second.started == lock.me.started


def test_a_filesystem_without_atomic_create_reads_the_lock_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_lock, "READ_BACK_S", 0.01)
    run_dir = RunDir("mock:///storage", "exp")  # pyarrow's in-memory filesystem, as s3:// or gs:// would be
    first, second = run_lock.RunLock(run_dir), run_lock.RunLock(run_dir)
    first.acquire()
    with pytest.raises(run_lock.RunLocked, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    second.acquire()
    assert second.holder().token == second.me.token
    second.release()


@pytest.mark.parametrize("command, file, name", [("run", "quickstart.yaml", "quickstart"),
                                                 ("sweep", "supervised/digits_sweep.yaml", "digits-sweep")])
def test_a_second_launch_exits_2_naming_the_holder_before_ray(command: str, file: str, name: str, tmp_path: Path,
                                                              mlflow_uri: str, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_init_ray", lambda address: pytest.fail("Ray was started"))  # a guard: fail fast
    with run_lock.hold(str(tmp_path), name):
        status = cli.main([command, str(EXPERIMENTS / file), "--set", f"storage_path={tmp_path}", f"name={name}"])
    error = capsys.readouterr().err
    assert status == 2  # before Ray: the guard above did not fire (other tests may have started the session's Ray)
    assert f"{tmp_path}/{name} is being run by host {socket.gethostname()} pid {os.getpid()} since" in error
    assert error.count("\n") == 1
