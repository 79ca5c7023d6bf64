"""Routes file: loading, start-up validation with precise errors, rendering and the sandbox."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from consumer.batching import Priority
from consumer.errors import InvalidEvent, RoutesError, SettingsError
from consumer.events import Event, Reason
from consumer.routes import (
    EVENT_TAG,
    ROUTE_TAG,
    RouteTable,
    decode_tag_value,
    encode_tag_value,
    event_tag,
    is_address,
    load_routes,
    source_tags,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "schemas" / "routes.yaml"

BASE_ROUTE = """
    idempotency_key: "thing:{data.id}"
    from: "Acme <no-reply@acme.example>"
    to: "{data.email}"
    subject: "Hello {{ data.name }}"
    template:
      html: t.html.j2
      text: t.txt.j2
"""


def write_routes(
    folder: Path,
    routes_yaml: str,
    *,
    html: str = "<p>Hi {{ data.name }}</p>",
    text: str = "Hi {{ data.name }}",
    schema: str = '{"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"}',
) -> Path:
    """A self-contained routes folder: routes.yaml, one schema, two templates."""
    (folder / "templates").mkdir(exist_ok=True)
    (folder / "templates" / "t.html.j2").write_text(html)
    (folder / "templates" / "t.txt.j2").write_text(text)
    (folder / "thing.done.schema.json").write_text(schema)
    (folder / "envelope.schema.json").write_text(
        (ROOT / "schemas" / "envelope.schema.json").read_text()
    )
    path = folder / "routes.yaml"
    path.write_text(textwrap.dedent(routes_yaml))
    return path


def one_route(tmp_path: Path, extra: str = "", **kwargs: Any) -> RouteTable:
    return load_routes(
        write_routes(tmp_path, "routes:\n  thing.done:" + BASE_ROUTE + extra, **kwargs)
    )


def event(data: Any, event_type: str = "thing.done") -> Event:
    return Event(
        id="e-1",
        source="https://acme.example",
        type=event_type,
        specversion="1.0",
        time=None,
        subject=None,
        datacontenttype=None,
        data=data,
        mode="structured",
        event_time=None,
    )


def body_reason(table: RouteTable, data: Any) -> str:
    with pytest.raises(InvalidEvent) as info:
        table.routes["thing.done"].body(event(data))
    return info.value.reason


GOOD = {"id": "1", "email": "jane@example.com", "name": "Jane"}


def test_shipped_routes_load_with_every_domain_event() -> None:
    """The shipped routes file names the four domain events and each has html and text."""
    table = load_routes(SHIPPED)
    assert set(table.routes) == {
        "order.confirmed",
        "password_reset.requested",
        "user.signed_up",
        "magic_link.requested",
    }
    for route in table.routes.values():
        assert route.html is not None
        assert route.text is not None
    assert table.routes["password_reset.requested"].max_event_age == 3600.0
    assert table.routes["magic_link.requested"].stale_policy == "skip"
    assert table.unknown_type == "dead-letter"


def test_routes_error_is_a_settings_error(tmp_path: Path) -> None:
    """RoutesError subclasses SettingsError, so the CLI reports it as configuration."""
    assert issubclass(RoutesError, SettingsError)
    with pytest.raises(SettingsError):
        load_routes(tmp_path / "missing.yaml")


def test_body_has_fields_from_route_and_data(tmp_path: Path) -> None:
    """The body takes from/subject/templates from the route and recipients from data."""
    table = one_route(
        tmp_path,
        extra="""
    cc: ["audit@acme.example"]
    bcc: "{data.bcc}"
    reply_to: "Support <support@acme.example>"
    tags:
      category: thing
      user: "{data.id}"
    headers:
      X-Entity-Ref-ID: "thing-{data.id}"
