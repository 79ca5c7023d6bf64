"""The Resend client: the answer table row by row, parsing of odd answers, and
every row over real sockets against the sandbox (or a tiny aiohttp server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import consumer
from consumer.errors import (
    AuthError,
    EndpointError,
    QuotaExceeded,
    ResendRejected,
    ResendRetriable,
    SettingsError,
    TransportError,
)
from consumer.resend import (
    RULES,
    Answer,
    ResendClient,
    answer_from_response,
    classify,
    parse_seconds,
    transport_answer,
)
from consumer.retry import RetryPolicy, ServiceGate, deliver
from consumer.sandbox import Faults, Sandbox, SandboxConfig
from consumer.settings import Secret, Settings
from tests.conftest import serve

KEY = "re_test_secret_123"
EMAIL = b'{"from":"a@example.com","to":"b@example.com","subject":"Hi","text":"hello"}'

# The contract's table (shared/resend/CONTRACT.md), written out independently of RULES.
CONTRACT_ROWS: list[tuple[int, str, str, str | None]] = [
    (400, "invalid_idempotency_key", "reject", None),
    (400, "validation_error", "reject", None),
    (403, "validation_error", "reject", None),
    (422, "validation_error", "reject", None),
    (422, "missing_required_field", "reject", None),
    (422, "invalid_parameter", "reject", None),
    (422, "invalid_attachment", "reject", None),
    (422, "missing_required_parameter", "reject", None),
    (403, "invalid_from_address", "reject", None),
    *[
        (status, name, "fatal", "auth")
        for status in (401, 403)
        for name in (
            "missing_api_key",
            "invalid_api_key",
            "restricted_api_key",
            "suspended_api_key",
            "invalid_permission",
        )
    ],
    (404, "not_found", "fatal", "endpoint"),
    (405, "method_not_allowed", "fatal", "endpoint"),
    (409, "invalid_idempotent_request", "reject", None),
    (409, "concurrent_idempotent_requests", "retry", None),
    (409, "resource_locked", "retry", None),
    (429, "rate_limit_exceeded", "retry", None),
    (429, "daily_quota_exceeded", "fatal", "quota_daily"),
    (429, "monthly_quota_exceeded", "fatal", "quota_monthly"),
    *[
        (status, name, "retry", None)
        for status in (500, 502, 503, 504)
        for name in ("application_error", "internal_server_error", "service_unavailable")
    ],
]

# Answers the contract does not name: unknown names and statuses.
FALLBACK_ROWS: list[tuple[int, str | None, str, str | None]] = [
    (401, "brand_new_auth_error", "fatal", "auth"),
    (404, None, "fatal", "endpoint"),
    (405, "something", "fatal", "endpoint"),
    (408, None, "retry", None),
    (429, "new_kind_of_limit", "retry", None),
    (409, "unknown_conflict", "reject", None),
    (418, "teapot", "reject", None),
    (400, None, "reject", None),
    (403, "mystery", "reject", None),
    (500, None, "retry", None),
    (501, "not_implemented", "retry", None),
    (599, None, "retry", None),
    (301, None, "fatal", "endpoint"),
    (307, None, "fatal", "endpoint"),
    (200, None, "ok", None),
    (202, None, "ok", None),
]


@pytest.mark.parametrize(("status", "name", "verdict", "condition"), CONTRACT_ROWS)
def test_contract_row(status: int, name: str, verdict: str, condition: str | None) -> None:
    """Each row of the contract's table classifies as the contract says."""
    rule = classify(status, name)
    assert (rule.verdict, rule.condition) == (verdict, condition)
    assert rule.name == name


def test_rules_hold_exactly_the_contract_rows_plus_status_defaults() -> None:
    """RULES has no named row the contract lacks, and lacks none it has."""
    named = {(s, r.name) for r in RULES if r.name is not None for s in r.statuses}
    assert named == {(s, n) for s, n, _, _ in CONTRACT_ROWS}
    unnamed = {s for r in RULES if r.name is None and not r.foreign for s in r.statuses}
    assert unnamed == {401, 404, 405, 408, 429}
    foreign = {s for r in RULES if r.foreign for s in r.statuses}
    assert foreign == {400, 403, 407}


