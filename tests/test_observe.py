"""Logs, metrics, health server and the `health` command (consumer.observe and its parts)."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest
import structlog

from consumer import cli, logs
from consumer.commands.health import HealthArgs, add_arguments, probe, probe_url
from consumer.errors import SettingsError
from consumer.health import Health, HealthServer
from consumer.logs import LogEvent, configure_logging, log_outcome
from consumer.metrics import CONTENT_TYPE, METRIC_NAMES, Metrics
from consumer.observe import ProgressReporter
from consumer.redact import REDACTED
from consumer.settings import Secret, Settings

FAKE_KEY = "re_FAKEkey_1234567890abcdef"
ADDRESS = "jane.doe@example.com"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Leave structlog and the root logger as they were."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    structlog.reset_defaults()


def json_lines(buf: io.BytesIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


# -- logs --------------------------------------------------------------------------------


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_mask_recipients_and_never_show_the_api_key() -> None:
    """Every string, nested value, exception and library log line is masked and key-free."""
    buf = io.BytesIO()
    settings = Settings(log_format="json", resend_api_key=Secret(FAKE_KEY))
    configure_logging(settings, stream=buf)
    log = structlog.get_logger("test")
    log.info(
        "sending",
        to=[ADDRESS],
        detail={"cc": f"Jane <{ADDRESS}>", "authorization": f"Bearer {FAKE_KEY}"},
        api_key=FAKE_KEY,
        password="hunter2",
        note=f"header was Bearer {FAKE_KEY}",
        settings=repr(settings),
    )
    try:
        raise RuntimeError(f"failed for {ADDRESS} with {FAKE_KEY}")
    except RuntimeError:
        log.exception("boom")
    logging.getLogger("aiokafka.consumer").warning("lost %s %s", ADDRESS, FAKE_KEY)
    log.warning("objects", err=ValueError(f"{ADDRESS} {FAKE_KEY}"), raw=FAKE_KEY.encode())
    try:
        raise OSError(f"connect with {FAKE_KEY}")
    except OSError:
        logging.getLogger("aiohttp.client").exception("library failed")
    out = buf.getvalue()
    assert FAKE_KEY.encode() not in out
    assert b"FAKEkey" not in out
    assert b"hunter2" not in out
    assert ADDRESS.encode() not in out
    lines = json_lines(buf)
    assert [line["event"] for line in lines] == [
        "sending",
        "boom",
        "lost ja***@example.com re_[redacted]",
        "objects",
        "library failed",
    ]
    first = lines[0]
    assert first["to"] == ["ja***@example.com"]
    assert first["api_key"] == REDACTED
    assert first["detail"] == {"cc": "Jane <ja***@example.com>", "authorization": REDACTED}
    assert first["level"] == "info"
    assert str(first["timestamp"]).endswith("Z")
    assert "ja***@example.com" in str(lines[1]["exception"])
    assert lines[2]["logger"] == "aiokafka.consumer"
    assert lines[3]["err"] == "ValueError('ja***@example.com re_[redacted]')"
    assert "OSError: connect with re_[redacted]" in str(lines[4]["exception"])


@pytest.mark.usefixtures("restore_logging")
def test_the_sasl_password_is_redacted_by_value_in_free_text() -> None:
    """A configured SASL password never shows, even inside messages and library lines."""
    password = "Tr0ub4dor-and-3"
    buf = io.BytesIO()
    settings = Settings(
        log_format="json",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="alice",
        kafka_sasl_password=Secret(password),
    )
    configure_logging(settings, stream=buf)
    structlog.get_logger("test").warning("auth", detail=f"tried alice:{password}", n=[password])
    logging.getLogger("aiokafka.conn").warning("sasl with %s failed", password)
    out = buf.getvalue()
    assert password.encode() not in out
    lines = json_lines(buf)
    assert lines[0]["detail"] == f"tried alice:{REDACTED}"
    assert lines[1]["event"] == f"sasl with {REDACTED} failed"


@pytest.mark.usefixtures("restore_logging")
def test_masking_can_be_turned_off_but_keys_stay_redacted() -> None:
    """MASK_RECIPIENTS=false shows addresses; API keys are redacted regardless."""
    buf = io.BytesIO()
    configure_logging(Settings(log_format="json", mask_recipients=False), stream=buf)
    structlog.get_logger().info("x", to=ADDRESS, key=FAKE_KEY)
    (line,) = json_lines(buf)
    assert line["to"] == ADDRESS
    assert line["key"] == "re_[redacted]"


@pytest.mark.usefixtures("restore_logging")
def test_console_format_redacts_tracebacks_too() -> None:
    """The console renderer output is scrubbed after rendering, tracebacks included."""
    buf = io.StringIO()
    configure_logging(Settings(log_format="console"), stream=buf)
    log = structlog.get_logger()
    try:
        raise ValueError(f"bad {FAKE_KEY} for {ADDRESS}")
    except ValueError:
        log.exception("send failed", to=ADDRESS)
    logging.getLogger("aiohttp.client").error("oops %s", FAKE_KEY)
    out = buf.getvalue()
    assert "send failed" in out
    assert "ValueError" in out
    assert FAKE_KEY not in out
    assert ADDRESS not in out
    assert "oops re_[redacted]" in out
    assert not out.lstrip().startswith("{")


@pytest.mark.usefixtures("restore_logging")
def test_levels_filter_own_lines_and_libraries_stay_at_warning() -> None:
    """LOG_LEVEL filters structlog lines; aiokafka's INFO chatter never shows, even at debug."""
    buf = io.BytesIO()
    configure_logging(Settings(log_format="json", log_level="info"), stream=buf)
    log = structlog.get_logger()
    log.debug("hidden")
    log.info("shown")
    logging.getLogger("aiokafka").info("rebalance chatter")
    logging.getLogger("aiokafka").warning("heartbeat failed")
    assert [line["event"] for line in json_lines(buf)] == ["shown", "heartbeat failed"]

    buf2 = io.BytesIO()
    configure_logging(Settings(log_format="json", log_level="debug"), stream=buf2)
    log.debug("now shown")
    logging.getLogger("aiokafka").info("rebalance chatter")
    assert [line["event"] for line in json_lines(buf2)] == ["now shown"]


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_twice_moves_output_and_keeps_one_handler() -> None:
    """A second call replaces the first: one root handler, lines go to the new stream only."""
    first, second = io.BytesIO(), io.BytesIO()
    log = structlog.get_logger()  # bound before the reconfiguration, on purpose
    configure_logging(Settings(log_format="json"), stream=first)
    configure_logging(Settings(log_format="json"), stream=second)
    log.info("hello")
    logging.getLogger("aiohttp").warning("lib")
    ours = [h for h in logging.getLogger().handlers if getattr(h, logs._HANDLER_MARK, False)]
    assert len(ours) == 1
    assert first.getvalue() == b""
    assert [line["event"] for line in json_lines(second)] == ["hello", "lib"]


