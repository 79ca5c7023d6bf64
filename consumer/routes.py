"""Routes: for each event type, how its one email is built.

The routes file (YAML, path from `ROUTES_FILE`) is read and checked once at
start-up: every route's schema is compiled, its key template parsed and its
Jinja2 templates compiled. Any problem raises `RoutesError`, naming the file,
the route and the field, and the service refuses to start.

Two template syntaxes, on purpose:

- `{path}` (single braces) in the key, from, to, cc, bcc, reply_to, tag and
  header values and hosted-template variables: a plain field reference
  (`{data.customer.email}`), no logic, nothing to escape;
- Jinja2 (`{{ data.order_number }}`) in the subject and the local HTML/text
  templates: an immutable sandbox, `StrictUndefined`, autoescaping for HTML
  only, and no `random` filter or `lipsum` global so rendering stays
  deterministic.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from consumer.batching import MAX_BATCH, MAX_LINGER, PRIORITIES, Priority
from consumer.errors import KeyTemplateError, RoutesError, TemplateReferenceError
from consumer.events import (
    Event,
    Interp,
    Reason,
    Validator,
    compile_schema,
    has_control_characters,
    invalid,
    load_json_file,
)
from consumer.keys import DEFAULT_KEY_TEMPLATE, KeyTemplate
from consumer.redact import mask_address
from consumer.settings import StalePolicy, parse_duration
from consumer.templates import (
    Compiled,
    TemplateOutside,
    check_references,
    environment,
    render_template,
)

UnknownTypePolicy = Literal["dead-letter", "skip"]
UNKNOWN_TYPE_POLICIES: Final[tuple[UnknownTypePolicy, ...]] = get_args(UnknownTypePolicy)
#: the choices of `policies.stale`, from the one declaration (`settings.StalePolicy`)
STALE_POLICIES: Final[tuple[StalePolicy, ...]] = get_args(StalePolicy)
#: Resend forgets idempotency keys after 24 h: no route may wait longer, and no dead
#: letter is replayed later than this after its first attempt
MAX_AGE_LIMIT: Final = 24 * 3600.0
#: Resend's limit of addresses in each of to, cc and bcc
MAX_TO: Final = 50
MAX_LOCAL_PART: Final = 64
MAX_DOMAIN: Final = 255
MAX_LABEL: Final = 63
MAX_TAGS: Final = 75
ENVELOPE_SCHEMA: Final = "envelope.schema.json"
SCHEMA_SUFFIX: Final = ".schema.json"

_TOP_KEYS: Final = frozenset(
    {"version", "schemas", "templates", "examples", "envelope", "defaults", "policies", "routes"}
)
_ROUTE_KEYS: Final = frozenset(
    {
        "schema",
        "idempotency_key",
        "from",
        "to",
        "cc",
        "bcc",
        "reply_to",
        "subject",
        "template",
        "tags",
        "headers",
        "policies",
        "priority",
        "batch",
    }
)
_DEFAULT_KEYS: Final = frozenset({"from", "reply_to", "tags", "headers"})
#: the routes file formats this version understands (an absent `version` means 1)
ROUTES_VERSIONS: Final = (1,)
#: headers with a route field of their own
_FIELD_HEADERS: Final = frozenset({"from", "to", "cc", "bcc", "subject", "reply-to"})
#: headers Resend or mail servers act on to route, authenticate or frame a message: a custom
#: value could add a hidden recipient, redirect bounces or receipts, or forge a trace
REFUSED_HEADERS: Final = frozenset(
    {
        "sender",
        "date",
        "return-path",
        "received",
        "received-spf",
        "delivered-to",
        "envelope-to",
        "x-original-to",
        "apparently-to",
        "errors-to",
        "return-receipt-to",
        "disposition-notification-to",
        "dkim-signature",
        "domainkey-signature",
        "authentication-results",
        "message-id",
        "mime-version",
    }
)
#: header name prefixes refused for the same reasons (Resent-To, Content-Type, ARC-Seal, ...)
REFUSED_HEADER_PREFIXES: Final = ("resent-", "content-", "arc-", "x-envelope-")

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
#: ASCII addresses only: a local part, then a domain with at least one dot
_EMAIL = rf"[A-Za-z0-9.!#$%&'*+/=?^_`{{|}}~-]+@{_LABEL}(?:\.{_LABEL})+"
#: a display name: bare words without the characters that let one string hold a second
#: address (`,` `;` `@` `:` quotes, brackets, backslash), or a quoted string that may hold
#: `,` `;` `:` (e.g. "Acme, Inc.") but still no `@`, brackets, quote or backslash
_DISPLAY = r'(?:[^<>@,;:"\\\x00-\x1f\x7f]*| *"[^<>@"\\\x00-\x1f\x7f]*" *)'
_ADDRESS = re.compile(rf"^(?:{_EMAIL}|{_DISPLAY}<{_EMAIL}>)\Z")
_TAG = re.compile(r"^[A-Za-z0-9_-]{1,256}\Z")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


def is_address(text: str) -> bool:
    """`jane@example.com`, `Jane Doe <jane@example.com>` or `"Doe, Jane" <jane@example.com>`.

    Exactly one address: a display name holding `@`, `,`, `;`, `:`, `<`, `>`
    or a stray quote is refused, so a single `to` value cannot smuggle in a
    second recipient past the checks and the cap. See `address_problem`.
    """
    return address_problem(text) is None


def address_problem(text: str) -> str | None:
    """Why text is not one usable address (never quoting it), or None.

    The lengths are SMTP's (RFC 5321): a local part of at most 64 characters,
    a domain of at most 255 with labels of at most 63; so an address Resend
    would refuse later is refused here with a reason code.
    """
    if len(text) > 320 or not _ADDRESS.match(text) or has_control_characters(text):
        return "is not an email address"
    address = text[text.rfind("<") + 1 : -1] if text.endswith(">") else text
    local, _, domain = address.rpartition("@")
    if len(local) > MAX_LOCAL_PART:
        return f"has a local part over {MAX_LOCAL_PART} characters"
    if len(domain) > MAX_DOMAIN:
        return f"has a domain over {MAX_DOMAIN} characters"
    if any(len(label) > MAX_LABEL for label in domain.split(".")):
        return f"has a domain label over {MAX_LABEL} characters"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """How one event type becomes one email."""

    event_type: str
    schema_path: Path
    validator: Validator
    key: KeyTemplate
    sender: Interp
    to: tuple[Interp, ...]
    cc: tuple[Interp, ...]
    bcc: tuple[Interp, ...]
    reply_to: tuple[Interp, ...]
    subject: Compiled
    html: Compiled | None
    text: Compiled | None
    hosted_id: str | None
    hosted_variables: tuple[tuple[str, Interp], ...]
    tags: tuple[tuple[str, Interp], ...]
    headers: tuple[tuple[str, Interp], ...]
    max_event_age: float | None
    stale_policy: StalePolicy | None
    #: served first by the shared rate budget when urgent (see consumer.batching)
    priority: Priority = Priority.NORMAL
    #: BATCH_SIZE / BATCH_LINGER for this route (None: the settings)
    batch_size: int | None = None
    batch_linger: float | None = None

    def body(self, event: Event, trace: str | None = None) -> dict[str, Any]:
        """The request body as a dict; InvalidEvent with a Reason when it cannot be built.

        `trace`: the record's trace context as a tag value, if it carried one.
        """
        sender = self.sender.constant
        if sender is None:
            sender = self.sender.one(event, field="from", reason=Reason.INVALID_SENDER)
            _no_controls("from", sender)
            problem = address_problem(sender)
            if problem is not None:
                shown = mask_address(sender)
                raise invalid(Reason.INVALID_SENDER, f"from: {shown} {problem}")
        to = _addresses(self.to, event, "to")
        if not to:
            raise invalid(Reason.INVALID_RECIPIENT, "to: no recipient")
        if len(to) > MAX_TO:
            raise invalid(Reason.INVALID_RECIPIENT, f"to: {len(to)} recipients, at most {MAX_TO}")
        context = {"data": event.data, "event": event.attributes()}
        subject = render_template(self.subject, context, "subject")
        _no_controls("subject", subject)
        if not subject.strip():
            raise invalid(Reason.TEMPLATE_ERROR, "subject: rendered empty")
        body: dict[str, Any] = {"from": sender, "to": to, "subject": subject}
        for name, exprs in (("cc", self.cc), ("bcc", self.bcc), ("reply_to", self.reply_to)):
            if exprs:
                addresses = _addresses(exprs, event, name)
                if name != "reply_to" and len(addresses) > MAX_TO:
                    raise invalid(
                        Reason.INVALID_RECIPIENT,
                        f"{name}: {len(addresses)} recipients, at most {MAX_TO}",
                    )
                body[name] = addresses
        if self.hosted_id is not None:
            variables = {name: _variable(expr, event, name) for name, expr in self.hosted_variables}
            body["template"] = {"id": self.hosted_id, "variables": variables}
        if self.html is not None:
            body["html"] = render_template(self.html, context, "html")
        if self.text is not None:
            body["text"] = render_template(self.text, context, "text")
        tags = [_tag(name, expr, event) for name, expr in self.tags]
        body["tags"] = [*tags, *source_tags(event, trace)]
        if self.headers:
            headers = {}
            for name, expr in self.headers:
                value = expr.one(event, field=f"headers.{name}", reason=Reason.TEMPLATE_ERROR)
                _no_controls(f"headers.{name}", value)
                headers[name] = value
            body["headers"] = headers
        return body

    def recipients(self, body: Mapping[str, Any]) -> tuple[str, ...]:
        """Every address the body sends to (for masked logging)."""
        out: list[str] = []
        for name in ("to", "cc", "bcc"):
            out.extend(body.get(name, ()))
        return tuple(out)


def _no_controls(field: str, value: str) -> None:
    if has_control_characters(value):
        raise invalid(Reason.CONTROL_CHARACTERS, f"{field}: CR, LF or another control character")


def _addresses(exprs: tuple[Interp, ...], event: Event, field: str) -> list[str]:
    reason = Reason.INVALID_RECIPIENT
    out: list[str] = []
    for expr in exprs:
        if expr.constant is not None:
            out.append(expr.constant)
            continue
        for address in expr.many(event, field=field, reason=reason):
            _no_controls(field, address)
            problem = address_problem(address)
            if problem is not None:
                # Masked even when it is not an address: it may still be personal data.
                shown = mask_address(address)
                raise invalid(reason, f"{field}: {shown} {problem}")
            out.append(address)
    return out


def _variable(expr: Interp, event: Event, name: str) -> Any:
    field = f"template.variables.{name}"
    value = expr.native(event, field=field, reason=Reason.TEMPLATE_ERROR)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise invalid(Reason.TEMPLATE_ERROR, f"{field}: need a string or a number")
    return value


def _tag(name: str, expr: Interp, event: Event) -> dict[str, str]:
    if expr.constant is not None:  # checked at load
        return {"name": name, "value": expr.constant}
    value = expr.one(event, field=f"tags.{name}", reason=Reason.INVALID_TAG)
    if not _TAG.match(value):
        raise invalid(Reason.INVALID_TAG, f"tags.{name}: value must be 1-256 of [A-Za-z0-9_-]")
    return {"name": name, "value": value}


#: tags every email carries so its webhooks join back to the event (see `source_tags`)
EVENT_TAG: Final = "rc_event"
ROUTE_TAG: Final = "rc_route"
#: the producer's trace context, when the record carried one (consumer.tracecontext)
TRACE_TAG: Final = "rc_trace"
RESERVED_TAGS: Final = frozenset({EVENT_TAG, ROUTE_TAG, TRACE_TAG})
_TAG_SAFE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def event_tag(source: str, event_id: str) -> str:
    """`rc_event`: the first 32 hex digits of SHA-256 over `source`, LF, `id`."""
    return hashlib.sha256(f"{source}\n{event_id}".encode()).hexdigest()[:32]


def encode_tag_value(text: str) -> str:
    """Text as a tag value: letters, digits and `_` kept, every other UTF-8 byte `-hh`.

    Reversible (`decode_tag_value`) and readable: `order.confirmed` is
    `order-2econfirmed`. Longer than 256: a 223-character prefix, `-`, 32 hex of a hash
    (exactly 256, so any shorter value decodes back).
    """
    out = "".join(c if c in _TAG_SAFE else "".join(f"-{b:02x}" for b in c.encode()) for c in text)
    if len(out) > 256:
        out = out[:223] + "-" + hashlib.sha256(text.encode()).hexdigest()[:32]
    return out or "-"


def decode_tag_value(value: str) -> str | None:
    """The text `encode_tag_value` made, or None when the value is not one of its outputs."""
    raw = bytearray()
    i = 0
    try:
        while i < len(value):
            if value[i] == "-":
                raw.append(int(value[i + 1 : i + 3], 16))
                i += 3
            else:
                raw += value[i].encode("ascii")
                i += 1
        return raw.decode()
    except (ValueError, IndexError):
        return None


def source_tags(event: Event, trace: str | None = None) -> list[dict[str, str]]:
    """The tags joining an email's webhooks back to its event: event hash and route,
    and the producer's trace (`trace`, from `consumer.tracecontext.trace_tag`).

    Part of the request bytes: stable for the same record and route.
    """
    tags = [
        {"name": EVENT_TAG, "value": event_tag(event.source, event.id)},
        {"name": ROUTE_TAG, "value": encode_tag_value(event.type)},
    ]
    if trace is not None:
        tags.append({"name": TRACE_TAG, "value": trace})
    return tags


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteTable:
    """The loaded routes file: every route plus the envelope validator and policies."""

    path: Path
    routes: Mapping[str, Route]
    envelope: Validator
    unknown_type: UnknownTypePolicy
    schemas_dir: Path
    templates_dir: Path
    examples_dir: Path | None


# -- loading ------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would silently keep the last)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
            )
        seen.add(key)
    return dict(loader.construct_mapping(node))


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Loader:
    """Reads one routes file; every error names file, route and field."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent

    def fail(
        self, problem: str, *, route: str | None = None, field: str | None = None
    ) -> RoutesError:
        where = [str(self.path)]
        if route is not None:
            where.append(f"route {route!r}")
        if field is not None:
            where.append(f"field {field!r}")
        return RoutesError(f"{': '.join(where)}: {problem}")

    def load(self) -> RouteTable:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise self.fail(f"cannot read the routes file ({exc})") from None
        try:
            doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise self.fail(f"not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise self.fail("the file must hold a mapping with a 'routes' key")
        self.unknown_keys(doc, _TOP_KEYS)
        version = doc.get("version", 1)
        if type(version) is not int or version not in ROUTES_VERSIONS:
            known = ", ".join(str(v) for v in ROUTES_VERSIONS)
            raise self.fail(
                f"{version!r} is not a routes file version this release knows ({known})",
                field="version",
            )
        schemas_dir = self.folder(doc, "schemas", ".")
        templates_dir = self.folder(doc, "templates", "templates")
        examples = self.folder(doc, "examples", "examples")
        envelope_name = doc.get("envelope", ENVELOPE_SCHEMA)
        if not isinstance(envelope_name, str):
            raise self.fail("must be a file name", field="envelope")
        envelope = self.schema(
            self.inside(schemas_dir, envelope_name, field="envelope"), field="envelope"
        )
        defaults = doc.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise self.fail("must be a mapping", field="defaults")
        self.unknown_keys(defaults, _DEFAULT_KEYS, field="defaults")
        policies = doc.get("policies") or {}
        if not isinstance(policies, dict):
            raise self.fail("must be a mapping", field="policies")
        self.unknown_keys(policies, frozenset({"unknown_type"}), field="policies")
        unknown_type = policies.get("unknown_type", "dead-letter")
        if unknown_type not in UNKNOWN_TYPE_POLICIES:
            raise self.fail(
                f"{unknown_type!r} is not one of {', '.join(UNKNOWN_TYPE_POLICIES)}",
                field="policies.unknown_type",
            )
        raw_routes = doc.get("routes")
        if not isinstance(raw_routes, dict) or not raw_routes:
            raise self.fail("must be a non-empty mapping of event type to route", field="routes")
        html_env = environment(templates_dir, html=True)
        text_env = environment(templates_dir, html=False)
        routes: dict[str, Route] = {}
        for event_type, spec in raw_routes.items():
            if not isinstance(event_type, str) or not event_type:
                raise self.fail(f"route name {event_type!r} must be an event type string")
            if not isinstance(spec, dict):
                raise self.fail("must be a mapping", route=event_type)
            merged = {**defaults, **spec}
            routes[event_type] = _RouteLoader(self, event_type, schemas_dir).build(
                merged, html_env=html_env, text_env=text_env
            )
        self.distinct_keys(routes)
        return RouteTable(
            path=self.path,
            routes=routes,
            envelope=envelope,
            unknown_type=unknown_type,
            schemas_dir=schemas_dir,
            templates_dir=templates_dir,
            examples_dir=examples if examples.is_dir() else None,
        )

    def distinct_keys(self, routes: Mapping[str, Route]) -> None:
        """Refuse key templates that could give two event types the same key."""
        prefixes = {name: route.key.prefix(name) for name, route in routes.items()}
        for name, prefix in prefixes.items():
            if not prefix:
                raise self.fail(
                    "must start with literal text (e.g. 'welcome:') or {type}, "
                    "so keys of different event types cannot collide",
                    route=name,
                    field="idempotency_key",
                )
            for other, other_prefix in prefixes.items():
                if other != name and other_prefix.startswith(prefix):
                    raise self.fail(
                        f"its fixed start {prefix!r} is also the start of route {other!r}'s "
                        f"keys ({other_prefix!r}): the two types could share a key",
                        route=name,
                        field="idempotency_key",
                    )

    def unknown_keys(
        self,
        doc: Mapping[Any, Any],
        allowed: frozenset[str],
        *,
        route: str | None = None,
        field: str | None = None,
    ) -> None:
        extra = sorted(str(k) for k in doc if k not in allowed)
        if extra:
            raise self.fail(
                f"unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}",
                route=route,
                field=field,
            )

    def folder(self, doc: Mapping[str, Any], name: str, default: str) -> Path:
        value = doc.get(name, default)
        if not isinstance(value, str):
            raise self.fail("must be a folder path", field=name)
        return self.inside(self.base, value, field=name)

    def inside(self, folder: Path, value: str, *, field: str, route: str | None = None) -> Path:
        """`folder / value`, resolved, refused unless it stays inside the routes file's folder.

        A routes file (often a less guarded ConfigMap than the Secret) must not
        reach other files: no absolute path, no `..`, no symlink leading out.
        """
        relative = Path(value)
        if relative.is_absolute() or ".." in relative.parts:
            raise self.fail(
                f"{value!r} must be relative to the routes file's folder, without '..'",
                route=route,
                field=field,
            )
        resolved = (folder / relative).resolve()
        if not resolved.is_relative_to(self.base):
            raise self.fail(
                f"{value!r} resolves outside the routes file's folder ({self.base})",
                route=route,
                field=field,
            )
        return resolved

    def schema(self, path: Path, *, route: str | None = None, field: str) -> Validator:
        try:
            return compile_schema(load_json_file(path))
        except OSError as exc:
            raise self.fail(
                f"cannot read {path} ({exc.strerror})", route=route, field=field
            ) from None
        except ValueError as exc:
            raise self.fail(f"{path}: {exc}", route=route, field=field) from None


class _RouteLoader:
    """Builds one `Route` from its mapping."""

    def __init__(self, loader: _Loader, event_type: str, schemas_dir: Path) -> None:
        self.loader = loader
        self.route = event_type
        self.schemas_dir = schemas_dir

    def fail(self, field: str, problem: str) -> RoutesError:
        return self.loader.fail(problem, route=self.route, field=field)

    def build(
        self,
        spec: dict[str, Any],
        *,
        html_env: ImmutableSandboxedEnvironment,
        text_env: ImmutableSandboxedEnvironment,
    ) -> Route:
        self.loader.unknown_keys(spec, _ROUTE_KEYS, route=self.route)
        schema_name = spec.get("schema", f"{self.route}{SCHEMA_SUFFIX}")
        if not isinstance(schema_name, str):
            raise self.fail("schema", "must be a file name")
        schema_path = self.loader.inside(
            self.schemas_dir, schema_name, field="schema", route=self.route
        )
        validator = self.loader.schema(schema_path, route=self.route, field="schema")
        key_text = spec.get("idempotency_key", DEFAULT_KEY_TEMPLATE)
        try:
            key = KeyTemplate.parse(key_text)
        except KeyTemplateError as exc:
            raise self.fail("idempotency_key", str(exc)) from None
        if "from" not in spec:
            raise self.fail("from", "is required (here or under defaults)")
        if "to" not in spec:
            raise self.fail("to", "is required")
        subject_text = self.string(spec, "subject", required=True)
        assert subject_text is not None
        html, text, hosted_id, variables = self.template(spec.get("template"), html_env, text_env)
        policies = spec.get("policies") or {}
        if not isinstance(policies, dict):
            raise self.fail("policies", "must be a mapping")
        self.loader.unknown_keys(
            policies, frozenset({"max_event_age", "stale"}), route=self.route, field="policies"
        )
        priority, batch_size, batch_linger = self.batching(spec)
        stale = policies.get("stale")
        if stale is not None and stale not in STALE_POLICIES:
            raise self.fail(
                "policies.stale", f"{stale!r} is not one of {', '.join(STALE_POLICIES)}"
            )
        return Route(
            event_type=self.route,
            schema_path=schema_path,
            validator=validator,
            key=key,
            sender=self.address("from", spec["from"]),
            to=self.interps("to", spec["to"], required=True),
            cc=self.interps("cc", spec.get("cc")),
            bcc=self.interps("bcc", spec.get("bcc")),
            reply_to=self.interps("reply_to", spec.get("reply_to")),
            subject=self.compile(text_env, subject_text, "subject"),
            html=html,
            text=text,
            hosted_id=hosted_id,
            hosted_variables=variables,
            tags=self.pairs("tags", spec.get("tags"), _TAG, MAX_TAGS - len(RESERVED_TAGS)),
            headers=self.pairs("headers", spec.get("headers"), _HEADER_NAME, 100),
            max_event_age=self.age(policies.get("max_event_age")),
            stale_policy=stale,
            priority=priority,
            batch_size=batch_size,
            batch_linger=batch_linger,
        )

    def batching(self, spec: Mapping[str, Any]) -> tuple[Priority, int | None, float | None]:
        """`priority: urgent|normal|bulk` and `batch: {size: 1..100, linger: 250ms}`."""
        name = spec.get("priority", "normal")
        if name not in PRIORITIES:
            raise self.fail("priority", f"{name!r} is not one of {', '.join(PRIORITIES)}")
        batch = spec.get("batch") or {}
        if not isinstance(batch, dict):
            raise self.fail("batch", "must be a mapping")
        self.loader.unknown_keys(
            batch, frozenset({"size", "linger"}), route=self.route, field="batch"
        )
        size = batch.get("size")
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH
        ):
            raise self.fail("batch.size", f"must be a whole number from 1 to {MAX_BATCH}")
        linger: float | None = None
        if batch.get("linger") is not None:
            try:
                linger = parse_duration(str(batch["linger"]))
            except ValueError as exc:
                raise self.fail("batch.linger", str(exc)) from None
            if not 0 <= linger <= MAX_LINGER:
                raise self.fail("batch.linger", f"must be from 0 to {MAX_LINGER:.0f}s")
        return PRIORITIES[name], size, linger

    def string(self, spec: Mapping[str, Any], field: str, *, required: bool = False) -> str | None:
        value = spec.get(field)
        if value is None:
            if required:
                raise self.fail(field, "is required")
            return None
        if isinstance(value, dict) and len(value) == 1 and None in value.values():
            raise self.fail(field, 'quote placeholders in YAML: write "{data.x}", not {data.x}')
        if not isinstance(value, str) or not value:
            raise self.fail(field, "must be a non-empty string")
        return value

    def interp(self, field: str, value: Any) -> Interp:
        text = self.string({field: value}, field, required=True)
        assert text is not None
        try:
            return Interp.parse(text)
        except ValueError as exc:
            raise self.fail(field, str(exc)) from None

    def address(self, field: str, value: Any) -> Interp:
        expr = self.interp(field, value)
        if expr.constant is not None:
            problem = address_problem(expr.constant)
            if problem is not None:
                raise self.fail(field, f"{expr.constant!a} {problem}")
        return expr

    def interps(self, field: str, value: Any, *, required: bool = False) -> tuple[Interp, ...]:
        if value is None and not required:
            return ()
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.fail(field, "must name at least one address")
        if field in ("to", "cc", "bcc") and len(items) > MAX_TO:
            raise self.fail(field, f"{len(items)} addresses, at most {MAX_TO}")
        return tuple(self.address(field, item) for item in items)

    def pairs(
        self, field: str, value: Any, name_rule: re.Pattern[str], limit: int
    ) -> tuple[tuple[str, Interp], ...]:
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise self.fail(field, "must be a mapping of name to value")
        if len(value) > limit:
            raise self.fail(field, f"at most {limit} entries")
        out = []
        for name, item in value.items():
            if not isinstance(name, str) or not name_rule.match(name):
                raise self.fail(f"{field}.{name}", f"name must match {name_rule.pattern}")
            if field == "tags" and name in RESERVED_TAGS:
                raise self.fail(f"{field}.{name}", "is set by the service (joins feedback back)")
            if field == "headers":
                self.header_name(name)
            if isinstance(item, int) and not isinstance(item, bool):
                item = str(item)
            expr = self.interp(f"{field}.{name}", item)
            if field == "tags" and expr.constant is not None and not _TAG.match(expr.constant):
                raise self.fail(f"{field}.{name}", "value must be 1-256 of [A-Za-z0-9_-]")
            if (
                field == "headers"
                and expr.constant is not None
                and has_control_characters(expr.constant)
            ):
                raise self.fail(f"{field}.{name}", "CR, LF or another control character")
            out.append((name, expr))
        return tuple(out)

    def header_name(self, name: str) -> None:
        lower = name.lower()
        if lower in _FIELD_HEADERS:
            raise self.fail(f"headers.{name}", "set this through its own route field")
        if lower in REFUSED_HEADERS or lower.startswith(REFUSED_HEADER_PREFIXES):
            raise self.fail(
                f"headers.{name}",
                "refused: Resend or mail servers act on this header to route, "
                "authenticate or frame the message",
            )

    def template(
        self,
        value: Any,
        html_env: ImmutableSandboxedEnvironment,
        text_env: ImmutableSandboxedEnvironment,
    ) -> tuple[Compiled | None, Compiled | None, str | None, tuple[tuple[str, Interp], ...]]:
        if not isinstance(value, dict):
            raise self.fail("template", "is required: {html, text} files or {id, variables}")
        if "id" in value:
            if set(value) - {"id", "variables"}:
                raise self.fail("template", "a hosted template takes only id and variables")
            hosted_id = self.string(value, "id", required=True)
            variables = self.pairs("template.variables", value.get("variables"), _TAG, 200)
            return None, None, hosted_id, variables
        if set(value) - {"html", "text"} or not value:
            raise self.fail("template", "give html and/or text files, or id and variables")
        html = self.file(html_env, value.get("html"), "template.html", ".html.j2")
        text = self.file(text_env, value.get("text"), "template.text", ".txt.j2")
        return html, text, None, ()

    def file(
        self, env: ImmutableSandboxedEnvironment, name: Any, field: str, suffix: str
    ) -> Compiled | None:
        if name is None:
            return None
        if not isinstance(name, str) or not name.endswith(suffix):
            raise self.fail(field, f"must be a template file name ending in {suffix}")
        try:
            template = env.get_template(name)
            assert env.loader is not None
            check_references(env, env.loader.get_source(env, name)[0], name=name)
        except TemplateOutside as exc:
            raise self.fail(field, str(exc.message)) from None
        except jinja2.TemplateNotFound:
            raise self.fail(field, f"template {name} not found in the templates folder") from None
        except jinja2.TemplateSyntaxError as exc:
            raise self.fail(field, f"{name} line {exc.lineno}: {exc.message}") from None
        except TemplateReferenceError as exc:
            raise self.fail(field, str(exc)) from None
        return Compiled(template)

    def compile(self, env: ImmutableSandboxedEnvironment, source: str, field: str) -> Compiled:
        try:
            template = env.from_string(source)
            check_references(env, source, name=field)
        except jinja2.TemplateSyntaxError as exc:
            raise self.fail(field, f"template syntax: {exc.message}") from None
        except TemplateReferenceError as exc:
            raise self.fail(field, str(exc)) from None
        return Compiled(template, source=source)

    def age(self, value: Any) -> float | None:
        if value is None:
            return None
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            raise self.fail("policies.max_event_age", str(exc)) from None
        if not 0 < seconds <= MAX_AGE_LIMIT:
            raise self.fail(
                "policies.max_event_age", "must be above 0 and at most 24h (Resend's key window)"
            )
        return seconds


def load_routes(path: Path) -> RouteTable:
    """Read, check and compile a routes file; RoutesError on any problem."""
    return _Loader(path.resolve()).load()