@pytest.mark.parametrize(("status", "name", "verdict", "condition"), FALLBACK_ROWS)
def test_unknown_names_and_statuses(
    status: int, name: str | None, verdict: str, condition: str | None
) -> None:
    """Unknown names fall back per status, unknown statuses per class (5xx retry, 4xx reject)."""
    rule = classify(status, name)
    assert (rule.verdict, rule.condition) == (verdict, condition)


# (status, content type, body) -> (verdict, condition, reason): whether a body is
# Resend's JSON matters only for 400, 403 and 407 (a WAF, proxy or block page).
BODY_ROWS: list[tuple[int, str, bytes, str, str | None, str]] = [
    (400, "text/html", b"<html>Request blocked</html>", "fatal", "endpoint", "block_page"),
    (403, "text/html", b"<html><h1>Access denied</h1></html>", "fatal", "endpoint", "block_page"),
    (
        407,
        "text/html",
        b"<html>Proxy Authentication Required</html>",
        "fatal",
        "endpoint",
        "block_page",
    ),
    (403, "text/plain", b"Forbidden", "fatal", "endpoint", "block_page"),
    (403, "text/plain", b"", "fatal", "endpoint", "block_page"),
    (400, "application/json", b"[1, 2]", "fatal", "endpoint", "block_page"),
    # Resend's own JSON answers stay as they are
    (
        400,
        "application/json",
        b'{"name":"validation_error","message":"bad"}',
        "reject",
        None,
        "validation_error",
    ),
    (
        403,
        "application/json",
        b'{"name":"validation_error","message":"bad"}',
        "reject",
        None,
        "validation_error",
    ),
    (
        403,
        "application/json",
        b'{"name":"invalid_from_address"}',
        "reject",
        None,
        "invalid_from_address",
    ),
    (403, "application/json", b'{"name":"invalid_api_key"}', "fatal", "auth", "invalid_api_key"),
    (
        400,
        "application/json",
        b'{"name":"brand_new","message":"?"}',
        "reject",
        None,
        "resend_rejected",
    ),
    (
        407,
        "application/json",
        b'{"name":"brand_new","message":"?"}',
        "reject",
        None,
        "resend_rejected",
    ),
    # other statuses are classified by status alone, JSON or not
    (401, "text/html", b"<html>401</html>", "fatal", "auth", "unauthorized"),
    (404, "text/html", b"<html>404</html>", "fatal", "endpoint", "not_found"),
    (422, "text/html", b"<html>422</html>", "reject", None, "resend_rejected"),
    (503, "text/html", b"<html>503</html>", "retry", None, "http_503"),
]


@pytest.mark.parametrize(("status", "kind", "raw", "verdict", "condition", "reason"), BODY_ROWS)
def test_block_pages_are_service_wide_not_per_email(
    status: int, kind: str, raw: bytes, verdict: str, condition: str | None, reason: str
) -> None:
    """A non-JSON 400/403/407 is a block page (fatal endpoint); Resend's JSON answers are not."""
    answer = answer_from_response(status, {"Content-Type": kind}, raw, endpoint="/emails")
    assert (answer.verdict, answer.condition, answer.reason) == (verdict, condition, reason)
    if verdict == "fatal" and condition == "endpoint":
        assert isinstance(answer.error(), EndpointError)
        assert "non-JSON" in answer.message


def test_html_error_page_is_classified_by_status() -> None:
    """A proxy's HTML 503 is retriable and its message says it was not JSON."""
    answer = answer_from_response(
        503, {"Content-Type": "text/html"}, b"<html>503</html>", endpoint="/emails"
    )
    assert answer.verdict == "retry"
    assert answer.error_name is None
    assert "non-JSON" in answer.message
    assert "text/html" in answer.message
    assert answer.outage_signal


def test_success_without_an_id_is_an_endpoint_problem() -> None:
    """A 200 that is not Resend's JSON (a web page) must never count as sent."""
    answer = answer_from_response(
        200, {"Content-Type": "text/html"}, b"<html>hi</html>", endpoint="/emails"
    )
    assert (answer.verdict, answer.condition) == ("fatal", "endpoint")
    assert answer.email_id is None


def test_batch_success_and_permissive_errors() -> None:
    """A batch answer yields ids in order and permissive errors by index."""
    raw = b'{"data":[{"id":"a"},{"id":"b"}],"errors":[{"index":2,"message":"bad to"}]}'
    answer = answer_from_response(200, {}, raw, endpoint="/emails/batch")
    assert answer.verdict == "ok"
    assert answer.email_ids == ["a", "b"]
    assert answer.batch_errors == [(2, "bad to")]


