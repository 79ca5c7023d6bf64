"""Preparer: records in, Prepared | Rejected | Skipped out; deterministic bytes; CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.commands.render import CheckArgs, RenderArgs
from consumer.commands.render import check as check_command
from consumer.commands.render import render as render_command
from consumer.errors import RoutesError
from consumer.events import Reason, parse_time
from consumer.exitcodes import EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE
from consumer.keys import is_valid_key
from consumer.prepare import (
    Prepared,
    Preparer,
    Rejected,
    Skipped,
    record_from_file,
)
from consumer.settings import Settings, StalePolicy
from tests.pipeline_support import read_all

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
EXAMPLES = SCHEMAS / "examples"
ORDER = json.loads((EXAMPLES / "order.confirmed.json").read_text())
ORDER_TIME = parse_time(ORDER["time"])
Headers = list[tuple[str, bytes]]


@pytest.fixture(scope="module")
def preparer() -> Preparer:
    """The shipped routes with an 8 KiB record limit and default age policy."""
    return Preparer.from_settings(
        Settings(routes_file=SCHEMAS / "routes.yaml", max_event_bytes=8192)
    )


def prepare(p: Preparer, value: bytes | None, headers: Headers | None = None, **kw: Any) -> Any:
    kw.setdefault("now", ORDER_TIME + 60)
    return p.prepare(
        value,
        headers or [],
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=kw.pop("ts", None),
        **kw,
    )


def order(mutate: Callable[[dict[str, Any]], object] | None = None) -> bytes:
    """The order.confirmed example, changed by `mutate` (which edits it in place)."""
    doc = copy.deepcopy(ORDER)
    if mutate is not None:
        mutate(doc)
    return orjson.dumps(doc)


def drop(*keys: str) -> Callable[[dict[str, Any]], object]:
    return lambda doc: [doc.pop(k) for k in keys]


def set_(path: str, value: Any) -> Callable[[dict[str, Any]], object]:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[last] = value

    return apply


def binary(value: bytes | None, **overrides: str | bytes | None) -> tuple[bytes | None, Headers]:
    headers: dict[str, str | bytes | None] = {
        "ce_specversion": "1.0",
        "ce_id": "bin-1",
        "ce_source": "https://shop.acme.example/orders",
        "ce_type": "order.confirmed",
        "ce_time": ORDER["time"],
        "content-type": "application/json",
    }
    headers.update(overrides)
    pairs = [
        (k, v if isinstance(v, bytes) else v.encode()) for k, v in headers.items() if v is not None
    ]
    return value, pairs


ORDER_DATA = orjson.dumps(ORDER["data"])

MALFORMED: list[tuple[str, bytes | None, Headers, Reason]] = [
    ("no value", None, [], Reason.EMPTY),
    ("empty value", b"", [], Reason.EMPTY),
    ("oversized", b"{" + b" " * 9000 + b"}", [], Reason.OVERSIZED),
    ("invalid byte", b"\xff", [], Reason.NOT_UTF8),
    ("truncated sequence", b'{"a": "\xc3"}', [], Reason.NOT_UTF8),
    ("latin-1 JSON", '{"a": "café"}'.encode("latin-1"), [], Reason.NOT_UTF8),
    ("plain text", b"order confirmed", [], Reason.NOT_JSON),
    ("unterminated", b'{"specversion": "1.0"', [], Reason.NOT_JSON),
    ("single quotes", b"{'id': 1}", [], Reason.NOT_JSON),
    ("NaN", b"NaN", [], Reason.NOT_JSON),
    ("trailing garbage", order() + b"}", [], Reason.NOT_JSON),
    ("array", b"[1, 2]", [], Reason.NOT_OBJECT),
    ("number", b"42", [], Reason.NOT_OBJECT),
    ("string", b'"order.confirmed"', [], Reason.NOT_OBJECT),
    ("boolean", b"true", [], Reason.NOT_OBJECT),
    ("no id", order(drop("id")), [], Reason.MISSING_FIELD),
    ("no type", order(drop("type")), [], Reason.MISSING_FIELD),
    ("no source", order(drop("source")), [], Reason.MISSING_FIELD),
    ("no specversion", order(drop("specversion")), [], Reason.MISSING_FIELD),
    ("specversion 2.0", order(set_("specversion", "2.0")), [], Reason.INVALID_ENVELOPE),
    ("numeric id", order(set_("id", 123)), [], Reason.INVALID_ENVELOPE),
    ("empty source", order(set_("source", "")), [], Reason.INVALID_ENVELOPE),
    ("bad time", order(set_("time", "last tuesday")), [], Reason.INVALID_ENVELOPE),
    ("naive time", order(set_("time", "2026-11-29T10:15:00")), [], Reason.INVALID_ENVELOPE),
    ("xml data", order(set_("datacontenttype", "text/xml")), [], Reason.UNSUPPORTED_CONTENT_TYPE),
    ("base64 data", order(set_("data_base64", "AAAA")), [], Reason.UNSUPPORTED_CONTENT_TYPE),
    ("unknown type", order(set_("type", "invoice.paid")), [], Reason.UNKNOWN_TYPE),
    ("no order_id", order(lambda d: d["data"].pop("order_id")), [], Reason.SCHEMA_VIOLATION),
    ("no items", order(set_("data.items", [])), [], Reason.SCHEMA_VIOLATION),
    ("total as text", order(set_("data.total_cents", "66.43")), [], Reason.SCHEMA_VIOLATION),
    ("null data", order(set_("data", None)), [], Reason.SCHEMA_VIOLATION),
    ("no data", order(drop("data")), [], Reason.SCHEMA_VIOLATION),
    ("bad currency", order(set_("data.currency", "euro")), [], Reason.SCHEMA_VIOLATION),
    (
        "negative quantity",
        order(lambda d: d["data"]["items"][0].update(quantity=-1)),
        [],
        Reason.SCHEMA_VIOLATION,
    ),
    ("bad recipient", order(set_("data.customer.email", "jane.doe")), [], Reason.INVALID_RECIPIENT),
    (
        "domain without dot",
        order(set_("data.customer.email", "jane@localhost")),
        [],
        Reason.INVALID_RECIPIENT,
    ),
    (
        "two addresses in one to value",
        order(set_("data.customer.email", "evil@attacker.example, <jane@example.com>")),
        [],
        Reason.INVALID_RECIPIENT,
    ),
    (
        "address list in one to value",
        order(set_("data.customer.email", "a@attacker.example; b@attacker.example")),
        [],
        Reason.INVALID_RECIPIENT,
    ),
    (
        "quoted address as display name",
        order(set_("data.customer.email", '"evil@attacker.example" <jane@example.com>')),
        [],
        Reason.INVALID_RECIPIENT,
    ),
    (
        "recipient header injection",
        order(set_("data.customer.email", "jane@example.com\r\nBcc: all@example.com")),
        [],
        Reason.CONTROL_CHARACTERS,
    ),
    (
        "subject CRLF",
        order(set_("data.order_number", "A-1\r\nBcc: x@example.com")),
        [],
        Reason.CONTROL_CHARACTERS,
    ),
    ("subject NUL", order(set_("data.order_number", "A-1\x00")), [], Reason.CONTROL_CHARACTERS),
    (
        "header value LF",
        order(set_("data.order_id", "ord-1\nX-Evil: 1")),
        [],
        Reason.CONTROL_CHARACTERS,
    ),
    ("binary: value not JSON", *binary(b"<xml/>"), Reason.NOT_JSON),
    ("binary: no ce_type", *binary(ORDER_DATA, ce_type=None), Reason.MISSING_FIELD),
    ("binary: header not UTF-8", *binary(ORDER_DATA, ce_source=b"\xff\xfe"), Reason.NOT_UTF8),
    ("binary: bad specversion", *binary(ORDER_DATA, ce_specversion="0.3"), Reason.INVALID_ENVELOPE),
    ("binary: unknown type", *binary(ORDER_DATA, ce_type="order.lost"), Reason.UNKNOWN_TYPE),
    ("binary: array data", *binary(b"[]"), Reason.SCHEMA_VIOLATION),
    ("binary: no value", *binary(None), Reason.SCHEMA_VIOLATION),
    (
        "binary: text content",
        *binary(ORDER_DATA, **{"content-type": "text/plain"}),
        Reason.UNSUPPORTED_CONTENT_TYPE,
    ),
    ("stale", order(set_("time", "2026-11-27T10:15:00Z")), [], Reason.STALE_EVENT),
    ("future time", order(set_("time", "2099-01-01T00:00:00Z")), [], Reason.INVALID_ENVELOPE),
    (
        "binary: future ce_time",
        *binary(ORDER_DATA, ce_time="2099-01-01T00:00:00Z"),
        Reason.INVALID_ENVELOPE,
    ),
]


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [pytest.param(v, h, r, id=name) for name, v, h, r in MALFORMED],
)
def test_malformed_records_are_rejected_with_reason(
    preparer: Preparer, value: bytes | None, headers: Headers, reason: Reason
) -> None:
    """Each malformed record gives Rejected with its stable reason code, never an exception."""
    result = prepare(preparer, value, headers)
    assert isinstance(result, Rejected), result
    assert result.reason == reason
    assert result.message
    assert "jane.doe@example.com" not in result.message


def test_table_has_at_least_thirty_cases() -> None:
    """The malformed-record table keeps its promised breadth."""
    assert len(MALFORMED) >= 30
    assert len({reason for *_, reason in MALFORMED}) >= 13


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=st.one_of(st.none(), st.binary(max_size=300), st.just(order())),
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type", "x"]
            ),
            st.binary(max_size=20),
        ),
        max_size=6,
    ),
)
def test_prepare_never_raises(preparer: Preparer, value: bytes | None, headers: Headers) -> None:
    """Property: arbitrary bytes and headers give a result with a proper reason, never a crash."""
    result = prepare(preparer, value, headers)
    assert isinstance(result, Prepared | Rejected | Skipped)
    if isinstance(result, Rejected):
        assert result.reason in set(Reason)
        assert result.reason != Reason.INTERNAL_ERROR, result.message


# -- mutated valid events: reach the route, key and render stages ------------------

EXAMPLE_DOCS: dict[str, Any] = {
    path.name: json.loads(path.read_text()) for path in sorted(EXAMPLES.glob("*.json"))
}


def json_paths(node: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every path to a value inside a JSON document (dict keys and list indexes)."""
    out: list[tuple[str | int, ...]] = []
    items: list[tuple[str | int, Any]] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    for key, child in items:
        out.append((*prefix, key))
        out.extend(json_paths(child, (*prefix, key)))
    return out


