"""Every command the docs show works as written, on any day.

The shell commands of README.md's and docs/*.md's code blocks (```sh blocks, and `$ `
lines of other blocks) are collected. Each one that runs the service's CLI
(`resend-consumer ...`, `python -m consumer ...`), or is listed in RUNNABLE, is run as
written with `bash -c` against the real broker and a local sandbox; the rest must be
in ALLOWED with the reason it cannot run here. A command in neither fails the test,
and so does an ALLOWED entry no page shows any more.

Environment is given the way the docs say it is given, never by editing a command:
KAFKA_BOOTSTRAP_SERVERS (the test broker), KAFKA_TOPICS (a fresh topic per command,
where `publish` writes by default), RESEND_BASE_URL and RESEND_API_KEY (the sandbox),
HEALTH_PORT (the running service's). Commands run in a scratch copy of the repository
root (every top-level entry linked), which also holds an `events.jsonl` of fresh
events, as a reader's own file would.

What is checked: the exit status; for `publish`, that the events it wrote are
delivered by the service (`event.outcome` sent, never dead-lettered): its records are
forwarded unchanged, all of them or the first 20 of a load run, to the topic a
running `resend-consumer run` consumes; for `render`, the request it prints; for a
server (`sandbox`), that it announces itself and exits 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.sandbox import Sandbox
from tests.conftest import NewTopicFactory, Produce
from tests.pipeline_support import (
    API_KEY,
    ServiceProcess,
    free_port,
    pipeline_settings,
    read_all,
    wait_for,
)

pytestmark = [pytest.mark.kafka]

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = ROOT / ".venv" / "bin"

#: documented commands that cannot run in a test: (pattern on the command, reason)
ALLOWED: list[tuple[str, str]] = [
    (r"^deploy/dev test\b", "the whole suite, what CI runs: from a test it would recurse"),
    (
        r"^deploy/dev quickstart$",
        "runs until Ctrl-C and starts its own broker; tests/test_quickstart.py runs it",
    ),
    (
        r"^KAFKA_BOOTSTRAP_SERVERS=broker:9092 RESEND_API_KEY=re_\.\.\. deploy/dev quickstart$",
        "placeholders for your broker and your Resend key",
    ),
    (r"^docker (build|compose) ", "needs Docker; tests/test_deploy.py checks the files"),
    (
        r"^RESEND_API_KEY=re_\.\.\. RESEND_BASE_URL=https://api\.resend\.com docker compose ",
        "needs Docker and a Resend key",
    ),
    (r"^pip install ", "installs from PyPI"),
    (
        r"^OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector:4318 ",
        "needs the otel extra and a collector, and runs until stopped (tests/test_tracing.py)",
    ),
    (
        r"^RESEND_WEBHOOK_SECRET=whsec_\.\.\. ",
        "placeholders for your signing secret and broker (tests/test_feedback.py runs it)",
    ),
    (r"^kafka-console-consumer\.sh ", "Kafka's own tool, not shipped here"),
    (
        r"^resend-consumer dlq replay \[",
        "a usage synopsis (brackets mark optional flags), not a command",
    ),
    (
        r"^resend-consumer health --url http://10\.0\.0\.7:8080/",
        "another pod's address, as an example of --url",
    ),
    (
        r"^curl -s localhost:8025/_sandbox/faults ",
        "with the sleep between them, a one-minute outage; tests/test_sandbox_api.py "
        "covers the fault API",
    ),
    (r"^sleep 60\b", "the one-minute outage of the curl example"),
    (r"^\.venv/bin/python bench/", "a benchmark: tens of seconds of load (docs/benchmarks.md)"),
    (
        r"^PYTHONHASHSEED=0 \.venv/bin/python -m tests\.sim \d+:\d+",
        "thousands of simulation seeds, minutes; tests/test_simulation.py runs 1,000",
    ),
]

#: commands that are not the service's CLI but cheap enough to run as written
RUNNABLE: list[str] = [
    r"^PYTHONHASHSEED=0 \.venv/bin/python -m tests\.sim \d+$",
]

_CLI = re.compile(r"(?:^|\|\s*)(?:\w+=\S+\s+)*(?:resend-consumer|python3? -m consumer)(?:\s|$)")
_SHELL_FENCES = {"sh", "bash", "shell", "console"}
#: publish runs with more events than this are checked on their first ones
SAMPLE = 20
#: a documented sandbox command listens here (the default --port)
SANDBOX_PORT = 8025


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str  # as written (continuation lines kept)

    @property
    def flat(self) -> str:
        """One line, continuations joined, for matching."""
        return re.sub(r"\s+", " ", self.text.replace("\\\n", " ")).strip()

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.flat}"


def _strip_comment(line: str) -> str:
    """A shell line without its trailing `# comment` (quotes respected)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def documented_commands() -> Iterator[Command]:
    """Every shell command in the code blocks of README.md and docs/*.md."""
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        lines = page.read_text().splitlines()
        fence: str | None = None
        pending: list[str] = []
        start = 0
        for number, line in enumerate(lines, start=1):
            if fence is None:
                m = re.match(r"^```(\S*)", line)
                if m:
                    fence = m.group(1)
                continue
            if line.startswith("```"):
                fence = None
                continue
            if fence in _SHELL_FENCES:
                text = _strip_comment(line)
                if not pending:
                    if not text:
                        continue
                    start = number
                pending.append(text)
                if text.endswith("\\"):
                    continue
                yield Command(name, start, "\n".join(pending))
                pending = []
            elif line.startswith("$ "):
                yield Command(name, number, _strip_comment(line[2:]))