@pytest.mark.usefixtures("restore_logging")
def test_auto_format_is_json_when_not_a_tty() -> None:
    """LOG_FORMAT=auto writes JSON to a stream that is not a terminal."""
    buf = io.StringIO()
    configure_logging(Settings(log_format="auto"), stream=buf)
    structlog.get_logger().info("hi", n=1)
    assert orjson.loads(buf.getvalue()) | {"timestamp": None} == {
        "event": "hi",
        "n": 1,
        "level": "info",
        "timestamp": None,
    }


@pytest.mark.usefixtures("restore_logging")
def test_log_outcome_writes_the_canonical_line() -> None:
    """One line per outcome with the fixed field names; dead letters at warning."""
    buf = io.BytesIO()
    configure_logging(Settings(log_format="json"), stream=buf)
    log = structlog.get_logger()
    common = {
        "event_id": "e1",
        "event_type": "order.placed",
        "source": "shop",
        "topic": "t",
        "partition": 2,
        "offset": 41,
        "idempotency_key": "order-confirmation:o-1",
        "attempts": 1,
        "latency": 0.1234,
    }
    log_outcome(log, outcome="sent", email_id="em_1", **common)
    log_outcome(log, outcome="dead_lettered", reason="schema", trace_id="ab" * 16, **common)
    sent, dead = json_lines(buf)
    assert "trace_id" not in sent  # tracing off: no field
    assert dead["trace_id"] == "ab" * 16
    assert sent["event"] == LogEvent.OUTCOME == "event.outcome"
    assert sent["latency_ms"] == 123.4
    assert sent["email_id"] == "em_1"
    assert "reason" not in sent
    assert (dead["level"], dead["reason"], dead["outcome"]) == (
        "warning",
        "schema",
        "dead_lettered",
    )