""",
    )
    body = table.routes["thing.done"].body(
        event({**GOOD, "bcc": ["b1@example.com", "b2@example.com"]})
    )
    assert body == {
        "from": "Acme <no-reply@acme.example>",
        "to": ["jane@example.com"],
        "cc": ["audit@acme.example"],
        "bcc": ["b1@example.com", "b2@example.com"],
        "reply_to": ["Support <support@acme.example>"],
        "subject": "Hello Jane",
        "html": "<p>Hi Jane</p>",
        "text": "Hi Jane",
        "tags": [
            {"name": "category", "value": "thing"},
            {"name": "user", "value": "1"},
            *source_tags(event(GOOD)),
        ],
        "headers": {"X-Entity-Ref-ID": "thing-1"},
    }


def test_html_is_autoescaped_text_is_not(tmp_path: Path) -> None:
    """HTML templates escape data; text templates and the subject keep it as written."""
    table = one_route(tmp_path)
    body = table.routes["thing.done"].body(event({**GOOD, "name": "<b>Tom & Jerry</b>"}))
    assert body["html"] == "<p>Hi &lt;b&gt;Tom &amp; Jerry&lt;/b&gt;</p>"
    assert body["text"] == "Hi <b>Tom & Jerry</b>"
    assert body["subject"] == "Hello <b>Tom & Jerry</b>"


def test_data_is_never_evaluated_as_template(tmp_path: Path) -> None:
    """Jinja syntax inside event data is printed, not run (no template injection)."""
    table = one_route(tmp_path)
    payload = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    body = table.routes["thing.done"].body(event({**GOOD, "name": payload}))
    assert body["text"] == f"Hi {payload}"


@pytest.mark.parametrize(
    "html",
    [
        "{{ data.name.__class__ }}",
        "{{ data.name.__class__.__mro__ }}",
        "{{ data[data.field] }}",
        "{{ data.name.format.__globals__ }}",
    ],
)
def test_template_reaching_python_internals_is_template_security(tmp_path: Path, html: str) -> None:
    """The sandbox stops attribute walks into Python internals with template_security."""
    table = one_route(tmp_path, html=html)
    assert body_reason(table, {**GOOD, "field": "__class__"}) == Reason.TEMPLATE_SECURITY


def test_sandbox_is_immutable(tmp_path: Path) -> None:
    """Templates cannot mutate event data (ImmutableSandboxedEnvironment)."""
    table = one_route(tmp_path, html="{{ data.tags.append('x') }}")
    assert body_reason(table, {**GOOD, "tags": []}) == Reason.TEMPLATE_SECURITY


def test_missing_template_variable_is_template_error(tmp_path: Path) -> None:
    """StrictUndefined: a field the template needs but the event lacks is template_error."""
    table = one_route(tmp_path, text="Order {{ data.order_number }}")
    assert body_reason(table, GOOD) == Reason.TEMPLATE_ERROR


def test_runtime_error_message_does_not_quote_data(tmp_path: Path) -> None:
    """A template failing on a value reports the exception type, not the (secret) value."""
    table = one_route(tmp_path, text="{{ 1 / data.zero }}")
    with pytest.raises(InvalidEvent) as info:
        table.routes["thing.done"].body(event({**GOOD, "zero": 0, "token": "tok-secret"}))
    assert info.value.reason == Reason.TEMPLATE_ERROR
    assert "ZeroDivisionError" in str(info.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({**GOOD, "email": "not-an-address"}, Reason.INVALID_RECIPIENT),
        ({**GOOD, "email": ""}, Reason.INVALID_RECIPIENT),
        ({**GOOD, "email": None}, Reason.INVALID_RECIPIENT),
        ({"id": "1", "name": "x"}, Reason.INVALID_RECIPIENT),
        ({**GOOD, "email": ["a@example.com", 5]}, Reason.INVALID_RECIPIENT),
        ({**GOOD, "email": [f"u{i}@example.com" for i in range(51)]}, Reason.INVALID_RECIPIENT),
        ({**GOOD, "email": []}, Reason.INVALID_RECIPIENT),
        ({**GOOD, "email": "jane@example.com\r\nBcc: evil@example.com"}, Reason.CONTROL_CHARACTERS),
        ({**GOOD, "name": "Jane\r\nBcc: evil@example.com"}, Reason.CONTROL_CHARACTERS),
    ],
)
def test_recipient_and_subject_problems_have_reasons(
    tmp_path: Path, data: dict[str, Any], reason: Reason
) -> None:
    """Bad recipients, header injection and empty subjects each map to a stable reason."""
    assert body_reason(one_route(tmp_path), data) == reason


def test_empty_subject_is_template_error(tmp_path: Path) -> None:
    """A subject that renders blank is refused (Resend requires one)."""
    routes = "routes:\n  thing.done:" + BASE_ROUTE.replace(
        "Hello {{ data.name }}", "{{ data.name }}"
    )
    table = load_routes(write_routes(tmp_path, routes))
    assert body_reason(table, {**GOOD, "name": "   "}) == Reason.TEMPLATE_ERROR


def test_sender_and_header_values_from_data_are_checked(tmp_path: Path) -> None:
    """from and header values filled from data refuse CR/LF and non-addresses."""
    path = write_routes(
        tmp_path,
        """
        routes:
          thing.done:
            idempotency_key: "thing:{data.id}"
            from: "{data.sender}"
            to: "{data.email}"
            subject: "s"
            template: {text: t.txt.j2}
            headers:
              X-Ref: "{data.ref}"
            tags:
              kind: "{data.kind}"
        """,
    )
    table = load_routes(path)
    ok = {**GOOD, "sender": "Acme <a@acme.example>", "ref": "r1", "kind": "k"}
    assert table.routes["thing.done"].body(event(ok))["headers"] == {"X-Ref": "r1"}
    assert (
        body_reason(table, {**ok, "sender": "Acme\n<a@acme.example>"}) == Reason.CONTROL_CHARACTERS
    )
    assert body_reason(table, {**ok, "sender": "nobody"}) == Reason.INVALID_SENDER
    assert body_reason(table, {**ok, "ref": "r1\r\nX-Evil: 1"}) == Reason.CONTROL_CHARACTERS
    assert body_reason(table, {**ok, "ref": {"a": 1}}) == Reason.TEMPLATE_ERROR
    assert body_reason(table, {**ok, "kind": "no spaces allowed"}) == Reason.INVALID_TAG


def test_hosted_template_sends_id_and_variables(tmp_path: Path) -> None:
    """A Resend-hosted template sends {id, variables} and no html/text."""
    path = write_routes(
        tmp_path,
        """
        routes:
          thing.done:
            idempotency_key: "thing:{data.id}"
            from: "a@acme.example"
            to: "{data.email}"
            subject: "Hello"
            template:
              id: "tmpl_welcome_v2"
              variables:
                name: "{data.name}"
                count: "{data.count}"
                greeting: "Hi {data.name}!"
        """,
    )
    body = load_routes(path).routes["thing.done"].body(event({**GOOD, "count": 3}))
    assert body["template"] == {
        "id": "tmpl_welcome_v2",
        "variables": {"name": "Jane", "count": 3, "greeting": "Hi Jane!"},
    }
    assert "html" not in body
    assert "text" not in body


ROUTE_ERRORS = [
    ("routes: []", None, "routes", "non-empty mapping"),
    ("nonsense: 1\nroutes: {}", None, None, "unknown key(s) nonsense"),
    ("routes:\n  thing.done: 5", "thing.done", None, "must be a mapping"),
    (
        "routes:\n  thing.done:" + BASE_ROUTE + "    colour: red\n",
        "thing.done",
        None,
        "unknown key(s) colour",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE.replace('"thing:{data.id}"', '"thing"'),
        "thing.done",
        "idempotency_key",
        "every event of the type",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE.replace('to: "{data.email}"', "to: {data.email}"),
        "thing.done",
        "to",
        "quote placeholders",
    ),
    (
        "routes:\n  thing.done:"
        + BASE_ROUTE.replace('"Acme <no-reply@acme.example>"', '"not an address"'),
        "thing.done",
        "from",
        "not an email address",
    ),
    (
        "routes:\n  thing.done:"
        + BASE_ROUTE.replace('    from: "Acme <no-reply@acme.example>"\n', ""),
        "thing.done",
        "from",
        "is required",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE.replace("t.html.j2", "missing.html.j2"),
        "thing.done",
        "template.html",
        "not found",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE.replace("t.html.j2", "t.txt.j2"),
        "thing.done",
        "template.html",
        "ending in .html.j2",
    ),
    (
        "routes:\n  thing.done:"
        + BASE_ROUTE.replace("Hello {{ data.name }}", "Hello {{ data.name "),
        "thing.done",
        "subject",
        "template syntax",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE + "    policies: {max_event_age: 25h}\n",
        "thing.done",
        "policies.max_event_age",
        "at most 24h",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE + "    policies: {stale: maybe}\n",
        "thing.done",
        "policies.stale",
        "not one of",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE + "    priority: asap\n",
        "thing.done",
        "priority",
        "not one of",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE + "    batch: {size: 101}\n",
        "thing.done",
        "batch.size",
        "from 1 to 100",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE + "    batch: {linger: 11s}\n",
        "thing.done",
        "batch.linger",
        "from 0 to 10s",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE + "    batch: {max: 3}\n",
        "thing.done",
        "batch",
        "max",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE + "    tags: {category: 'has space'}\n",
        "thing.done",
        "tags.category",
        "value must be",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE + "    headers: {Bcc: 'x@acme.example'}\n",
        "thing.done",
        "headers.Bcc",
        "own route field",
    ),
    (
        "routes:\n  thing.done:" + BASE_ROUTE + "    schema: nope.schema.json\n",
        "thing.done",
        "schema",
        "cannot read",
    ),
    (
        "policies: {unknown_type: explode}\nroutes:\n  thing.done:" + BASE_ROUTE,
        None,
        "policies.unknown_type",
        "not one of",
    ),
    ("routes:\n  thing.done:" + BASE_ROUTE + "  thing.done: {}\n", None, None, "duplicate key"),
    ("routes: [unclosed", None, None, "not valid YAML"),
]


@pytest.mark.parametrize(("routes_yaml", "route", "field", "problem"), ROUTE_ERRORS)
def test_invalid_routes_file_names_file_route_and_field(
    tmp_path: Path, routes_yaml: str, route: str | None, field: str | None, problem: str
) -> None:
    """Every routes-file mistake fails at load, naming the file, the route and the field."""
    path = write_routes(tmp_path, routes_yaml)
    with pytest.raises(RoutesError) as info:
        load_routes(path)
    message = str(info.value)
    assert str(path) in message
    assert problem in message
    if route is not None:
        assert f"route {route!r}" in message
    if field is not None:
        assert f"field {field!r}" in message


def test_nondeterministic_helpers_are_refused_at_load(tmp_path: Path) -> None:
    """`random` and `lipsum` would change bytes between attempts: templates cannot use them."""
    with pytest.raises(RoutesError, match="random"):
        one_route(tmp_path, html="{{ data.items | random }}")
    table = one_route(tmp_path, html="{{ lipsum() }}")
    assert body_reason(table, GOOD) == Reason.TEMPLATE_ERROR


def test_broken_schema_is_refused(tmp_path: Path) -> None:
    """A schema file that is not valid JSON Schema stops start-up, naming the route."""
    with pytest.raises(RoutesError, match=r"route 'thing\.done': field 'schema'"):
        one_route(tmp_path, schema='{"type": 12}')


def test_address_rule() -> None:
    """Plain and named addresses pass; missing domains, spaces and brackets do not."""
    assert is_address("jane@example.com")
    assert is_address("Jane Doe <jane@example.com>")
    assert is_address("<jane@example.com>")
    assert is_address('"Doe, Jane" <jane@example.com>')
    assert is_address("J. R. O'Neil <jane@example.com>")
    for bad in ("jane", "jane@", "jane@localhost", "ja ne@example.com", "<jane@example.com", ""):
        assert not is_address(bad), bad


@pytest.mark.parametrize(
    "text",
    [
        "evil@attacker.example, <jane@example.com>",
        "evil@attacker.example; <jane@example.com>",
        "<evil@attacker.example>, <jane@example.com>",
        "jane@example.com, evil@attacker.example",
        "Jane, Bob <jane@example.com>",
        "evil@attacker.example <jane@example.com>",
        '"evil@attacker.example" <jane@example.com>',
        '"Jane <jane@example.com>',
        '"a" "b" <jane@example.com>',
        "undisclosed-recipients: <jane@example.com>",
        "Jane\\ <jane@example.com>",
        "Jane\x7f <jane@example.com>",
    ],
)
def test_address_rule_refuses_a_second_address_in_one_value(text: str) -> None:
    """A display name holding @ , ; : quotes or brackets is refused: one value, one address."""
    assert not is_address(text)


COMPLEX_HTML = """{% macro row(k, v) %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endmacro -%}
{% set greeting %}Hello <b>{{ data.name }}</b>{% endset -%}
{{ greeting }}|{{ greeting | upper }}|{{ row(data.name, data.html | safe) }}|
{{- data.name ~ '<i>' }}|{% autoescape false %}{{ data.name }}{% endautoescape %}|
{{- data.count }}|{{ data.list | join(', ') }}|{{ data.html | safe }}|
{{- data.missing | default('<d>') }}
{%- for x in data.list %}{{ loop.index }}{{ x }}{% endfor %}"""


def test_fast_render_matches_stock_jinja(tmp_path: Path) -> None:
    """Compiled.render gives byte-identical output to Template.render, escaping included."""
    table = one_route(tmp_path, html=COMPLEX_HTML)
    route = table.routes["thing.done"]
    assert route.html is not None
    data = {"name": "<Tom & 'Jerry'>", "html": "<em>ok</em>", "count": 3, "list": ["a<", "b&"]}
    context = {"data": data, "event": {}}
    stock = route.html.template.environment.from_string(COMPLEX_HTML).render(context)
    assert route.html.render(context) == stock
    assert "&lt;Tom &amp; &#39;Jerry&#39;&gt;" in stock
    assert "<em>ok</em>" in stock


def test_shipped_templates_render_like_stock_jinja() -> None:
    """Every shipped template renders its example exactly as an unmodified Jinja template."""
    table = load_routes(SHIPPED)
    compared = 0
    for path in sorted((ROOT / "schemas" / "examples").glob("*.json")):
        doc = json.loads(path.read_text())
        event_type = doc["headers"]["ce_type"] if "headers" in doc else doc["type"]
        data = doc["value"] if "headers" in doc else doc["data"]
        route = table.routes[event_type]
        context = {"data": data, "event": {}}
        for compiled in (route.html, route.text):
            assert compiled is not None
            assert compiled.template.name is not None
            source = (table.templates_dir / compiled.template.name).read_text()
            stock = compiled.template.environment.from_string(source).render(context)
            assert compiled.render(context) == stock, (path.name, compiled)
            compared += 1
    assert compared >= 10


@pytest.mark.parametrize(
    ("subject", "data"),
    [
        ("Your order {{ data.order.number }} is confirmed", {"order": {"number": "A-1"}}),
        ("Count {{data.n}}", {"n": 12}),
        ("Price {{ data.n }}", {"n": 1.5}),
        ("Flag {{ data.n }}", {"n": True}),
        ("List {{ data.n }}", {"n": [1, "<a>"]}),
        ("Items {{ data.items }}", {"items": "x"}),
        ("Plain subject, no fields", {}),
        ("Upper {{ data.name | upper }}", {"name": "jane"}),
        ("{{ data.a }}{{ data.b }}", {"a": "x", "b": 2}),
    ],
)
def test_simple_subject_matches_jinja(tmp_path: Path, subject: str, data: dict[str, Any]) -> None:
    """The subject shortcut gives Jinja's exact output, falling back for other values."""
    routes = "routes:\n  thing.done:" + BASE_ROUTE.replace("Hello {{ data.name }}", subject)
    route = load_routes(write_routes(tmp_path, routes)).routes["thing.done"]
    context = {"data": data, "event": {}}
    stock = route.subject.template.environment.from_string(subject).render(context)
    assert route.subject.render(context) == stock