#: a minute after the latest example: every unmutated example is fresh, none is future-dated
EXAMPLES_NOW = parse_time("2026-11-29T10:46:30Z")
EXAMPLE_PATHS = {name: json_paths(doc) for name, doc in EXAMPLE_DOCS.items()}

tricky_strings = st.sampled_from(
    [
        "",
        " ",
        "\r\n",
        "\u2028",
        "@",
        "jane@example.com",
        "evil@attacker.example, <jane@example.com>",
        "{{ 7*7 }}",
        "{data.email}",
        "2099-01-01T00:00:00Z",
        "0001-01-01T00:00:00-12:00",
        "9999-12-31T23:59:59+14:00",
        "2026-11-29T10:15:00",
        "1.0",
        "application/json",
        "text/plain",
        "order.confirmed",
        "💌" * 40,
    ]
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.text(min_size=300, max_size=1500),
    tricky_strings,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


def like(original: Any) -> st.SearchStrategy[Any]:
    """Values of the original's JSON type: odd, long or unicode, but often schema-valid."""
    if isinstance(original, bool):
        return st.booleans()
    if isinstance(original, int):
        return st.integers(min_value=-(2**70), max_value=2**70)
    if isinstance(original, float):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(original, str):
        return st.one_of(
            tricky_strings,
            st.text(min_size=1, max_size=40),
            st.text(min_size=41, max_size=120),
            st.text(min_size=300, max_size=1500),
            st.from_regex(r"[a-z0-9._%+-]{1,20}@[a-z0-9-]{1,10}\.[a-z]{2,5}", fullmatch=True),
        )
    if isinstance(original, list):
        return st.lists(json_values, max_size=4)
    if isinstance(original, dict):
        return st.dictionaries(st.text(max_size=8), json_values, max_size=4)
    return json_values


@st.composite
def mutated_examples(draw: st.DrawFn) -> tuple[str, bytes | None, Headers]:
    """A shipped example with one to three values replaced (any JSON type) or removed."""
    name = draw(st.sampled_from(sorted(EXAMPLE_DOCS)))
    doc = copy.deepcopy(EXAMPLE_DOCS[name])
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        paths = json_paths(doc)
        data_paths = [p for p in paths if p[0] in ("data", "value")]
        # Mostly the data: envelope mutations stop at decode, data ones reach key and render.
        mostly_data: bool = draw(st.sampled_from([True, True, True, False]))
        if data_paths and mostly_data:
            paths = data_paths
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        try:
            for step in path[:-1]:
                parent = parent[step]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced this branch
        last = path[-1]
        kind = draw(st.sampled_from(["same type", "same type", "any", "remove"]))
        try:
            if kind == "remove" and isinstance(parent, dict):
                parent.pop(last, None)
            elif isinstance(parent, dict | list):
                # Same-typed values often pass the schema, so the key and render stages run.
                target: Any = parent  # a dict or a list: `last` is a key or an index
                strategy = like(target[last]) if kind == "same type" else json_values
                target[last] = draw(strategy)
        except (KeyError, IndexError):
            continue
    raw = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    value, headers = record_from_file(raw)
    return name, value, headers


def test_mutation_strategy_reaches_every_example_path() -> None:
    """The mutation strategy's path list covers data fields deep inside each example."""
    assert ("data", "customer", "email") in EXAMPLE_PATHS["order.confirmed.json"]
    assert ("headers", "ce_time") in EXAMPLE_PATHS["order.confirmed.binary.json"]
    assert ("value", "items", 0, "quantity") in EXAMPLE_PATHS["order.confirmed.binary.json"]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated_examples(), ts=st.sampled_from([None, -1, 0, int(ORDER_TIME * 1000)]))
