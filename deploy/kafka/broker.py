#!/usr/bin/env python3
"""A real single-node Apache Kafka broker (KRaft) for development, tests and the quickstart.

Standard library only, so it runs before any virtual environment exists.

    python3 deploy/kafka/broker.py fetch                  # resolve jars into deploy/kafka/cache/lib
    python3 deploy/kafka/broker.py start --dir DIR        # prints the bootstrap address
    python3 deploy/kafka/broker.py start --dir DIR --secure   # plus SSL and SASL listeners
    python3 deploy/kafka/broker.py stop --dir DIR
    python3 deploy/kafka/broker.py status --dir DIR

`start` formats a fresh storage folder, starts `kafka.Kafka` on 127.0.0.1 on
free ports, and returns only once a Metadata request answers with a broker.
`--watch-pid PID` leaves a small watchdog behind that stops the broker when
PID exits, so an interrupted test run leaves no JVM behind. The watchdog
starts together with the JVM, not once it is ready, and SIGTERM or SIGINT to
`start` itself, or any error while it waits, stops the half-started broker.

`--secure` adds listeners for every security setting the service supports
(see `SECURE_LISTENERS`), with a throwaway CA made by `openssl` in DIR and
one SASL user known to PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512. Addresses,
file paths and the user's credentials go to DIR/secure.json; the last line
printed stays the PLAINTEXT bootstrap address either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
LIB = HERE / "cache" / "lib"
POM = HERE / "pom.xml"
MAIN_JAR_GLOB = "kafka_2.13-*.jar"

SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}{more_listeners}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}{more_listeners}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT{more_protocols}
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

# --secure: listener name -> security protocol. MTLS is an SSL listener that also
# demands a client certificate signed by the run's CA (KAFKA_SSL_CERTFILE/KEYFILE).
SECURE_LISTENERS: dict[str, str] = {
    "SSL": "SSL",
    "SASL_PLAINTEXT": "SASL_PLAINTEXT",
    "SASL_SSL": "SASL_SSL",
    "MTLS": "SSL",
}
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SASL_USER = "alice"
_PLAIN_MODULE = "org.apache.kafka.common.security.plain.PlainLoginModule"
_SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"

SECURE_PROPERTIES = """\
# --secure: one user for every SASL mechanism; no authorizer, so any
# authenticated user may do anything (like PLAINTEXT)
sasl.enabled.mechanisms={mechanisms}
{jaas}
ssl.keystore.type=PKCS12
ssl.keystore.location={keystore}
ssl.keystore.password={store_password}
ssl.key.password={store_password}
listener.name.mtls.ssl.client.auth=required
listener.name.mtls.ssl.truststore.type=PEM
listener.name.mtls.ssl.truststore.location={ca}
"""

# Extensions kept in a config file rather than `-addext`, which older OpenSSL and
# LibreSSL lack. The leaf certificates carry what strict verifiers (Python 3.13's
# VERIFY_X509_STRICT) want: key identifiers, key usage, extended key usage, SAN.
OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
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
    return bool(correlation == 7 and brokers > 0)


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


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    return ports


class Interrupted(Exception):
    """SIGTERM or SIGINT reached `start`; the half-started broker has been stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class _SignalGuard:
    """Turns SIGTERM/SIGINT into `Interrupted`, except while `held` (then they wait).

    Holding covers the moments where an exception would lose track of the JVM:
    inside Popen (the child may exist before `proc` is assigned) and during the
    clean-up that stops it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.pending: int | None = None
        self.holding = False

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.holding:
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        # signal.signal only works in the main thread; elsewhere run unguarded
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None:
            raise Interrupted(self.pending)


def start(
    run_dir: Path,
    *,
    watch_pid: int | None = None,
    timeout: float = 90.0,
    secure: bool = False,
) -> str:
    """Format fresh storage in run_dir, start the broker, return its bootstrap address.

    With `secure`, the broker also opens the `SECURE_LISTENERS` and their
    details are written to run_dir/secure.json (see `_secure_setup`).
    SIGTERM/SIGINT while starting stop the broker and raise `Interrupted`.
    """
    guard = _SignalGuard()
    with guard.installed():
        return _start(run_dir, guard, watch_pid=watch_pid, timeout=timeout, secure=secure)


def _start(
    run_dir: Path,
    guard: _SignalGuard,
    *,
    watch_pid: int | None,
    timeout: float,
    secure: bool,
) -> str:
    fetch()
    existing = _pid(run_dir)
    if existing and _alive(existing):
        raise SystemExit(f"broker: already running in {run_dir} (pid {existing})")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    port, controller_port, *secure_ports = _free_ports(2 + (len(SECURE_LISTENERS) if secure else 0))
    listeners = dict(zip(SECURE_LISTENERS, secure_ports, strict=False))
    props = run_dir / "server.properties"
    text = SERVER_PROPERTIES.format(
        port=port,
        controller_port=controller_port,
        data=run_dir / "data",
        more_listeners="".join(f",{name}://127.0.0.1:{p}" for name, p in listeners.items()),
        more_protocols="".join(f",{name}:{SECURE_LISTENERS[name]}" for name in listeners),
    )
    format_extra: list[str] = []
    info: dict[str, object] = {}
    if secure:
        text, format_extra, info = _secure_setup(run_dir, text, listeners)
    props.write_text(text)
    (run_dir / "log4j2.properties").write_text(
        LOG4J2.format(log=run_dir / "server.log", level=os.environ.get("KAFKA_LOG_LEVEL", "INFO"))
    )
    cluster_id = _cluster_id()
    subprocess.run(  # noqa: S603 - fixed argv
        [
            *_jvm(run_dir),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(props),
            *format_extra,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    bootstrap = f"127.0.0.1:{port}"
    began = _launch(
        run_dir,
        guard,
        port=port,
        listeners=listeners,
        watch_pid=watch_pid,
        timeout=timeout,
        append=False,
    )
    (run_dir / "started_in").write_text(f"{time.monotonic() - began:.2f}")
    if secure:
        # written last: its presence means every secure listener answered
        (run_dir / "secure.json").write_text(json.dumps(info, indent=2) + "\n")
    return bootstrap


def resume(run_dir: Path, *, watch_pid: int | None = None, timeout: float = 90.0) -> str:
    """Start the stopped broker of run_dir again, on the same ports and the same data.

    For restart tests: clients keep their bootstrap address, topics and
    committed offsets survive. Secure listeners are not resumed.
    """
    props = run_dir / "server.properties"
    boot_file = run_dir / "bootstrap"
    if not props.exists() or not boot_file.exists():
        raise SystemExit(f"broker: nothing to resume in {run_dir}")
    existing = _pid(run_dir)
    if existing and _alive(existing):
        raise SystemExit(f"broker: already running in {run_dir} (pid {existing})")
    bootstrap = boot_file.read_text().strip()
    port = int(bootstrap.rsplit(":", 1)[1])
    guard = _SignalGuard()
    with guard.installed():
        _launch(
            run_dir,
            guard,
            port=port,
            listeners={},
            watch_pid=watch_pid,
            timeout=timeout,
            append=True,
        )
    return bootstrap


def _launch(
    run_dir: Path,
    guard: _SignalGuard,
    *,
    port: int,
    listeners: dict[str, int],
    watch_pid: int | None,
    timeout: float,
    append: bool,
) -> float:
    """Launch `kafka.Kafka` on run_dir's server.properties and wait until it answers.

    On any failure, a signal included, the JVM is stopped again before the
    exception goes on. Returns when the launch began (monotonic seconds).
    """
    began = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    try:
        # Signals wait until the pid is on disk and the watchdog runs: from then
        # on both this process and the watchdog can find and stop the JVM.
        with guard.held():
            with (run_dir / "broker.out").open("ab" if append else "wb") as out:
                proc = subprocess.Popen(  # noqa: S603 - fixed argv
                    [*_jvm(run_dir), "kafka.Kafka", str(run_dir / "server.properties")],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            (run_dir / "broker.pid").write_text(str(proc.pid))
            if watch_pid is not None:
                _spawn_watchdog(run_dir, watch_pid)
        (run_dir / "bootstrap").write_text(f"127.0.0.1:{port}")
        _wait_ready(proc, run_dir, port, listeners, began=began, timeout=timeout)
    except BaseException:
        # Hold signals for good: a second SIGTERM must not cut the clean-up short,
        # and the exception on its way out already ends the command.
        guard.holding = True
        if proc is not None:
            stop(run_dir, grace=5.0)
        raise
    return began


def _wait_ready(
    proc: subprocess.Popen[bytes],
    run_dir: Path,
    port: int,
    listeners: dict[str, int],
    *,
    began: float,
    timeout: float,
) -> None:
    """Return once Metadata and every secure listener answer; SystemExit if the broker cannot."""

    def ready() -> bool:
        if not metadata_ok("127.0.0.1", port):
            return False
        return all(_listener_ready(name, p, run_dir) for name, p in listeners.items())

    while not ready():
        if proc.poll() is not None:
            tail = (run_dir / "broker.out").read_text(errors="replace")[-2000:]
            raise SystemExit(f"broker: exited with {proc.returncode} while starting:\n{tail}")
        if time.monotonic() - began > timeout:
            # the caller stops the broker on the way out
            raise SystemExit(f"broker: not ready after {timeout:.0f}s; see {run_dir}/server.log")
        time.sleep(0.2)


def _secure_setup(
    run_dir: Path, properties: str, listeners: dict[str, int]
) -> tuple[str, list[str], dict[str, object]]:
    """Make the CA and certificates, add the secure settings to the broker's properties.

    Returns the properties, the extra `StorageTool format` arguments (SCRAM
    credentials live in the KRaft metadata log, so they are created at format
    time) and what secure.json will hold.
    """
    tls = run_dir / "tls"
    store_password = secrets.token_urlsafe(16)
    files = _make_certificates(tls, store_password)
    password = secrets.token_urlsafe(16)
    jaas = []
    for name, protocol in SECURE_LISTENERS.items():
        if not protocol.startswith("SASL"):
            continue
        prefix = f"listener.name.{name.lower()}"
        jaas.append(
            f"{prefix}.plain.sasl.jaas.config={_PLAIN_MODULE} required "
            f'user_{SASL_USER}="{password}";'
        )
        for mechanism in SASL_MECHANISMS[1:]:
            jaas.append(f"{prefix}.{mechanism.lower()}.sasl.jaas.config={_SCRAM_MODULE} required;")
    properties += SECURE_PROPERTIES.format(
        mechanisms=",".join(SASL_MECHANISMS),
        jaas="\n".join(jaas),
        keystore=files["keystore"],
        store_password=store_password,
        ca=files["ca"],
    )
    format_extra = []
    for mechanism in SASL_MECHANISMS[1:]:
        format_extra += ["--add-scram", f"{mechanism}=[name={SASL_USER},password={password}]"]
    info: dict[str, object] = {
        "listeners": {name: f"127.0.0.1:{p}" for name, p in listeners.items()},
        "protocols": dict(SECURE_LISTENERS),
        "ca_file": str(files["ca"]),
        "client_cert_file": str(files["client_cert"]),
        "client_key_file": str(files["client_key"]),
        "sasl_mechanisms": list(SASL_MECHANISMS),
        "username": SASL_USER,
        "password": password,
    }
    return properties, format_extra, info


def _make_certificates(tls: Path, store_password: str) -> dict[str, Path]:
    """A throwaway CA, a broker certificate for 127.0.0.1 and a client certificate."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SystemExit("broker: --secure needs the openssl command to make certificates")
    tls.mkdir(mode=0o700)
    (tls / "openssl.cnf").write_text(OPENSSL_CNF)

    def run(args: str, *more: str) -> None:
        # fixed words split on spaces; `more` holds values that may contain spaces
        argv = [openssl, *args.split(), *more]
        done = subprocess.run(argv, cwd=tls, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            raise SystemExit(f"broker: openssl {args} failed:\n{done.stderr[-2000:]}")

    def key(name: str) -> None:
        run(f"genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {name}.key")

    def sign(name: str, cn: str, extensions: str) -> None:
        key(name)
        run(f"req -new -key {name}.key -out {name}.csr -config openssl.cnf -subj", f"/CN={cn}")
        run(
            f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -days 30 -sha256 "
            f"-set_serial {secrets.randbits(63)} -extfile openssl.cnf -extensions {extensions} "
            f"-out {name}.pem"
        )

    key("ca")
    run(
        "req -x509 -new -key ca.key -days 30 -sha256 -config openssl.cnf -extensions ca_ext "
        "-out ca.pem -subj",
        "/CN=resend-consumer test CA",
    )
    sign("broker", "127.0.0.1", "server_ext")
    sign("client", "resend-consumer", "client_ext")
    run(
        "pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem -name broker "
        "-out broker.p12 -passout",
        f"pass:{store_password}",
    )
    return {
        "ca": tls / "ca.pem",
        "keystore": tls / "broker.p12",
        "client_cert": tls / "client.pem",
        "client_key": tls / "client.key",
    }


def _listener_ready(name: str, port: int, run_dir: Path) -> bool:
    """True once the listener accepts; TLS listeners must also complete a verified handshake."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as raw:
            if SECURE_LISTENERS[name] == "SASL_PLAINTEXT":
                return True
            context = ssl.create_default_context(cafile=run_dir / "tls" / "ca.pem")
            if name == "MTLS":
                context.load_cert_chain(
                    run_dir / "tls" / "client.pem", run_dir / "tls" / "client.key"
                )
            with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return True
    except (OSError, ssl.SSLError):
        return False


def _cluster_id() -> str:
    """16 random bytes, URL-safe base64 without padding (22 chars), as Kafka wants.

    Never starting with "-": the storage tool would read `-t -xyz...` as an option
    and fail (about 1 start in 64 did, before this check).
    """
    import base64

    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


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
    p_start.add_argument(
        "--secure",
        action="store_true",
        help="also open SSL, SASL_PLAINTEXT, SASL_SSL and mutual-TLS listeners (see secure.json)",
    )
    p_resume = sub.add_parser(
        "resume", help="start the stopped broker of --dir again, same ports and data"
    )
    p_resume.add_argument("--dir", type=Path, required=True)
    p_resume.add_argument("--watch-pid", type=int, default=None)
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
        try:
            bootstrap = start(
                args.dir.resolve(),
                watch_pid=args.watch_pid,
                timeout=args.timeout,
                secure=args.secure,
            )
        except Interrupted as exc:
            print(f"broker: {exc} while starting; nothing left running", file=sys.stderr)
            return 128 + exc.signum
        print(bootstrap)
    elif args.cmd == "resume":
        print(resume(args.dir.resolve(), watch_pid=args.watch_pid))
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