def test_simple_subject_missing_field_still_errors(tmp_path: Path) -> None:
    """A missing subject field falls back to Jinja and fails as template_error."""
    routes = "routes:\n  thing.done:" + BASE_ROUTE.replace(
        "Hello {{ data.name }}", "Hi {{ data.who }}"
    )
    table = load_routes(write_routes(tmp_path, routes))
    assert body_reason(table, GOOD) == Reason.TEMPLATE_ERROR


def two_routes(tmp_path: Path, first_key: str, second_key: str) -> Path:
    """A routes file with two event types sharing one schema and template."""
    route = BASE_ROUTE + "    schema: thing.done.schema.json\n"
    return write_routes(
        tmp_path,
        "routes:\n  thing.done:"
        + route.replace('"thing:{data.id}"', f'"{first_key}"')
        + "  thing.other:"
        + route.replace('"thing:{data.id}"', f'"{second_key}"'),
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("thing:{data.id}", "thing:{data.id}"),
        ("a:{data.id}", "a:b:{data.id}"),
        ("a:b:{data.id}", "a:{data.x}:{data.y}"),
        ("{data.id}:x", "thing:{data.id}"),
        ("thing.2eother:{id}", "{type}:{id}"),
    ],
)
def test_routes_that_could_share_keys_are_refused(tmp_path: Path, first: str, second: str) -> None:
    """Two event types whose keys could collide fail at load, naming the idempotency_key."""
    with pytest.raises(RoutesError, match="field 'idempotency_key'"):
        load_routes(two_routes(tmp_path, first, second))


