"""Sandbox contract over real sockets: auth, validation, batch modes, GET /emails/{id}."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.sandbox import Sandbox, SandboxConfig
from tests.sandbox.support import AUTH, EMAIL, send


async def test_send_returns_uuid_and_records_delivery(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """A valid POST /emails answers 200 {id} and the ledger holds exactly that email."""
    reply = await send(http, sandbox, EMAIL)
    (status, body), headers = reply.answer, reply.headers
    assert status == 200
    assert set(body) == {"id"}
    [d] = sandbox.deliveries()
    assert d.id == body["id"]
    assert d.body == EMAIL
    assert d.endpoint == "/emails"
    assert d.idempotency_key is None
    assert headers["Content-Type"].startswith("application/json")


async def test_missing_bearer_is_401(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """No Authorization header: 401 missing_api_key with Resend's error body, nothing sent."""
    status, body = (await send(http, sandbox, EMAIL, headers={"User-Agent": "x"})).answer
    assert status == 401
    assert body["statusCode"] == 401
    assert body["name"] == "missing_api_key"
    assert isinstance(body["message"], str)
    assert sandbox.deliveries() == []


async def test_wrong_key_is_403_and_right_key_passes(
    make_sandbox: Any, http: aiohttp.ClientSession
) -> None:
    """With --api-key set, another key gets 403 invalid_api_key; the configured key is accepted."""
    sb = await make_sandbox(config=SandboxConfig(api_key="re_right"))
    status, body = (
        await send(http, sb, EMAIL, headers={"Authorization": "Bearer re_wrong", "User-Agent": "x"})
    ).answer
    assert (status, body["name"]) == (403, "invalid_api_key")
    assert "re_right" not in body["message"]
    assert "re_wrong" not in body["message"]
    status = (
        await send(http, sb, EMAIL, headers={"Authorization": "Bearer re_right", "User-Agent": "x"})
    ).status
    assert status == 200


