"""Idempotency keys: deterministic, valid, distinct, never showing sensitive values."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.errors import InvalidEvent, KeyTemplateError
from consumer.events import Event, Reason
from consumer.keys import (
    DEFAULT_KEY_TEMPLATE,
    MAX_KEY_LENGTH,
    KeyTemplate,
    encode_value,
    finish_key,
    is_valid_key,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.one_of(
    st.text(min_size=1, max_size=400),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=50)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


def event(data: Any = None, **attrs: Any) -> Event:
    """An Event built directly (keys do not care how it was decoded)."""
    fields: dict[str, Any] = {
        "id": "evt-1",
        "source": "https://shop.acme.example/orders",
        "type": "order.confirmed",
        "specversion": "1.0",
        "time": None,
        "subject": None,
        "datacontenttype": None,
        "data": data,
        "mode": "structured",
        "event_time": None,
    }
    fields.update(attrs)
    return Event(**fields)


def test_route_template_gives_readable_key() -> None:
    """A key keeps clean entity IDs as they are, after the route's literal text."""
    template = KeyTemplate.parse("order-confirmation:{data.order_id}")
    assert template.render(event({"order_id": "A-10042"})) == "order-confirmation:A-10042"


def test_two_part_key_and_integer_ids() -> None:
    """Integers are entity IDs too; both parts show, separated by the literal colon."""
    template = KeyTemplate.parse("password-reset:{data.user_id}:{data.request_id}")
    key = template.render(event({"user_id": 5521, "request_id": "r-9"}))
    assert key == "password-reset:5521:r-9"


def test_disallowed_characters_are_escaped_as_hex() -> None:
    """'_' and '.' (and any other character outside [A-Za-z0-9-]) become '.' plus UTF-8 hex."""
    assert encode_value("usr_5.5", sensitive=False) == "usr.5f5.2e5"
    assert encode_value("é", sensitive=False) == ".c3.a9"


def test_default_template_uses_type_source_and_id() -> None:
    """Without a route template the key is {type}:{source}:{id}, escaped."""
    key = KeyTemplate.parse(DEFAULT_KEY_TEMPLATE).render(event({}))
    assert key.startswith("order.2econfirmed:https.3a.2f.2fshop")
    assert key.endswith(":evt-1")
    assert is_valid_key(key)


def test_sensitive_marker_hashes_with_sha256() -> None:
    """{path|sha256} puts the first 32 hex digits of SHA-256 in the key, never the value."""
    template = KeyTemplate.parse("magic-link:{data.token|sha256}")
    key = template.render(event({"token": "s3cret-token"}))
    digest = hashlib.sha256(b"s3cret-token").hexdigest()[:32]
    assert key == f"magic-link:.sha256-{digest}"
    assert "s3cret" not in key


def test_address_is_hashed_even_when_not_marked() -> None:
    """A value holding '@' is hashed, so an address never reaches a key in clear."""
    plain = KeyTemplate.parse("welcome:{data.email}").render(event({"email": "jane@example.com"}))
    marked = KeyTemplate.parse("welcome:{data.email|sha256}").render(
        event({"email": "jane@example.com"})
    )
    assert plain == marked
    assert plain.startswith("welcome:.sha256-")
    assert "jane" not in plain
    assert "example" not in plain


def test_over_long_key_keeps_prefix_and_ends_in_hash() -> None:
    """A key above 256 characters keeps a readable prefix and ends in the full SHA-256."""
    long_id = "x" * 400
    key = KeyTemplate.parse("order-confirmation:{data.order_id}").render(
        event({"order_id": long_id})
    )
    full = f"order-confirmation:{long_id}"
    assert len(key) == MAX_KEY_LENGTH
    assert key.startswith("order-confirmation:xxxx")
    assert key.endswith(".:" + hashlib.sha256(full.encode()).hexdigest())
    assert key == full[:190] + ".:" + hashlib.sha256(full.encode()).hexdigest()
    assert finish_key("short") == "short"