@pytest.mark.usefixtures("restore_logging")
def test_the_outcome_line_splits_resends_answer_time_from_waits_and_says_why() -> None:
    """`latency_ms` is fetch to outcome; with requests made, `resend_ms` is the time
    inside them and `wait_ms` the rest (queue, pacing, backoff). A dead letter carries
    the message `render` would print, addresses in it masked."""
    buf = io.BytesIO()
    configure_logging(Settings(log_format="json", mask_recipients=True), stream=buf)
    log = structlog.get_logger()
    common = {
        "event_id": "e1",
        "event_type": "order.confirmed",
        "source": "shop",
        "topic": "t",
        "partition": 0,
        "offset": 1,
        "idempotency_key": "k",
    }
    log_outcome(log, outcome="sent", attempts=1, latency=0.3039, answer_time=0.0031, **common)
    log_outcome(
        log,
        outcome="dead_lettered",
        attempts=0,
        latency=0.002,
        reason="schema_violation",
        message="data.customer_email 'jane.doe@example.com' must contain ['currency']",
        **common,
    )
    sent, dead = json_lines(buf)
    assert (sent["latency_ms"], sent["resend_ms"], sent["wait_ms"]) == (303.9, 3.1, 300.8)
    assert "resend_ms" not in dead
    assert "wait_ms" not in dead
    assert "message" not in sent
    assert "must contain ['currency']" in dead["message"]
    assert "jane.doe@example.com" not in dead["message"]
    assert "***@example.com" in dead["message"]


@pytest.mark.usefixtures("restore_logging")
def test_aiokafka_errors_it_retries_by_itself_are_warnings() -> None:
    """A fresh broker answers GroupCoordinatorNotAvailable on every start, and aiokafka
    logs that at ERROR although it retries: the line says warning; other errors stay."""
    from aiokafka.errors import GroupAuthorizationFailedError, GroupCoordinatorNotAvailableError

    buf = io.BytesIO()
    configure_logging(Settings(log_format="json"), stream=buf)
    lib = logging.getLogger("aiokafka.consumer.group_coordinator")
    lib.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    lib.error("Group Coordinator Request failed: %s", GroupAuthorizationFailedError("g"))
    logging.getLogger("consumer.x").error("ours: %s", GroupCoordinatorNotAvailableError())
    retried, fatal, ours = json_lines(buf)
    assert "GroupCoordinatorNotAvailable" in retried["event"]
    assert retried["level"] == "warning"
    assert fatal["level"] == "error"
    assert ours["level"] == "error"


# -- metrics -----------------------------------------------------------------------------


def test_metrics_instances_are_independent_and_expose_every_name() -> None:
    """Each Metrics has its own registry; render() lists every declared family."""
    a, b = Metrics(), Metrics()
    a.events.labels(type="order.placed", outcome="sent").inc(3)
    a.sends.labels(status="200").inc()
    a.send_latency.observe(0.2)
    a.retries.labels(reason="429").inc()
    a.lag.labels(topic="t", partition="0").set(7)
    a.committed_offset.labels(topic="t", partition="0").set(12)
    a.circuit_open.labels(condition="auth").set(1)
    a.dead_letters.labels(reason="schema").inc()
    a.ratelimit_wait.observe(0.01)
    text = a.render().decode()
    for name in METRIC_NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert 'resend_consumer_events_total{outcome="sent",type="order.placed"} 3.0' in text
    assert 'resend_consumer_lag{partition="0",topic="t"} 7.0' in text
    assert "resend_consumer_send_latency_seconds_count 1.0" in text
    assert 'resend_consumer_events_total{outcome="sent"' not in b.render().decode()
    snap = a.snapshot()
    assert (snap.events, snap.retries, snap.dead_letters, snap.lag) == (3, 1, 1, 7)


def test_forget_partition_drops_per_partition_series() -> None:
    """A revoked partition's lag and committed offset disappear (and forgetting twice is fine)."""
    m = Metrics()
    m.lag.labels(topic="t", partition="1").set(5)
    m.committed_offset.labels(topic="t", partition="1").set(9)
    m.forget_partition("t", 1)
    m.forget_partition("t", 1)
    text = m.render().decode()
    assert 'partition="1"' not in text


@pytest.mark.usefixtures("restore_logging")
def test_progress_reporter_logs_rates_between_ticks() -> None:
    """The progress line reports events/s and retries since the last tick, plus gauges."""
    buf = io.BytesIO()
    configure_logging(Settings(log_format="json"), stream=buf)
    clock, m = FakeClock(), Metrics()
    reporter = ProgressReporter(metrics=m, interval=10.0, clock=clock)
    m.events.labels(type="a", outcome="sent").inc(50)
    m.retries.labels(reason="5xx").inc(2)
    m.in_flight.set(4)
    clock.now += 10.0
    fields = reporter.tick()
    assert fields["events_per_s"] == 5.0
    assert (fields["retries"], fields["in_flight"]) == (2, 4)
    clock.now += 10.0
    assert reporter.tick()["retries"] == 0
    lines = json_lines(buf)
    assert [line["event"] for line in lines] == ["progress", "progress"]


