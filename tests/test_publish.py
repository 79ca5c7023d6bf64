"""`resend-consumer publish` against a real Kafka broker, plus its pure envelope logic."""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer import cli, publish
from consumer.commands import publish as publish_command
from consumer.errors import BadInput
from consumer.exitcodes import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE
from consumer.publish import build_envelope, kafka_key, parse_input, to_record
from consumer.settings import Settings
from tests.pipeline_support import end_offsets, read_all

pytestmark = pytest.mark.kafka


class TTYStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def parse(*argv: str) -> publish_command.PublishArgs:
    parser = argparse.ArgumentParser()
    cli._add_settings_flags(parser)
    publish_command.add_arguments(parser)
    return publish_command.PublishArgs.from_namespace(parser.parse_args(argv))


async def run(bootstrap: str, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    """Run the publish command as the CLI would; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    settings = Settings(kafka_bootstrap_servers=bootstrap)
    code = await publish_command.publish(
        settings, parse(*argv), asyncio.Event(), stdin=io.StringIO(stdin), stdout=out, stderr=err
    )
    return code, out.getvalue(), err.getvalue()


# -- against the broker ------------------------------------------------------------------


async def test_one_event_from_arguments_gets_a_full_envelope(
    kafka_bootstrap: str, new_topic: Callable[..., Any]
) -> None:
    """--type/--data publish one structured CloudEvent keyed by the first *_id data field."""
    topic = await new_topic()
    code, out, err = await run(
        kafka_bootstrap,
        "--topic",
        topic,
        "--type",
        "order.placed",
        "--data",
        '{"customer": "x", "order_id": "o-42", "user_id": "u-1"}',
    )
    assert (code, err) == (0, "")
    assert re.match(rf"published 1 event\(s\) to {topic} in \d+\.\d\ds", out)
    (record,) = await read_all(kafka_bootstrap, topic, 1)
    event = orjson.loads(record.value)
    assert record.key == b"o-42"
    assert dict(record.headers)["content-type"] == publish.STRUCTURED_CONTENT_TYPE.encode()
    assert event["type"] == "order.placed"
    assert event["specversion"] == "1.0"
    assert event["source"] == "resend-consumer/publish"
    assert event["datacontenttype"] == "application/json"
    assert uuid.UUID(event["id"]).version == 4
    assert event["time"].endswith("Z")
    assert event["data"] == {"customer": "x", "order_id": "o-42", "user_id": "u-1"}


async def test_file_of_envelopes_keeps_given_fields_and_keys_by_subject(
    kafka_bootstrap: str, new_topic: Callable[..., Any], tmp_path: Path
) -> None:
    """A JSON array file keeps each event's id, time and source; subject becomes the key."""
    topic = await new_topic(partitions=3)
    events = [
        {
            "specversion": "1.0",
            "id": f"evt-{i}",
            "source": "shop",
            "type": "order.placed",
            "time": "2026-01-02T03:04:05Z",
            "subject": f"order/{i % 2}",
            "data": {"order_id": str(i)},
        }
        for i in range(6)
    ]
    path = tmp_path / "events.json"
    path.write_bytes(orjson.dumps(events))
    code, _, err = await run(kafka_bootstrap, "--topic", topic, "--file", str(path))
    assert (code, err) == (0, "")
    records = await read_all(kafka_bootstrap, topic, 6)
    got = {orjson.loads(r.value)["id"]: r for r in records}
    assert set(got) == {f"evt-{i}" for i in range(6)}
    for i in range(6):
        record = got[f"evt-{i}"]
        assert record.key == f"order/{i % 2}".encode()
        event = orjson.loads(record.value)
        assert (event["time"], event["source"]) == ("2026-01-02T03:04:05Z", "shop")
    # one entity, one partition: its events stay in order
    for subject in (b"order/0", b"order/1"):
        assert len({r.partition for r in records if r.key == subject}) == 1


async def test_stdin_json_lines_in_binary_mode(
    kafka_bootstrap: str, new_topic: Callable[..., Any]
) -> None:
    """`-` reads JSON lines; --binary puts attributes in ce_ headers and the data in the value."""
    topic = await new_topic()
    lines = "\n".join(
        orjson.dumps({"type": "user.signed_up", "data": {"user": {"id": f"u{i}"}}}).decode()
        for i in range(3)
    )
    code, out, _ = await run(
        kafka_bootstrap,
        "-",
        "--topic",
        topic,
        "--binary",
        "--key-field",
        "data.user.id",
        "--source",
        "tests",
        stdin=lines + "\n\n",
    )
    assert code == 0
    assert "published 3 event(s)" in out
    records = await read_all(kafka_bootstrap, topic, 3)
    assert [r.key for r in records] == [b"u0", b"u1", b"u2"]
    headers = dict(records[0].headers)
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_type"] == b"user.signed_up"
    assert headers["ce_source"] == b"tests"
    assert headers["content-type"] == b"application/json"
    assert "ce_id" in headers
    assert "ce_time" in headers
    assert "ce_data" not in headers
    assert orjson.loads(records[1].value) == {"user": {"id": "u1"}}


async def test_bad_lines_are_reported_and_nothing_is_published(
    kafka_bootstrap: str, new_topic: Callable[..., Any]
) -> None:
    """A bad line anywhere stops the whole input: exit 3, line numbers named, topic empty."""
    topic = await new_topic()
    stdin = "\n".join(
        [
            '{"type": "a", "data": {"x_id": 1}}',
            "{not json",
            '{"type": "a", "data": {}}',
            '{"data": {"no": "type"}, "specversion": "1.0"}',
            '{"type": "a", "data": [1, 2]}',
        ]
    )
    code, out, err = await run(kafka_bootstrap, "--stdin", "--topic", topic, stdin=stdin)
    assert code == EXIT_BAD_INPUT
    assert out == ""
    assert "nothing published" in err
    assert "line 2: not JSON" in err
    assert "line 4: type must be a non-empty string" in err
    assert "line 5: data must be a JSON object" in err
    assert "line 1" not in err
    assert "line 3" not in err
    assert await end_offsets(kafka_bootstrap, topic, 1) == {0: 0}


async def test_count_makes_distinct_copies_with_a_progress_bar(
    kafka_bootstrap: str, new_topic: Callable[..., Any]
) -> None:
    """--count N publishes N events, `{n}` numbering each; --progress draws a bar on stderr."""
    topic = await new_topic(partitions=2)
    code, out, err = await run(
        kafka_bootstrap,
        "--topic",
        topic,
        "--type",
        "order.placed",
        "--data",
        '{"order_id": "o-{n}"}',
        "--count",
        "250",
        "--progress",
    )
    assert code == 0
    assert "published 250 event(s)" in out
    assert "250/250 100%" in err
    assert err.startswith("\r[")
    records = await read_all(kafka_bootstrap, topic, 250)
    events = [orjson.loads(r.value) for r in records]
    assert len({e["id"] for e in events}) == 250
    assert {e["data"]["order_id"] for e in events} == {f"o-{n}" for n in range(250)}
    assert {r.key for r in records} == {f"o-{n}".encode() for n in range(250)}


async def test_stop_event_interrupts_publishing(
    kafka_bootstrap: str, new_topic: Callable[..., Any]
) -> None:
    """A set stop event publishes nothing more and reports the interruption (exit 130)."""
    topic = await new_topic()
    stop = asyncio.Event()
    stop.set()
    out, err = io.StringIO(), TTYStringIO()
    code = await publish_command.publish(
        Settings(kafka_bootstrap_servers=kafka_bootstrap),
        parse("--topic", topic, "--type", "a", "--count", "5"),
        stop,
        stdout=out,
        stderr=err,
    )
    assert code == EXIT_INTERRUPTED
    assert "published 0 event(s)" in out.getvalue()
    assert "interrupted after 0 of 5" in err.getvalue()
    assert "0/5" in err.getvalue()  # a terminal gets the bar without --progress
    assert await end_offsets(kafka_bootstrap, topic, 1) == {0: 0}


async def test_unreachable_broker_fails_with_one_clear_line() -> None:
    """No broker: exit 1 with a one-line message, not a traceback."""
    out, err = io.StringIO(), io.StringIO()
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1")
    code = await publish_command.publish(
        settings, parse("--type", "a"), asyncio.Event(), stdout=out, stderr=err
    )
    assert code == EXIT_FAILURE
    assert "failed to publish to domain-events" in err.getvalue()
    assert "Traceback" not in err.getvalue()


# -- pure logic --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "nothing to publish"),
        (("--data", "{}"), "--data needs --type"),
        (("--stdin", "--file", "x.json"), "give one input"),
        (("--type", "a", "--count", "0"), "--count must be at least 1"),
    ],
)
async def test_usage_errors(argv: tuple[str, ...], message: str) -> None:
    """Conflicting or missing inputs exit 2 before touching Kafka."""
    err = io.StringIO()
    code = await publish_command.publish(
        Settings(kafka_bootstrap_servers="127.0.0.1:1"),
        parse(*argv),
        asyncio.Event(),
        stdout=io.StringIO(),
        stderr=err,
    )
    assert code == EXIT_USAGE
    assert message in err.getvalue()