def test_mutated_valid_events_never_crash(
    preparer: Preparer, case: tuple[str, bytes | None, Headers], ts: int | None
) -> None:
    """Property: valid examples with values swapped for other JSON give a proper reason code."""
    name, value, headers = case
    result = prepare(preparer, value, headers, ts=ts, now=EXAMPLES_NOW)
    assert isinstance(result, Prepared | Rejected | Skipped)
    if isinstance(result, Rejected):
        assert result.reason in set(Reason), (name, result)
        assert result.reason != Reason.INTERNAL_ERROR, (name, result.message)
    else:
        assert is_valid_key(result.idempotency_key) if isinstance(result, Prepared) else True


def test_example_order_prepares_exact_request(preparer: Preparer) -> None:
    """The order example gives the route's key, endpoint, recipients and sorted-key JSON."""
    result = prepare(preparer, order())
    assert isinstance(result, Prepared)
    assert result.idempotency_key == "order-confirmation:ord.5f01JDZ6K8Q4T7"
    assert result.endpoint == "/emails"
    assert result.recipients == ("jane.doe@example.com",)
    assert result.event_time == ORDER_TIME
    assert result.stale is False
    body = orjson.loads(result.body)
    assert list(body) == sorted(body)
    assert body["subject"] == "Your Acme order A-10042 is confirmed"
    assert "Socks &lt;3-pack&gt;" in body["html"]
    assert "66.43 EUR" in body["text"]
    assert result.body == orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def example_records() -> dict[str, tuple[bytes, Headers]]:
    return {
        path.name: record_from_file(path.read_bytes()) for path in sorted(EXAMPLES.glob("*.json"))
    }