def allowed_reason(command: Command) -> str | None:
    for pattern, reason in ALLOWED:
        if re.search(pattern, command.flat):
            return reason
    return None


def is_runnable(command: Command) -> bool:
    return bool(_CLI.search(command.flat)) or any(re.search(p, command.flat) for p in RUNNABLE)


def test_every_documented_command_is_runnable_or_allowed_with_a_reason() -> None:
    """A command the docs show either runs in the test below or is listed with why not."""
    commands = list(documented_commands())
    assert len(commands) > 10, "the extractor finds the documented commands"
    neither = [str(c) for c in commands if allowed_reason(c) is None and not is_runnable(c)]
    assert neither == [], "add these to ALLOWED with a reason, or make them runnable"
    unused = [p for p, _ in ALLOWED if not any(re.search(p, c.flat) for c in commands)] + [
        p for p in RUNNABLE if not any(re.search(p, c.flat) for c in commands)
    ]
    assert unused == [], "no page shows these any more: remove them"


def test_the_extractor_keeps_commands_whole() -> None:
    """Continuation lines make one command; comments go; `$ ` lines of output blocks count."""
    flat = [c.flat for c in documented_commands()]
    one_event = "resend-consumer publish --type order.confirmed --data '{"
    assert any(f.startswith(one_event) for f in flat)
    assert "resend-consumer render schemas/examples/order.confirmed.json" in flat
    assert "deploy/dev test" in flat
    assert not any(f.startswith("#") for f in flat)