def test_distinct_prefixes_and_type_keys_load(tmp_path: Path) -> None:
    """Disjoint literal prefixes, or {type} first, keep keys of different types apart."""
    table = load_routes(two_routes(tmp_path, "{type}:{id}", "{type}:{source}:{id}"))
    assert table.routes["thing.done"].key.prefix("thing.done") == "thing.2edone:"
    load_routes(two_routes(tmp_path, "done:{data.id}", "other:{data.id}"))


# -- a routes file cannot read other files (issue 11, item 2) -------------------


def write_secret(tmp_path: Path) -> Path:
    """A file outside the routes folder standing in for /proc/self/environ."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "environ.txt.j2"
    secret.write_text("RESEND_API_KEY=re_leaked")
    return secret


def routes_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "routes"
    folder.mkdir()
    return folder


@pytest.mark.parametrize(
    ("top", "field", "problem"),
    [
        ("templates: /\n", "templates", "must be relative"),
        ("templates: ../outside\n", "templates", "without '..'"),
        ("schemas: /etc\n", "schemas", "must be relative"),
        ("examples: ../..\n", "examples", "without '..'"),
        ("envelope: ../outside/e.json\n", "envelope", "without '..'"),
        ("envelope: /etc/passwd\n", "envelope", "must be relative"),
    ],
)
def test_folders_and_files_outside_the_routes_folder_are_refused(
    tmp_path: Path, top: str, field: str, problem: str
) -> None:
    """Absolute paths and '..' in folders and file names fail at load, naming the field."""
    folder = routes_folder(tmp_path)
    path = write_routes(folder, top + "routes:\n  thing.done:" + BASE_ROUTE)
    with pytest.raises(RoutesError) as info:
        load_routes(path)
    assert f"field {field!r}" in str(info.value)
    assert problem in str(info.value)


def test_route_schema_outside_the_folder_is_refused(tmp_path: Path) -> None:
    """A route's schema file name cannot climb out of the routes folder."""
    folder = routes_folder(tmp_path)
    route = BASE_ROUTE + "    schema: ../outside/x.schema.json\n"
    with pytest.raises(RoutesError) as info:
        load_routes(write_routes(folder, "routes:\n  thing.done:" + route))
    assert "route 'thing.done'" in str(info.value)
    assert "field 'schema'" in str(info.value)