def test_every_example_prepares_with_a_valid_key(preparer: Preparer) -> None:
    """Each shipped example (structured and binary) prepares; keys are valid and distinct."""
    records = example_records()
    assert len(records) >= 5
    keys = set()
    for name, (value, headers) in records.items():
        result = prepare(preparer, value, headers, enforce_age=False)
        assert isinstance(result, Prepared), (name, result)
        assert is_valid_key(result.idempotency_key)
        keys.add(result.idempotency_key)
    assert len(keys) == len(records)


def test_sensitive_key_part_is_hashed(preparer: Preparer) -> None:
    """The magic-link key hashes the address: it never appears in clear."""
    value, headers = example_records()["magic_link.requested.json"]
    result = prepare(preparer, value, headers, enforce_age=False)
    assert isinstance(result, Prepared)
    assert result.idempotency_key.startswith("magic-link:.sha256-")
    assert "noah" not in result.idempotency_key


def test_same_event_gives_same_bytes_every_attempt(preparer: Preparer) -> None:
    """Preparing one record many times gives identical key and body bytes."""
    results = {(r.idempotency_key, r.body) for r in (prepare(preparer, order()) for _ in range(20))}
    assert len(results) == 1


def test_binary_and_structured_forms_render_same_body(preparer: Preparer) -> None:
    """The same event in either mode gives the same key and body."""
    structured = prepare(preparer, order())
    value, headers = binary(ORDER_DATA, ce_id=ORDER["id"])
    in_binary = prepare(preparer, value, headers)
    assert isinstance(structured, Prepared)
    assert isinstance(in_binary, Prepared)
    assert (structured.idempotency_key, structured.body) == (
        in_binary.idempotency_key,
        in_binary.body,
    )


DUMP_SCRIPT = """
import sys
from pathlib import Path
from consumer.prepare import Preparer, record_from_file
from consumer.settings import Settings, StalePolicy
p = Preparer.from_settings(Settings(routes_file=Path(sys.argv[1])))
for path in sorted(Path(sys.argv[2]).glob("*.json")):
    value, headers = record_from_file(path.read_bytes())
    r = p.prepare(
        value, headers, topic="x", partition=9, offset=99, timestamp_ms=None, enforce_age=False
    )
    print(path.name, r.idempotency_key, r.body.hex())
"""


def test_bytes_identical_across_processes(preparer: Preparer) -> None:
    """Two fresh processes with different hash seeds produce the same keys and bytes as this one."""
    expected = []
    for name, (value, headers) in example_records().items():
        result = prepare(preparer, value, headers, enforce_age=False)
        assert isinstance(result, Prepared)
        expected.append(f"{name} {result.idempotency_key} {result.body.hex()}")
    outputs = []
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", DUMP_SCRIPT, str(SCHEMAS / "routes.yaml"), str(EXAMPLES)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            check=True,
            timeout=60,
        )
        outputs.append(done.stdout.splitlines())
    assert outputs[0] == expected
    assert outputs[1] == expected


# -- freshness -------------------------------------------------------------------


def with_policy(policy: StalePolicy) -> Preparer:
    return Preparer.from_settings(
        Settings(routes_file=SCHEMAS / "routes.yaml", stale_policy=policy)
    )


