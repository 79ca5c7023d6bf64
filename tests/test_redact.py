"""Redaction (consumer.redact): one masking rule for addresses, one scrubber for secrets."""

from __future__ import annotations

import pytest

from consumer.redact import (
    MASK,
    REDACTED,
    is_secret_key,
    mask_address,
    mask_addresses,
    redact_secrets,
    without_userinfo,
)

KEY = "re_AbCdEf123456_SuperSecretKeyValue99"

# -- addresses -------------------------------------------------------------------------


def test_mask_addresses_keeps_two_letters_and_the_domain() -> None:
    """Addresses are shortened to two letters of the local part; other text is untouched."""
    assert mask_addresses("jane@example.com") == "ja***@example.com"
    assert mask_addresses("to a@b.io and bob.smith+x@mail.example.org!") == (
        "to a***@b.io and bo***@mail.example.org!"
    )
    assert mask_addresses("no address here") == "no address here"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("to: 'jane.doe@example.com' bad", "to: 'ja***@example.com' bad"),
        ("Jane <jane.doe@example.com>", "Jane <ja***@example.com>"),
        ('"Doe, Jane" <jane@example.com>', '"Doe, Jane" <ja***@example.com>'),
        ("(jane@example.com)", "(ja***@example.com)"),
        ("a@x.io, b@y.io; c@z.io", "a***@x.io, b***@y.io; c***@z.io"),
        # no dot in the domain, letters outside ASCII: masked all the same
        ("jane.doe@example", "ja***@example"),
        ("jané@exämple.com", "ja***@exämple.com"),
        ("root@10.0.0.1 refused", "ro***@10.0.0.1 refused"),
        # a record's coordinates are not an address
        ("orders[2]@41: TimeoutError", "orders[2]@41: TimeoutError"),
    ],
)
def test_every_address_in_text_is_masked(text: str, masked: str) -> None:
    """Delimiters around addresses stay; the local part never shows past two characters."""
    assert mask_addresses(text) == masked


def test_a_long_run_without_an_address_is_not_slow() -> None:
    """The local part is bounded: a long line with a lone `@` is scanned in linear time."""
    text = "x" * 200_000 + " @"
    assert mask_addresses(text) == text


def test_mask_address_masks_one_value_even_when_it_is_not_an_address() -> None:
    """One value meant as an address: its local part is cut; no `@` at all gives `***`."""
    assert mask_address("jane.doe@example.com") == "ja***@example.com"
    assert mask_address("jane.doe@") == "ja***@"
    assert mask_address("nonsense") == MASK


def test_masked_text_is_not_masked_again() -> None:
    """Masking is idempotent: a masked address has no local part left to cut."""
    once = mask_addresses("jane@example.com and Jane <j@example.org>")
    assert mask_addresses(once) == once


# -- secrets ---------------------------------------------------------------------------


def test_resend_keys_tokens_pairs_and_given_values_are_redacted() -> None:
    """Resend keys, Bearer tokens, secret-named pairs and known values never survive."""
    text = (
        f"bad key {KEY}; Authorization: Bearer abc.def-ghi; password=hunter2 "
        '{"api_key": "sk-live-1"} token: t0k sasl pw plainvalue'
    )
    cleaned = redact_secrets(text, ["plainvalue"])
    for leaked in (KEY, "abc.def-ghi", "hunter2", "sk-live-1", "t0k", "plainvalue"):
        assert leaked not in cleaned
    assert f"bad key re_{REDACTED};" in cleaned
    assert f"Authorization: Bearer {REDACTED};" in cleaned
    assert f"password={REDACTED}" in cleaned
    assert f'"api_key": "{REDACTED}"' in cleaned
    assert cleaned.endswith(f"sasl pw {REDACTED}")


def test_a_bearer_resend_key_reads_as_one_redacted_token() -> None:
    assert redact_secrets(f"header was Bearer {KEY}") == f"header was Bearer {REDACTED}"


def test_text_without_secrets_is_returned_as_it_is() -> None:
    """Words that merely contain the patterns are left alone."""
    for text in ("are_you there", "tokens left: 3", "the secretary", "more_than re", ""):
        assert redact_secrets(text) == text
    assert redact_secrets("nothing", ["", "absent"]) == "nothing"


def test_secrets_in_exception_text_are_redacted() -> None:
    """What an exception says (str or repr) is scrubbed like any other text."""
    exc = OSError(f"connect to https://api.resend.com with {KEY} failed (password=pw1)")
    for text in (str(exc), repr(exc), f"{type(exc).__name__}: {exc}"):
        cleaned = redact_secrets(text, ["pw1"])
        assert KEY not in cleaned
        assert "pw1" not in cleaned
        assert f"re_{REDACTED}" in cleaned
    nested = ValueError(f"wrapped: {RuntimeError(f'Bearer {KEY}')!r}")
    assert KEY not in redact_secrets(repr(nested))


def test_secrets_and_masks_compose() -> None:
    """A message scrubbed and masked keeps neither the key nor the recipient."""
    text = f"to jane@example.com with {KEY}"
    assert mask_addresses(redact_secrets(text)) == f"to ja***@example.com with re_{REDACTED}"


def test_urls_lose_their_userinfo_only() -> None:
    """`user:password@` becomes `***@`; the scheme, host and path stay readable."""
    assert without_userinfo("https://u:pw@api.example.com/v1") == "https://***@api.example.com/v1"
    assert without_userinfo("u:pw@host:8080") == "***@host:8080"
    assert without_userinfo("https://api.resend.com") == "https://api.resend.com"
    assert without_userinfo("https://api.example.com/a@b") == "https://api.example.com/a@b"


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("api_key", True),
        ("Authorization", True),
        ("kafka-sasl-password", True),
        ("webhook_secret", True),
        ("refresh_token", True),
        ("idempotency_key", False),
        ("to", False),
        (3, False),
    ],
)
def test_secret_field_names(name: object, secret: bool) -> None:
    assert is_secret_key(name) is secret