def test_build_envelope_fills_and_checks() -> None:
    """Missing attributes are filled, given ones kept, malformed ones rejected."""
    event = build_envelope({"a": 1}, event_type="t", now="2026-01-01T00:00:00.000Z")
    assert event == {
        "data": {"a": 1},
        "type": "t",
        "specversion": "1.0",
        "id": event["id"],
        "time": "2026-01-01T00:00:00.000Z",
        "source": "resend-consumer/publish",
        "datacontenttype": "application/json",
    }
    kept = build_envelope({"type": "x", "data": {}, "id": "given"}, event_type="other")
    assert (kept["id"], kept["type"]) == ("given", "x")
    with pytest.raises(ValueError, match="not an event"):
        build_envelope({"a": 1})
    with pytest.raises(ValueError, match="specversion"):
        build_envelope({"specversion": "0.3", "type": "x", "data": {}})
    with pytest.raises(ValueError, match="RFC 3339"):
        build_envelope({"type": "x", "data": {}, "time": "yesterday"})
    with pytest.raises(ValueError, match="JSON object"):
        build_envelope([1], event_type="x")


def test_kafka_key_rules() -> None:
    """Key: explicit path, else subject, else first data *_id, else none."""
    event = {"subject": "s", "data": {"name": "n", "order_id": 7, "user_id": "u"}}
    assert kafka_key(event) == b"s"
    assert kafka_key({"data": event["data"]}) == b"7"
    assert kafka_key({"data": {"name": "n"}}) is None
    assert kafka_key(event, "data.user_id") == b"u"
    assert kafka_key({"data": {"items": [{"sku": "k"}]}}, "data.items.0.sku") == b"k"
    with pytest.raises(ValueError, match="missing"):
        kafka_key(event, "data.nope")
    with pytest.raises(ValueError, match="scalar"):
        kafka_key(event, "data")