def test_stale_event_is_dead_lettered_by_default_with_its_key(preparer: Preparer) -> None:
    """Older than MAX_EVENT_AGE (23 h): Rejected(stale_event), still naming its key."""
    result = prepare(preparer, order(), now=ORDER_TIME + 23 * 3600 + 1)
    assert isinstance(result, Rejected)
    assert result.reason == Reason.STALE_EVENT
    assert result.idempotency_key == "order-confirmation:ord.5f01JDZ6K8Q4T7"
    fresh = prepare(preparer, order(), now=ORDER_TIME + 23 * 3600 - 1)
    assert isinstance(fresh, Prepared)


def test_stale_policy_skip_and_send() -> None:
    """STALE_POLICY=skip gives Skipped; send gives Prepared marked stale."""
    late = ORDER_TIME + 2 * 86400
    skipped = prepare(with_policy("skip"), order(), now=late)
    assert skipped == Skipped("stale_event", ORDER["id"], "order.confirmed")
    sent = prepare(with_policy("send"), order(), now=late)
    assert isinstance(sent, Prepared)
    assert sent.stale is True


def test_route_policy_overrides_age_and_policy(preparer: Preparer) -> None:
    """password_reset allows 1 h; magic_link skips after 15 min, whatever the settings say."""
    value, headers = example_records()["password_reset.requested.json"]
    reset_time = parse_time("2026-11-29T10:30:00Z")
    assert isinstance(prepare(preparer, value, headers, now=reset_time + 3500), Prepared)
    late = prepare(preparer, value, headers, now=reset_time + 3700)
    assert isinstance(late, Rejected)
    assert late.reason == Reason.STALE_EVENT
    value, headers = example_records()["magic_link.requested.json"]
    link_time = parse_time("2026-11-29T10:45:30.250Z")
    assert isinstance(prepare(with_policy("send"), value, headers, now=link_time + 901), Skipped)


def test_kafka_timestamp_used_when_event_has_no_time(preparer: Preparer) -> None:
    """Without a CloudEvents time, the record timestamp decides freshness."""
    value = order(drop("time"))
    fresh = prepare(preparer, value, ts=int(ORDER_TIME * 1000))
    assert isinstance(fresh, Prepared)
    assert fresh.event_time == ORDER_TIME
    stale = prepare(preparer, value, ts=int((ORDER_TIME - 86400) * 1000))
    assert isinstance(stale, Rejected)
    no_time = prepare(preparer, value, ts=-1)
    assert isinstance(no_time, Prepared)
    assert no_time.event_time is None


@pytest.mark.parametrize("policy", ["dead-letter", "skip", "send"])
@pytest.mark.parametrize(
    ("example", "event_time"),
    [
        ("order.confirmed.json", ORDER_TIME),  # settings: 23 h
        ("password_reset.requested.json", parse_time("2026-11-29T10:30:00Z")),  # route: 1 h
        (
            "magic_link.requested.json",
            parse_time("2026-11-29T10:45:30.250Z"),
        ),  # route: skip, 15 min
    ],
)
def test_stale_reason_is_the_admission_rule_applied_later(
    policy: StalePolicy, example: str, event_time: float
) -> None:
    """Prepared.stale_reason(t) refuses exactly when admission at t would have refused, alike."""
    p = with_policy(policy)
    value, headers = example_records()[example]
    prepared = prepare(p, value, headers, now=event_time + 1)
    assert isinstance(prepared, Prepared)
    for later in (60.0, 899.0, 901.0, 3599.0, 3601.0, 23 * 3600 - 1, 23 * 3600 + 1, 3 * 86400):
        now = event_time + later
        admitted = prepare(p, value, headers, now=now)
        refused = isinstance(admitted, Rejected | Skipped)
        if refused:
            assert admitted.reason == Reason.STALE_EVENT
            expected = "skipped" if isinstance(admitted, Skipped) else "dead_lettered"
            assert prepared.stale_outcome == expected
        assert prepared.stale_reason(now) == (Reason.STALE_EVENT.value if refused else None), later


def test_stale_reason_never_refuses_unknown_ages_send_or_dry_runs(preparer: Preparer) -> None:
    """No usable time, STALE_POLICY=send, or enforce_age=False: never stale later either."""
    far = ORDER_TIME + 10 * 86400
    no_time = prepare(preparer, order(drop("time")), ts=-1)
    sent = prepare(with_policy("send"), order())
    dry = prepare(preparer, order(), enforce_age=False)
    defaults = prepare(preparer, order())
    for prepared in (no_time, sent, dry):
        assert isinstance(prepared, Prepared)
        assert prepared.stale_reason(far) is None
    assert isinstance(defaults, Prepared)
    assert defaults.stale_reason(far) == Reason.STALE_EVENT.value
    assert (defaults.max_age, defaults.stale_policy) == (23 * 3600.0, "dead-letter")


