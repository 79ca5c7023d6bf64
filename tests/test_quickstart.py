"""The one-command quickstart: local Kafka, sandbox, service, receiver, examples, clean Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _env() -> dict[str, str]:
    # the quickstart starts what the environment does not name: give it nothing
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "RESEND_", "HEALTH_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["LOG_FORMAT"] = "json"
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_quickstart_delivers_every_example_then_ctrl_c_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """Every example becomes one delivery and its feedback events; SIGINT exits 0, stops all."""
    state = tmp_path / "qs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consumer",
            "quickstart",
            "--sandbox-port",
            "0",
            "--health-port",
            "0",
            "--webhook-port",
            "0",
            "--state-dir",
            str(state),
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deliveries, feedback_log = state / "deliveries.jsonl", state / "feedback.jsonl"
        deadline = time.monotonic() + 90
        lines: list[bytes] = []
        feedback: list[bytes] = []
        while time.monotonic() < deadline:
            if deliveries.exists():
                lines = [ln for ln in deliveries.read_bytes().splitlines() if ln.strip()]
            if feedback_log.exists():
                feedback = [ln for ln in feedback_log.read_bytes().splitlines() if ln.strip()]
            if len(lines) >= 4 and len(feedback) >= 8:
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.2)
        assert len(lines) == 4, "the four shipped examples are delivered"
        assert len(feedback) == 8, "each delivery gets email.sent and email.delivered back"
        broker_pid = int((state / "kafka" / "broker.pid").read_text())
        assert _alive(broker_pid)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    subjects = {orjson.loads(ln).get("body", {}).get("subject") for ln in lines}
    assert "Your Acme sign-in link" in subjects
    assert b"service stopped" in err
    assert b"webhook receiver stopped" in err
    # the loop closes: each email's webhooks come back from Kafka as feedback CloudEvents
    ids = {orjson.loads(ln)["id"] for ln in lines}
    events = [orjson.loads(ln) for ln in feedback]
    by_email: dict[str, list[str]] = {}
    for event in events:
        by_email.setdefault(event["subject"], []).append(event["type"])
    assert set(by_email) == ids
    assert all(
        types == ["com.resend.email.sent", "com.resend.email.delivered"]
        for types in by_email.values()
    )
    assert {e["sourceroute"] for e in events} >= {"order.confirmed", "magic_link.requested"}
    printed = [ln for ln in err.splitlines() if b"feedback email." in ln]
    assert len(printed) == 8
    assert any(b"email.delivered" in ln and b"(route order.confirmed" in ln for ln in printed)
    assert b"local Kafka stopped" in err
    outcomes = [
        orjson.loads(ln)
        for ln in out.splitlines()
        if ln.startswith(b"{") and b'"event.outcome"' in ln
    ]
    assert sorted(o["outcome"] for o in outcomes) == ["sent"] * 4
    # the structured log masks recipients and never shows the API key
    assert b"@example.com" not in out.replace(b"***@example.com", b"")
    assert b"re_quickstart_sandbox" not in out + err
    for _ in range(50):
        if not _alive(broker_pid):
            break
        time.sleep(0.1)
    assert not _alive(broker_pid), "the local broker is stopped on Ctrl-C"
