#!/usr/bin/env python3
"""A real single-node Apache Kafka broker (KRaft) for development, tests and the quickstart.

Standard library only, so it runs before any virtual environment exists.

    python3 deploy/kafka/broker.py fetch                  # resolve jars into deploy/kafka/cache/lib
    python3 deploy/kafka/broker.py start --dir DIR        # prints the bootstrap address
    python3 deploy/kafka/broker.py stop --dir DIR
    python3 deploy/kafka/broker.py status --dir DIR

`start` formats a fresh storage folder, starts `kafka.Kafka` on 127.0.0.1 on
free ports, and returns only once a Metadata request answers with a broker.
`--watch-pid PID` leaves a small watchdog behind that stops the broker when
PID exits, so an interrupted test run leaves no JVM behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIB = HERE / "cache" / "lib"
POM = HERE / "pom.xml"
MAIN_JAR_GLOB = "kafka_2.13-*.jar"

SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
# single node: every internal topic has one replica
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# tests join groups constantly: no artificial delay before the first rebalance
group.initial.rebalance.delay.ms=0
# topics are created on purpose, never by a typo
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
log.retention.hours=24
"""

LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.apache.name = org.apache
logger.apache.level = warn
"""


def _jars_present() -> bool:
    return LIB.is_dir() and any(LIB.glob(MAIN_JAR_GLOB))


def fetch(*, quiet: bool = True) -> None:
    """Resolve the broker's runtime jars from Maven Central, once."""
    if _jars_present():
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise SystemExit("broker: Maven (mvn) is needed to fetch the Kafka jars")
    cmd = [mvn, "-B", "-f", str(POM), "package"]
    if quiet:
        cmd.insert(2, "-q")
    subprocess.run(cmd, check=True)  # noqa: S603 - fixed argv
    if not _jars_present():
        raise SystemExit(f"broker: Maven finished but no {MAIN_JAR_GLOB} in {LIB}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise SystemExit("broker: Java 17+ is needed to run Kafka")
    return java


def _classpath() -> str:
    return os.pathsep.join(str(p) for p in sorted(LIB.glob("*.jar")))


def _jvm(run_dir: Path) -> list[str]:
    heap = os.environ.get("KAFKA_HEAP", "768m")
    return [
        _java(),
        f"-Xmx{heap}",
        "-Xms128m",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={run_dir / 'log4j2.properties'}",
        "-cp",
        _classpath(),
    ]


def metadata_ok(host: str, port: int, timeout: float = 2.0) -> bool:
    """Send a Metadata v4 request for all topics; true when a broker is listed."""
    client_id = b"broker.py"
    header = struct.pack(">hhih", 3, 4, 7, len(client_id)) + client_id
    body = struct.pack(">i?", -1, False)  # topics: null (all), allow_auto_topic_creation
    frame = header + body
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(struct.pack(">i", len(frame)) + frame)
            size = struct.unpack(">i", _recv(s, 4))[0]
            payload = _recv(s, size)
    except (OSError, struct.error):
        return False
    # correlation id, throttle_time_ms, brokers array length
    correlation, _throttle, brokers = struct.unpack(">iii", payload[:12])
    return correlation == 7 and brokers > 0


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf


def _pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / "broker.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours still answers kill(0)
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def start(run_dir: Path, *, watch_pid: int | None = None, timeout: float = 90.0) -> str:
    """Format fresh storage in run_dir, start the broker, return its bootstrap address."""
    fetch()
    existing = _pid(run_dir)
    if existing and _alive(existing):
        raise SystemExit(f"broker: already running in {run_dir} (pid {existing})")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    port, controller_port = _free_port(), _free_port()
    while controller_port == port:
        controller_port = _free_port()
    props = run_dir / "server.properties"
    props.write_text(
        SERVER_PROPERTIES.format(port=port, controller_port=controller_port, data=run_dir / "data")
    )
    (run_dir / "log4j2.properties").write_text(
        LOG4J2.format(log=run_dir / "server.log", level=os.environ.get("KAFKA_LOG_LEVEL", "INFO"))
    )
    cluster_id = _cluster_id()
    subprocess.run(  # noqa: S603 - fixed argv
        [*_jvm(run_dir), "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    began = time.monotonic()
    with (run_dir / "broker.out").open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [*_jvm(run_dir), "kafka.Kafka", str(props)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (run_dir / "broker.pid").write_text(str(proc.pid))
    bootstrap = f"127.0.0.1:{port}"
    (run_dir / "bootstrap").write_text(bootstrap)
    while not metadata_ok("127.0.0.1", port):
        if proc.poll() is not None:
            tail = (run_dir / "broker.out").read_text(errors="replace")[-2000:]
            raise SystemExit(f"broker: exited with {proc.returncode} while starting:\n{tail}")
        if time.monotonic() - began > timeout:
            stop(run_dir)
            raise SystemExit(f"broker: not ready after {timeout:.0f}s; see {run_dir}/server.log")
        time.sleep(0.2)
    (run_dir / "started_in").write_text(f"{time.monotonic() - began:.2f}")
    if watch_pid is not None:
        _spawn_watchdog(run_dir, watch_pid)
    return bootstrap


def _cluster_id() -> str:
    # Kafka wants 16 random bytes, URL-safe base64 without padding (22 chars).
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _spawn_watchdog(run_dir: Path, watch_pid: int) -> None:
    subprocess.Popen(  # noqa: S603 - fixed argv
        [sys.executable, __file__, "watch", "--dir", str(run_dir), "--pid", str(watch_pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def watch(run_dir: Path, pid: int) -> None:
    """Stop the broker in run_dir once pid has exited or the broker is gone."""
    while _alive(pid):
        broker = _pid(run_dir)
        if broker is None or not _alive(broker):
            return
        time.sleep(0.5)
    stop(run_dir)


def stop(run_dir: Path, *, grace: float = 20.0) -> bool:
    """Stop the broker cleanly; kill it when it will not stop. True if one was running."""
    pid = _pid(run_dir)
    if pid is None or not _alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    (run_dir / "broker.pid").unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="broker.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="resolve the Kafka jars into deploy/kafka/cache/lib")
    p_fetch.add_argument("--quiet", action="store_true")
    p_start = sub.add_parser("start", help="start a fresh broker; prints its bootstrap address")
    p_start.add_argument("--dir", type=Path, required=True)
    p_start.add_argument("--watch-pid", type=int, default=None)
    p_start.add_argument("--timeout", type=float, default=90.0)
    p_stop = sub.add_parser("stop", help="stop the broker started in --dir")
    p_stop.add_argument("--dir", type=Path, required=True)
    p_status = sub.add_parser("status", help="exit 0 when the broker in --dir answers")
    p_status.add_argument("--dir", type=Path, required=True)
    p_watch = sub.add_parser("watch", help=argparse.SUPPRESS)
    p_watch.add_argument("--dir", type=Path, required=True)
    p_watch.add_argument("--pid", type=int, required=True)
    args = parser.parse_args(argv)

    if args.cmd == "fetch":
        fetch(quiet=args.quiet)
    elif args.cmd == "start":
        print(start(args.dir.resolve(), watch_pid=args.watch_pid, timeout=args.timeout))
    elif args.cmd == "stop":
        stop(args.dir.resolve())
    elif args.cmd == "status":
        boot_file = args.dir / "bootstrap"
        boot = boot_file.read_text().strip() if boot_file.exists() else ""
        if not boot:
            return 1
        host, port = boot.rsplit(":", 1)
        return 0 if metadata_ok(host, int(port)) else 1
    elif args.cmd == "watch":
        watch(args.dir.resolve(), args.pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
