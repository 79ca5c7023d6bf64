"""Decoding CloudEvents records: structured and Kafka binary mode, with reason codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.errors import InvalidEvent
from consumer.events import (
    Decoder,
    Event,
    FieldPath,
    Reason,
    compile_schema,
    has_control_characters,
    load_json_file,
    parse_time,
    validate_data,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    """A decoder with the shipped envelope schema and a 4 KiB size limit."""
    envelope = compile_schema(load_json_file(SCHEMAS / "envelope.schema.json"))
    return Decoder(envelope=envelope, max_bytes=4096)


def structured(**overrides: Any) -> bytes:
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "https://auth.acme.example",
        "type": "user.signed_up",
        "time": "2026-11-29T10:00:00Z",
        "data": {"user_id": "u1", "email": "a@example.com", "name": "A"},
    }
    doc.update(overrides)
    return orjson.dumps({k: v for k, v in doc.items() if v is not None})


def binary_headers(**overrides: str | None) -> list[tuple[str, bytes]]:
    headers: dict[str, str | None] = {
        "ce_specversion": "1.0",
        "ce_id": "evt-2",
        "ce_source": "https://auth.acme.example",
        "ce_type": "user.signed_up",
        "ce_time": "2026-11-29T10:00:00+01:00",
        "content-type": "application/json",
    }
    headers.update(overrides)
    return [(k, v.encode()) for k, v in headers.items() if v is not None]


def reason_of(decoder: Decoder, value: bytes | None, headers: Any = ()) -> str:
    with pytest.raises(InvalidEvent) as info:
        decoder.decode(value, list(headers))
    return info.value.reason


def test_structured_event_decodes_with_epoch_time(decoder: Decoder) -> None:
    """A structured-mode record gives an Event whose time is epoch seconds."""
    event = decoder.decode(structured(subject="u1"), [])
    assert (event.id, event.type, event.mode, event.subject) == (
        "evt-1",
        "user.signed_up",
        "structured",
        "u1",
    )
    assert event.event_time == 1_795_946_400.0
    assert event.data["user_id"] == "u1"


def test_binary_mode_reads_ce_headers_and_value(decoder: Decoder) -> None:
    """Binary mode takes attributes from ce_ headers, content-type and data from the value."""
    value = orjson.dumps({"user_id": "u2"})
    event = decoder.decode(value, binary_headers())
    assert event.mode == "binary"
    assert (event.id, event.source) == ("evt-2", "https://auth.acme.example")
    assert event.datacontenttype == "application/json"
    assert event.data == {"user_id": "u2"}
    assert event.event_time == 1_795_942_800.0


def test_binary_mode_header_names_are_case_insensitive(decoder: Decoder) -> None:
    """CE_ID and Content-Type count like ce_id and content-type."""
    headers = [(name.upper(), value) for name, value in binary_headers()]
    event = decoder.decode(b"{}", headers)
    assert (event.mode, event.id, event.datacontenttype) == ("binary", "evt-2", "application/json")


def test_binary_mode_without_value_has_no_data(decoder: Decoder) -> None:
    """A binary-mode record may carry no value: data is None (the schema decides)."""
    assert decoder.decode(None, binary_headers()).data is None


def test_shipped_binary_example_decodes(decoder: Decoder) -> None:
    """The binary-mode example file holds headers and value in the documented shape."""
    doc = json.loads((SCHEMAS / "examples" / "order.confirmed.binary.json").read_text())
    headers = [(k, v.encode()) for k, v in doc["headers"].items()]
    event = decoder.decode(orjson.dumps(doc["value"]), headers)
    assert event.type == "order.confirmed"
    assert event.data["order_id"] == "ord_01JDZ7M2R9V1"


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (None, [], Reason.EMPTY),
        (b"", [], Reason.EMPTY),
        (b"x" * 5000, [], Reason.OVERSIZED),
        (b"{}", [("ce_specversion", b"1.0"), ("pad", b"x" * 5000)], Reason.OVERSIZED),
        (b"\xff\xfe{}", [], Reason.NOT_UTF8),
        (b"{not json", [], Reason.NOT_JSON),
        (b"[1, 2]", [], Reason.NOT_OBJECT),
        (b'"text"', [], Reason.NOT_OBJECT),
        (b"null", [], Reason.NOT_OBJECT),
        (structured(id=None), [], Reason.MISSING_FIELD),
        (structured(specversion="0.3"), [], Reason.INVALID_ENVELOPE),
        (structured(id=""), [], Reason.INVALID_ENVELOPE),
        (structured(type=7), [], Reason.INVALID_ENVELOPE),
        (structured(time="yesterday"), [], Reason.INVALID_ENVELOPE),
        (structured(time="2026-11-29T10:00:00"), [], Reason.INVALID_ENVELOPE),
        (structured(time="2026-13-45T10:00:00Z"), [], Reason.INVALID_ENVELOPE),
        (structured(datacontenttype="text/plain"), [], Reason.UNSUPPORTED_CONTENT_TYPE),
        (structured(data_base64="AAAA"), [], Reason.UNSUPPORTED_CONTENT_TYPE),
        (b"{}", binary_headers(ce_id=None), Reason.MISSING_FIELD),
        (
            b"{}",
            binary_headers(**{"content-type": "application/xml"}),
            Reason.UNSUPPORTED_CONTENT_TYPE,
        ),
        (b"{}", [*binary_headers(), ("ce_id", b"evt-3")], Reason.INVALID_ENVELOPE),
        (b"{}", [*binary_headers(ce_id=None), ("ce_id", b"\xff")], Reason.NOT_UTF8),
        (b"{oops", binary_headers(), Reason.NOT_JSON),
    ],
)
def test_bad_records_raise_invalid_event_with_reason(
    decoder: Decoder, value: bytes | None, headers: list[tuple[str, bytes]], reason: Reason
) -> None:
    """Every malformed record is InvalidEvent with its stable reason code."""
    assert reason_of(decoder, value, headers) == reason


def test_json_content_types_are_accepted(decoder: Decoder) -> None:
    """application/json, +json suffixes and charset parameters all count as JSON data."""
    for content_type in (
        "application/json",
        "application/cloudevents+json",
        "application/json; charset=utf-8",
    ):
        event = decoder.decode(b"{}", binary_headers(**{"content-type": content_type}))
        assert event.datacontenttype == content_type


def test_field_paths_resolve_into_data_and_envelope() -> None:
    """Paths reach envelope attributes, nested data and list items; absent is KeyError."""
    event = Event(
        id="e",
        source="s",
        type="t",
        specversion="1.0",
        time=None,
        subject="sub",
        datacontenttype=None,
        data={"a": {"b": [10, {"c": "deep"}]}, "n": None},
        mode="structured",
        event_time=None,
    )
    assert FieldPath.parse("subject").resolve(event) == "sub"
    assert FieldPath.parse("data.a.b.1.c").resolve(event) == "deep"
    for missing in ("data.n", "data.a.x", "data.a.b.9", "time"):
        with pytest.raises(KeyError):
            FieldPath.parse(missing).resolve(event)
    for bad in ("payload.x", "id.x", "data..x", "data.a b"):
        with pytest.raises(ValueError):
            FieldPath.parse(bad)


def test_schema_violation_names_path_not_value() -> None:
    """A per-type schema failure is schema_violation; the message names the field only."""
    validator = compile_schema(load_json_file(SCHEMAS / "user.signed_up.schema.json"))
    event = Event(
        id="e",
        source="s",
        type="user.signed_up",
        specversion="1.0",
        time=None,
        subject=None,
        datacontenttype=None,
        data={"user_id": "u", "email": "secret-person@example.com", "name": "N", "plan": "gold"},
        mode="structured",
        event_time=None,
    )
    with pytest.raises(InvalidEvent) as info:
        validate_data(validator, event)
    assert info.value.reason == Reason.SCHEMA_VIOLATION
    assert "data.plan" in str(info.value)
    assert "secret-person" not in str(info.value)


def test_compile_schema_refuses_other_drafts_and_broken_schemas() -> None:
    """Only draft-07 schemas compile; a broken schema is a ValueError naming the problem."""
    with pytest.raises(ValueError, match="draft-07"):
        compile_schema({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    with pytest.raises(ValueError, match="invalid schema"):
        compile_schema({"type": "no-such-type"})
    with pytest.raises(ValueError, match="JSON object"):
        compile_schema([])


def test_every_shipped_schema_compiles() -> None:
    """Every *.schema.json under schemas/ is a valid draft-07 schema."""
    files = sorted(SCHEMAS.glob("*.schema.json"))
    assert len(files) >= 5
    for path in files:
        compile_schema(load_json_file(path))


def test_time_parsing_needs_an_offset() -> None:
    """RFC 3339 times with Z or an offset parse; a naive time is refused."""
    assert parse_time("1970-01-01T00:00:01Z") == 1.0
    assert parse_time("1970-01-01T01:00:01.5+01:00") == 1.5
    with pytest.raises(ValueError):
        parse_time("1970-01-01T00:00:01")


def test_control_characters_detected() -> None:
    """CR, LF, NUL, DEL, C1 controls and Unicode line separators count as control characters."""
    for bad in ("a\rb", "a\nb", "\x00", "\x7f", "\x85", "a\u2028b", "tab\there"):
        assert has_control_characters(bad), repr(bad)
    assert not has_control_characters("Your order A-1 is confirmed — thanks!")


# -- numbers and binary-mode headers (issue 11, items 8 and 9) ----------------------


ENVELOPE = SCHEMAS / "envelope.schema.json"
BINARY_HEADERS = binary_headers()


def _decoder(max_bytes: int = 1 << 20) -> Decoder:
    return Decoder(envelope=compile_schema(load_json_file(ENVELOPE)), max_bytes=max_bytes)


def _structured(data_json: str) -> bytes:
    return (
        '{"specversion": "1.0", "id": "e1", "source": "s", "type": "t", "data": ' + data_json + "}"
    ).encode()


@pytest.mark.parametrize("number", [str(2**64), str(10**23), str(-(2**63) - 1), "1" + "0" * 300])
def test_integers_orjson_would_round_are_schema_violation(number: str) -> None:
    """An integer outside -2^63..2^64-1 would become a float: refused, never rounded."""
    with pytest.raises(InvalidEvent) as info:
        _decoder().decode(_structured('{"n": ' + number + "}"), [])
    assert info.value.reason == Reason.SCHEMA_VIOLATION
    with pytest.raises(InvalidEvent) as binary:
        _decoder().decode(f'{{"n": {number}}}'.encode(), BINARY_HEADERS)
    assert binary.value.reason == Reason.SCHEMA_VIOLATION


@pytest.mark.parametrize("number", [2**53 + 1, 2**63 - 1, 2**64 - 1, -(2**63)])
def test_integers_within_range_stay_exact(number: int) -> None:
    """Integers above 2^53 but inside orjson's exact range keep every digit."""
    event = _decoder().decode(_structured(f'{{"n": {number}}}'), [])
    assert event.data["n"] == number
    assert type(event.data["n"]) is int