@pytest.mark.parametrize(
    ("data", "reason_text"),
    [
        ({}, "missing"),
        ({"order_id": None}, "missing"),
        ({"order_id": ""}, "empty"),
        ({"order_id": True}, "bool"),
        ({"order_id": 1.5}, "float"),
        ({"order_id": {"a": 1}}, "dict"),
        ({"order_id": [1]}, "list"),
    ],
)
def test_unusable_key_field_is_invalid_key(data: dict[str, Any], reason_text: str) -> None:
    """A missing, empty or non-scalar entity ID is InvalidEvent(invalid_key), not a crash."""
    template = KeyTemplate.parse("order-confirmation:{data.order_id}")
    with pytest.raises(InvalidEvent) as info:
        template.render(event(data))
    assert info.value.reason == Reason.INVALID_KEY
    assert reason_text in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "non-empty"),
        ("order confirmation:{data.id}", "literal text"),
        ("order:{data.id", "literal text"),
        ("order:{data.id|md5}", "unknown filter"),
        ("order:{payload.id}", "must start with"),
        ("order:{type}", "every event of the type"),
        ("constant-key", "every event of the type"),
        ("order:{data.a}{data.b}", "separated"),
        ("order:{data.a}-{data.b}", "separated"),
        ("order:{data.a b}", "segment"),
        ("order:{id.x}", "nested"),
    ],
)
def test_bad_key_templates_are_refused(text: str, problem: str) -> None:
    """Templates that could give invalid or colliding keys fail at load with a reason."""
    with pytest.raises(KeyTemplateError) as info:
        KeyTemplate.parse(text)
    assert problem in str(info.value)


# -- properties ---------------------------------------------------------------


def outcome(render: Callable[[], str]) -> tuple[str, str]:
    """("key", key) or ("invalid", reason): lets properties assert outside except blocks."""
    try:
        return "key", render()
    except InvalidEvent as exc:
        return "invalid", exc.reason


@FAST
@given(order_id=ids, user=ids)
def test_same_event_always_gives_same_key(order_id: str | int, user: str | int) -> None:
    """Property: rendering the same event twice (or re-parsing the template) gives one key."""
    data = {"order_id": order_id, "user": user}
    first = KeyTemplate.parse("o:{data.order_id}:{data.user|sha256}").render(event(data))
    second = KeyTemplate.parse("o:{data.order_id}:{data.user|sha256}").render(event(dict(data)))
    assert first == second


literals = st.sampled_from(["order", "o", "password-reset", "a.b", "v2", "x_y", "9"])
placeholders = st.sampled_from(
    ["{data.x}", "{data.y}", "{data.x|sha256}", "{id}", "{type}", "{source}", "{subject}"]
)
#: ':' and '/' keep placeholders distinct; '-', '.' and '' must be refused between two
separators = st.sampled_from([":", "/", ":", "/", "-", ".", ""])


@st.composite
def key_templates(draw: st.DrawFn) -> tuple[str, bool]:
    """(template, well_formed): literal pieces and placeholders joined by separators.

    well_formed is True when the template follows the parse rules by
    construction: every two neighbouring placeholders have ':' or '/' between
    them, and one placeholder tells events apart (not {type} or {source}).
    (Starting with literal text is the routes loader's rule, not the parser's.)
    """
    pieces = draw(st.lists(st.one_of(literals, placeholders), min_size=1, max_size=5))
    text = ""
    well_formed = True
    between: str | None = None  # literal text since the last placeholder (None: none yet)
    for index, piece in enumerate(pieces):
        sep = draw(separators) if index else ""
        if between is not None:
            between += sep
        if piece.startswith("{"):
            if between is not None and ":" not in between and "/" not in between:
                well_formed = False
            between = ""
        elif between is not None:
            between += piece
        text += sep + piece
    if not any(p.startswith("{") and p not in ("{type}", "{source}") for p in pieces):
        well_formed = False  # nothing tells two events of one type apart
    return text, well_formed