NOW = ORDER_TIME + 60
FUTURE = "2099-01-01T00:00:00Z"
FUTURE_MS = int(parse_time(FUTURE) * 1000)


def at(seconds_from_now: float) -> str:
    """An RFC 3339 time `seconds_from_now` after NOW."""
    return datetime.fromtimestamp(NOW + seconds_from_now, tz=UTC).isoformat()


#: (name, event time or None to drop it, record timestamp ms, expected result, time used)
FRESHNESS: list[tuple[str, str | None, int | None, type | Reason, float | None]] = [
    ("time within skew", at(299), None, Prepared, NOW + 299),
    ("time just past skew, no timestamp", at(301), None, Reason.INVALID_ENVELOPE, None),
    ("future time, timestamp -1", FUTURE, -1, Reason.INVALID_ENVELOPE, None),
    ("future time, future timestamp", FUTURE, FUTURE_MS, Reason.INVALID_ENVELOPE, None),
    ("future time, sane timestamp", FUTURE, int((NOW - 60) * 1000), Prepared, NOW - 60),
    ("future time, old timestamp", FUTURE, int((NOW - 2 * 86400) * 1000), Reason.STALE_EVENT, None),
    ("no time, no timestamp: age unknown", None, None, Prepared, None),
    ("no time, timestamp -1: age unknown", None, -1, Prepared, None),
    ("no time, future timestamp: age unknown", None, FUTURE_MS, Prepared, None),
    ("no time, sane timestamp", None, int((NOW - 5) * 1000), Prepared, NOW - 5),
]


@pytest.mark.parametrize(
    ("time_", "ts", "expected", "used"),
    [pytest.param(t, ts, e, u, id=name) for name, t, ts, e, u in FRESHNESS],
)
def test_freshness_rules(
    preparer: Preparer, time_: str | None, ts: int | None, expected: Any, used: float | None
) -> None:
    """A time over 5 min ahead is not trusted: a sane record timestamp stands in, else rejected."""
    value = order(drop("time") if time_ is None else set_("time", time_))
    result = prepare(preparer, value, ts=ts, now=NOW)
    if isinstance(expected, Reason):
        assert isinstance(result, Rejected), result
        assert result.reason == expected
        assert result.idempotency_key == "order-confirmation:ord.5f01JDZ6K8Q4T7"
        if expected == Reason.INVALID_ENVELOPE:
            assert "in the future" in result.message
    else:
        assert isinstance(result, expected), result
        assert result.event_time == pytest.approx(used)


def test_future_time_is_rendered_by_dry_runs(preparer: Preparer) -> None:
    """enforce_age=False (render, check) does not judge the event time at all."""
    result = prepare(preparer, order(set_("time", FUTURE)), enforce_age=False)
    assert isinstance(result, Prepared)
    assert result.event_time == parse_time(FUTURE)


def test_enforce_age_off_ignores_freshness(preparer: Preparer) -> None:
    """Dry runs (enforce_age=False) render old events instead of refusing them."""
    assert isinstance(
        prepare(preparer, order(), now=ORDER_TIME + 10 * 86400, enforce_age=False), Prepared
    )


# -- policies and failures ---------------------------------------------------------


def shipped_copy(folder: Path) -> str:
    """Copy the shipped schemas and templates (not the examples) into folder; the routes text.

    A routes file reaches only files in its own folder, so a changed copy of
    the shipped routes needs the schemas and templates beside it.
    """
    for schema in SCHEMAS.glob("*.json"):
        shutil.copy(schema, folder / schema.name)
    shutil.copytree(SCHEMAS / "templates", folder / "templates")
    return (SCHEMAS / "routes.yaml").read_text()


def test_unknown_type_skip_policy(tmp_path: Path) -> None:
    """policies.unknown_type: skip turns unknown event types into Skipped."""
    text = shipped_copy(tmp_path).replace("unknown_type: dead-letter", "unknown_type: skip")
    (tmp_path / "routes.yaml").write_text(text)
    p = Preparer.from_settings(Settings(routes_file=tmp_path / "routes.yaml"))
    result = prepare(p, order(set_("type", "invoice.paid")))
    assert result == Skipped("unknown_type", ORDER["id"], "invoice.paid")


def test_unexpected_exception_is_internal_error(preparer: Preparer) -> None:
    """A bug inside the pipeline gives Rejected(internal_error) instead of raising."""
    route = preparer.table.routes["order.confirmed"]

    def broken(_: Any) -> None:
        raise RuntimeError("boom with secret@example.com")

    broken_table = dataclasses.replace(
        preparer.table,
        routes={
            **preparer.table.routes,
            "order.confirmed": dataclasses.replace(route, validator=broken),
        },
    )
    p = Preparer(
        table=broken_table, max_event_bytes=8192, max_event_age=3600.0, stale_policy="dead-letter"
    )
    result = prepare(p, order())
    assert isinstance(result, Rejected)
    assert result.reason == Reason.INTERNAL_ERROR
    assert "secret" not in result.message
    assert "rejected=1" in repr(p)