# -- health ------------------------------------------------------------------------------


def test_health_states() -> None:
    """Liveness follows the poll clock; readiness lists every reason it is not ready."""
    clock = FakeClock()
    h = Health(liveness_window=60.0, clock=clock)
    assert h.live()[0]  # start counts as progress
    clock.now += 61
    live, info = h.live()
    assert not live
    assert info["seconds_since_poll"] == 61
    h.mark_poll()
    assert h.live()[0]

    ok, info = h.ready()
    assert not ok
    assert info["reasons"] == ["broker_unreachable", "no_partitions_assigned"]
    h.set_broker_ok(True)
    h.set_assigned(3)
    assert h.ready()[0]
    h.set_circuit(True, "quota")
    h.set_circuit(True, "auth")
    assert h.ready()[1]["reasons"] == ["circuit_open:auth", "circuit_open:quota"]
    h.set_circuit(False, "auth")
    assert h.ready()[1]["open_circuits"] == ["quota"]
    h.set_circuit(False, None)
    assert h.ready()[0]
    h.set_stopping()
    assert h.ready()[1]["reasons"] == ["stopping"]


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    """A real HealthServer on a free port."""
    srv = HealthServer(
        health=Health(liveness_window=60.0, clock=FakeClock()),
        metrics=Metrics(),
        host="127.0.0.1",
        port=0,
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_server_endpoints(server: HealthServer) -> None:
    """/healthz, /readyz answer 200/503 JSON; /metrics serves Prometheus text."""
    base = f"http://127.0.0.1:{server.port}"
    clock = server.health._clock
    assert isinstance(clock, FakeClock)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/healthz") as r:
            assert r.status == 200
            assert (await r.json())["live"] is True
        clock.now += 120
        async with http.get(base + "/healthz") as r:
            assert r.status == 503
        async with http.get(base + "/readyz") as r:
            assert r.status == 503
            assert "no_partitions_assigned" in (await r.json())["reasons"]
        server.health.set_broker_ok(True)
        server.health.set_assigned(1)
        async with http.get(base + "/readyz") as r:
            assert r.status == 200
            assert r.content_type == "application/json"
        server.metrics.in_flight.set(5)
        async with http.get(base + "/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == CONTENT_TYPE
            assert "resend_consumer_in_flight 5.0" in await r.text()
        async with http.get(base + "/nope") as r:
            assert r.status == 404


async def test_server_stop_frees_the_port() -> None:
    """After stop() nothing listens any more, and start on a taken port fails cleanly."""
    srv = HealthServer(health=Health(), metrics=Metrics(), host="127.0.0.1", port=0)
    await srv.start()
    port = srv.port
    clash = HealthServer(health=Health(), metrics=Metrics(), host="127.0.0.1", port=port)
    with pytest.raises(SettingsError, match=f"HEALTH_PORT={port}"):
        await clash.start()
    await srv.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz"):
            pass


async def test_health_command_exit_codes(
    server: HealthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resend-consumer health` exits 0 on 200, 1 on 503 and 1 when nothing listens."""
    settings = Settings(health_port=server.port, health_host="0.0.0.0")
    assert probe_url(settings, "ready") == f"http://127.0.0.1:{server.port}/readyz"

    def run(*argv: str) -> int:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return probe(settings, HealthArgs.from_namespace(parser.parse_args(argv)))

    assert await asyncio.to_thread(run, "--check", "ready") == 1
    assert "no_partitions_assigned" in capsys.readouterr().out
    assert await asyncio.to_thread(run, "--check", "live") == 0
    server.health.set_broker_ok(True)
    server.health.set_assigned(2)
    assert await asyncio.to_thread(run) == 0
    assert capsys.readouterr().out.startswith("200 ")
    await server.stop()
    assert await asyncio.to_thread(run, "--timeout", "1") == 1
    assert "resend-consumer health" in capsys.readouterr().err


async def test_health_command_takes_the_health_port_setting_flag(server: HealthServer) -> None:
    """With the CLI's settings flags, --health-port picks the port the probe goes to."""
    server.health.set_broker_ok(True)
    server.health.set_assigned(1)
    parser = argparse.ArgumentParser()
    cli._add_settings_flags(parser)
    add_arguments(parser)
    args = parser.parse_args(["--quiet", "--health-port", str(server.port)])
    options = HealthArgs.from_namespace(args)
    assert await asyncio.to_thread(probe, cli.settings_from(args), options) == 0


# -- the health server under hostile clients (issue 11, item 6) ---------------------

PARTIAL_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: probe\r\nX-Slow: "


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await reader.read()


async def test_half_open_connections_are_closed_and_healthz_still_answers() -> None:
    """Half-sent requests are closed after the header timeout; over the bound, 503 at once."""
    srv = HealthServer(
        health=Health(),
        metrics=Metrics(),
        host="127.0.0.1",
        port=0,
        header_timeout=0.5,
        max_connections=20,
    )
    await srv.start()
    writers: list[asyncio.StreamWriter] = []
    try:
        readers = []
        for _ in range(200):
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(PARTIAL_REQUEST)
            await writer.drain()
            readers.append(reader)
            writers.append(writer)
        # before the fix nothing closed these for an hour: bounded here by a generous wait
        answers = await asyncio.wait_for(
            asyncio.gather(*(read_to_eof(r) for r in readers)), timeout=30
        )
        busy = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        timed_out = [a for a in answers if a == b""]
        assert len(busy) + len(timed_out) == 200
        assert 0 < len(timed_out) <= 20
        assert len(busy) == srv.refused >= 180
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{srv.port}/healthz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{srv.port}/metrics") as r:
                assert r.status == 200
    finally:
        for writer in writers:
            writer.close()
        await srv.stop()


async def test_healthz_answers_while_connections_below_the_bound_are_held() -> None:
    """Held half-open connections under the bound do not stop /healthz and /metrics."""
    srv = HealthServer(
        health=Health(),
        metrics=Metrics(),
        host="127.0.0.1",
        port=0,
        header_timeout=60.0,
        max_connections=50,
    )
    await srv.start()
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(40):
            _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(PARTIAL_REQUEST)
            writers.append(writer)
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/metrics", "/readyz"):
                async with http.get(f"http://127.0.0.1:{srv.port}{path}") as r:
                    assert r.status in (200, 503)
                    assert await r.read()
        assert srv.open_connections >= 40
        assert srv.refused == 0
    finally:
        for writer in writers:
            writer.close()
        await srv.stop()


def test_default_bounds_are_set() -> None:
    """By default a request must arrive within 5 s and at most 128 connections are open."""
    srv = HealthServer(health=Health(), metrics=Metrics())
    assert (srv.header_timeout, srv.max_connections) == (5.0, 128)


def test_scrape_time_families_read_their_sources_at_each_render() -> None:
    """`ready` and the oldest event times come from the wiring's callables, read per scrape."""
    m = Metrics()
    assert "\nresend_consumer_ready " not in m.render().decode()  # not wired: no sample
    state = {"ready": False, "oldest": [("t", 2, 1_700_000_000.5)]}
    m.observe_readiness(lambda: bool(state["ready"]))
    m.observe_oldest_events(lambda: list(state["oldest"]))  # type: ignore[arg-type]
    text = m.render().decode()
    assert "\nresend_consumer_ready 0.0" in text
    assert 'resend_consumer_oldest_event_timestamp_seconds{partition="2",topic="t"} 1.7' in text
    state["ready"], state["oldest"] = True, []
    text = m.render().decode()
    assert "\nresend_consumer_ready 1.0" in text
    assert "resend_consumer_oldest_event_timestamp_seconds{" not in text


def test_metric_families_follow_prometheus_naming_conventions() -> None:
    """One prefix, base units (seconds, emails), `_total` on counters only, bounded labels."""
    from prometheus_client import Counter, Gauge, Histogram

    metrics = Metrics()
    bounded = {"type", "outcome", "status", "reason", "condition", "topic", "partition", "version"}
    families = list(metrics.registry.collect())
    assert families
    for family in families:
        assert family.name.startswith("resend_consumer_"), family.name
        if family.type == "counter":
            assert not family.name.endswith("_total")  # the exposition appends it
        elif family.type == "histogram":
            assert family.name.endswith(("_seconds", "_emails")), family.name
        else:
            assert not family.name.endswith("_total"), family.name
        assert not any(unit in family.name for unit in ("_ms", "_milliseconds", "_minutes"))
    for collector in metrics.registry._collector_to_names:
        if isinstance(collector, Counter | Gauge | Histogram):
            assert set(collector._labelnames) <= bounded, collector._labelnames
