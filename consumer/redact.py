"""Redaction, declared once: what never leaves the process as it came in.

Two jobs, used by the logs, the dead-letter headers, Resend answers, rejection
messages and trace attributes alike:

- `redact_secrets(text, secrets)`: Bearer tokens, `password=...`-style pairs
  with a secret-sounding name, anything shaped like a Resend API key
  (`re_...` -> `re_[redacted]`) and the given secret values (-> `[redacted]`);
  `is_secret_key(name)` says which structured field names are never shown;
  `without_userinfo(url)` hides a URL's `user:password@` as `***@`;
- `mask_addresses(text)`: every email address shortened to two characters of
  its local part and the domain, `jane@example.com` -> `ja***@example.com`;
  `mask_address(value)` masks one value that should have been an address (and
  `***` when it is not one: it may still be personal data).

Both are defence in depth: messages are built from codes, names and statuses,
but an upstream error text (Resend's, Kafka's, an exception's) may still quote
a key or a recipient.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Final

__all__ = [
    "MASK",
    "REDACTED",
    "SECRET_KEYS",
    "is_secret_key",
    "mask_address",
    "mask_addresses",
    "redact_secrets",
    "without_userinfo",
]

#: what a secret is replaced with
REDACTED: Final = "[redacted]"
#: what stands for the hidden part of an address
MASK: Final = "***"
#: characters of an address's local part that stay visible
_KEEP: Final = 2

#: field names whose values are never shown, whatever they hold (compared lower-cased)
SECRET_KEYS: Final = frozenset(
    {
        "api_key",
        "apikey",
        "resend_api_key",
        "password",
        "sasl_plain_password",
        "kafka_sasl_password",
        "authorization",
        "secret",
        "token",
    }
)
_SECRET_SUFFIXES: Final = ("_password", "_api_key", "_secret", "_token")

# Applied in this order: a Bearer token first (so `Bearer re_...` reads `Bearer
# [redacted]`), then secret-named pairs (`password=...`, `"api_key": "..."`, but not
# `Authorization: Bearer`, already done), then Resend keys anywhere: `re_` then
# letters, digits and underscores; the word boundary keeps `are_you` intact.
_BEARER: Final = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+")
_PAIR: Final = re.compile(
    r"(?i)\b(authorization|api[_-]?key|password|passwd|secret|token)"
    r"([\"']?\s*[:=]\s*[\"']?)(?!bearer\b)[^\s\"',;}]+"
)
_RESEND_KEY: Final = re.compile(r"\bre_[A-Za-z0-9_]+")
# Deliberately loose, so that nothing shaped like an address escapes: a local part of
# up to 64 characters (any but space and the delimiters around addresses in text),
# `@`, and a domain, dotted or not, that holds a letter or a dot: `jane@example`,
# `jane@10.0.0.1`, but not the `orders[2]@41` of a record's coordinates.
_DELIMITERS: Final = r"\s<>@\"',;()"
_ADDRESS: Final = re.compile(
    rf"([^{_DELIMITERS}]{{1,64}})@(?=[^{_DELIMITERS}]*?[^\W\d_.]|[^{_DELIMITERS}]*?\.)"
    rf"([^{_DELIMITERS}]+)"
)
#: a URL's scheme (kept) and its userinfo, up to the first `@` before the path
_USERINFO: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^/?#]*@")


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: object) -> bool:
    """A structured field (log key, setting name) whose value is never shown."""
    # field names repeat on every log line: the answer is cached per name
    if not isinstance(key, str):
        return False
    low = key.lower().replace("-", "_")
    return low in SECRET_KEYS or low.endswith(_SECRET_SUFFIXES)


def _may_hold_credentials(text: str) -> bool:
    # plain substring tests first: most text (ids, names, statuses) holds none, and
    # these cost a tenth of a case-insensitive regex scan
    if "re_" in text:
        return True
    low = text.lower()
    return (
        "bearer" in low
        or "passw" in low
        or "api" in low
        or "secret" in low
        or "token" in low
        or "authorization" in low
    )


def redact_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without credentials: tokens, secret pairs, Resend keys and the given values."""
    if _may_hold_credentials(text):
        text = _BEARER.sub(f"Bearer {REDACTED}", text)
        text = _PAIR.sub(rf"\1\2{REDACTED}", text)
        text = _RESEND_KEY.sub(f"re_{REDACTED}", text)
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def without_userinfo(url: str) -> str:
    """A URL with any `user:password@` replaced by `***@`, safe to show."""
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}{MASK}@", url, count=1)


def _visible(local: str) -> str:
    # a mask already there counts as hidden: masking twice changes nothing
    return local.rstrip("*")[:_KEEP]


def _mask_match(match: re.Match[str]) -> str:
    return f"{_visible(match.group(1))}{MASK}@{match.group(2)}"


def mask_addresses(text: str) -> str:
    """Every address in text masked: 'to jane@example.com' -> 'to ja***@example.com'."""
    # the substring test skips the regex for the vast majority of values
    return _ADDRESS.sub(_mask_match, text) if "@" in text else text


def mask_address(value: str) -> str:
    """One value meant as an address, masked; `***` when it holds no `@` at all."""
    local, sep, domain = value.rpartition("@")
    if not sep:
        return MASK
    return f"{_visible(local)}{MASK}@{domain}"
