"""Settings: careless values are refused at start-up with exit 2 and a message naming them."""

from __future__ import annotations

import re
import socket
import typing
from pathlib import Path

import pytest

from consumer.cli import main
from consumer.errors import SettingsError
from consumer.health import Health, HealthServer
from consumer.metrics import Metrics
from consumer.settings import FIELDS, Settings

ROOT = Path(__file__).resolve().parent.parent
ROUTES = ROOT / "schemas" / "routes.yaml"

#: every setting that holds a float (a duration or a number)
FLOAT_SETTINGS = [f.env for f in FIELDS if isinstance(getattr(Settings(), f.name), float)]


def literal_settings() -> list[tuple[str, tuple[str, ...]]]:
    """(ENV, allowed values) of every setting whose type is a Literal (or a Literal | None)."""
    hints = typing.get_type_hints(Settings)
    out = []
    for f in FIELDS:
        hint = hints[f.name]
        for part in (hint, *typing.get_args(hint)):
            if typing.get_origin(part) is typing.Literal:
                out.append((f.env, typing.get_args(part)))
    return out


@pytest.mark.parametrize(("env", "allowed"), literal_settings())
def test_a_choice_takes_exactly_the_values_of_its_literal(
    env: str, allowed: tuple[str, ...]
) -> None:
    """The values a choice accepts are its type's Literal, declared once."""
    (setting,) = (f for f in FIELDS if f.env == env)
    for value in allowed:
        assert setting.parse(value) == value
    with pytest.raises(ValueError, match=re.escape(f"is not one of {', '.join(allowed)}")):
        setting.parse("not-a-choice")


@pytest.mark.parametrize("env", FLOAT_SETTINGS)
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "infinity", "9" * 400])
def test_numbers_refuse_nan_and_infinities(env: str, text: str) -> None:
    """NaN, infinities and digit strings that overflow to infinity name the variable."""
    with pytest.raises(SettingsError, match=env):
        Settings.from_env({env: text})


def test_rate_limit_nan_is_refused_even_when_built_in_code() -> None:
    """The object itself refuses NaN (RATE_LIMIT=nan used to load and send nothing)."""
    with pytest.raises(SettingsError, match="RATE_LIMIT"):
        Settings(rate_limit=float("nan"))
    with pytest.raises(SettingsError, match="RETRY_CAP"):
        Settings(retry_cap=float("inf"))


@pytest.mark.parametrize("text", ["99999", "-1", "65536"])
def test_health_port_is_range_checked(text: str) -> None:
    """HEALTH_PORT takes 1-65535, or 0 for off."""
    with pytest.raises(SettingsError, match="HEALTH_PORT"):
        Settings.from_env({"HEALTH_PORT": text})
    assert Settings.from_env({"HEALTH_PORT": "0"}).health_port == 0
    assert Settings.from_env({"HEALTH_PORT": "65535"}).health_port == 65535


@pytest.mark.parametrize(
    "text", ["broker:0", "broker:99999", "broker:x", "a:1,,b:2", "http://broker:9092"]
)
def test_bootstrap_server_ports_are_range_checked(text: str) -> None:
    """Each KAFKA_BOOTSTRAP_SERVERS entry is host[:port] with a port from 1 to 65535."""
    with pytest.raises(SettingsError, match="KAFKA_BOOTSTRAP_SERVERS"):
        Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": text})


@pytest.mark.parametrize(
    "text", ["b1:9092,b2:9093", "[::1]:9092", "::1", "broker", "pkc-1.eu.confluent.cloud:9092"]
)
def test_usual_bootstrap_servers_load(text: str) -> None:
    """Host names, IPv4 and IPv6 (bracketed with a port) and bare hosts still load."""
    assert Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": text}).kafka_bootstrap_servers == text


@pytest.mark.parametrize("text", ["http://0.0.0.0", "0.0.0.0:8080", "a b", "ab:80"])
def test_health_host_must_be_a_host(text: str) -> None:
    """HEALTH_HOST is a host name or address, not a URL or host:port."""
    with pytest.raises(SettingsError, match="HEALTH_HOST"):
        Settings.from_env({"HEALTH_HOST": text})


@pytest.mark.parametrize("text", ["nan", "0", "1", "1.5"])
def test_resume_ratio_is_a_share(text: str) -> None:
    """RESUME_RATIO is strictly between 0 and 1, and finite."""
    with pytest.raises(SettingsError, match="RESUME_RATIO"):
        Settings.from_env({"RESUME_RATIO": text})