@FAST
@given(
    value=json_values,
    other=st.one_of(st.text(min_size=1, max_size=30), st.integers()),
    template=key_templates(),
)
def test_any_input_gives_valid_key_or_clear_error(
    value: Any, other: str | int, template: tuple[str, bool]
) -> None:
    """Property: built templates parse when well formed, and give a valid key or invalid_key."""
    text, well_formed = template
    try:
        parsed: KeyTemplate | None = KeyTemplate.parse(text)
        problem = ""
    except KeyTemplateError as exc:
        parsed, problem = None, str(exc)
    if parsed is None:
        assert not well_formed, (text, problem)
        assert problem
        return
    assert well_formed, text
    data = {"x": value, "y": other}
    kind, result = outcome(lambda: parsed.render(event(data, id=str(other), subject="s/1")))
    if kind == "invalid":
        assert result == Reason.INVALID_KEY
    else:
        assert is_valid_key(result), result
        assert len(result) <= MAX_KEY_LENGTH


@FAST
@given(template=key_templates(), x=ids, y=ids)
def test_well_formed_templates_with_clean_ids_always_give_a_key(
    template: tuple[str, bool], x: str | int, y: str | int
) -> None:
    """Property: a well-formed template and string/integer IDs always give a valid key."""
    text, well_formed = template
    if not well_formed:
        return
    key = KeyTemplate.parse(text).render(event({"x": x, "y": y}, id=str(x), subject=str(y)))
    assert is_valid_key(key)
    assert len(key) <= MAX_KEY_LENGTH


@FAST
@given(
    entity=st.tuples(ids, ids),
    noise=st.tuples(json_values, json_values),
    sources=st.tuples(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20)),
)
def test_equal_entity_ids_give_equal_keys(
    entity: tuple[str | int, str | int],
    noise: tuple[Any, Any],
    sources: tuple[str, str],
) -> None:
    """Property: two events with the same entity IDs share one key, whatever else differs."""
    template = KeyTemplate.parse("password-reset:{data.user_id}:{data.request_id}")
    first = event(
        {"user_id": entity[0], "request_id": entity[1], "note": noise[0]},
        id="evt-1",
        source=sources[0],
        time="2026-11-29T10:00:00Z",
    )
    second = event(
        {"request_id": entity[1], "user_id": entity[0], "note": noise[1], "more": [1, 2]},
        id="evt-2",
        source=sources[1],
        subject="other",
    )
    assert template.render(first) == template.render(second)


@FAST
@given(value=json_values)
def test_any_data_value_gives_valid_key_or_invalid_key(value: Any) -> None:
    """Property: a fixed route template never produces an invalid key, whatever the data."""
    template = KeyTemplate.parse("password-reset:{data.user}:{data.req}")
    kind, result = outcome(lambda: template.render(event({"user": value, "req": value})))
    if kind == "invalid":
        assert result == Reason.INVALID_KEY
    else:
        assert is_valid_key(result)
        assert len(result) <= MAX_KEY_LENGTH


def test_hash_never_equals_a_clean_id() -> None:
    """A hashed value cannot collide with an ID that happens to be the same hex digits."""
    hashed = encode_value("jane@example.com", sensitive=False)
    digits = hashed.removeprefix(".sha256-")
    assert encode_value(digits, sensitive=False) != hashed
    assert encode_value(hashed, sensitive=False) != hashed


@FAST
@given(a=st.tuples(ids, ids), b=st.tuples(ids, ids))
def test_different_entity_ids_give_different_keys(
    a: tuple[str | int, str | int], b: tuple[str | int, str | int]
) -> None:
    """Property: two events whose entity IDs differ never share a key."""
    template = KeyTemplate.parse("password-reset:{data.user_id}:{data.request_id}")

    def key(ids_: tuple[str | int, str | int]) -> str:
        return template.render(event({"user_id": ids_[0], "request_id": ids_[1]}))

    same_ids = tuple(str(x) for x in a) == tuple(str(x) for x in b)
    # An int and its decimal string are the same entity ID on purpose.
    assert (key(a) == key(b)) == same_ids


# -- injectivity across lengths (issue 11, item 1) ------------------------------