def test_retry_after_and_ratelimit_reset() -> None:
    """retry-after wins; a 429 without it falls back to ratelimit-reset."""
    body = b'{"statusCode":429,"name":"rate_limit_exceeded","message":"slow"}'
    both = answer_from_response(
        429, {"retry-after": "2", "ratelimit-reset": "7"}, body, endpoint="/emails"
    )
    assert both.retry_after == 2.0
    reset_only = answer_from_response(429, {"ratelimit-reset": "7"}, body, endpoint="/emails")
    assert reset_only.retry_after == 7.0
    assert reset_only.message == "slow"


def test_parse_seconds() -> None:
    """Delay headers: seconds, fractions, HTTP dates; junk and negatives are safe."""
    assert parse_seconds("3") == 3.0
    assert parse_seconds(" 0.5 ") == 0.5
    assert parse_seconds("-4") == 0.0
    assert parse_seconds("soon") is None
    assert parse_seconds("nan") is None
    assert parse_seconds(None) is None
    assert parse_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0


def test_transport_errors_are_retriable_and_redacted() -> None:
    """Timeouts and resets retry with a reason code; the key never appears in the message."""
    assert transport_answer(TimeoutError()).reason == "timeout"
    reset = transport_answer(aiohttp.ServerDisconnectedError(), redact=KEY)
    assert (reset.verdict, reset.reason) == ("retry", "server_disconnected")
    leaky = transport_answer(OSError(f"boom {KEY}"), redact=KEY)
    assert KEY not in leaky.message
    bad_url = transport_answer(aiohttp.InvalidURL("nope"))
    assert (bad_url.verdict, bad_url.condition) == ("fatal", "endpoint")


def test_answers_map_to_the_error_hierarchy() -> None:
    """Answer.error() gives the errors.py class that matches the verdict and condition."""
    assert Answer(status=200, verdict="ok").error() is None
    assert isinstance(Answer(status=None, verdict="retry").error(), TransportError)
    assert isinstance(Answer(status=503, verdict="retry").error(), ResendRetriable)
    rejected = Answer(status=422, verdict="reject", reason="validation_error").error()
    assert isinstance(rejected, ResendRejected)
    assert rejected.reason == "validation_error"
    assert isinstance(Answer(status=401, verdict="fatal", condition="auth").error(), AuthError)
    quota = Answer(status=429, verdict="fatal", condition="quota_daily").error()
    assert isinstance(quota, QuotaExceeded)
    assert isinstance(
        Answer(status=404, verdict="fatal", condition="endpoint").error(), EndpointError
    )


def test_from_settings_needs_a_key_and_never_shows_it() -> None:
    """No key is a SettingsError; with a key, neither repr nor str shows it."""
    with pytest.raises(SettingsError, match="RESEND_API_KEY"):
        ResendClient.from_settings(Settings())
    client = ResendClient.from_settings(
        Settings(
            resend_api_key=Secret(KEY),
            resend_base_url="http://x/",
            resend_allow_http=True,
            max_in_flight=7,
        )
    )
    assert KEY not in repr(client)
    assert client.base_url == "http://x"
    assert client._max_connections == 7


# -- over real sockets ---------------------------------------------------------------


@pytest.fixture
async def keyed_sandbox(make_sandbox: Callable[..., Awaitable[Sandbox]]) -> Sandbox:
    """A sandbox that accepts only KEY, fast rate limit."""
    return await make_sandbox(config=SandboxConfig(api_key=KEY, rate_limit=1000.0))


@pytest.fixture
async def client(keyed_sandbox: Sandbox) -> AsyncIterator[ResendClient]:
    """A client of keyed_sandbox with the right key."""
    async with ResendClient(
        base_url=keyed_sandbox.url, api_key=Secret(KEY), total_timeout=5.0
    ) as c:
        yield c


ALL_ROWS = [(s, n, v, c) for s, n, v, c in CONTRACT_ROWS]