def test_rejection_message_masks_addresses(preparer: Preparer) -> None:
    """Messages quoting a bad recipient mask it."""
    result = prepare(preparer, order(set_("data.customer.email", "jane.doe@example")))
    assert isinstance(result, Rejected)
    assert "jane.doe" not in result.message
    assert "ja***@example" in result.message
    no_at = prepare(preparer, order(set_("data.customer.email", "jane.doe")))
    assert isinstance(no_at, Rejected)
    assert "jane" not in no_at.message


def test_invalid_routes_file_refuses_to_build(tmp_path: Path) -> None:
    """Preparer.from_settings raises RoutesError naming the file for a broken routes file."""
    bad = tmp_path / "routes.yaml"
    bad.write_text("routes: {}\n")
    with pytest.raises(RoutesError, match=str(bad)):
        Preparer.from_settings(Settings(routes_file=bad))


# -- CLI ---------------------------------------------------------------------------


def test_render_prints_key_and_exact_body(
    capsysbinary: pytest.CaptureFixture[bytes], preparer: Preparer
) -> None:
    """`render EVENT.json` prints POST /emails, the key and the body bytes; exit 0."""
    path = EXAMPLES / "order.confirmed.binary.json"
    code = render_command(
        Settings(routes_file=SCHEMAS / "routes.yaml"), RenderArgs(event=str(path))
    )
    out = capsysbinary.readouterr().out
    value, headers = record_from_file(path.read_bytes())
    expected = prepare(preparer, value, headers, enforce_age=False)
    assert isinstance(expected, Prepared)
    assert code == EXIT_OK
    assert out == (
        b"POST /emails\nIdempotency-Key: "
        + expected.idempotency_key.encode()
        + b"\n\n"
        + expected.body
        + b"\n"
    )


def test_render_bad_input_exits_3_with_reason_json(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """Bad input exits 3 and prints {"reason", "message"} as JSON on stderr."""
    path = tmp_path / "bad.json"
    path.write_bytes(order(set_("data.customer.email", "nobody")))
    code = render_command(
        Settings(routes_file=SCHEMAS / "routes.yaml"), RenderArgs(event=str(path))
    )
    captured = capsysbinary.readouterr()
    assert code == EXIT_BAD_INPUT
    assert captured.out == b""
    assert orjson.loads(captured.err)["reason"] == "invalid_recipient"


def test_render_stale_only_with_enforce_age(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """render ignores age by default; --enforce-age applies the stale policy."""
    path = tmp_path / "old.json"
    path.write_bytes(order(set_("time", "2020-01-01T00:00:00Z")))
    settings_ = Settings(routes_file=SCHEMAS / "routes.yaml")
    assert render_command(settings_, RenderArgs(event=str(path), enforce_age=False)) == EXIT_OK
    capsysbinary.readouterr()
    assert (
        render_command(settings_, RenderArgs(event=str(path), enforce_age=True)) == EXIT_BAD_INPUT
    )
    assert orjson.loads(capsysbinary.readouterr().err)["reason"] == "stale_event"


def test_check_passes_on_shipped_files(capsys: pytest.CaptureFixture[str]) -> None:
    """`check` loads routes, schemas and templates and renders every example: exit 0."""
    code = check_command(Settings(routes_file=SCHEMAS / "routes.yaml"), CheckArgs())
    assert code == EXIT_OK
    assert "4 routes" in capsys.readouterr().out


def test_check_warns_when_age_exceeds_resend_window(capsys: pytest.CaptureFixture[str]) -> None:
    """MAX_EVENT_AGE above 24 h passes check but prints a warning about duplicates."""
    settings_ = Settings(routes_file=SCHEMAS / "routes.yaml", max_event_age=25 * 3600.0)
    assert check_command(settings_, CheckArgs(examples=False)) == EXIT_OK
    assert "24 h idempotency window" in capsys.readouterr().err


def test_check_fails_with_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`check` exits 2 naming the file, route and field of a broken routes file."""
    text = shipped_copy(tmp_path)
    text = text.replace('"welcome:{data.user_id}"', '"welcome"')
    (tmp_path / "routes.yaml").write_text(text)
    code = check_command(Settings(routes_file=tmp_path / "routes.yaml"), CheckArgs())
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "route 'user.signed_up': field 'idempotency_key'" in err


def test_check_fails_on_a_broken_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` renders the examples folder and reports an example that does not prepare."""
    text = shipped_copy(tmp_path)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "broken.json").write_bytes(order(set_("data.items", [])))
    (tmp_path / "routes.yaml").write_text(text)
    code = check_command(Settings(routes_file=tmp_path / "routes.yaml"), CheckArgs())
    assert code == EXIT_USAGE
    assert "broken.json: schema_violation" in capsys.readouterr().err


# -- through a real broker -----------------------------------------------------------


@pytest.mark.kafka
async def test_records_from_kafka_prepare_like_files(
    preparer: Preparer, kafka_bootstrap: str, new_topic: Any, produce: Any
) -> None:
    """Examples produced to a real topic, headers and all, prepare to the same bytes as files."""
    topic = await new_topic(partitions=1)
    records = example_records()
    await produce(topic, [(None, value, headers) for value, headers in records.values()])
    got = await read_all(kafka_bootstrap, topic, len(records), timeout=60)
    assert len(got) == len(records)
    for message, (name, (value, headers)) in zip(got, records.items(), strict=True):
        from_kafka = preparer.prepare(
            message.value,
            list(message.headers),
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            timestamp_ms=message.timestamp,
            enforce_age=False,
        )
        from_file = prepare(preparer, value, headers, enforce_age=False)
        assert isinstance(from_kafka, Prepared), (name, from_kafka)
        assert isinstance(from_file, Prepared)
        assert (from_kafka.idempotency_key, from_kafka.body) == (
            from_file.idempotency_key,
            from_file.body,
        )


def test_cli_entry_point_render_and_check() -> None:
    """`python -m consumer render|check` wire through cli.py: exit codes 0, 3 and 2."""
    env = {k: v for k, v in os.environ.items() if k != "ROUTES_FILE"}

    def run(*args: str, stdin: str = "", **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "consumer", *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**env, **extra},
            timeout=60,
            check=False,
        )

    rendered = run("render", "schemas/examples/user.signed_up.json")
    assert rendered.returncode == EXIT_OK, rendered.stderr
    assert rendered.stdout.startswith("POST /emails\nIdempotency-Key: welcome:usr.5f5522\n\n{")
    bad = run("render", "-", "--max-event-bytes", "10", stdin=order().decode())
    assert bad.returncode == EXIT_BAD_INPUT
    assert json.loads(bad.stderr)["reason"] == "oversized"
    checked = run("check")
    assert checked.returncode == EXIT_OK, checked.stderr
    broken = run("check", ROUTES_FILE="/nonexistent/routes.yaml")
    assert broken.returncode == EXIT_USAGE
    assert "/nonexistent/routes.yaml" in broken.stderr