# -- running them ----------------------------------------------------------------------


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _fresh_events(n: int) -> str:
    """JSON lines of valid order confirmations timed now (a reader's own events.jsonl)."""
    doc = orjson.loads((ROOT / "schemas" / "examples" / "order.confirmed.json").read_bytes())
    lines = []
    for i in range(n):
        event = dict(doc, id=str(uuid.uuid4()), subject=f"ord_docs_{i}")
        event.pop("time")  # publish stamps now
        event["data"] = dict(doc["data"], order_id=f"ord_docs_{i}")
        lines.append(orjson.dumps(event).decode())
    return "\n".join(lines) + "\n"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The repository root as a reader has it, plus their own events.jsonl."""
    work = tmp_path / "repo"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", ".cache"}:
            (work / entry.name).symlink_to(entry)
    (work / "events.jsonl").write_text(_fresh_events(3))
    return work


class Harness:
    """The broker, the sandbox and a running service that commands are checked against."""

    def __init__(
        self,
        *,
        bootstrap: str,
        sandbox: Sandbox,
        service: ServiceProcess,
        health_port: int,
        workdir: Path,
        new_topic: NewTopicFactory,
        produce: Produce,
        service_topic: str,
    ) -> None:
        self.bootstrap = bootstrap
        self.sandbox = sandbox
        self.service = service
        self.health_port = health_port
        self.workdir = workdir
        self.new_topic = new_topic
        self.produce = produce
        self.service_topic = service_topic

    def env(self, topic: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KAFKA_", "RESEND_", "HEALTH_", "LOG_", "ROUTES_"))
        }
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            KAFKA_TOPICS=topic,
            RESEND_BASE_URL=self.sandbox.url,
            RESEND_API_KEY=API_KEY,
            HEALTH_PORT=str(self.health_port),
        )
        return env

    async def _spawn(self, command: Command, topic: str, **kw: Any) -> asyncio.subprocess.Process:
        """`command` as written, in bash, in the scratch root with the test environment."""
        return await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command.text,
            cwd=self.workdir,
            env=self.env(topic),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            **kw,
        )

    async def run(self, command: Command, topic: str, timeout: float = 60.0) -> Run:
        proc = await self._spawn(command, topic)
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode is not None
        return Run(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    async def serve(self, command: Command, topic: str, ready: str) -> Run:
        """Start a server command, wait for its ready line, SIGTERM it; its exit and output."""
        proc = await self._spawn(command, topic, start_new_session=True)
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert ready in line.decode(), (line, await proc.stderr.read())
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return Run(proc.returncode, line.decode() + out.decode(), err.decode(errors="replace"))

    def outcomes(self) -> dict[str, str]:
        """event_id -> outcome of every `event.outcome` line the service logged."""
        found: dict[str, str] = {}
        for line in self.service.output().splitlines():
            if line.startswith("{") and '"event.outcome"' in line:
                entry: dict[str, Any] = orjson.loads(line)
                found[entry["event_id"]] = entry["outcome"]
        return found

    async def assert_delivered(self, command: Command, run: Run, topic: str) -> None:
        """The records the command published reach Resend when the service reads them."""
        m = re.search(r"published (\d+) event\(s\) to (\S+)", run.stdout)
        assert m, (str(command), run.stdout, run.stderr)
        count, written = int(m.group(1)), m.group(2)
        assert written == topic, str(command)
        assert count >= 1, str(command)
        records = (await read_all(self.bootstrap, topic, min(count, SAMPLE)))[:SAMPLE]
        ids = [_event_id(r) for r in records]
        sent_before = len(self.sandbox.deliveries())
        await self.produce(self.service_topic, [(r.key, r.value, list(r.headers)) for r in records])

        def finished() -> bool:
            return set(ids) <= set(self.outcomes())

        await wait_for(finished, 30, f"the service's outcome for {command}")
        outcomes = self.outcomes()
        assert {outcomes[i] for i in ids} == {"sent"}, (str(command), outcomes)
        assert len(self.sandbox.deliveries()) >= sent_before + len(set(ids))


def _event_id(record: Any) -> str:
    headers = dict(record.headers)
    if "ce_id" in headers:
        return str(headers["ce_id"].decode())
    return str(orjson.loads(record.value)["id"])


@pytest.fixture
async def harness(
    kafka_bootstrap: str,
    sandbox: Sandbox,
    new_topic: NewTopicFactory,
    produce: Produce,
    workdir: Path,
    tmp_path: Path,
) -> AsyncIterator[Harness]:
    topic = await new_topic(1, prefix="docs")
    port = free_port()
    settings = pipeline_settings(
        kafka_bootstrap, topic, sandbox.url, health_port=port, log_level="info"
    )
    service = ServiceProcess(settings, tmp_path / "service.log")
    try:
        await service.wait_assigned()
        yield Harness(
            bootstrap=kafka_bootstrap,
            sandbox=sandbox,
            service=service,
            health_port=port,
            workdir=workdir,
            new_topic=new_topic,
            produce=produce,
            service_topic=topic,
        )
        service.terminate()
        assert await service.wait() == 0, service.output()[-2000:]
    finally:
        service.ensure_dead()


async def test_every_runnable_documented_command_works_as_written(harness: Harness) -> None:
    """Run each, in the order the pages show them, against the broker, sandbox and service."""
    runnable = [c for c in documented_commands() if allowed_reason(c) is None and is_runnable(c)]
    assert any("publish" in c.flat for c in runnable)
    sandbox_log = Path("/tmp/sent.jsonl")
    had_log = sandbox_log.exists()
    checked: list[str] = []
    try:
        for command in runnable:
            topic = await harness.new_topic(1, prefix="docs-cmd")
            if re.search(r"resend-consumer sandbox\b", command.flat):
                assert _port_free(SANDBOX_PORT), f"port {SANDBOX_PORT} is taken: {command}"
                run = await harness.serve(command, topic, "sandbox listening on")
            else:
                run = await harness.run(command, topic)
            assert run.code == 0, (str(command), run.stdout[-2000:], run.stderr[-2000:])
            if re.search(r"resend-consumer publish\b", command.flat):
                await harness.assert_delivered(command, run, topic)
            elif re.search(r"resend-consumer render\b", command.flat):
                assert run.stdout.startswith("POST /emails\nIdempotency-Key: "), run.stdout
            checked.append(command.flat)
    finally:
        if not had_log:
            sandbox_log.unlink(missing_ok=True)
    assert len(checked) == len(runnable)