def test_symlinked_folder_leading_out_is_refused(tmp_path: Path) -> None:
    """A templates folder that is a symlink to somewhere else is refused at load."""
    secret = write_secret(tmp_path)
    folder = routes_folder(tmp_path)
    (folder / "elsewhere").symlink_to(secret.parent, target_is_directory=True)
    path = write_routes(folder, "templates: elsewhere\nroutes:\n  thing.done:" + BASE_ROUTE)
    with pytest.raises(RoutesError, match="resolves outside") as info:
        load_routes(path)
    assert "field 'templates'" in str(info.value)


def test_symlinked_schema_leading_out_is_refused(tmp_path: Path) -> None:
    """A schema file that is a symlink out of the routes folder is refused at load."""
    folder = routes_folder(tmp_path)
    path = write_routes(folder, "routes:\n  thing.done:" + BASE_ROUTE)
    outside = tmp_path / "outside.schema.json"
    outside.write_text((folder / "thing.done.schema.json").read_text())
    (folder / "thing.done.schema.json").unlink()
    (folder / "thing.done.schema.json").symlink_to(outside)
    with pytest.raises(RoutesError, match="resolves outside") as info:
        load_routes(path)
    assert "field 'schema'" in str(info.value)


def test_symlinked_template_file_leading_out_is_refused(tmp_path: Path) -> None:
    """A template file that is a symlink out of the templates folder is refused at load."""
    secret = write_secret(tmp_path)
    folder = routes_folder(tmp_path)
    path = write_routes(folder, "routes:\n  thing.done:" + BASE_ROUTE)
    (folder / "templates" / "t.txt.j2").unlink()
    (folder / "templates" / "t.txt.j2").symlink_to(secret)
    with pytest.raises(RoutesError, match="outside the templates folder") as info:
        load_routes(path)
    assert "field 'template.text'" in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{% include '/proc/self/environ' %}", "absolute template names"),
        ("{% include '../outside/environ.txt.j2' %}", "not found"),
        ("{% include 'leak.txt.j2' %}", "outside the templates folder"),
        ("{% import 'leak.txt.j2' as x %}", "outside the templates folder"),
        ("{% extends 'leak.txt.j2' %}", "outside the templates folder"),
        ("{% include data.name %}", "literally"),
        ("{% include 'missing.txt.j2' %}", "not found"),
        ("{% include 'inner.txt.j2' %}", "outside the templates folder"),
    ],
)
def test_include_import_extends_stay_in_the_templates_folder(
    tmp_path: Path, text: str, problem: str
) -> None:
    """Template references are literal names inside the templates folder, checked at load."""
    secret = write_secret(tmp_path)
    folder = routes_folder(tmp_path)
    path = write_routes(folder, "routes:\n  thing.done:" + BASE_ROUTE, text=text)
    (folder / "templates" / "leak.txt.j2").symlink_to(secret)
    # a template inside the folder that itself includes the symlink: checked recursively
    (folder / "templates" / "inner.txt.j2").write_text("{% include 'leak.txt.j2' %}")
    with pytest.raises(RoutesError) as info:
        load_routes(path)
    assert "field 'template.text'" in str(info.value)
    assert problem in str(info.value)
    assert "re_leaked" not in str(info.value)


