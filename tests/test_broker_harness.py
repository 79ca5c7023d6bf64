"""deploy/kafka/broker.py leaves no JVM behind when whoever started it goes away mid-start.

Each test starts its own broker in a temporary folder (never the session
broker) and its fixtures stop the broker, kill any JVM whose command line
names that folder and reap every helper process, pass or fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import BROKER

pytestmark = pytest.mark.kafka

#: how long a stopped JVM may take to disappear; a liveness bound, not a speed claim
GONE_WITHIN = 30.0
#: how long `broker.py start` may take to reach its readiness loop (it formats storage first)
STARTING_WITHIN = 90.0


def _load_broker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kafka_test_broker", BROKER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


broker = _load_broker()


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def _jvms(run_dir: Path) -> list[int]:
    """Pids of live `kafka.Kafka` processes whose command line names run_dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = _cmdline(int(entry.name))
        if "kafka.Kafka" in args and any(str(run_dir) in a for a in args):
            found.append(int(entry.name))
    return found


def _wait_for(condition: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _broker_gone(run_dir: Path, pid: int) -> Callable[[], bool]:
    return lambda: not broker._alive(pid) and not _jvms(run_dir)


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """A broker folder; whatever broker ends up running there is killed afterwards."""
    path = tmp_path / "broker"
    try:
        yield path
    finally:
        broker.stop(path, grace=5.0)
        for pid in _jvms(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start helper processes; each is killed and reaped afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def run(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
        started.append(proc)
        return proc

    try:
        yield run
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            with proc:  # closes its pipes and reaps it
                pass


def _start_cmd(run_dir: Path, *more: str) -> list[str]:
    return [sys.executable, str(BROKER), "start", "--dir", str(run_dir), *more]


def _wait_until_starting(run_dir: Path, proc: subprocess.Popen[bytes]) -> int:
    """Wait until `start` has launched the JVM and polls for readiness; return the JVM's pid."""
    # `bootstrap` is written after broker.pid and the watchdog, right before the readiness loop
    assert _wait_for(lambda: (run_dir / "bootstrap").exists(), STARTING_WITHIN)
    assert proc.poll() is None, "broker.py finished before the test could interrupt it"
    assert not (run_dir / "started_in").exists(), "the broker was ready already"
    pid = int((run_dir / "broker.pid").read_text())
    assert broker._alive(pid)
    return pid


def test_watchdog_stops_broker_when_watched_process_exits(
    run_dir: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """`start --watch-pid P` returns the bootstrap; once P exits, the broker's JVM is stopped."""
    watched = spawn(["sleep", "60"])
    out = subprocess.run(
        _start_cmd(run_dir, "--watch-pid", str(watched.pid)),
        check=True,
        capture_output=True,
        text=True,
        timeout=STARTING_WITHIN,
    )
    bootstrap = out.stdout.strip().splitlines()[-1]
    assert bootstrap == (run_dir / "bootstrap").read_text()
    host, port = bootstrap.rsplit(":", 1)
    assert broker.metadata_ok(host, int(port))
    pid = int((run_dir / "broker.pid").read_text())
    assert broker._alive(pid)
    watched.kill()
    watched.wait()
    assert _wait_for(_broker_gone(run_dir, pid), GONE_WITHIN), "JVM outlived the watched pid"


def test_watchdog_runs_from_the_moment_the_jvm_starts(
    run_dir: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """`start` SIGKILLed while waiting for readiness: the watchdog still stops the JVM."""
    watched = spawn(["sleep", "60"])
    starter = spawn(
        _start_cmd(run_dir, "--watch-pid", str(watched.pid)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid = _wait_until_starting(run_dir, starter)
    starter.kill()  # SIGKILL: no handler runs, only the watchdog can help
    starter.wait()
    watched.kill()
    watched.wait()
    assert _wait_for(_broker_gone(run_dir, pid), GONE_WITHIN), "orphan JVM left behind"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_start_stops_the_jvm(
    run_dir: Path,
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
    signum: signal.Signals,
) -> None:
    """SIGTERM/SIGINT to `start` while it waits: it stops the JVM, says so, exits 128+signal."""
    stderr_file = tmp_path / "start.err"
    with stderr_file.open("wb") as err:
        starter = spawn(_start_cmd(run_dir), stdout=subprocess.PIPE, stderr=err)
    pid = _wait_until_starting(run_dir, starter)
    starter.send_signal(signum)
    stdout, _ = starter.communicate(timeout=GONE_WITHIN)
    assert starter.returncode == 128 + signum
    assert stdout == b""  # no bootstrap address for a broker that is not there
    assert f"interrupted by {signum.name}" in stderr_file.read_text()
    assert _broker_gone(run_dir, pid)(), "JVM still running after start was interrupted"
    assert not (run_dir / "broker.pid").exists()


def test_stop_kills_a_broker_that_ignores_sigterm(
    run_dir: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """`stop` escalates to SIGKILL after its grace period and removes broker.pid."""
    stubborn = spawn(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,  # stop() signals the process group, as for the JVM
    )
    assert stubborn.stdout is not None
    assert stubborn.stdout.readline() == b"ready\n"
    run_dir.mkdir()
    (run_dir / "broker.pid").write_text(str(stubborn.pid))
    assert broker.stop(run_dir, grace=1.0) is True
    # stop() reaps it too, so the pid is gone from /proc rather than a zombie
    assert not Path(f"/proc/{stubborn.pid}").exists()
    assert not (run_dir / "broker.pid").exists()
    assert broker.stop(run_dir, grace=1.0) is False


def test_cluster_ids_never_start_with_a_dash() -> None:
    """The storage tool would read a leading '-' as an option: ids must never start with one."""
    ids = [broker._cluster_id() for _ in range(5000)]
    assert not [cid for cid in ids if cid.startswith("-")]
    assert all(len(cid) == 22 for cid in ids)
    assert len(set(ids)) == len(ids)
