"""Events: CloudEvents 1.0 records from Kafka, decoded and checked.

Two encodings are accepted, as the CloudEvents Kafka protocol binding defines them:

- structured mode: the record value is one JSON object holding the envelope
  attributes (`specversion`, `id`, `source`, `type`, ...) and `data`;
- binary mode: the attributes travel as `ce_<name>` headers, `content-type`
  names the data's media type and the record value is the data itself.

A record is binary mode when it carries a `ce_specversion` header. Decoding
either gives an `Event` or raises `InvalidEvent` whose `reason` is a stable
`Reason` code; nothing else escapes `Decoder.decode`.

`FieldPath` (`data.customer.email`) and `Interp` (`"Acme <{data.sender}>"`)
are the plain field references routes and keys use to read an event.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal

import fastjsonschema
import orjson

from consumer.errors import InvalidEvent
from consumer.redact import mask_addresses


class Reason(StrEnum):
    """Why a record produced no email: a dead-letter header and a metrics label."""

    EMPTY = "empty_record"
    OVERSIZED = "oversized"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    INVALID_ENVELOPE = "invalid_envelope"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    UNKNOWN_TYPE = "unknown_type"
    SCHEMA_VIOLATION = "schema_violation"
    INVALID_KEY = "invalid_key"
    INVALID_SENDER = "invalid_sender"
    INVALID_RECIPIENT = "invalid_recipient"
    CONTROL_CHARACTERS = "control_characters"
    INVALID_TAG = "invalid_tag"
    TEMPLATE_ERROR = "template_error"
    TEMPLATE_SECURITY = "template_security"
    STALE_EVENT = "stale_event"
    #: an unexpected exception inside the pipeline: a bug, never the sender's fault
    INTERNAL_ERROR = "internal_error"


class Outcome(StrEnum):
    """What an event ended as: the canonical line's `outcome`, the events metric's label.

    Declared once, here beside `Reason`: a delivery's result, a stale policy's
    refusal, the metric, the log line and the trace all say the same words.
    """

    SENT = "sent"
    #: with a `Reason` (or Resend's reason), written to the dead-letter topic
    DEAD_LETTERED = "dead_lettered"
    SKIPPED = "skipped"
    #: revoked before it finished: nothing committed, the next owner sends it
    REVOKED = "revoked"


#: what a delivery refused before sending ends in (a stale policy's choice)
Refusal = Literal[Outcome.DEAD_LETTERED, Outcome.SKIPPED]


Mode = Literal["structured", "binary"]
Validator = Callable[[Any], Any]

#: attributes every CloudEvent must carry (CloudEvents 1.0, "REQUIRED")
REQUIRED_ATTRIBUTES: Final = ("specversion", "id", "source", "type")
#: Kafka header prefix of binary-mode attributes
CE_HEADER_PREFIX: Final = "ce_"
CONTENT_TYPE_HEADER: Final = "content-type"
#: path roots a route may reference: envelope attributes and the data
PATH_ROOTS: Final = frozenset({"id", "source", "type", "subject", "time", "specversion", "data"})

_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json(?:\s*;.*)?\Z", re.IGNORECASE)
#: C0/C1 controls, DEL, line/paragraph separators; bidi embeddings, overrides, isolates and
#: marks (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C), which reorder how a
#: subject or a display name reads; zero-width characters (U+200B-U+200D, U+FEFF), which
#: hide text or split a look-alike name
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c"
    "\u200b-\u200d\ufeff]"
)
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+\Z")


def invalid(reason: Reason, message: str) -> InvalidEvent:
    """An `InvalidEvent` carrying a `Reason` code (messages stay free of addresses)."""
    return InvalidEvent(mask_addresses(message), reason=reason)


@dataclass(frozen=True, slots=True)
class FieldPath:
    """A dotted reference into an event: `id`, `source`, `data.customer.email`, `data.items.0`."""

    text: str
    root: str
    steps: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> FieldPath:
        """Parse a path; ValueError names what is wrong."""
        parts = text.split(".")
        root = parts[0]
        if root not in PATH_ROOTS:
            roots = ", ".join(sorted(PATH_ROOTS))
            raise ValueError(f"{text!r} must start with one of {roots}")
        if root != "data" and len(parts) > 1:
            raise ValueError(f"{text!r}: only data has nested fields")
        for part in parts[1:]:
            if not _PATH_SEGMENT.match(part):
                raise ValueError(f"{text!r}: segment {part!r} is not [A-Za-z0-9_-]+")
        return cls(text=text, root=root, steps=tuple(parts[1:]))

    def resolve(self, event: Event) -> Any:
        """The value at this path; KeyError (naming the path) when it is absent or null."""
        value: Any = event.data if self.root == "data" else getattr(event, self.root)
        for step in self.steps:
            if isinstance(value, dict):
                value = value.get(step)
            elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
                value = value[int(step)]
            else:
                value = None
            if value is None:
                break
        if value is None:
            raise KeyError(self.text)
        return value


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class Interp:
    """A string with `{path}` placeholders, filled from an event."""

    __slots__ = ("_parts", "constant", "text", "whole")

    def __init__(self, *, text: str, parts: tuple[str | FieldPath, ...]) -> None:
        self.text = text
        self._parts = parts
        #: the one path when the string is exactly one placeholder (may yield a list)
        self.whole = parts[0] if len(parts) == 1 and isinstance(parts[0], FieldPath) else None
        #: the text when it has no placeholder: checked once at load, not per event
        self.constant = text if all(isinstance(p, str) for p in parts) else None

    def __repr__(self) -> str:
        return f"Interp({self.text!r})"

    @classmethod
    def parse(cls, text: str) -> Interp:
        parts: list[str | FieldPath] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            if match.start() > pos:
                parts.append(text[pos : match.start()])
            parts.append(FieldPath.parse(match.group(1).strip()))
            pos = match.end()
        if pos < len(text):
            parts.append(text[pos:])
        return cls(text=text, parts=tuple(parts))

    def native(self, event: Event, *, field: str, reason: Reason) -> Any:
        """The value: the field's own JSON value for a whole placeholder, else a string."""
        if self.whole is not None:
            return _resolve(self.whole, event, field=field, reason=reason)
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
            else:
                out.append(
                    _scalar(_resolve(part, event, field=field, reason=reason), field, reason)
                )
        return "".join(out)

    def one(self, event: Event, *, field: str, reason: Reason) -> str:
        return _scalar(self.native(event, field=field, reason=reason), field, reason)

    def many(self, event: Event, *, field: str, reason: Reason) -> list[str]:
        value = self.native(event, field=field, reason=reason)
        if isinstance(value, list):
            return [_scalar(item, field, reason) for item in value]
        return [_scalar(value, field, reason)]


