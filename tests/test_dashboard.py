"""The Grafana dashboard (deploy/grafana/resend-consumer.json), checked statically.

Every query names only metrics the service exports, and the dashboard covers
what an operator looks for. tests/test_alerts.py also runs every query
against a real Prometheus scraping the service.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from consumer.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "resend-consumer.json"
_SERIES_SUFFIXES = ("_bucket", "_count", "_sum")


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside rows included."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries(dashboard: dict[str, Any] | None = None) -> list[str]:
    """Every PromQL expression of the dashboard's panels and variables."""
    d = dashboard if dashboard is not None else load()
    exprs = [t["expr"] for p in panels(d) for t in p.get("targets", [])]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"])
    return exprs


def family(series: str) -> str:
    """The metric family a series name belongs to (histograms expose three series)."""
    if series in METRIC_NAMES:
        return series
    for suffix in _SERIES_SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in METRIC_NAMES:
            return series.removesuffix(suffix)
    return series


def test_every_query_names_only_metrics_the_service_exports() -> None:
    """Each expression names at least one resend_consumer_* family, all in METRIC_NAMES."""
    exprs = queries()
    assert len(exprs) >= 20
    for expr in exprs:
        names = re.findall(r"resend_consumer_\w+", expr)
        assert names, expr
        for name in names:
            assert family(name) in METRIC_NAMES, (name, expr)


def test_histogram_queries_use_the_series_a_histogram_has() -> None:
    """histogram_quantile reads `_bucket` and groups by `le`; no query reads a histogram bare."""
    histograms = {"resend_consumer_send_latency_seconds", "resend_consumer_ratelimit_wait_seconds"}
    for expr in queries():
        for name in re.findall(r"resend_consumer_\w+", expr):
            assert name not in histograms, expr  # a histogram family has no bare series
        if "histogram_quantile" in expr:
            assert "_bucket" in expr, expr
            assert "by (le)" in expr, expr


def test_dashboard_covers_what_an_operator_looks_for() -> None:
    """Panels for throughput, latency, lag, age, retries, limiter, circuits, DLQ and stalls."""
    by_title = {
        p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in panels(load())
    }
    wanted = {
        "Events by outcome": ("resend_consumer_events_total", "by (outcome)"),
        "Events by type": ("resend_consumer_events_total", "by (type)"),
        "Resend answer time (one attempt)": ("resend_consumer_send_latency_seconds_bucket",),
        "Wait for the shared rate limiter": ("resend_consumer_ratelimit_wait_seconds_bucket",),
        "Lag per partition": ("resend_consumer_lag", "by (topic, partition)"),
        "Oldest unfinished event age per partition": (
            "resend_consumer_oldest_event_timestamp_seconds",
            "resend_consumer_max_event_age_seconds",
        ),
        "Retries by reason": ("resend_consumer_retries_total", "by (reason)"),
        "Learned rate per pod": ("resend_consumer_ratelimit_rate",),
        "Circuit states": ("resend_consumer_circuit_open", "by (condition)"),
        "Dead letters by reason": ("resend_consumer_dead_letters_total", "by (reason)"),
        "Stalled partitions per pod": ("resend_consumer_stalled_partitions",),
    }
    for title, needles in wanted.items():
        assert title in by_title, title
        for needle in needles:
            assert needle in by_title[title], (title, needle)


def test_panels_use_the_datasource_and_job_variables() -> None:
    """Every query filters on $job and every panel reads the ${datasource} variable."""
    d = load()
    names = {v["name"] for v in d["templating"]["list"]}
    assert names == {"datasource", "job"}
    for panel in panels(d):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"], target["expr"]
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