def test_settings_flag_with_nan_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`--rate-limit nan` on the command line exits 2 with one line naming the setting."""
    assert main(["check", "--rate-limit", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "RATE_LIMIT='nan'" in err


async def test_unresolvable_health_host_is_a_settings_error() -> None:
    """A HEALTH_HOST that does not resolve is a SettingsError naming HEALTH_HOST."""
    server = HealthServer(health=Health(), metrics=Metrics(), host="no-such-host.invalid", port=0)
    with pytest.raises(SettingsError, match=re.escape("HEALTH_HOST='no-such-host.invalid'")):
        await server.start()


async def test_health_host_that_is_not_local_is_a_settings_error() -> None:
    """A HEALTH_HOST address this machine does not own cannot be bound: named, not a traceback."""
    server = HealthServer(health=Health(), metrics=Metrics(), host="192.0.2.1", port=0)
    with pytest.raises(SettingsError, match=re.escape("HEALTH_HOST='192.0.2.1'")):
        await server.start()


def run_until_start(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str]:
    """`resend-consumer run` with flags that fail before Kafka is reached; (code, stderr)."""
    code = main(
        [
            "run",
            "--routes-file",
            str(ROUTES),
            "--resend-api-key",
            "re_test_key",
            "--log-format",
            "json",
            *flags,
        ]
    )
    return code, capsys.readouterr().err


def test_run_with_an_unresolvable_health_host_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """`run` with a bad HEALTH_HOST exits 2 with one line naming it (it used to be a traceback)."""
    code, err = run_until_start(
        capsys, "--health-host", "no-such-host.invalid", "--health-port", "1"
    )
    assert code == 2
    assert "HEALTH_HOST='no-such-host.invalid'" in err
    assert "Traceback" not in err


def test_run_with_a_taken_health_port_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """`run` whose HEALTH_PORT is taken exits 2 naming HEALTH_PORT."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_until_start(
            capsys, "--health-host", "127.0.0.1", "--health-port", str(port)
        )
    assert code == 2
    assert f"HEALTH_PORT={port}" in err
    assert "Traceback" not in err


# -- RESEND_BASE_URL and the API key (issue 11, item 5) ---------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://api.resend.com", "must start with https://"),
        ("api.resend.com", "must start with https://"),
        ("https://", "no valid host"),
        ("https://api.resend.com:99999", "invalid port"),
        ("https://api.resend.com/?x=1", "query"),
        ("https://exa mple.com", "whitespace"),
        ("https://api.resend.com\n", "whitespace"),
        ("http://api.resend.com", "in clear"),
        ("http://10.0.0.5:8025", "in clear"),
    ],
)
def test_unusable_or_unsafe_base_urls_are_refused(url: str, problem: str) -> None:
    """RESEND_BASE_URL must be https (http only to loopback) with a host and a valid port."""
    with pytest.raises(SettingsError, match="RESEND_BASE_URL") as info:
        Settings.from_env({"RESEND_BASE_URL": url})
    assert problem in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://user:hunter2pass@api.resend.com",
        "https://user@api.resend.com",
        "http://admin:hunter2pass@127.0.0.1:8025",
    ],
)
def test_credentials_in_the_base_url_are_refused_and_never_shown(url: str) -> None:
    """A user name or password in the URL is refused; the error quotes neither."""
    for build in (
        lambda: Settings.from_env({"RESEND_BASE_URL": url}),
        lambda: Settings(resend_base_url=url),
    ):
        with pytest.raises(SettingsError, match="credentials") as info:
            build()
        assert "hunter2pass" not in str(info.value)
        assert "user" not in str(info.value).replace("RESEND_", "")
        assert "admin" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    ["https://api.resend.com", "http://127.0.0.1:8025", "http://localhost:8025/", "http://[::1]:1"],
)
def test_https_and_loopback_http_base_urls_load(url: str) -> None:
    """https anywhere and http to this machine (the local sandbox) load without opt-in."""
    assert Settings.from_env({"RESEND_BASE_URL": url}).resend_base_url == url


def test_http_to_another_host_needs_the_explicit_opt_in() -> None:
    """RESEND_ALLOW_HTTP=true lets a sandbox in another container be reached over http."""
    env = {"RESEND_BASE_URL": "http://sandbox:8025", "RESEND_ALLOW_HTTP": "true"}
    assert Settings.from_env(env).resend_base_url == "http://sandbox:8025"


@pytest.mark.parametrize(
    "key", [" re_abcdef", "re_abcdef ", "re_abcdef\n", "re_abc\ndef", "re_abc def", "\tre_x"]
)
def test_api_key_with_whitespace_or_a_line_break_is_refused(key: str) -> None:
    """A key with surrounding whitespace or a line break fails at start-up, never echoed."""
    with pytest.raises(SettingsError, match="whitespace or a line break") as info:
        Settings.from_env({"RESEND_API_KEY": key})
    assert "re_abc" not in str(info.value)
    assert "re_x" not in str(info.value)


def test_api_key_file_is_stripped_but_inner_line_breaks_are_refused(tmp_path: Path) -> None:
    """A key file's trailing newline is normal and stripped; a line break inside is refused."""
    good = tmp_path / "good"
    good.write_text("re_abcdef\n")
    settings = Settings.from_env({"RESEND_API_KEY_FILE": str(good)})
    assert settings.resend_api_key is not None
    assert settings.resend_api_key.get() == "re_abcdef"
    bad = tmp_path / "bad"
    bad.write_text("re_abc\ndef\n")
    with pytest.raises(SettingsError, match="RESEND_API_KEY") as info:
        Settings.from_env({"RESEND_API_KEY_FILE": str(bad)})
    assert "re_abc" not in str(info.value)


def test_check_refuses_a_base_url_with_credentials_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`check` exits 2 with one line, and the line shows no credentials."""
    code = main(
        [
            "check",
            "--no-examples",
            "--routes-file",
            str(ROUTES),
            "--resend-base-url",
            "https://me:hunter2pass@api.resend.com",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "hunter2pass" not in err