@pytest.mark.parametrize(("status", "name", "verdict", "condition"), ALL_ROWS)
async def test_contract_row_over_the_socket(
    keyed_sandbox: Sandbox,
    client: ResendClient,
    status: int,
    name: str,
    verdict: str,
    condition: str | None,
) -> None:
    """Every table row, answered by the sandbox over HTTP, is classified as the contract says."""
    keyed_sandbox.set_faults(
        Faults(force_status={"status": status, "name": name, "retry_after": 3})
    )
    answer = await client.send(endpoint="/emails", body=EMAIL, idempotency_key="row-1")
    assert (answer.status, answer.error_name) == (status, name)
    assert (answer.verdict, answer.condition) == (verdict, condition)
    assert answer.retry_after == 3.0
    assert KEY not in answer.message
    assert keyed_sandbox.deliveries() == []


async def test_send_returns_the_id_and_a_replay_returns_the_same(
    keyed_sandbox: Sandbox, client: ResendClient
) -> None:
    """200 with an id; the same key and bytes again replay the id and send nothing new."""
    first = await client.send(endpoint="/emails", body=EMAIL, idempotency_key="order:1")
    again = await client.send(endpoint="/emails", body=EMAIL, idempotency_key="order:1")
    assert first.verdict == again.verdict == "ok"
    assert first.email_id is not None
    assert first.email_id == again.email_id
    assert len(keyed_sandbox.deliveries(idempotency_key="order:1")) == 1


async def test_batch_send(keyed_sandbox: Sandbox, client: ResendClient) -> None:
    """POST /emails/batch yields one id per email, in order."""
    body = b"[" + EMAIL + b"," + EMAIL + b"]"
    answer = await client.send(endpoint="/emails/batch", body=body, idempotency_key="batch:1")
    assert answer.verdict == "ok"
    assert answer.email_ids is not None
    assert len(answer.email_ids) == 2
    assert [d.id for d in keyed_sandbox.deliveries(idempotency_key="batch:1")] == answer.email_ids


async def test_real_sandbox_rejections(keyed_sandbox: Sandbox, client: ResendClient) -> None:
    """Genuine sandbox errors: 409 different body, 422 missing field, 400 bad key."""
    await client.send(endpoint="/emails", body=EMAIL, idempotency_key="k:1")
    other = EMAIL.replace(b"Hi", b"Ho")
    conflict = await client.send(endpoint="/emails", body=other, idempotency_key="k:1")
    assert (conflict.status, conflict.verdict, conflict.reason) == (
        409,
        "reject",
        "invalid_idempotent_request",
    )
    missing = await client.send(
        endpoint="/emails",
        body=b'{"from":"a@example.com","to":"b@example.com"}',
        idempotency_key="k:2",
    )
    assert (missing.status, missing.verdict) == (422, "reject")
    bad_key = await client.send(endpoint="/emails", body=EMAIL, idempotency_key="x" * 300)
    assert (bad_key.status, bad_key.error_name, bad_key.verdict) == (
        400,
        "invalid_idempotency_key",
        "reject",
    )


async def test_wrong_and_missing_key(keyed_sandbox: Sandbox) -> None:
    """A wrong key (403) and an empty key (401) are fatal auth, and never echoed."""
    async with ResendClient(base_url=keyed_sandbox.url, api_key=Secret("re_wrong")) as c:
        wrong = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="a")
    async with ResendClient(base_url=keyed_sandbox.url, api_key=Secret("")) as c:
        empty = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="a")
    assert (wrong.status, wrong.error_name, wrong.condition) == (403, "invalid_api_key", "auth")
    assert (empty.status, empty.error_name, empty.condition) == (401, "missing_api_key", "auth")
    assert "re_wrong" not in wrong.message


async def test_wrong_base_url_path_is_fatal_endpoint(keyed_sandbox: Sandbox) -> None:
    """A base URL with a wrong path prefix answers 404: fatal, condition endpoint."""
    async with ResendClient(base_url=keyed_sandbox.url + "/v9", api_key=Secret(KEY)) as c:
        answer = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="a")
    assert (answer.status, answer.verdict, answer.condition) == (404, "fatal", "endpoint")