def test_include_in_a_subject_is_confined_too(tmp_path: Path) -> None:
    """The subject is a template of its own: its include is checked like a file's."""
    folder = routes_folder(tmp_path)
    route = BASE_ROUTE.replace("Hello {{ data.name }}", "{% include '/etc/hostname' %}")
    with pytest.raises(RoutesError, match="absolute template names") as info:
        load_routes(write_routes(folder, "routes:\n  thing.done:" + route))
    assert "field 'subject'" in str(info.value)


def test_include_inside_the_folder_still_works(tmp_path: Path) -> None:
    """A literal include of a template in the templates folder renders as before."""
    folder = routes_folder(tmp_path)
    path = write_routes(
        folder, "routes:\n  thing.done:" + BASE_ROUTE, text="{% include 'part.txt.j2' %}!"
    )
    (folder / "templates" / "part.txt.j2").write_text("Hi {{ data.name }}")
    body = load_routes(path).routes["thing.done"].body(event(GOOD))
    assert body["text"] == "Hi Jane!"


def test_schema_with_a_remote_ref_is_refused(tmp_path: Path) -> None:
    """A schema $ref to a file or URL is refused at load: schemas cannot read files either."""
    secret = write_secret(tmp_path)
    schema = json.dumps(
        {"$schema": "http://json-schema.org/draft-07/schema#", "$ref": secret.as_uri()}
    )
    with pytest.raises(RoutesError, match=r"only references inside the schema") as info:
        one_route(routes_folder(tmp_path), schema=schema)
    assert "field 'schema'" in str(info.value)


