"""The error tree (consumer.errors): one base, one way for a command to end with an error."""

from __future__ import annotations

import argparse

import pytest

from consumer import cli, errors
from consumer.errors import (
    BadInput,
    ConsumerError,
    FatalError,
    KeyTemplateError,
    PermanentError,
    RetriableError,
    RoutesError,
    SettingsError,
    TemplateReferenceError,
    TracingUnavailable,
)
from consumer.exitcodes import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_USAGE

RAISED = [
    cls
    for cls in vars(errors).values()
    if isinstance(cls, type)
    and issubclass(cls, BaseException)
    and cls.__module__ == errors.__name__
]


def test_every_class_of_the_module_is_in_the_one_tree() -> None:
    """Each error class descends from ConsumerError and has its own reason code."""
    assert len(RAISED) >= 20
    for cls in RAISED:
        assert issubclass(cls, ConsumerError), cls
    reasons = [cls.reason for cls in RAISED]
    assert len(set(reasons)) == len(reasons)


def test_configuration_errors_are_settings_errors_and_value_errors() -> None:
    """Routes, templates, key templates and tracing are configuration: exit 2, ValueError."""
    for cls in (RoutesError, TemplateReferenceError, KeyTemplateError, TracingUnavailable):
        assert issubclass(cls, SettingsError)
        assert cls.exit_code == EXIT_USAGE
    for cls in (SettingsError, BadInput):
        assert issubclass(cls, ValueError)
    for cls in (RetriableError, PermanentError, FatalError):
        assert cls.exit_code == EXIT_FAILURE
        assert not issubclass(cls, SettingsError)


def test_bad_input_lists_at_most_twenty_lines() -> None:
    problems = [(n, "not an event") for n in range(1, 31)]
    text = str(BadInput(problems))
    assert text.splitlines()[0] == "line 1: not an event"
    assert text.splitlines()[-1] == "... and 10 more"
    assert BadInput(problems).problems == problems


def _main_raising(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> int:
    def boom(_: argparse.Namespace) -> int:
        raise exc

    monkeypatch.setattr(cli, "cmd_config", boom)
    return cli.main(["config"])


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (SettingsError("RATE_LIMIT='x': not a number"), EXIT_USAGE, "configuration error: "),
        (RoutesError("routes.yaml: order.confirmed: to: missing"), EXIT_USAGE, "configuration"),
        (BadInput([(3, "not JSON")]), EXIT_BAD_INPUT, "line 3: not JSON [bad_input]"),
        (FatalError("no luck", reason="kafka_unavailable"), EXIT_FAILURE, "[kafka_unavailable]"),
    ],
)
def test_main_catches_the_one_base(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    exc: ConsumerError,
    code: int,
    line: str,
) -> None:
    """A command ending with any ConsumerError prints one line and exits with its code."""
    assert _main_raising(monkeypatch, exc) == code
    err = capsys.readouterr().err
    assert err.startswith("resend-consumer: ")
    assert line in err
    assert "Traceback" not in err
