"""`resend-consumer render` and `resend-consumer check`: the prepare stage, by hand."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from consumer.errors import RoutesError
from consumer.exitcodes import EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE
from consumer.prepare import Prepared, Preparer, Rejected, record_from_file
from consumer.routes import MAX_AGE_LIMIT
from consumer.settings import Settings

__all__ = [
    "CheckArgs",
    "RenderArgs",
    "add_check_arguments",
    "add_render_arguments",
    "check",
    "check_examples",
    "render",
]

#: `render`'s argument naming standard input instead of a file
STDIN: Final = "-"


# -- render -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class RenderArgs:
    """What `render` is asked: the event file (or "-") and whether age counts."""

    event: str
    enforce_age: bool = False

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> RenderArgs:
        return cls(event=ns.event, enforce_age=ns.enforce_age)


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("event", help="event file (CloudEvents JSON), or - for stdin")
    parser.add_argument(
        "--enforce-age",
        action="store_true",
        help="apply MAX_EVENT_AGE/STALE_POLICY against the wall clock (default: ignore age)",
    )


def render(settings: Settings, args: RenderArgs) -> int:
    """Dry run: print `POST /emails`, the idempotency key and the exact body."""
    preparer = Preparer.from_settings(settings)
    try:
        raw = sys.stdin.buffer.read() if args.event == STDIN else Path(args.event).read_bytes()
    except OSError as exc:
        print(f"resend-consumer: cannot read {args.event}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    value, headers = record_from_file(raw)
    result = preparer.prepare(
        value,
        headers,
        topic="render",
        partition=0,
        offset=0,
        timestamp_ms=None,
        enforce_age=args.enforce_age,
    )
    if isinstance(result, Prepared):
        out = sys.stdout.buffer
        out.write(f"POST {result.endpoint}\nIdempotency-Key: {result.idempotency_key}\n\n".encode())
        out.write(result.body + b"\n")
        out.flush()
        return EXIT_OK
    failure: dict[str, Any] = {"reason": result.reason}
    failure["message"] = (
        result.message if isinstance(result, Rejected) else f"skipped by policy ({result.reason})"
    )
    sys.stderr.buffer.write(orjson.dumps(failure) + b"\n")
    sys.stderr.flush()
    return EXIT_BAD_INPUT


# -- check --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckArgs:
    """What `check` is asked: whether to render the examples folder too."""

    examples: bool = True

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> CheckArgs:
        return cls(examples=not ns.no_examples)


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-examples",
        action="store_true",
        help="do not render the example events of the routes file's examples folder",
    )


def check_examples(preparer: Preparer) -> list[str]:
    """Render every example event; one message per failure (empty when all pass)."""
    folder = preparer.table.examples_dir
    if folder is None:
        return []
    problems = []
    for path in sorted(folder.glob("*.json")):
        value, headers = record_from_file(path.read_bytes())
        result = preparer.prepare(
            value,
            headers,
            topic="check",
            partition=0,
            offset=0,
            timestamp_ms=None,
            enforce_age=False,
        )
        if not isinstance(result, Prepared):
            message = result.message if isinstance(result, Rejected) else "skipped"
            problems.append(f"{path}: {result.reason}: {message}")
    return problems


def check(settings: Settings, args: CheckArgs) -> int:
    """Validate settings, routes, schemas and templates (and render the examples)."""
    try:
        preparer = Preparer.from_settings(settings)
    except RoutesError as exc:
        print(f"resend-consumer check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    table = preparer.table
    problems = check_examples(preparer) if args.examples else []
    for problem in problems:
        print(f"resend-consumer check: example failed: {problem}", file=sys.stderr)
    if problems:
        return EXIT_USAGE
    if settings.max_event_age > MAX_AGE_LIMIT and settings.stale_policy != "send":
        # Allowed, but the freshness guard no longer protects against duplicates.
        print(
            f"resend-consumer check: warning: MAX_EVENT_AGE={settings.max_event_age:.0f}s is "
            "longer than Resend's 24 h idempotency window; late events may be sent twice",
            file=sys.stderr,
        )
    routes = ", ".join(table.routes)
    print(f"ok: settings valid; {table.path}: {len(table.routes)} routes ({routes})")
    print("ok: schemas and templates compile")
    if table.examples_dir is not None and args.examples:
        print(f"ok: examples in {table.examples_dir} render")
    return EXIT_OK
