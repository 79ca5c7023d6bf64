"""Alerting rules: promtool's own checks and unit tests, and a real scrape of the service.

promtool and the Prometheus server come from Debian's `prometheus` package,
unpacked into .cache/tools/prometheus by `deploy/dev setup` (or named by
PROMTOOL / PROMETHEUS).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from consumer.metrics import METRIC_NAMES
from consumer.sandbox import Faults, Sandbox
from tests.conftest import NewTopicFactory, Produce
from tests.pipeline_support import (
    ServiceProcess,
    free_port,
    order_event,
    order_records,
    pipeline_settings,
    wait_for,
)
from tests.test_dashboard import queries as dashboard_queries

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rules.test.yaml"
RUNBOOK_PAGE = "docs/operating.md"
RUNBOOK = (ROOT / RUNBOOK_PAGE).read_text()
TOOLS = ROOT / ".cache" / "tools" / "prometheus" / "usr" / "bin"
#: the scrape job the no-ready-pod rule names (docs/operating.md, *Alerts*)
JOB = "resend-consumer"


def _tool(name: str) -> str:
    given = os.environ.get(name.upper())
    found = given or (str(TOOLS / name) if (TOOLS / name).exists() else shutil.which(name))
    if not found:
        pytest.fail(f"{name} not found: run `deploy/dev setup` (unpacks Debian's prometheus)")
    return found


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    """`promtool check rules` and `promtool test rules` both succeed on deploy/prometheus."""
    promtool = _tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in check.stdout
    unit = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


def test_every_alert_has_a_unit_test() -> None:
    """Each alert of rules.yaml is named by at least one promtool test case."""
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert {rule["alert"] for rule in _rules()} == tested


def test_every_runbook_link_names_a_docs_section() -> None:
    """Each rule's runbook_url is docs/operating.md#anchor, and the anchor is a heading there."""
    anchors = {
        github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", RUNBOOK, re.MULTILINE)
    }
    for rule in _rules():
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == RUNBOOK_PAGE, url
        assert anchor in anchors, (rule["alert"], anchor)
        assert f"`{rule['alert']}`" in RUNBOOK, rule["alert"]


def test_rules_query_only_metrics_the_service_exports() -> None:
    """Every resend_consumer_* name in a rule is a family of consumer.metrics.METRIC_NAMES."""
    names: set[str] = set()
    for rule in _rules():
        names |= set(re.findall(r"resend_consumer_\w+", rule["expr"]))
    assert names, "the rules query something"
    assert names <= set(METRIC_NAMES), names - set(METRIC_NAMES)


# -- a real scrape -------------------------------------------------------------------------


class PrometheusServer:
    """A Prometheus server (Debian's binary) scraping one target every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def get(self, path: str, **params: str) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + path, params=params) as resp,
        ):
            body = await resp.json()
            assert body["status"] == "success", body
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: the result vector."""
        data = await self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def alerts(self) -> dict[str, dict[str, Any]]:
        """Active (pending or firing) alerts by name."""
        data = await self.get("/api/v1/alerts")
        return {a["labels"]["alertname"]: a for a in data["alerts"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
async def service_and_prometheus(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    produce: Produce,
    sandbox: Sandbox,
    tmp_path: Path,
) -> AsyncIterator[tuple[str, Produce, ServiceProcess, PrometheusServer]]:
    """`resend-consumer run` on a fresh topic, scraped every second by a real Prometheus."""
    topic = await new_topic(1)
    await produce(topic, order_records(range(5)))
    health_port = free_port()
    settings = pipeline_settings(
        kafka_bootstrap,
        topic,
        sandbox.url,
        health_host="127.0.0.1",
        health_port=health_port,
        max_event_age=600.0,
        log_level="info",
    )
    service = ServiceProcess(settings, tmp_path / "service.log")
    prometheus = PrometheusServer(tmp_path, f"127.0.0.1:{health_port}")
    try:
        yield topic, produce, service, prometheus
    finally:
        prometheus.stop()
        service.ensure_dead()


async def _value(prometheus: PrometheusServer, expr: str) -> float | None:
    try:
        result = await prometheus.query(expr)
    except aiohttp.ClientError:
        return None  # not listening yet
    return float(result[0]["value"][1]) if result else None


@pytest.mark.kafka
@pytest.mark.slow
async def test_rules_evaluate_against_a_real_scrape_of_the_running_service(
    service_and_prometheus: tuple[str, Produce, ServiceProcess, PrometheusServer],
    sandbox: Sandbox,
) -> None:
    """Prometheus scrapes `run`: real series, every rule evaluates, held events alert."""
    topic, produce, service, prom = service_and_prometheus
    sent = f'sum(resend_consumer_events_total{{job="{JOB}", outcome="sent"}})'

    async def healthy() -> bool:
        return await _value(prom, sent) == 5 and await _value(prom, "resend_consumer_ready") == 1

    await wait_for(healthy, 90, "5 sent events and a ready pod in Prometheus")
    lag = f'resend_consumer_lag{{topic="{topic}", partition="0"}}'

    async def lag_zero() -> bool:
        return await _value(prom, lag) == 0

    await wait_for(lag_zero, 30, "the partition's lag at 0")
    assert await _value(prom, "resend_consumer_max_event_age_seconds") == 600
    rules = (await prom.get("/api/v1/rules"))["groups"][0]["rules"]
    assert {r["name"] for r in rules} == {r["alert"] for r in _rules()}

    async def all_evaluated() -> bool:
        rules = (await prom.get("/api/v1/rules"))["groups"][0]["rules"]
        return all(r["health"] == "ok" for r in rules)

    await wait_for(all_evaluated, 30, "every rule evaluated without error")

    async def quiet() -> bool:
        # an evaluation from before the first ready scrape may still hold an alert
        # pending: the next evaluation, with the pod ready, must clear it
        return await prom.alerts() == {}

    await wait_for(quiet, 30, "no alert once the service is healthy")
    assert await prom.alerts() == {}
    # the dashboard's queries, as Grafana would send them: all valid, the main ones with data
    empty = []
    for expr in dashboard_queries():
        if expr.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        promql = expr.replace("$job", JOB).replace("$__rate_interval", "1m")
        if not await prom.query(promql):
            empty.append(expr)
    assert not [e for e in empty if "events_total" in e or "send_latency" in e], empty

    # Resend refuses the key: the auth circuit opens, readiness goes, and an
    # event 500 s old (MAX_EVENT_AGE 600 s) waits unfinished.
    sandbox.set_faults(Faults(force_status={"status": 401, "name": "invalid_api_key"}))
    old = datetime.now(UTC) - timedelta(seconds=500)
    await produce(topic, [(b"ord-old", order_event(99, when=old), [])])

    expected = {
        "ResendConsumerCircuitOpenAuth",
        "ResendConsumerNoPodReady",
        "ResendConsumerEventsNearMaxAge",
    }

    async def pending() -> bool:
        return expected <= set(await prom.alerts())

    await wait_for(pending, 60, f"{sorted(expected)} pending")
    alerts = await prom.alerts()
    assert set(alerts) == expected, alerts
    assert all(a["state"] == "pending" for a in alerts.values())  # each has a `for:`
    assert alerts["ResendConsumerEventsNearMaxAge"]["labels"]["partition"] == "0"
    assert alerts["ResendConsumerCircuitOpenAuth"]["labels"]["job"] == JOB
    # the refused key never reached the rules' view of the world
    assert "re_test" not in str(await prom.query('{__name__=~"resend_consumer_.*"}'))
    service.terminate()
    assert await service.wait(60) == 0, service.output()[-3000:]
    await asyncio.sleep(0)