RESET = "password-reset:{data.user_id}:{data.request_id}"


def reset_key(user_id: str | int, request_id: str | int) -> str:
    """The password-reset key of one (user_id, request_id) pair."""
    return KeyTemplate.parse(RESET).render(event({"user_id": user_id, "request_id": request_id}))


def decode_escaped(text: str) -> str | None:
    """The placeholder value whose encoding is `text`, or None when no value encodes to it."""
    out = bytearray()
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char == ".":
            pair = text[pos + 1 : pos + 3]
            if len(pair) < 2 or any(c not in "0123456789abcdef" for c in pair):
                return None
            out.append(int(pair, 16))
            pos += 3
        elif char.isascii() and (char.isalnum() or char == "-"):
            out.append(ord(char))
            pos += 1
        else:
            return None
    try:
        value = out.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return value if value and encode_value(value, sensitive=False) == text else None


def forged_pair(key: str) -> tuple[str, str] | None:
    """Placeholder values whose natural key would be exactly `key`, if any exist.

    The attack of issue 11: read a shortened key as if it were a natural one.
    """
    head = "password-reset:"
    if not key.startswith(head):
        return None
    rest = key[len(head) :]
    user_text, sep, request_text = rest.partition(":")
    if not sep:
        return None
    user_id, request_id = decode_escaped(user_text), decode_escaped(request_text)
    if user_id is None or request_id is None:
        return None
    return user_id, request_id


def test_a_natural_256_character_key_never_equals_a_shortened_one() -> None:
    """The crafted pair of issue 11 (prefix, ':', 64 hex) no longer takes a victim's key."""
    victim = reset_key("x" * 300, "req-1")
    forged = forged_pair(victim)
    # Before the fix the shortened key parsed back into a valid (user_id, request_id) pair.
    assert forged is None or reset_key(*forged) != victim


#: values near the 256-character boundary, from characters the encoding treats differently
boundary_text = st.builds(
    lambda n, alphabet: (alphabet * 300)[:n],
    st.one_of(st.integers(1, 12), st.integers(60, 130), st.integers(170, 260)),
    st.sampled_from(["x", "a0f", "-", "_", ".", ":", "ab.:", "é", "7f", "x.3a", "/"]),
)
adversarial_ids = st.one_of(
    boundary_text, st.text(min_size=1, max_size=260), st.integers(0, 10**80)
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(victim=st.tuples(adversarial_ids, adversarial_ids))
def test_no_values_forge_another_events_key(victim: tuple[str | int, str | int]) -> None:
    """Property: reading any key back as a natural key only ever yields the event's own values."""
    key = reset_key(*victim)
    assert is_valid_key(key)
    forged = forged_pair(key)
    if forged is not None and reset_key(*forged) == key:
        assert forged == (str(victim[0]), str(victim[1])), (victim, forged)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=st.tuples(adversarial_ids, adversarial_ids), b=st.tuples(adversarial_ids, adversarial_ids))
def test_keys_are_injective_across_all_lengths(
    a: tuple[str | int, str | int], b: tuple[str | int, str | int]
) -> None:
    """Property: two events share a key only when their entity IDs are equal, at any length."""
    same = (str(a[0]), str(a[1])) == (str(b[0]), str(b[1]))
    assert (reset_key(*a) == reset_key(*b)) == same


def test_short_keys_are_unchanged_by_the_shortening_marker() -> None:
    """Keys up to 256 characters are exactly what earlier versions produced (no re-keying)."""
    assert reset_key("usr-1", "req_2") == "password-reset:usr-1:req.5f2"
    exact = reset_key("u" * 200, "r" * 40)
    assert len(exact) == MAX_KEY_LENGTH
    assert exact == f"password-reset:{'u' * 200}:{'r' * 40}"


def test_literal_text_may_not_hold_the_shortening_marker() -> None:
    """A template whose literal text holds '.:' is refused: only a shortened key carries it."""
    with pytest.raises(KeyTemplateError, match=r"'\.:'"):
        KeyTemplate.parse("order.:{data.id}")