async def test_missing_user_agent_is_403(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A request without User-Agent is refused with 403, as Resend does."""
    async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as bare:
        status, body = (
            await send(bare, sandbox, EMAIL, headers={"Authorization": "Bearer re_x"})
        ).answer
    assert status == 403
    assert body["statusCode"] == 403


@pytest.mark.parametrize("field", ["from", "to", "subject"])
async def test_required_fields(sandbox: Sandbox, http: aiohttp.ClientSession, field: str) -> None:
    """Each of from/to/subject missing gives 422 missing_required_field naming the field."""
    email = {k: v for k, v in EMAIL.items() if k != field}
    status, body = (await send(http, sandbox, email)).answer
    assert (status, body["name"]) == (422, "missing_required_field")
    assert f"`{field}`" in body["message"]
    assert sandbox.deliveries() == []


@pytest.mark.parametrize(
    ("patch", "name"),
    [
        ({"to": ["not-an-address"]}, "validation_error"),
        ({"from": "Acme orders.acme.test"}, "validation_error"),
        ({"cc": "a b@c.d"}, "validation_error"),
        ({"to": [f"u{i}@example.com" for i in range(51)]}, "validation_error"),
        ({"tags": [{"name": "bad tag", "value": "x"}]}, "validation_error"),
        ({"tags": [{"name": "ok", "value": "é"}]}, "validation_error"),
        ({"tags": [{"name": "n" * 257, "value": "x"}]}, "validation_error"),
        ({"template": {"id": "tpl_1"}}, "validation_error"),  # together with html
        ({"subject": 5}, "validation_error"),
        ({"attachments": [{"filename": "a.txt"}]}, "invalid_attachment"),
        ({"scheduled_at": "2999-01-01T00:00:00Z"}, "validation_error"),
    ],
)
async def test_invalid_emails_are_422(
    sandbox: Sandbox, http: aiohttp.ClientSession, patch: dict[str, Any], name: str
) -> None:
    """Malformed addresses, >50 recipients, bad tags, template+html, bad attachments: 422."""
    status, body = (await send(http, sandbox, {**EMAIL, **patch})).answer
    assert (status, body["name"]) == (422, name)
    assert sandbox.deliveries() == []


async def test_fifty_recipients_named_addresses_tags_and_template_accepted(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """Edge values Resend accepts: 50 `to`, `Name <a@b>`, 256-char tags, template without html."""
    email = {
        "from": "Acme <orders@acme.test>",
        "to": [f"u{i}@example.com" for i in range(50)],
        "subject": "s",
        "template": {"id": "tpl_1", "variables": {"name": "Ann", "n": 3}},
        "tags": [{"name": "t" * 256, "value": "v_1-2"}],
        "reply_to": "Support <help@acme.test>",
        "scheduled_at": "in 10 min",
    }
    status, body = (await send(http, sandbox, email)).answer
    assert status == 200, body


async def test_invalid_json_is_400(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A body that is not JSON gets a Resend-shaped 400, not an aiohttp page."""
    async with http.post(sandbox.url + "/emails", data=b"{nope", headers=AUTH) as r:
        assert r.status == 400
        assert (await r.json())["name"] == "validation_error"


async def test_batch_strict_rejects_whole_batch(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """Strict mode (default): one invalid email rejects the batch and sends nothing."""
    batch = [EMAIL, {**EMAIL, "to": "broken"}, EMAIL]
    status, body = (await send(http, sandbox, batch, path="/emails/batch")).answer
    assert (status, body["name"]) == (422, "validation_error")
    assert "emails[1]" in body["message"]
    assert sandbox.deliveries() == []


async def test_batch_permissive_sends_valid_and_lists_errors(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """Permissive mode: valid emails are sent in order; errors list the invalid indexes."""
    batch = [EMAIL, {**EMAIL, "to": "broken"}, {**EMAIL, "subject": "third"}]
    headers = {**AUTH, "x-batch-validation": "permissive"}
    status, body = (await send(http, sandbox, batch, path="/emails/batch", headers=headers)).answer
    assert status == 200
    assert len(body["data"]) == 2
    assert [e["index"] for e in body["errors"]] == [1]
    sent = sandbox.deliveries()
    assert [d.id for d in sent] == [e["id"] for e in body["data"]]
    assert [d.batch_index for d in sent] == [0, 2]
    # the ledger says which request (which batch) each email came in
    assert len({d.request_id for d in sent}) == 1
    assert sent[0].request_id.startswith("req_")
    assert sent[1].body["subject"] == "third"


async def test_batch_limits(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """At most 100 emails, none with attachments, not empty, and strict answers have no errors."""
    status, body = (await send(http, sandbox, [EMAIL] * 101, path="/emails/batch")).answer
    assert (status, body["name"]) == (422, "validation_error")
    status, body = (await send(http, sandbox, [], path="/emails/batch")).answer
    assert status == 422
    attach = {**EMAIL, "attachments": [{"filename": "a.txt", "content": "aGk="}]}
    status, body = (await send(http, sandbox, [attach], path="/emails/batch")).answer
    assert status == 422
    status, body = (await send(http, sandbox, [EMAIL] * 100, path="/emails/batch")).answer
    assert status == 200
    assert len(body["data"]) == 100
    assert "errors" not in body
    assert len({d["id"] for d in body["data"]}) == 100


async def test_bad_batch_validation_header(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """An unknown x-batch-validation value is a 422, not silently strict."""
    headers = {**AUTH, "x-batch-validation": "lenient"}
    status = (await send(http, sandbox, [EMAIL], path="/emails/batch", headers=headers)).status
    assert status == 422


async def test_get_email_returns_sent_email(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """GET /emails/{id} returns the email object; unknown ids 404, non-UUIDs 422."""
    sent = (await send(http, sandbox, {**EMAIL, "cc": "cc@example.com"})).json()
    async with http.get(f"{sandbox.url}/emails/{sent['id']}", headers=AUTH) as r:
        assert r.status == 200
        got = await r.json()
    assert got["object"] == "email"
    assert got["id"] == sent["id"]
    assert got["to"] == EMAIL["to"]
    assert got["cc"] == ["cc@example.com"]
    assert got["from"] == EMAIL["from"]
    assert got["last_event"] == "delivered"
    missing = "00000000-0000-4000-8000-000000000000"
    async with http.get(f"{sandbox.url}/emails/{missing}", headers=AUTH) as r:
        assert (r.status, (await r.json())["name"]) == (404, "not_found")
    async with http.get(f"{sandbox.url}/emails/nope", headers=AUTH) as r:
        assert r.status == 422
    async with http.get(f"{sandbox.url}/emails/{sent['id']}") as r:
        assert r.status == 401


async def test_unknown_path_and_method_are_json(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """A wrong base URL or method gets Resend-shaped 404/405 JSON bodies."""
    async with http.post(sandbox.url + "/v1/emails", json=EMAIL, headers=AUTH) as r:
        assert (r.status, (await r.json())["name"]) == (404, "not_found")
    async with http.put(sandbox.url + "/emails", json=EMAIL, headers=AUTH) as r:
        assert (r.status, (await r.json())["name"]) == (405, "method_not_allowed")


@pytest.mark.parametrize(
    "when",
    ["in 99999999999 days", "in 10000000 days", "in " + "9" * 5000 + " minutes"],
)
async def test_scheduled_at_overflow_is_422_not_500(
    sandbox: Sandbox, http: aiohttp.ClientSession, when: str
) -> None:
    """A relative `scheduled_at` too large for datetime/int is a JSON 422, not a plain 500."""
    status, body = (await send(http, sandbox, {**EMAIL, "scheduled_at": when})).answer
    assert status == 422
    assert body == {
        "statusCode": 422,
        "name": "validation_error",
        "message": "`scheduled_at` cannot be more than 30 days in the future.",
    }
    assert sandbox.deliveries() == []


# -- hostile JSON: any object posted gets a JSON answer, never a 500 ------------------

_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits orjson refuses the body: must be a 400, not a 500
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_ADDRESSES = st.sampled_from(["a@b.co", "Name <a@b.co>", "x", "", "a b@c.d", "<@>"])
_SCHEDULED = (
    st.builds(
        "in {} {}".format,
        # every length of number equally likely: small, day-sized and overflowing alike
        st.integers(min_value=1, max_value=40).flatmap(lambda n: st.integers(0, 10**n - 1)),
        st.sampled_from(["min", "mins", "hour", "days"]),
    )
    | st.datetimes().map(lambda d: d.isoformat())
    | st.text(max_size=30)
)
#: per Resend field: hostile values shaped like the field, or any JSON at all
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "from": _ADDRESSES | _JSON,
    "to": st.lists(_ADDRESSES, max_size=3) | _ADDRESSES | _JSON,
    "cc": st.lists(_ADDRESSES, max_size=3) | _JSON,
    "bcc": _ADDRESSES | _JSON,
    "reply_to": _ADDRESSES | _JSON,
    "subject": st.text(max_size=10) | _JSON,
    "html": _JSON,
    "text": _JSON,
    "topic_id": _JSON,
    "headers": st.dictionaries(st.text(max_size=5), _JSON, max_size=3) | _JSON,
    "tags": st.lists(st.dictionaries(st.sampled_from(["name", "value", "x"]), _JSON)) | _JSON,
    "template": st.fixed_dictionaries(
        {}, optional={"id": _JSON, "variables": st.dictionaries(st.text(max_size=4), _JSON)}
    )
    | _JSON,
    "attachments": st.lists(
        st.dictionaries(st.sampled_from(["content", "path", "filename"]), _JSON), max_size=3
    )
    | _JSON,
    "scheduled_at": _SCHEDULED | _JSON,
}
#: a valid email with exactly one field replaced reaches every field's check
_ONE_FIELD = st.sampled_from(sorted(_FIELDS)).flatmap(
    lambda name: _FIELDS[name].map(lambda value: {**EMAIL, name: value})
)
#: `scheduled_at` is the one field validation does arithmetic on: it gets a branch of its own
_SCHEDULED_EMAIL = _SCHEDULED.map(lambda value: {**EMAIL, "scheduled_at": value})
#: several fields changed, sometimes from nothing, with unknown extra fields
_EMAILS = st.builds(
    lambda extra, base, fields: {**extra, **base, **fields},
    st.dictionaries(st.text(max_size=8), _JSON, max_size=2),
    st.sampled_from([EMAIL, {}]),
    st.lists(st.sampled_from(sorted(_FIELDS)), max_size=4, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: _FIELDS[n] for n in names})
    ),
)


@pytest.fixture
async def unlimited(make_sandbox: Any) -> Sandbox:
    """A sandbox whose rate limit no test reaches, so every example is validated."""
    sb: Sandbox = await make_sandbox(config=SandboxConfig(rate_limit=1e6))
    return sb


#: batches refuse `scheduled_at` before any arithmetic, so most examples go to /emails
_BATCH = st.sampled_from([False, False, True])


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.one_of(_ONE_FIELD, _SCHEDULED_EMAIL, _EMAILS, _JSON), batch=_BATCH)
# hypothesis 6.170 sometimes flags `st.recursive`'s extend as not using its argument
# (it does: see _JSON); a warning about the strategy, not a finding about the sandbox
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_hostile_json_never_answers_500(
    unlimited: Sandbox, http: aiohttp.ClientSession, body: Any, batch: bool
) -> None:
    """Any JSON posted to /emails or /emails/batch is answered 2xx/4xx with a Resend JSON body."""
    sb = unlimited
    path = "/emails/batch" if batch else "/emails"
    payload = [body, EMAIL] if batch else body
    # json.dumps (not aiohttp's json=) so integers beyond 64 bits reach the server as written
    data = json.dumps(payload).encode()
    async with http.post(sb.url + path, data=data, headers=AUTH) as r:
        status = r.status
        assert r.headers["Content-Type"].startswith("application/json"), await r.text()
        answer = await r.json()
    assert status < 500, answer
    if status == 200:
        assert set(answer) == ({"data"} if batch else {"id"})
    else:
        assert set(answer) == {"statusCode", "name", "message"}
        assert answer["statusCode"] == status
        assert isinstance(answer["name"], str)
        assert isinstance(answer["message"], str)


async def test_refused_recipients_fail_alone_in_a_permissive_batch_and_as_a_single(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """The `refuse_to` fault: a single send is answered 422; in a permissive batch only
    that member is listed in `errors`; a strict batch is refused whole."""
    from consumer.sandbox import Faults

    sandbox.set_faults(Faults.from_dict({"refuse_to": ["Blocked@"]}))
    assert sandbox.faults.to_dict()["refuse_to"] == ["blocked@"]
    refused = {**EMAIL, "to": "blocked@example.com"}
    status, body = (await send(http, sandbox, refused)).answer
    assert (status, body["name"]) == (422, "validation_error")
    headers = {**AUTH, "x-batch-validation": "permissive"}
    status, body = (
        await send(http, sandbox, [EMAIL, refused, EMAIL], path="/emails/batch", headers=headers)
    ).answer
    assert status == 200
    assert [e["index"] for e in body["errors"]] == [1]
    assert [d.batch_index for d in sandbox.deliveries()] == [0, 2]
    status, body = (await send(http, sandbox, [EMAIL, refused], path="/emails/batch")).answer
    assert status == 422
    assert "emails[1]" in body["message"]
    with pytest.raises(ValueError, match="refuse_to"):
        Faults.from_dict({"refuse_to": "blocked@"})