def test_parse_input_shapes() -> None:
    """One object, an array, JSON lines, and a broken document with its line number."""
    assert parse_input('{"a": 1}', lines=False) == ([(1, {"a": 1})], [])
    assert parse_input("[1, 2]", lines=False) == ([(1, 1), (2, 2)], [])
    assert parse_input('{"a": 1}\n{"b": 2}\n', lines=False) == ([(1, {"a": 1}), (2, {"b": 2})], [])
    items, problems = parse_input('{\n  "a": 1,\n  "b": \n}\n', lines=False)
    assert items == []
    assert [n for n, _ in problems] == [4]
    with pytest.raises(BadInput, match="line 3"):
        raise BadInput([(3, "x")])


def test_binary_record_carries_extensions_as_headers() -> None:
    """Extension attributes become ce_ headers too; datacontenttype is content-type."""
    event = build_envelope({"type": "t", "data": {"k": 1}, "tenant": "acme"})
    record = to_record(event, key=None, binary=True)
    headers = dict(record.headers)
    assert headers["ce_tenant"] == b"acme"
    assert headers["content-type"] == b"application/json"
    assert record.value == b'{"k":1}'


def test_binary_form_examples_are_published_in_binary_mode() -> None:
    """A {"headers", "value"} example keeps its ce_ attributes and stays binary."""
    example = {
        "headers": {
            "ce_specversion": "1.0",
            "ce_id": "given-id",
            "ce_source": "shop",
            "ce_type": "order.confirmed",
            "ce_subject": "ord_1",
            "content-type": "application/json",
        },
        "value": {"order_id": "ord_1"},
    }
    (record,) = publish.build_records(
        [(1, example)], event_type=None, source="x", key_field=None, binary=False
    )
    headers = dict(record.headers)
    assert headers["ce_id"] == b"given-id"
    assert headers["ce_source"] == b"shop"
    assert "ce_time" in headers
    assert record.key == b"ord_1"
    assert orjson.loads(record.value) == {"order_id": "ord_1"}


def test_every_shipped_example_is_publishable() -> None:
    """Each file in schemas/examples becomes events without errors, ids kept."""
    examples = sorted((Path(__file__).parent.parent / "schemas" / "examples").glob("*.json"))
    assert examples
    for path in examples:
        items, problems = parse_input(path.read_text(), lines=False)
        assert problems == [], path
        records = publish.build_records(
            items, event_type=None, source="x", key_field=None, binary=False
        )
        assert records, path
        for obj, record in zip((o for _, o in items), records, strict=True):
            given = obj.get("id") or obj.get("headers", {}).get("ce_id")
            if given:
                assert given.encode() in record.value + b"".join(v for _, v in record.headers)


def test_fresh_time_replaces_the_given_time_only_when_asked() -> None:
    """A given time is kept; --fresh-time stamps now, in structured and binary form alike."""
    given = {"type": "x", "data": {}, "time": "2026-11-29T10:15:00Z"}
    assert build_envelope(given)["time"] == "2026-11-29T10:15:00Z"
    now = "2030-01-02T03:04:05.000Z"
    assert build_envelope(given, now=now, fresh_time=True)["time"] == now
    examples = Path(__file__).parent.parent / "schemas" / "examples"
    before = publish._now_rfc3339()
    for path in sorted(examples.glob("*.json")):
        items, _ = parse_input(path.read_text(), lines=False)
        (record,) = publish.build_records(
            items, event_type=None, source="x", key_field=None, binary=False, fresh_time=True
        )
        headers = dict(record.headers)
        stamped = headers["ce_time"].decode() if "ce_time" in headers else None
        stamped = stamped or orjson.loads(record.value)["time"]
        assert stamped >= before, path


def test_fresh_time_is_a_flag_of_the_command() -> None:
    """`publish --fresh-time` parses; without it nothing is restamped."""
    assert parse("--file", "x.json", "--fresh-time").fresh_time is True
    assert parse("--file", "x.json").fresh_time is False