def test_long_digit_runs_inside_strings_are_fine() -> None:
    """Twenty digits inside a string are text, not a number: nothing is refused."""
    event = _decoder().decode(_structured('{"card": "123456789012345678901234"}'), [])
    assert event.data["card"] == "123456789012345678901234"


def test_two_content_type_headers_are_invalid_envelope() -> None:
    """A binary-mode record with two content-type headers is refused, not last-one-wins."""
    headers = [*BINARY_HEADERS, ("content-type", b"text/plain")]
    with pytest.raises(InvalidEvent) as info:
        _decoder().decode(b'{"n": 1}', headers)
    assert info.value.reason == Reason.INVALID_ENVELOPE


def test_contradicting_ce_datacontenttype_is_invalid_envelope() -> None:
    """ce_datacontenttype and content-type must agree when both are present."""
    headers = [*BINARY_HEADERS, ("ce_datacontenttype", b"text/plain")]
    with pytest.raises(InvalidEvent) as info:
        _decoder().decode(b'{"n": 1}', headers)
    assert info.value.reason == Reason.INVALID_ENVELOPE
    agreeing = [*BINARY_HEADERS, ("ce_datacontenttype", b"Application/JSON")]
    assert _decoder().decode(b'{"n": 1}', agreeing).data == {"n": 1}


def test_header_names_count_toward_max_event_bytes() -> None:
    """Thousands of empty-valued headers with long names are oversized, not free."""
    headers = [*BINARY_HEADERS, *((f"x-{i:04d}-" + "n" * 200, b"") for i in range(100))]
    with pytest.raises(InvalidEvent) as info:
        _decoder(max_bytes=10_000).decode(b'{"n": 1}', headers)
    assert info.value.reason == Reason.OVERSIZED