async def test_rate_limit_and_daily_quota_from_the_sandbox(
    make_sandbox: Callable[..., Awaitable[Sandbox]],
) -> None:
    """A real 429 rate limit retries after retry-after; an exhausted daily quota is fatal."""
    sb = await make_sandbox(config=SandboxConfig(api_key=KEY, rate_limit=1.0, daily_quota=1))
    async with ResendClient(base_url=sb.url, api_key=Secret(KEY)) as c:
        ok = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="q:1")
        limited = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="q:2")
        await asyncio.sleep(1.05)
        quota = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="q:3")
    assert ok.verdict == "ok"
    assert (limited.status, limited.verdict, limited.error_name) == (
        429,
        "retry",
        "rate_limit_exceeded",
    )
    assert limited.retry_after is not None
    assert limited.retry_after >= 1
    assert (quota.status, quota.verdict, quota.condition) == (429, "fatal", "quota_daily")
    assert quota.retry_after is not None
    assert quota.retry_after > 0


async def test_html_503_from_the_sandbox(keyed_sandbox: Sandbox, client: ResendClient) -> None:
    """The sandbox's nginx-style HTML error page is survived and classified retry."""
    keyed_sandbox.set_faults(Faults(error_rate=1.0, html_error_share=1.0))
    answer = await client.send(endpoint="/emails", body=EMAIL, idempotency_key="h:1")
    assert answer.status in (500, 503)
    assert answer.verdict == "retry"
    assert "non-JSON" in answer.message


async def test_hang_until_timeout(keyed_sandbox: Sandbox) -> None:
    """A request that is never answered ends as a retriable timeout after the total timeout."""
    keyed_sandbox.set_faults(Faults(hang_rate=1.0))
    async with ResendClient(
        base_url=keyed_sandbox.url, api_key=Secret(KEY), total_timeout=0.3, read_timeout=5.0
    ) as c:
        answer = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="hang:1")
    assert (answer.status, answer.verdict, answer.reason) == (None, "retry", "timeout")
    assert answer.outage_signal


async def test_connection_refused_and_invalid_url() -> None:
    """Nobody listening is a retriable connect error; a malformed base URL is fatal."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with ResendClient(base_url=f"http://127.0.0.1:{port}", api_key=Secret(KEY)) as c:
        refused = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="a")
    async with ResendClient(base_url="api.resend.com", api_key=Secret(KEY)) as c:
        invalid = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="a")
    assert (refused.status, refused.verdict, refused.reason) == (None, "retry", "connect_error")
    assert (invalid.verdict, invalid.condition) == ("fatal", "endpoint")


# -- a tiny recording server for what the sandbox cannot show -------------------------


class Recorder:
    """A real aiohttp server that records requests and answers what it is told."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answer: Callable[[], web.StreamResponse] = lambda: web.json_response({"id": "e-1"})
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(
            {
                "path": request.path,
                "headers": dict(request.headers),
                "body": await request.read(),
                "peer": peer,
            }
        )
        return self.answer()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner, self.url = await serve(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    """A started Recorder, cleaned up afterwards."""
    rec = Recorder()
    await rec.start()
    try:
        yield rec
    finally:
        await rec.stop()


async def test_headers_bytes_and_keep_alive(recorder: Recorder) -> None:
    """Every attempt carries the headers and the exact bytes, over one kept-alive connection."""
    async with ResendClient(base_url=recorder.url + "/", api_key=Secret(KEY)) as c:
        for _ in range(3):
            answer = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="same:key")
            assert answer.email_id == "e-1"
    assert [r["path"] for r in recorder.requests] == ["/emails"] * 3
    for r in recorder.requests:
        h = r["headers"]
        assert h["Authorization"] == f"Bearer {KEY}"
        assert h["User-Agent"] == f"resend-consumer/{consumer.__version__}"
        assert h["Content-Type"] == "application/json"
        assert h["Idempotency-Key"] == "same:key"
        assert r["body"] == EMAIL
    assert len({r["peer"] for r in recorder.requests}) == 1


async def test_redirect_and_html_success_are_endpoint_trouble(recorder: Recorder) -> None:
    """A redirect is not followed and a 200 web page is not a send: both fatal endpoint."""
    async with ResendClient(base_url=recorder.url, api_key=Secret(KEY)) as c:
        recorder.answer = lambda: web.Response(status=301, headers={"Location": "https://x/"})
        moved = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="a")
        recorder.answer = lambda: web.Response(
            text="<html>welcome</html>", content_type="text/html"
        )
        page = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="a")
        recorder.answer = lambda: web.Response(status=418, text="short and stout")
        teapot = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="a")
    assert (moved.status, moved.verdict, moved.condition) == (301, "fatal", "endpoint")
    assert (page.status, page.verdict, page.condition) == (200, "fatal", "endpoint")
    assert (teapot.status, teapot.verdict, teapot.reason) == (418, "reject", "resend_rejected")
    assert len(recorder.requests) == 3


