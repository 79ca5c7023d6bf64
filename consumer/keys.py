"""Idempotency keys: deterministic, derived from the event, never random.

A route's key template mixes literal text with `{path}` placeholders, e.g.
`order-confirmation:{data.order_id}` or `password-reset:{data.user_id}:{data.request_id}`;
`{type}:{source}:{id}` when a route names none. Rules:

- a key is 1 to 256 characters of `[A-Za-z0-9._:/-]` (Resend documents no
  character set; this project restricts it);
- a placeholder value (a string or an integer) keeps `[A-Za-z0-9-]` as it is;
  every other character becomes `.` plus the hex of its UTF-8 bytes (`_` ->
  `.5f`, `.` -> `.2e`). Encoded values never contain `:` or `/`, and two
  placeholders must be separated by literal text holding `:` or `/`, so
  different entity IDs always give different keys;
- `{path|sha256}` marks a value sensitive (addresses, tokens): it appears as
  `.sha256-` and the first 32 hex digits of its SHA-256, never in clear (the
  marker starts with `.` and a non-hex letter, which no encoded value holds, so
  a hash never equals some other clean ID). A value holding `@` is hashed even
  when not marked, so an address cannot leak through a key;
- a key longer than 256 characters keeps its first 190 characters, then the
  marker `.:` and the SHA-256 (64 hex) of the whole key. No natural key holds
  `.:`: in an encoded value every `.` is followed by two hex digits or
  `sha256-`, a value never ends in `.` and never starts with `:`, and literal
  text may not hold `.:` (the parser refuses it). So a shortened key never
  equals a natural one, two shortened keys differ when their whole keys do,
  and the mapping from (route, placeholder values) to key is injective at
  every length. Keys of 256 characters or fewer are exactly as before;
- across routes, each key template's fixed start (its literal text before the
  first placeholder other than `{type}`) must be non-empty and must not be a
  prefix of another route's, so two event types never share a key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from consumer.errors import KeyTemplateError
from consumer.events import Event, FieldPath, Reason, invalid

MAX_KEY_LENGTH: Final = 256
DEFAULT_KEY_TEMPLATE: Final = "{type}:{source}:{id}"
#: characters allowed anywhere in a key
KEY_PATTERN: Final = re.compile(r"^[A-Za-z0-9._:/-]{1,256}\Z")
SENSITIVE_FILTER: Final = "sha256"
#: hex digits of SHA-256 kept for a sensitive value (128 bits)
SENSITIVE_HEX: Final = 32
#: prefix of a hashed value
HASH_MARKER: Final = ".sha256-"
#: placeholders that tell one event of a type from another
_DISTINCT_ROOTS: Final = frozenset({"id", "subject", "data"})

_LITERAL = re.compile(r"^[A-Za-z0-9._:/-]*\Z")
_CLEAN_VALUE = re.compile(r"^[A-Za-z0-9-]+\Z")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9-]")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
#: ends the readable prefix of a shortened key; no natural key holds it (see above)
SHORTENED_MARKER: Final = ".:"
_PREFIX_KEEP: Final = MAX_KEY_LENGTH - len(SHORTENED_MARKER) - 64


@dataclass(frozen=True, slots=True)
class _Slot:
    path: FieldPath
    sensitive: bool


class KeyTemplate:
    """A parsed key template; `render(event)` gives the key or raises InvalidEvent."""

    __slots__ = ("_parts", "text")

    def __init__(self, *, text: str, parts: tuple[str | _Slot, ...]) -> None:
        self.text = text
        self._parts = parts

    def __repr__(self) -> str:
        return f"KeyTemplate({self.text!r})"

    @classmethod
    def parse(cls, text: str) -> KeyTemplate:
        if not isinstance(text, str) or not text:
            raise KeyTemplateError("key template must be a non-empty string")
        parts: list[str | _Slot] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            parts.append(text[pos : match.start()])
            parts.append(_parse_slot(match.group(1)))
            pos = match.end()
        parts.append(text[pos:])
        for part in parts:
            if isinstance(part, str) and not _LITERAL.match(part):
                raise KeyTemplateError(
                    f"literal text {part!r} may hold only [A-Za-z0-9._:/-] "
                    "and {path} placeholders"
                )
            if isinstance(part, str) and SHORTENED_MARKER in part:
                raise KeyTemplateError(
                    f"literal text {part!r} may not hold {SHORTENED_MARKER!r}: "
                    "it marks a shortened key"
                )
        slots = [p for p in parts if isinstance(p, _Slot)]
        if not any(s.path.root in _DISTINCT_ROOTS for s in slots):
            raise KeyTemplateError(
                "key template must reference id, subject or a data field, "
                "or every event of the type would share one key"
            )
        # parts alternate literal, slot, literal, ...: check the literal between two slots
        for index in range(2, len(parts) - 1, 2):
            between = parts[index]
            assert isinstance(between, str)
            if ":" not in between and "/" not in between:
                raise KeyTemplateError(
                    f"placeholders {parts[index - 1].path.text!r} and "  # type: ignore[union-attr]
                    f"{parts[index + 1].path.text!r} must be separated "  # type: ignore[union-attr]
                    "by text holding ':' or '/' so keys stay distinct"
                )
        return cls(text=text, parts=tuple(p for p in parts if p != ""))

    def prefix(self, event_type: str) -> str:
        """The fixed start of every key of this route: literal text, with `{type}` filled in.

        Routes whose prefixes are not prefixes of one another can never share a
        key, whatever their events hold (the loader checks this).
        """
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
            elif part.path.root == "type":
                out.append(encode_value(event_type, sensitive=part.sensitive, name="type"))
            else:
                break
        return "".join(out)

    def render(self, event: Event) -> str:
        """The key for this event; InvalidEvent(invalid_key) when a field is unusable."""
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            try:
                value = part.path.resolve(event)
            except KeyError:
                raise invalid(
                    Reason.INVALID_KEY, f"key field {part.path.text} is missing"
                ) from None
            out.append(encode_value(value, sensitive=part.sensitive, name=part.path.text))
        return finish_key("".join(out))


def _parse_slot(inner: str) -> _Slot:
    path_text, bar, filter_name = inner.partition("|")
    path_text = path_text.strip()
    sensitive = False
    if bar:
        if filter_name.strip() != SENSITIVE_FILTER:
            raise KeyTemplateError(
                f"unknown filter {filter_name.strip()!r} in {{{inner}}}; only |{SENSITIVE_FILTER}"
            )
        sensitive = True
    try:
        path = FieldPath.parse(path_text)
    except ValueError as exc:
        raise KeyTemplateError(f"placeholder {{{inner}}}: {exc}") from None
    return _Slot(path=path, sensitive=sensitive)


def encode_value(value: object, *, sensitive: bool, name: str = "value") -> str:
    """One placeholder value as key text (see the module docstring for the rules)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise invalid(
            Reason.INVALID_KEY,
            f"key field {name} is a {type(value).__name__}, need a string or an integer",
        )
    text = str(value)
    if not text:
        raise invalid(Reason.INVALID_KEY, f"key field {name} is empty")
    if sensitive or "@" in text:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return HASH_MARKER + digest[:SENSITIVE_HEX]
    if _CLEAN_VALUE.match(text):
        return text
    return _UNSAFE_CHAR.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    return "".join(f".{byte:02x}" for byte in match.group().encode("utf-8", "surrogatepass"))


def finish_key(key: str) -> str:
    """Cap a key at 256 characters: a readable prefix, `.:`, then the hash of the whole key."""
    if len(key) <= MAX_KEY_LENGTH:
        return key
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{key[:_PREFIX_KEEP]}{SHORTENED_MARKER}{digest}"


def is_valid_key(key: str) -> bool:
    """True when Resend (and this project) accept the key."""
    return bool(KEY_PATTERN.match(key))