def test_run_refuses_to_start_with_a_broken_routes_file(tmp_path: Path) -> None:
    """`python -m consumer run` exits 2 naming a broken ROUTES_FILE, before contacting Kafka."""
    broken = tmp_path / "routes.yaml"
    broken.write_text("routes: [oops\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KAFKA_", "RESEND_", "ROUTES_", "HEALTH_"))
    }
    env.update(
        ROUTES_FILE=str(broken),
        RESEND_API_KEY="re_dummy",
        # Nothing listens on port 9: reaching Kafka first would hang or fail differently.
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9",
    )
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == EXIT_USAGE, done.stderr
    assert str(broken) in done.stderr
    assert "not valid YAML" in done.stderr
    assert "re_dummy" not in done.stderr + done.stdout


TRACEPARENT_HEADER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("headers", "tag"),
    [
        ([("traceparent", TRACEPARENT_HEADER.encode())], TRACEPARENT_HEADER[3:-3]),
        ([("ce_traceparent", TRACEPARENT_HEADER.encode())], TRACEPARENT_HEADER[3:-3]),
        # later versions may append fields; version ff and all-zero ids are invalid
        ([("traceparent", (TRACEPARENT_HEADER.replace("00-", "01-", 1) + "-x").encode())], None),
        ([("traceparent", TRACEPARENT_HEADER.replace("00-", "ff-", 1).encode())], None),
        ([("traceparent", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01")], None),
        ([("traceparent", b"garbage")], None),
        ([("traceparent", b"\xff\xfe")], None),
        ([], None),
    ],
)
def test_the_producers_trace_context_becomes_the_rc_trace_tag(
    preparer: Preparer, headers: Headers, tag: str | None
) -> None:
    """The record's traceparent (never one made up here: the bytes must repeat) is
    tagged on the email so its delivery feedback continues the trace."""
    first = prepare(preparer, order(), headers)
    again = prepare(preparer, order(), headers)
    assert isinstance(first, Prepared)
    assert first.body == again.body
    tags = {t["name"]: t["value"] for t in orjson.loads(first.body)["tags"]}
    if tag is None and headers and headers[0][1].startswith(b"01-"):
        tag = TRACEPARENT_HEADER[3:-3]  # a later version's first four fields still count
    assert tags.get("rc_trace") == tag
