"""Fidelity: the official `resend` SDK (PyPI) works against the sandbox over a real socket.

The SDK's sync client uses `requests`, so each call runs in a thread while the
in-process sandbox serves on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import resend
from resend.exceptions import (
    MissingApiKeyError,
    MissingRequiredFieldsError,
    RateLimitError,
    ResendError,
    ValidationError,
)

from consumer.sandbox import Faults, Sandbox, SandboxConfig
from tests.sandbox.support import EMAIL

T = TypeVar("T")


@pytest.fixture
def sdk(monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox) -> Sandbox:
    """Point the SDK's module-global settings at the sandbox (restored afterwards)."""
    monkeypatch.setattr(resend, "api_url", sandbox.url)
    monkeypatch.setattr(resend, "api_key", "re_sdk_test")
    return sandbox


async def call(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


async def test_sdk_send_and_get(sdk: Sandbox) -> None:
    """Emails.send returns the id the ledger recorded; Emails.get reads the email back."""
    sent = await call(resend.Emails.send, EMAIL)
    [d] = sdk.deliveries()
    assert sent["id"] == d.id
    assert d.body["subject"] == "Your order"
    got = await call(resend.Emails.get, sent["id"])
    assert got["id"] == sent["id"]
    assert got["to"] == ["buyer@example.com"]


async def test_sdk_idempotent_replay_same_id(sdk: Sandbox) -> None:
    """Two sends with one idempotency_key return one id and record one delivery."""
    options: resend.Emails.SendOptions = {"idempotency_key": "order-confirmation:42"}
    first = await call(resend.Emails.send, EMAIL, options)
    second = await call(resend.Emails.send, EMAIL, options)
    assert first["id"] == second["id"]
    assert len(sdk.deliveries(idempotency_key="order-confirmation:42")) == 1


async def test_sdk_batch_send_and_replay(sdk: Sandbox) -> None:
    """Batch.send returns ids in order; a replay with its key returns the same ids."""
    batch = [EMAIL, {**EMAIL, "subject": "second"}]
    options: resend.Batch.SendOptions = {"idempotency_key": "batch:7"}
    first = await call(resend.Batch.send, batch, options)
    again = await call(resend.Batch.send, batch, options)
    assert [e["id"] for e in first["data"]] == [e["id"] for e in again["data"]]
    assert [d.body["subject"] for d in sdk.deliveries()] == ["Your order", "second"]


async def test_sdk_batch_permissive_errors(sdk: Sandbox) -> None:
    """Permissive batch: the SDK surfaces data and errors as Resend documents them."""
    options: resend.Batch.SendOptions = {"batch_validation": "permissive"}
    result = await call(resend.Batch.send, [EMAIL, {**EMAIL, "to": "nope"}], options)
    assert len(result["data"]) == 1
    assert result["errors"][0]["index"] == 1


async def test_sdk_raises_its_422_classes(sdk: Sandbox) -> None:
    """Missing field and malformed address raise the SDK's own 422 error classes."""
    with pytest.raises(MissingRequiredFieldsError) as missing:
        await call(resend.Emails.send, {k: v for k, v in EMAIL.items() if k != "subject"})
    assert missing.value.code == 422
    with pytest.raises(ValidationError) as invalid:
        await call(resend.Emails.send, {**EMAIL, "to": "not an address"})
    assert invalid.value.code == 422


async def test_sdk_raises_rate_limit_error(sdk: Sandbox) -> None:
    """A 429 storm raises RateLimitError carrying retry-after in its headers."""
    sdk.set_faults(Faults(storm_429_rate=1.0))
    with pytest.raises(RateLimitError) as caught:
        await call(resend.Emails.send, EMAIL)
    assert caught.value.error_type == "rate_limit_exceeded"
    assert int(caught.value.headers["retry-after"]) >= 1


async def test_sdk_raises_409_for_idempotency_conflict(sdk: Sandbox) -> None:
    """Same key with another body raises ResendError 409 invalid_idempotent_request."""
    options: resend.Emails.SendOptions = {"idempotency_key": "conflict:1"}
    await call(resend.Emails.send, EMAIL, options)
    with pytest.raises(ResendError) as caught:
        await call(resend.Emails.send, {**EMAIL, "subject": "changed"}, options)
    assert caught.value.code == 409
    assert caught.value.error_type == "invalid_idempotent_request"


async def test_sdk_survives_html_error_page(sdk: Sandbox) -> None:
    """An HTML 503 from a 'proxy' becomes an SDK error with the HTTP status, not a crash."""
    sdk.set_faults(Faults(error_rate=1.0, html_error_share=1.0))
    with pytest.raises(ResendError) as caught:
        await call(resend.Emails.send, EMAIL)
    assert caught.value.code in (500, 503)


async def test_sdk_missing_key(
    monkeypatch: pytest.MonkeyPatch, make_sandbox: Callable[..., Any]
) -> None:
    """An empty API key makes the SDK raise MissingApiKeyError (401)."""
    sb = await make_sandbox(config=SandboxConfig())
    monkeypatch.setattr(resend, "api_url", sb.url)
    monkeypatch.setattr(resend, "api_key", "")
    with pytest.raises(MissingApiKeyError):
        await call(resend.Emails.send, EMAIL)