async def test_key_file_is_reread_after_an_auth_failure(recorder: Recorder, tmp_path: Path) -> None:
    """A rotated key file heals auth without a restart: the next attempt after a 401 rereads it."""
    key_file = tmp_path / "api-key"
    key_file.write_text("re_old\n")
    recorder.answer = lambda: web.json_response(
        {"statusCode": 401, "name": "invalid_api_key", "message": "API key is invalid"},
        status=401,
    )
    settings = Settings(resend_base_url=recorder.url, resend_api_key_file=key_file)
    settings = settings.replace(resend_api_key=Secret(key_file.read_text().strip()))
    async with ResendClient.from_settings(settings) as c:
        denied = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="a")
        key_file.write_text("re_new\n")
        recorder.answer = lambda: web.json_response({"id": "e-2"})
        ok = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="a")
    assert denied.condition == "auth"
    assert ok.email_id == "e-2"
    assert [r["headers"]["Authorization"] for r in recorder.requests] == [
        "Bearer re_old",
        "Bearer re_new",
    ]
    assert "re_new" not in repr(c)


async def test_a_block_page_pauses_the_service_and_dead_letters_nothing(
    recorder: Recorder,
) -> None:
    """An HTML 403 from a WAF over a real socket opens the gate as endpoint; all send after."""
    recorder.answer = lambda: web.Response(
        status=403,
        text="<html><h1>Access denied</h1>by the firewall</html>",
        content_type="text/html",
    )
    changes: list[tuple[str, str, str | None]] = []
    gate = ServiceGate(
        probe_initial=0.05, probe_max=0.1, on_change=lambda *change: changes.append(change)
    )
    policy = RetryPolicy(base=0.01, cap=0.02, max_attempts=2, max_elapsed=5.0)
    slots = asyncio.Semaphore(4)
    async with ResendClient(base_url=recorder.url, api_key=Secret(KEY)) as c:
        tasks = [
            asyncio.create_task(
                deliver(
                    c,
                    endpoint="/emails",
                    body=EMAIL,
                    idempotency_key=f"blocked:{i}",
                    policy=policy,
                    gate=gate,
                    slots=slots,
                )
            )
            for i in range(4)
        ]
        await asyncio.sleep(0.5)
        assert (gate.state, gate.condition) == ("open", "endpoint")
        assert not any(t.done() for t in tasks), "a block page must never dead-letter"
        assert len(recorder.requests) <= 4 + 10  # the first wave, then one probe at a time
        recorder.answer = lambda: web.json_response({"id": "e-1"})
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert {r.outcome for r in results} == {"sent"}
    assert changes == [("closed", "open", "endpoint"), ("open", "closed", None)]


# -- malformed base URLs pause the service (issue 11, item 5) --------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://api.resend.com",
        "https://api.resend.com:99999",
        "https://exa mple.com",
        "https://user:hunter2pass@127.0.0.1:1",
        "https://api.resend.com?x=1",
        "",
    ],
)
async def test_malformed_base_url_is_an_endpoint_condition(url: str) -> None:
    """Whatever is wrong with the base URL, a send is fatal `endpoint` (a pause), not an outage."""
    async with ResendClient(base_url=url, api_key=Secret(KEY)) as c:
        answer = await c.send(endpoint="/emails", body=EMAIL, idempotency_key="a")
        shown = repr(c)
    assert (answer.verdict, answer.condition, answer.reason) == (
        "fatal",
        "endpoint",
        "invalid_base_url",
    )
    assert not answer.outage_signal
    assert "hunter2pass" not in answer.message + shown
    assert "user" not in answer.message


def test_non_http_url_error_from_aiohttp_is_an_endpoint_condition() -> None:
    """aiohttp's NonHttpUrlClientError (ftp://, ...) classifies as `endpoint`, not a retry."""
    answer = transport_answer(aiohttp.NonHttpUrlClientError("ftp://x"))
    assert (answer.verdict, answer.condition) == ("fatal", "endpoint")