def test_the_issue_attack_is_refused_by_check_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`templates: /` plus an include of proc/self/environ: `check` exits 2 with one line."""
    from consumer.cli import main

    folder = routes_folder(tmp_path)
    path = write_routes(
        folder,
        "templates: /\nroutes:\n  thing.done:" + BASE_ROUTE,
        text="{% include 'proc/self/environ' %}",
    )
    code = main(["check", "--no-examples", "--routes-file", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "field 'templates'" in err


# -- routes file version and routing headers (issue 11, item 3) ------------------


@pytest.mark.parametrize("version", ["2", "0", "'1'", "1.0", "true", "null", "[1]"])
def test_unknown_routes_file_version_is_refused(tmp_path: Path, version: str) -> None:
    """Only routes file version 1 loads; anything else names the field 'version'."""
    path = write_routes(tmp_path, f"version: {version}\nroutes:\n  thing.done:" + BASE_ROUTE)
    with pytest.raises(RoutesError, match="not a routes file version") as info:
        load_routes(path)
    assert "field 'version'" in str(info.value)


def test_version_1_and_no_version_load(tmp_path: Path) -> None:
    """`version: 1` and an absent version (the format before versions were checked) load."""
    assert load_routes(write_routes(tmp_path, "version: 1\nroutes:\n  thing.done:" + BASE_ROUTE))
    assert one_route(tmp_path)


ROUTING_HEADERS = [
    "Bcc",
    "Cc",
    "To",
    "From",
    "Reply-To",
    "Sender",
    "Resent-To",
    "resent-bcc",
    "Return-Path",
    "Received",
    "Delivered-To",
    "Envelope-To",
    "DKIM-Signature",
    "Message-ID",
    "Content-Type",
    "Content-Transfer-Encoding",
    "MIME-Version",
    "X-Original-To",
    "Disposition-Notification-To",
    "Errors-To",
    "ARC-Seal",
    "Date",
]


@pytest.mark.parametrize("name", ROUTING_HEADERS)
def test_routing_headers_are_refused(tmp_path: Path, name: str) -> None:
    """Headers mail servers route on cannot be set as custom headers, here or in defaults."""
    with pytest.raises(RoutesError) as info:
        one_route(tmp_path, f'    headers: {{{name}: "x@example.com"}}\n')
    assert f"field 'headers.{name}'" in str(info.value)
    path = write_routes(
        tmp_path,
        f'defaults:\n  headers: {{{name}: "v"}}\nroutes:\n  thing.done:' + BASE_ROUTE,
    )
    with pytest.raises(RoutesError, match=f"headers.{name}"):
        load_routes(path)


@pytest.mark.parametrize("name", ["X-Entity-Ref-ID", "List-Unsubscribe", "In-Reply-To"])
def test_ordinary_custom_headers_still_load(tmp_path: Path, name: str) -> None:
    """Headers that do not route the message stay allowed."""
    table = one_route(tmp_path, f'    headers: {{{name}: "{{data.id}}"}}\n')
    assert table.routes["thing.done"].body(event(GOOD))["headers"] == {name: "1"}


# -- bidi and zero-width characters, address and list caps (issue 11, item 7) -------

INVISIBLE = [
    "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",
    "\u2066", "\u2067", "\u2068", "\u2069",
    "\u200b", "\u200c", "\u200d", "\ufeff",
]  # fmt: skip


@pytest.mark.parametrize("char", INVISIBLE)
def test_bidi_and_zero_width_characters_in_a_subject_are_control_characters(
    tmp_path: Path, char: str
) -> None:
    """A subject carrying a bidi override or a zero-width character is control_characters."""
    table = one_route(tmp_path)
    assert body_reason(table, {**GOOD, "name": f"Invoice gpj{char}.exe"}) == (
        Reason.CONTROL_CHARACTERS
    )


@pytest.mark.parametrize("char", INVISIBLE)
def test_bidi_and_zero_width_characters_in_a_display_name_are_control_characters(
    tmp_path: Path, char: str
) -> None:
    """A display name from data with a bidi or zero-width character is control_characters."""
    table = one_route(tmp_path)
    email = f"Jane{char} Doe <jane@example.com>"
    assert body_reason(table, {**GOOD, "email": email}) == Reason.CONTROL_CHARACTERS
    sender_route = BASE_ROUTE.replace('"Acme <no-reply@acme.example>"', '"{data.sender}"')
    sender_table = load_routes(write_routes(tmp_path, "routes:\n  thing.done:" + sender_route))
    sender = f"Acme{char} <no-reply@acme.example>"
    assert body_reason(sender_table, {**GOOD, "sender": sender}) == Reason.CONTROL_CHARACTERS


@pytest.mark.parametrize("char", ["\u202e", "\u200b"])
def test_bidi_characters_in_a_constant_address_fail_at_load(tmp_path: Path, char: str) -> None:
    """A routes file's own display name with a bidi or zero-width character is refused."""
    route = BASE_ROUTE.replace("Acme <", f"Ac{char}me <")
    with pytest.raises(RoutesError, match="not an email address") as info:
        load_routes(write_routes(tmp_path, "routes:\n  thing.done:" + route))
    assert "field 'from'" in str(info.value)


