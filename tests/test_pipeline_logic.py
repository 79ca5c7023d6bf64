"""Pure pieces of the pipeline: how the gate's state reaches readiness and metrics."""

from __future__ import annotations

from consumer.health import Health
from consumer.metrics import Metrics
from consumer.service import gate_observer


def _ready(health: Health) -> tuple[bool, list[str]]:
    ok, info = health.ready()
    return ok, info.get("reasons", [])


def test_gate_closing_keeps_a_dead_letter_outage_open() -> None:
    """The gate closing its own condition leaves another open circuit (the DLQ) in place."""
    health, metrics = Health(liveness_window=60.0), Metrics()
    health.mark_poll()
    health.set_broker_ok(True)
    health.set_assigned(3)
    observe = gate_observer(health, metrics)
    health.set_circuit(True, "dlq_unavailable")
    observe("closed", "open", "auth")
    observe("open", "closed", None)
    ok, reasons = _ready(health)
    assert not ok
    assert any("dlq_unavailable" in r for r in reasons)
    assert not any("auth" in r for r in reasons)
    health.set_circuit(False, "dlq_unavailable")
    assert health.ready()[0]


def test_gate_condition_change_replaces_the_old_condition() -> None:
    """auth -> quota_daily: readiness names only the current condition; the metric follows."""
    health, metrics = Health(liveness_window=60.0), Metrics()
    health.mark_poll()
    health.set_broker_ok(True)
    health.set_assigned(1)
    observe = gate_observer(health, metrics)
    observe("closed", "open", "auth")
    observe("open", "open", "quota_daily")
    _, reasons = _ready(health)
    assert any("quota_daily" in r for r in reasons)
    assert not any("auth" in r for r in reasons)
    text = metrics.render().decode()
    assert 'resend_consumer_circuit_open{condition="quota_daily"} 1.0' in text
    assert 'resend_consumer_circuit_open{condition="auth"} 0.0' in text
    observe("open", "closed", None)
    assert health.ready()[0]
    assert 'resend_consumer_circuit_open{condition="quota_daily"} 0.0' in metrics.render().decode()
