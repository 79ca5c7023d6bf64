"""The W3C trace context a record carries, and its compact form as an email tag.

Kept apart from consumer.tracing (which needs OpenTelemetry only when tracing is
on) because preparing a record needs it too: the producer's trace context, when
the record has one, becomes the `rc_trace` tag of the email, so the delivery
feedback of that email continues the same trace (see consumer.feedback).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import orjson

__all__ = [
    "CE_TRACEPARENT",
    "CE_TRACESTATE",
    "TRACEPARENT",
    "TRACESTATE",
    "carrier",
    "trace_tag",
    "traceparent_from_tag",
]

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
#: CloudEvents binary mode on Kafka: extension attributes are `ce_` headers
CE_TRACEPARENT: Final = "ce_traceparent"
CE_TRACESTATE: Final = "ce_tracestate"

Headers = Sequence[tuple[str, bytes | None]]

#: version-trace_id-parent_id-flags; later versions may append fields (W3C, level 1)
_TRACEPARENT: Final = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?"
)
_TAG: Final = re.compile(r"([0-9a-f]{32})-([0-9a-f]{16})")


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def carrier(headers: Headers, value: bytes | None) -> dict[str, str]:
    """The W3C trace context of a record, as a propagator carrier (maybe empty).

    Kafka headers first (what a producer's instrumentation injects), then the
    CloudEvents binary-mode headers, then the structured-mode envelope's
    extension attributes. Values that are not ASCII text are ignored; the
    propagator validates the rest.
    """
    found: dict[str, str] = {}
    ce: dict[str, str] = {}
    for name, raw in headers:
        low = name.lower()
        if low in (TRACEPARENT, TRACESTATE):
            text = _text(raw)
            if text is not None:
                found.setdefault(low, text)
        elif low in (CE_TRACEPARENT, CE_TRACESTATE):
            text = _text(raw)
            if text is not None:
                ce.setdefault(low.removeprefix("ce_"), text)
    if TRACEPARENT in found:
        return found
    if TRACEPARENT in ce:
        return ce
    # the substring test keeps orjson off every record that carries no context
    if value and b'"traceparent"' in value:
        try:
            envelope = orjson.loads(value)
        except orjson.JSONDecodeError:
            return {}
        if isinstance(envelope, dict) and isinstance(envelope.get(TRACEPARENT), str):
            out = {TRACEPARENT: envelope[TRACEPARENT]}
            if isinstance(envelope.get(TRACESTATE), str):
                out[TRACESTATE] = envelope[TRACESTATE]
            return out
    return {}


def trace_tag(traceparent: str | None) -> str | None:
    """`<trace id>-<parent id>` of a valid traceparent, None otherwise.

    Only what the record carries goes in, never an id this process makes up: the
    tag is part of the request bytes, which must be the same on every retry.
    """
    if traceparent is None:
        return None
    m = _TRACEPARENT.fullmatch(traceparent.strip())
    if m is None:
        return None
    version, trace_id, parent_id, _flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return f"{trace_id}-{parent_id}"


def traceparent_from_tag(value: str | None) -> str | None:
    """The traceparent (sampled) that `trace_tag` compacted, None for anything else."""
    if value is None:
        return None
    m = _TAG.fullmatch(value)
    if m is None or m[1] == "0" * 32 or m[2] == "0" * 16:
        return None
    return f"00-{m[1]}-{m[2]}-01"
