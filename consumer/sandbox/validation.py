"""Request validation as Resend does it, and the error answers it produces.

Every check returns an `ApiError` (status, name, message) instead of raising,
because a batch in permissive mode collects one error per email.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import orjson

MAX_TO: Final = 50
MAX_BATCH: Final = 100
MAX_TAGS: Final = 75
MAX_IDEMPOTENCY_KEY: Final = 256
MAX_SCHEDULE_AHEAD: Final = timedelta(days=30)

ErrorName = Literal[
    "missing_api_key",
    "invalid_api_key",
    "validation_error",
    "missing_required_field",
    "invalid_parameter",
    "invalid_attachment",
    "invalid_idempotency_key",
    "invalid_idempotent_request",
    "concurrent_idempotent_requests",
    "rate_limit_exceeded",
    "daily_quota_exceeded",
    "monthly_quota_exceeded",
    "not_found",
    "method_not_allowed",
    "application_error",
    "service_unavailable",
]


@dataclass(frozen=True, slots=True)
class ApiError:
    """One Resend error answer: `{statusCode, name, message}`."""

    status: int
    name: str
    message: str

    def body(self) -> bytes:
        return orjson.dumps({"statusCode": self.status, "name": self.name, "message": self.message})


def _err(status: int, name: ErrorName, message: str) -> ApiError:
    return ApiError(status, name, message)


# A pragmatic address check: no spaces, one @, a dot in the domain. Resend is no
# stricter than this in practice, and an RFC 5322 parser would accept more.
_ADDRESS = re.compile(r"^[^\s@<>\",;]+@[^\s@<>\",;]+\.[^\s@<>\",;.]+$")
_NAMED = re.compile(r"^(?P<name>[^<>]*)<(?P<addr>[^<>]+)>$")
_TAG = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_RELATIVE = re.compile(r"^in\s+(\d+)\s+(min|mins|minute|minutes|hour|hours|day|days)$")
_RELATIVE_UNIT: Final = {"min": 60, "minute": 60, "hour": 3600, "day": 86400}


def is_address(text: str) -> bool:
    """`a@b.co` or `Name <a@b.co>`."""
    m = _NAMED.match(text.strip())
    addr = m.group("addr").strip() if m else text.strip()
    return bool(_ADDRESS.match(addr))


def _address_error(field: str) -> ApiError:
    return _err(
        422,
        "validation_error",
        f"Invalid `{field}` field. The email address needs to follow the "
        "`email@example.com` or `Name <email@example.com>` format.",
    )


def _addresses(body: dict[str, Any], field: str, *, required: bool) -> ApiError | None:
    value = body.get(field)
    if value is None or value == "" or value == []:
        if required:
            return _err(422, "missing_required_field", f"Missing `{field}` field.")
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        return _err(
            422,
            "validation_error",
            f"Invalid `{field}` field. Expected a string or an array of strings.",
        )
    if field == "to" and len(items) > MAX_TO:
        return _err(
            422, "validation_error", f"Too many recipients in `to`: at most {MAX_TO} are allowed."
        )
    for item in items:
        if not is_address(item):
            return _address_error(field)
    return None


def _tags(tags: Any) -> ApiError | None:
    if not isinstance(tags, list):
        return _err(422, "validation_error", "Invalid `tags` field. Expected an array.")
    if len(tags) > MAX_TAGS:
        return _err(422, "validation_error", f"Too many tags: at most {MAX_TAGS} are allowed.")
    for tag in tags:
        if not isinstance(tag, dict) or "name" not in tag:
            return _err(422, "missing_required_field", "Missing `name` field in `tags`.")
        for part in ("name", "value"):
            value = tag.get(part)
            if part == "value" and value is None:
                continue
            if not isinstance(value, str) or not _TAG.match(value):
                return _err(
                    422,
                    "validation_error",
                    f"Tag {part}s can only contain ASCII letters (a-z, A-Z), numbers (0-9), "
                    "underscores (_), or dashes (-), and at most 256 characters.",
                )
    return None


def _template(template: Any, body: dict[str, Any]) -> ApiError | None:
    if not isinstance(template, dict) or not isinstance(template.get("id"), str):
        return _err(422, "missing_required_field", "Missing `template.id` field.")
    if body.get("html") is not None or body.get("text") is not None:
        return _err(
            422,
            "validation_error",
            "The `template` field cannot be used together with `html` or `text`.",
        )
    variables = template.get("variables")
    if variables is not None and (
        not isinstance(variables, dict)
        or not all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in variables.values()
        )
    ):
        return _err(
            422, "validation_error", "Template variables must be an object of strings or numbers."
        )
    return None


def _attachments(attachments: Any) -> ApiError | None:
    if not isinstance(attachments, list):
        return _err(422, "invalid_attachment", "Invalid `attachments` field. Expected an array.")
    for att in attachments:
        if not isinstance(att, dict):
            return _err(422, "invalid_attachment", "Each attachment must be an object.")
        if att.get("content") is None and att.get("path") is None:
            return _err(
                422, "invalid_attachment", "An attachment needs either `content` or `path`."
            )
        if att.get("content") is not None and not att.get("filename"):
            return _err(
                422, "invalid_attachment", "An attachment with `content` needs a `filename`."
            )
    return None


def _too_far_ahead() -> ApiError:
    return _err(
        422, "validation_error", "`scheduled_at` cannot be more than 30 days in the future."
    )


def _scheduled_at(value: Any, now: datetime) -> ApiError | None:
    if not isinstance(value, str):
        return _err(422, "validation_error", "Invalid `scheduled_at` field.")
    m = _RELATIVE.match(value.strip().lower())
    if m:
        unit = m.group(2).rstrip("s")
        try:
            # `in 99999999999 days` overflows timedelta/datetime, and more than
            # 4300 digits overflow int(): either way it is far beyond the limit.
            when = now + timedelta(seconds=int(m.group(1)) * _RELATIVE_UNIT[unit])
        except (ArithmeticError, ValueError):
            return _too_far_ahead()
    else:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return _err(
                422,
                "validation_error",
                "Invalid `scheduled_at` field. Use ISO 8601 or natural language like `in 1 min`.",
            )
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    # aware minus aware within years 1-9999 always fits a timedelta: no overflow here
    if when - now > MAX_SCHEDULE_AHEAD:
        return _too_far_ahead()
    return None


_STRING_FIELDS: Final = ("subject", "html", "text", "topic_id")


def validate_email(body: Any, *, in_batch: bool = False) -> ApiError | None:
    """The first problem with one email, or None when Resend would accept it."""
    if not isinstance(body, dict):
        return _err(422, "validation_error", "Each email must be a JSON object.")
    if body.get("from") is None or body.get("from") == "":
        return _err(422, "missing_required_field", "Missing `from` field.")
    if not isinstance(body["from"], str) or not is_address(body["from"]):
        return _address_error("from")
    problem = _addresses(body, "to", required=True)
    if problem:
        return problem
    if body.get("subject") is None:
        return _err(422, "missing_required_field", "Missing `subject` field.")
    for field in _STRING_FIELDS:
        if body.get(field) is not None and not isinstance(body[field], str):
            return _err(422, "validation_error", f"Invalid `{field}` field. Expected a string.")
    for field in ("cc", "bcc", "reply_to"):
        problem = _addresses(body, field, required=False)
        if problem:
            return problem
    headers = body.get("headers")
    if headers is not None and (
        not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values())
    ):
        return _err(422, "validation_error", "Invalid `headers` field. Expected string values.")
    if body.get("tags") is not None:
        problem = _tags(body["tags"])
        if problem:
            return problem
    if body.get("template") is not None:
        problem = _template(body["template"], body)
        if problem:
            return problem
    if body.get("attachments") is not None:
        if in_batch:
            return _err(422, "validation_error", "Attachments are not supported in batch emails.")
        problem = _attachments(body["attachments"])
        if problem:
            return problem
    if body.get("scheduled_at") is not None:
        if in_batch:
            return _err(422, "validation_error", "`scheduled_at` is not supported in batch emails.")
        problem = _scheduled_at(body["scheduled_at"], datetime.now(UTC))
        if problem:
            return problem
    return None


def validate_idempotency_key(key: str | None) -> ApiError | None:
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        return _err(
            400,
            "invalid_idempotency_key",
            f"The idempotency key must be between 1 and {MAX_IDEMPOTENCY_KEY} characters.",
        )
    return None


def batch_shape(body: Any) -> ApiError | None:
    """Problems with the batch as a whole (not with its members)."""
    if not isinstance(body, list):
        return _err(422, "validation_error", "The batch must be a JSON array of emails.")
    if not body:
        return _err(422, "validation_error", "The batch must contain at least one email.")
    if len(body) > MAX_BATCH:
        return _err(422, "validation_error", f"Too many emails in the batch: at most {MAX_BATCH}.")
    return None
