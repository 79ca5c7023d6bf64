"""Fidelity: sandbox requests and answers validate against Resend's own OpenAPI file.

OpenAPI 3.1 schemas are JSON Schema 2020-12; `#/components/...` references are
resolved by registering the whole document as one resource.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from consumer.sandbox import Sandbox
from consumer.sandbox.validation import MAX_IDEMPOTENCY_KEY, validate_email
from tests.sandbox.support import AUTH, send

# Resend's own OpenAPI file (MIT), kept with its LICENSE and SOURCE under tests/data
OPENAPI = Path(__file__).resolve().parent / "data" / "resend-openapi" / "resend.yaml"
BASE = "urn:resend:openapi"
JSON = "content/application~1json/schema"


def _registry() -> Registry[Any]:
    doc: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
    resource: Resource[Any] = Resource.from_contents(doc, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(BASE, resource)
    return registry


REGISTRY = _registry()


def validator(pointer: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"{BASE}#{pointer}"}, registry=REGISTRY)


SEND_REQUEST = validator(f"/paths/~1emails/post/requestBody/{JSON}")
SEND_RESPONSE = validator(f"/paths/~1emails/post/responses/200/{JSON}")
BATCH_REQUEST = validator(f"/paths/~1emails~1batch/post/requestBody/{JSON}")
BATCH_RESPONSE = validator(f"/paths/~1emails~1batch/post/responses/200/{JSON}")
EMAIL_RESPONSE = validator(f"/paths/~1emails~1{{email_id}}/get/responses/200/{JSON}")

VALID_EMAILS: list[dict[str, Any]] = [
    {"from": "a@acme.test", "to": "b@example.com", "subject": "plain"},
    {
        "from": "Acme <orders@acme.test>",
        "to": ["b@example.com", "C <c@example.com>"],
        "subject": "everything",
        "html": "<p>hi</p>",
        "text": "hi",
        "cc": "cc@example.com",
        "bcc": ["bcc@example.com"],
        "reply_to": ["help@acme.test"],
        "headers": {"X-Entity-Ref-ID": "123"},
        "tags": [{"name": "category", "value": "order_confirmation"}],
        "topic_id": "topic_1",
    },
    {
        "from": "a@acme.test",
        "to": "b@example.com",
        "subject": "templated",
        "template": {"id": "tpl_1", "variables": {"name": "Ann", "count": 3}},
    },
    {
        "from": "a@acme.test",
        "to": "b@example.com",
        "subject": "attached",
        "text": "see attachment",
        "attachments": [{"filename": "a.txt", "content": "aGVsbG8="}],
        "scheduled_at": "in 5 minutes",
    },
]


def test_schemas_resolve() -> None:
    """The OpenAPI refs resolve and the schemas reject an obviously wrong body."""
    assert not SEND_REQUEST.is_valid({"to": "b@example.com"})
    assert not BATCH_RESPONSE.is_valid({"data": "nope"})


@pytest.mark.parametrize("body", VALID_EMAILS, ids=lambda b: b["subject"])
async def test_send_request_and_response_match_openapi(
    sandbox: Sandbox, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    """Requests valid per OpenAPI are accepted; the 200 body and GET email body match it."""
    SEND_REQUEST.validate(body)
    reply = await send(http, sandbox, body)
    assert reply.status == 200, reply.text
    answer = reply.json()
    SEND_RESPONSE.validate(answer)
    async with http.get(f"{sandbox.url}/emails/{answer['id']}", headers=AUTH) as r:
        assert r.status == 200
        EMAIL_RESPONSE.validate(await r.json())


@pytest.mark.parametrize("mode", ["strict", "permissive"])
async def test_batch_request_and_response_match_openapi(
    sandbox: Sandbox, http: aiohttp.ClientSession, mode: str
) -> None:
    """A batch valid per OpenAPI is accepted in both modes and answers with its schema."""
    batch = [
        {k: v for k, v in e.items() if k not in ("attachments", "scheduled_at")}
        for e in VALID_EMAILS
    ]
    BATCH_REQUEST.validate(batch)
    headers = {**AUTH, "x-batch-validation": mode}
    reply = await send(http, sandbox, batch, path="/emails/batch", headers=headers)
    assert reply.status == 200, reply.text
    answer = reply.json()
    BATCH_RESPONSE.validate(answer)
    assert len(answer["data"]) == len(batch)


@pytest.mark.parametrize("missing", ["from", "to", "subject"])
async def test_openapi_invalid_requests_are_rejected(
    sandbox: Sandbox, http: aiohttp.ClientSession, missing: str
) -> None:
    """What OpenAPI calls invalid (a required field missing) the sandbox refuses too."""
    body = {k: v for k, v in VALID_EMAILS[0].items() if k != missing}
    assert not SEND_REQUEST.is_valid(body)
    assert (await send(http, sandbox, body)).status == 422
    assert (await send(http, sandbox, [body], path="/emails/batch")).status == 422
    assert sandbox.deliveries() == []


def test_idempotency_key_bound_matches_openapi() -> None:
    """The sandbox's key bound is the OpenAPI header's maxLength."""
    doc = REGISTRY.contents(BASE)
    params = doc["paths"]["/emails"]["post"]["parameters"]
    [idem] = [p for p in params if p["name"] == "Idempotency-Key"]
    assert idem["schema"]["maxLength"] == MAX_IDEMPOTENCY_KEY


_LOCAL = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}", fullmatch=True)
_DOMAIN = st.from_regex(r"[a-z0-9-]{1,12}(\.[a-z0-9-]{1,8})?\.[a-z]{2,6}", fullmatch=True)
_ADDRESS = st.builds(lambda local, domain: f"{local}@{domain}", _LOCAL, _DOMAIN)
_NAMED = st.one_of(
    _ADDRESS,
    st.builds(
        lambda n, a: f"{n} <{a}>",
        st.from_regex(r"[A-Za-z][A-Za-z ]{0,10}", fullmatch=True),
        _ADDRESS,
    ),
)
_RECIPIENTS = st.one_of(_NAMED, st.lists(_NAMED, min_size=1, max_size=50))
_TAG_TEXT = st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)
_EMAILS = st.fixed_dictionaries(
    {"from": _NAMED, "to": _RECIPIENTS, "subject": st.text(max_size=80)},
    optional={
        "html": st.text(max_size=200),
        "text": st.text(max_size=200),
        "cc": _RECIPIENTS,
        "bcc": _RECIPIENTS,
        "reply_to": _RECIPIENTS,
        "headers": st.dictionaries(_TAG_TEXT, st.text(max_size=20), max_size=3),
        "tags": st.lists(
            st.fixed_dictionaries({"name": _TAG_TEXT, "value": _TAG_TEXT}), max_size=5
        ),
    },
)


@settings(max_examples=100, deadline=None)
@given(_EMAILS, st.sampled_from(["from", "to", "subject", None]))
def test_sandbox_agrees_with_openapi_on_generated_emails(
    email: dict[str, Any], drop: str | None
) -> None:
    """Generated emails valid per OpenAPI pass the sandbox; without a required field both refuse."""
    if drop is not None:
        email = {k: v for k, v in email.items() if k != drop}
    assert SEND_REQUEST.is_valid(email) == (drop is None)
    problem = validate_email(email)
    if drop is None:
        assert problem is None, problem
    else:
        assert problem is not None
        assert problem.name == "missing_required_field"