def _resolve(path: FieldPath, event: Event, *, field: str, reason: Reason) -> Any:
    try:
        return path.resolve(event)
    except KeyError:
        raise invalid(reason, f"{field}: {path.text} is missing") from None


def _scalar(value: Any, field: str, reason: Reason) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise invalid(reason, f"{field}: got a {type(value).__name__}, need a string")


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded CloudEvent; `id` + `source` identify it."""

    id: str
    source: str
    type: str
    specversion: str
    time: str | None
    subject: str | None
    datacontenttype: str | None
    data: Any
    mode: Mode
    #: `time` as epoch seconds, None when the event has no time
    event_time: float | None

    def attributes(self) -> dict[str, Any]:
        """Envelope attributes without data (the `event` variable of templates)."""
        return {
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "specversion": self.specversion,
            "time": self.time,
            "subject": self.subject,
        }


def load_json_file(path: Path) -> Any:
    """Read a JSON file (schemas, examples); OSError or ValueError on failure."""
    return json.loads(path.read_text(encoding="utf-8"))


def compile_schema(schema: Any) -> Validator:
    """Compile a draft-07 JSON Schema once; the validator raises on a violation.

    ValueError when the schema itself is unusable.
    """
    if not isinstance(schema, dict):
        raise ValueError("a schema must be a JSON object")
    declared = schema.get("$schema", "http://json-schema.org/draft-07/schema#")
    if "draft-07" not in str(declared):
        raise ValueError(f"$schema must be draft-07, got {declared!r}")
    _only_local_refs(schema)
    try:
        # fastjsonschema fetches any other $ref with urlopen (file:, http:, ...):
        # refuse every scheme urlopen knows, on top of the check above.
        validator: Validator = fastjsonschema.compile(schema, handlers=_NO_REMOTE)
    except fastjsonschema.JsonSchemaDefinitionException as exc:
        raise ValueError(f"invalid schema: {exc}") from None
    return validator


def _refuse_remote(uri: str) -> Any:
    raise fastjsonschema.JsonSchemaDefinitionException(f"remote $ref {uri} is refused")


_NO_REMOTE: Final = dict.fromkeys(("", "file", "http", "https", "ftp", "data"), _refuse_remote)


def _only_local_refs(node: Any) -> None:
    """Refuse `$ref`s that leave the schema: a schema must not read files or URLs."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                raise ValueError(f"$ref {ref!r}: only references inside the schema (#...)")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_time(text: str) -> float:
    """RFC 3339 timestamp -> epoch seconds; ValueError without an offset."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("time has no UTC offset")
    return moment.timestamp()


def has_control_characters(text: str) -> bool:
    """True for controls, line separators, bidi controls and zero-width characters.

    CR/LF inject headers; bidi overrides make `gpj.exe` read as `exe.jpg` and
    zero-width characters hide text, in subjects and display names alike.
    """
    return _CONTROL.search(text) is not None


class Decoder:
    """Bytes and headers of one Kafka record -> `Event`, or `InvalidEvent` with a reason."""

    __slots__ = ("_envelope", "_max_bytes")

    def __init__(self, *, envelope: Validator, max_bytes: int) -> None:
        self._envelope = envelope
        self._max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"<Decoder max_bytes={self._max_bytes}>"

    def decode(self, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> Event:
        """One record -> Event; InvalidEvent (with a Reason) for anything malformed."""
        size = len(value) if value is not None else 0
        if headers:
            # names count too: thousands of empty-valued headers are not free
            size += sum(
                len(name.encode("utf-8", "surrogatepass")) + (len(v) if v is not None else 0)
                for name, v in headers
            )
        if size > self._max_bytes:
            raise invalid(
                Reason.OVERSIZED, f"record is {size} bytes, above MAX_EVENT_BYTES={self._max_bytes}"
            )
        if headers and any(name.lower() == "ce_specversion" for name, _ in headers):
            return self._binary(value, headers)
        return self._structured(value)

    # -- structured mode --------------------------------------------------------

    def _structured(self, value: bytes | None) -> Event:
        if not value:
            raise invalid(Reason.EMPTY, "record has no value and no ce_ headers")
        doc = _loads(value)
        if not isinstance(doc, dict):
            raise invalid(Reason.NOT_OBJECT, f"event is a JSON {_kind(doc)}, not an object")
        if "data_base64" in doc:
            raise invalid(
                Reason.UNSUPPORTED_CONTENT_TYPE, "data_base64 is not supported: data must be JSON"
            )
        return self._event(doc, doc.get("data"), "structured")

    # -- binary mode ------------------------------------------------------------

    def _binary(self, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> Event:
        attrs: dict[str, Any] = {}
        content_type: str | None = None
        for name, raw in headers:
            lower = name.lower()
            if lower == CONTENT_TYPE_HEADER:
                if content_type is not None:
                    raise invalid(Reason.INVALID_ENVELOPE, f"header {name} appears twice")
                content_type = _header_text(name, raw)
            elif lower.startswith(CE_HEADER_PREFIX):
                attr = lower[len(CE_HEADER_PREFIX) :]
                if attr in attrs:
                    raise invalid(Reason.INVALID_ENVELOPE, f"header {name} appears twice")
                attrs[attr] = _header_text(name, raw)
        if content_type is not None:
            declared = attrs.get("datacontenttype")
            if declared is not None and declared.strip().lower() != content_type.strip().lower():
                raise invalid(
                    Reason.INVALID_ENVELOPE,
                    "ce_datacontenttype and content-type disagree: which one holds is unclear",
                )
            attrs["datacontenttype"] = content_type
        data = _loads(value) if value else None
        return self._event(attrs, data, "binary")

    # -- shared -----------------------------------------------------------------

    def _event(self, attrs: dict[str, Any], data: Any, mode: Mode) -> Event:
        if not ("id" in attrs and "type" in attrs and "source" in attrs and "specversion" in attrs):
            missing = [name for name in REQUIRED_ATTRIBUTES if name not in attrs]
            where = "ce_ headers" if mode == "binary" else "envelope"
            raise invalid(Reason.MISSING_FIELD, f"{where} lacks {', '.join(missing)}")
        try:
            self._envelope(attrs)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise invalid(Reason.INVALID_ENVELOPE, f"envelope: {_schema_message(exc)}") from None
        content_type = attrs.get("datacontenttype")
        if (
            content_type is not None
            and content_type != "application/json"
            and not _JSON_TYPE.match(content_type)
        ):
            raise invalid(
                Reason.UNSUPPORTED_CONTENT_TYPE,
                f"datacontenttype {content_type!r} is not JSON",
            )
        time = attrs.get("time")
        event_time = None
        if time is not None:
            try:
                event_time = parse_time(time)
            except ValueError:
                raise invalid(
                    Reason.INVALID_ENVELOPE, f"time {time!r} is not an RFC 3339 timestamp"
                ) from None
        return Event(
            id=attrs["id"],
            source=attrs["source"],
            type=attrs["type"],
            specversion=attrs["specversion"],
            time=time,
            subject=attrs.get("subject"),
            datacontenttype=content_type,
            data=data,
            mode=mode,
            event_time=event_time,
        )


def validate_data(validator: Validator, event: Event) -> None:
    """Check event data against its type's schema; InvalidEvent(schema_violation)."""
    try:
        validator(event.data)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise invalid(Reason.SCHEMA_VIOLATION, f"{event.type}: {_schema_message(exc)}") from None


def _schema_message(exc: fastjsonschema.JsonSchemaValueException) -> str:
    # fastjsonschema names the path and the rule, not the offending value, so
    # the message carries no event content (addresses are masked anyway).
    return str(exc.message)


#: a run of 19+ digits: the only way to write an integer orjson cannot keep exact
_LONG_DIGITS: Final = re.compile(rb"\d{19}")
#: orjson keeps integers in this range exact and turns the others into floats
_EXACT_INTS: Final = range(-(2**63), 2**64)


def _loads(value: bytes) -> Any:
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        pass
    else:
        if _LONG_DIGITS.search(value) is not None:
            _refuse_inexact_integers(value)
        return doc
    # Only on the error path: tell "not UTF-8" apart from "not JSON".
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(Reason.NOT_UTF8, "value is not valid UTF-8") from None
    raise invalid(Reason.NOT_JSON, "value is not valid JSON") from None


def _refuse_inexact_integers(value: bytes) -> None:
    """schema_violation for an integer literal orjson would round to a float.

    Such a number would silently pass an `integer` schema as a float with other
    digits. Only called when the bytes hold 19 digits in a row (rare), and the
    stdlib parser's `parse_int` sees integer literals only, never strings.
    """

    def check(text: str) -> int:
        number = int(text)
        if number not in _EXACT_INTS:
            raise invalid(
                Reason.SCHEMA_VIOLATION,
                f"an integer of {len(text.lstrip('-'))} digits cannot be kept exact "
                "(limit -2^63 to 2^64-1); send it as a string",
            )
        return number

    try:
        json.loads(value, parse_int=check)
    except InvalidEvent:
        raise
    except (ValueError, RecursionError):
        # orjson accepted what the stdlib parser does not (depth): orjson's reading stands
        return


def _header_text(name: str, raw: bytes | None) -> str:
    if raw is None:
        raise invalid(Reason.INVALID_ENVELOPE, f"header {name} has no value")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(Reason.NOT_UTF8, f"header {name} is not valid UTF-8") from None


def _kind(value: Any) -> str:
    kinds: Mapping[type, str] = {list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")
