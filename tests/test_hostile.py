"""The hostile corpus of issue 11: every input, its expected outcome, in one table each.

Event data goes through `Preparer.prepare` (and, for what a Kafka record can
carry, through the real broker first); hostile configuration goes through
`resend-consumer check`, which must exit 2 with one line naming the setting,
route or field.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.cli import main
from consumer.events import parse_time
from consumer.prepare import Preparer, Rejected
from consumer.settings import Settings
from tests.conftest import NewTopicFactory, Produce
from tests.pipeline_support import read_all

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
ORDER = json.loads((SCHEMAS / "examples" / "order.confirmed.json").read_text())
NOW = parse_time(ORDER["time"]) + 60
Headers = list[tuple[str, bytes]]


def order(change: Callable[[dict[str, Any]], None] | None = None) -> bytes:
    """The shipped order.confirmed example, changed in place by `change`."""
    doc = copy.deepcopy(ORDER)
    if change is not None:
        change(doc)
    # the stdlib writes integers of any size, as a hostile producer may
    return json.dumps(doc).encode()


def customer(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["data"]["customer"].__setitem__(field, value)


def data(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["data"].__setitem__(field, value)


def binary(*extra: tuple[str, bytes]) -> tuple[bytes, Headers]:
    """The order as a binary-mode record, with extra headers appended."""
    headers: Headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", ORDER["id"].encode()),
        ("ce_source", ORDER["source"].encode()),
        ("ce_type", b"order.confirmed"),
        ("ce_time", ORDER["time"].encode()),
        ("content-type", b"application/json"),
    ]
    headers += extra
    return orjson.dumps(ORDER["data"]), headers


LONG_LOCAL = "a" * 65 + "@example.com"
LONG_DOMAIN = "a@" + ".".join(["b" * 60] * 5) + ".example"

#: (name, record value, headers, expected reason): every event-data input of issue 11
#: plus the earlier malformed-record table
EVENT_CORPUS: list[tuple[str, bytes | None, Headers, str]] = [
    ("bidi override in the subject", order(data("order_number", "A-1\u202egpj.exe")), [],
     "control_characters"),
    ("bidi isolate in the subject", order(data("order_number", "A\u2066-1")), [],
     "control_characters"),
    ("zero-width space in the subject", order(data("order_number", "A\u200b-1")), [],
     "control_characters"),
    ("BOM in the subject", order(data("order_number", "\ufeffA-1")), [], "control_characters"),
    ("bidi override in a display name",
     order(customer("email", "Jane\u202e Doe <jane@example.com>")), [], "control_characters"),
    ("zero-width joiner in a display name",
     order(customer("email", "Ja\u200dne <jane@example.com>")), [], "control_characters"),
    ("CR/LF header injection in the address",
     order(customer("email", "jane@example.com\r\nBcc: x@evil.example")), [],
     "control_characters"),
    ("local part of 65 characters", order(customer("email", LONG_LOCAL)), [], "invalid_recipient"),
    ("domain over 255 characters", order(customer("email", LONG_DOMAIN)), [], "invalid_recipient"),
    ("integer above 2^64", order(data("total_cents", 2**64)), [], "schema_violation"),
    ("integer of 23 digits", order(data("total_cents", 10**22 + 1)), [], "schema_violation"),
    ("two content-type headers", *binary(("content-type", b"text/plain")), "invalid_envelope"),
    ("ce_datacontenttype contradicts content-type",
     *binary(("ce_datacontenttype", b"text/plain")), "invalid_envelope"),
    # the earlier malformed-record table
    ("no value and no headers", None, [], "empty_record"),
    ("not UTF-8", b"\xff\xfe{", [], "not_utf8"),
    ("not JSON", b"{nope", [], "not_json"),
    ("a JSON array", b"[1, 2]", [], "not_object"),
    ("no id", order(lambda doc: doc.pop("id")), [], "missing_field"),
    ("bad time", order(lambda doc: doc.__setitem__("time", "yesterday")), [], "invalid_envelope"),
    ("unknown type", order(lambda doc: doc.__setitem__("type", "x.y")), [], "unknown_type"),
    ("data_base64", order(lambda doc: doc.__setitem__("data_base64", "AA==")), [],
     "unsupported_content_type"),
    ("schema violation", order(data("items", [])), [], "schema_violation"),
    ("key field missing", order(lambda doc: doc["data"].pop("order_id")), [], "schema_violation"),
]  # fmt: skip


@pytest.fixture(scope="module")
def preparer() -> Preparer:
    """The shipped routes with an 8 KiB record limit."""
    return Preparer.from_settings(
        Settings(routes_file=SCHEMAS / "routes.yaml", max_event_bytes=8192)
    )


def reason_of(preparer: Preparer, value: bytes | None, headers: Headers) -> str:
    result = preparer.prepare(
        value, headers, topic="t", partition=0, offset=0, timestamp_ms=None, now=NOW
    )
    assert isinstance(result, Rejected), result
    return result.reason


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [case[1:] for case in EVENT_CORPUS],
    ids=[case[0] for case in EVENT_CORPUS],
)
def test_hostile_event_gets_its_reason_code(
    preparer: Preparer, value: bytes | None, headers: Headers, reason: str
) -> None:
    """Each hostile record of the corpus is rejected with its stable reason code."""
    assert reason_of(preparer, value, headers) == reason


async def test_transport_level_inputs_keep_their_reason_through_the_broker(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, preparer: Preparer
) -> None:
    """Records written to and read from a real broker keep their headers and reasons."""
    cases = [c for c in EVENT_CORPUS if c[2] or c[0].startswith(("integer", "bidi override"))]
    topic = await new_topic()
    await produce(topic, [(None, value, headers) for _, value, headers, _ in cases])
    records = await read_all(kafka_bootstrap, topic, len(cases))
    got = [reason_of(preparer, r.value, list(r.headers)) for r in records]
    assert got == [reason for *_, reason in cases]


# -- hostile configuration: `check` exits 2 with one line -------------------------------


def routes_copy(tmp_path: Path, edit: Callable[[str], str]) -> Path:
    """The shipped routes folder copied to tmp_path, with routes.yaml edited."""
    import shutil

    folder = tmp_path / "routes"
    shutil.copytree(SCHEMAS, folder)
    path = folder / "routes.yaml"
    path.write_text(edit(path.read_text()))
    return path


def secret_include(text: str) -> str:
    return text.replace("templates: templates", "templates: /")


def bcc_header(text: str) -> str:
    return text.replace("X-Entity-Ref-ID:", "Bcc:")


CONFIG_CORPUS: list[tuple[str, Callable[[str], str], dict[str, str], str]] = [
    ("templates: / (reads any file)", secret_include, {}, "field 'templates'"),
    ("version 2", lambda t: t.replace("version: 1", "version: 2"), {}, "field 'version'"),
    ("a Bcc custom header", bcc_header, {}, "field 'headers.Bcc'"),
    ("a key template with the shortening marker",
     lambda t: t.replace('"order-confirmation:{data.order_id}"', '"order.:{data.order_id}"'),
     {}, "field 'idempotency_key'"),
    ("RATE_LIMIT=nan", lambda t: t, {"RATE_LIMIT": "nan"}, "RATE_LIMIT"),
    ("RETRY_CAP=inf", lambda t: t, {"RETRY_CAP": "inf"}, "RETRY_CAP"),
    ("HEALTH_PORT=99999", lambda t: t, {"HEALTH_PORT": "99999"}, "HEALTH_PORT"),
    ("HEALTH_HOST a URL", lambda t: t, {"HEALTH_HOST": "http://0.0.0.0"}, "HEALTH_HOST"),
    ("RESEND_BASE_URL with credentials", lambda t: t,
     {"RESEND_BASE_URL": "https://u:hunter2pass@api.resend.com"}, "credentials"),
    ("RESEND_BASE_URL plain http off-host", lambda t: t,
     {"RESEND_BASE_URL": "http://api.resend.com"}, "RESEND_ALLOW_HTTP"),
    ("RESEND_BASE_URL ftp", lambda t: t, {"RESEND_BASE_URL": "ftp://api.resend.com"},
     "RESEND_BASE_URL"),
    ("API key with a newline", lambda t: t, {"RESEND_API_KEY": "re_abc\n"}, "line break"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "env", "named"),
    [case[1:] for case in CONFIG_CORPUS],
    ids=[case[0] for case in CONFIG_CORPUS],
)
def test_hostile_configuration_is_refused_by_check(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    edit: Callable[[str], str],
    env: dict[str, str],
    named: str,
) -> None:
    """`resend-consumer check` exits 2 with one line naming the culprit, leaking nothing."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = routes_copy(tmp_path, edit)
    code = main(["check", "--no-examples", "--routes-file", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert named in err
    assert "hunter2pass" not in err
    assert "re_abc" not in err
    assert "Traceback" not in err