def test_unicode_display_names_without_invisible_characters_still_send(tmp_path: Path) -> None:
    """Ordinary non-ASCII display names and subjects (accents, RTL letters) are fine."""
    table = one_route(tmp_path)
    data = {**GOOD, "name": "Zoë שלום", "email": "Zoë Ĳssel <zoe@example.com>"}
    body = table.routes["thing.done"].body(event(data))
    assert body["subject"] == "Hello Zoë שלום"


@pytest.mark.parametrize(
    ("email", "problem"),
    [
        ("a" * 65 + "@example.com", "local part over 64"),
        ("Jane <" + "a" * 65 + "@example.com>", "local part over 64"),
        ("a@" + ".".join(["b" * 60] * 5) + ".com", "domain over 255"),
        ("a@" + "b" * 64 + ".com", "label over 63"),
    ],
)
def test_over_long_address_parts_are_invalid_recipient(
    tmp_path: Path, email: str, problem: str
) -> None:
    """A local part over 64 or a domain over 255 characters is invalid_recipient, named."""
    table = one_route(tmp_path)
    with pytest.raises(InvalidEvent) as info:
        table.routes["thing.done"].body(event({**GOOD, "email": email}))
    assert info.value.reason == Reason.INVALID_RECIPIENT
    assert problem in str(info.value)


def test_address_at_the_length_limits_is_accepted() -> None:
    """64 characters of local part and 63-character labels are still addresses."""
    assert is_address("a" * 64 + "@" + "b" * 63 + ".example")
    assert not is_address("a" * 65 + "@example.com")


@pytest.mark.parametrize("field", ["cc", "bcc"])
def test_more_than_50_cc_or_bcc_is_invalid_recipient(tmp_path: Path, field: str) -> None:
    """cc and bcc hold at most 50 addresses each (Resend's limit), like to."""
    table = one_route(tmp_path, f'    {field}: "{{data.copies}}"\n')
    many = [f"u{i}@example.com" for i in range(51)]
    assert body_reason(table, {**GOOD, "copies": many}) == Reason.INVALID_RECIPIENT
    fifty = table.routes["thing.done"].body(event({**GOOD, "copies": many[:50]}))
    assert len(fifty[field]) == 50


def test_more_than_50_constant_cc_fail_at_load(tmp_path: Path) -> None:
    """A routes file listing over 50 cc addresses is refused at load."""
    many = ", ".join(f'"u{i}@example.com"' for i in range(51))
    with pytest.raises(RoutesError, match="at most 50") as info:
        one_route(tmp_path, f"    cc: [{many}]\n")
    assert "field 'cc'" in str(info.value)


def test_every_body_carries_the_source_tags(tmp_path: Path) -> None:
    """A route without tags still sends rc_event (hash of source and id) and rc_route."""
    table = one_route(tmp_path)
    body = table.routes["thing.done"].body(event(GOOD))
    digest = hashlib.sha256(b"https://acme.example\ne-1").hexdigest()[:32]
    assert body["tags"] == [
        {"name": EVENT_TAG, "value": digest},
        {"name": ROUTE_TAG, "value": "thing-2edone"},
    ]
    assert event_tag("https://acme.example", "e-1") == digest


@pytest.mark.parametrize(
    "text", ["order.confirmed", "a-b_c", "ünïcode / spaces", "x" * 300, "tab\there"]
)
def test_tag_value_encoding_is_valid_and_reversible(text: str) -> None:
    """Encoded values use only [A-Za-z0-9_-], at most 256; short ones decode back exactly."""
    value = encode_tag_value(text)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,256}", value)
    if len(value) < 256:
        assert decode_tag_value(value) == text


def test_route_may_not_set_a_reserved_tag(tmp_path: Path) -> None:
    """A routes file naming rc_event or rc_route as a tag is refused at load."""
    with pytest.raises(RoutesError, match="rc_event"):
        one_route(tmp_path, extra="    tags: {rc_event: x}\n")


def test_priority_and_batch_overrides_are_read_per_route(tmp_path: Path) -> None:
    """A route's priority and batch settings reach the compiled route."""
    table = one_route(tmp_path, "    priority: urgent\n    batch: {size: 10, linger: 50ms}\n")
    route = table.routes["thing.done"]
    assert route.priority is Priority.URGENT
    assert (route.batch_size, route.batch_linger) == (10, 0.05)
    plain = one_route(tmp_path)
    assert plain.routes["thing.done"].priority is Priority.NORMAL
    assert plain.routes["thing.done"].batch_size is None
