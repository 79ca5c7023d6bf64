"""`resend-consumer publish`: read, check, then put domain events on a topic.

Building envelopes and records and producing them is `consumer.publish`'s;
choosing the input, checking the flags and reporting is here. All input is
read and checked before the first record is sent: a bad line publishes
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from consumer.errors import BadInput
from consumer.exitcodes import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
)
from consumer.publish import (
    DEFAULT_SOURCE,
    Record,
    build_records,
    parse_input,
    publish_records,
)
from consumer.settings import Settings

__all__ = ["PublishArgs", "add_arguments", "publish"]

#: the input argument (FILE, --file) naming standard input
STDIN: Final = "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", nargs="?", metavar="FILE|-", help="events file, or - for JSON lines on stdin"
    )
    parser.add_argument("--topic", help="topic (default: the first of KAFKA_TOPICS)")
    parser.add_argument("--type", dest="event_type", metavar="TYPE", help="event type")
    parser.add_argument("--data", metavar="JSON", help="the event's data (with --type)")
    parser.add_argument(
        "--file", metavar="FILE", help="a JSON object, an array of them, or JSON lines"
    )
    parser.add_argument("--stdin", action="store_true", help="read JSON lines from stdin")
    parser.add_argument(
        "--source", default=DEFAULT_SOURCE, help=f"source of events without one ({DEFAULT_SOURCE})"
    )
    parser.add_argument(
        "--key-field",
        metavar="PATH",
        help="dot path used as the Kafka key, e.g. data.order_id "
        "(default: subject, else the first data field ending in _id)",
    )
    parser.add_argument(
        "--binary",
        action="store_true",
        help="Kafka binary mode: ce_* headers with the data as value (default: structured)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=1,
        metavar="N",
        help="publish each input N times; '{n}' in strings becomes the copy number",
    )
    parser.add_argument(
        "--progress", action="store_true", help="progress bar even when stderr is not a terminal"
    )
    parser.add_argument(
        "--fresh-time",
        action="store_true",
        help="set every event's time to now, replacing a given one "
        "(the shipped examples carry fixed times, stale a day later)",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class PublishArgs:
    """What `publish` is asked: one input, the topic, and how to build the records."""

    #: the positional FILE, or "-" for JSON lines on stdin
    input: str | None = None
    file: str | None = None
    stdin: bool = False
    event_type: str | None = None
    data: str | None = None
    topic: str | None = None
    source: str = DEFAULT_SOURCE
    key_field: str | None = None
    binary: bool = False
    count: int = 1
    progress: bool = False
    #: every event's `time` is now, even when the input gives one
    fresh_time: bool = False

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> PublishArgs:
        return cls(
            input=ns.input,
            file=ns.file,
            stdin=ns.stdin,
            event_type=ns.event_type,
            data=ns.data,
            topic=ns.topic,
            source=ns.source,
            key_field=ns.key_field,
            binary=ns.binary,
            count=ns.count,
            progress=ns.progress,
            fresh_time=ns.fresh_time,
        )

    def usage_problem(self) -> str | None:
        """What is wrong with the combination of flags, if anything."""
        sources = sum(bool(x) for x in (self.file, self.stdin, self.input))
        if sources > 1:
            return "give one input: FILE, --file, --stdin or -"
        if self.data is not None and (sources or not self.event_type):
            return "--data needs --type and no other input"
        if not sources and not self.event_type:
            return "nothing to publish: give --type (and --data), --file FILE, --stdin or -"
        if self.count < 1:
            return "--count must be at least 1"
        return None

    def read_input(self, stdin: IO[str]) -> tuple[str, bool, str]:
        """(text, as JSON lines, name for messages) from the chosen input."""
        if STDIN in (self.input, self.file) or self.stdin:
            return stdin.read(), True, "stdin"
        path = self.file or self.input
        if path:
            return Path(path).read_text(encoding="utf-8"), False, str(path)
        if self.data is not None:
            return self.data, False, "--data"
        return "{}", False, "--type"


async def publish(
    settings: Settings,
    args: PublishArgs,
    stop: asyncio.Event,
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Read, check and publish; print one summary line. Exit codes as in `consumer.exitcodes`."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    problem = args.usage_problem()
    if problem:
        print(f"resend-consumer publish: {problem}", file=stderr)
        return EXIT_USAGE
    topic = args.topic or (settings.kafka_topics[0] if settings.kafka_topics else None)
    if not topic:
        print("resend-consumer publish: no topic: pass --topic", file=stderr)
        return EXIT_USAGE
    try:
        text, lines, name = args.read_input(stdin)
    except OSError as exc:
        print(f"resend-consumer publish: cannot read input: {exc}", file=stderr)
        return EXIT_BAD_INPUT
    items, problems = parse_input(text, lines=lines)
    records: list[Record] = []
    try:
        records = build_records(
            items,
            event_type=args.event_type,
            source=args.source,
            key_field=args.key_field,
            binary=args.binary,
            count=args.count,
            fresh_time=args.fresh_time,
        )
    except BadInput as exc:
        problems.extend(exc.problems)
    if problems:
        print(f"resend-consumer publish: bad input in {name}, nothing published:", file=stderr)
        print(str(BadInput(sorted(problems))), file=stderr)
        return EXIT_BAD_INPUT
    if not records:
        print(f"resend-consumer publish: no events in {name}", file=stderr)
        return EXIT_BAD_INPUT
    show_bar = args.progress or (stderr.isatty() and len(records) > 1)
    started = time.monotonic()
    try:
        acked = await publish_records(
            settings, topic, records, stop=stop, progress=stderr if show_bar else None
        )
    except Exception as exc:  # Kafka errors: one clear line, not a traceback
        print(
            f"resend-consumer publish: failed to publish to {topic}: {type(exc).__name__}: {exc}",
            file=stderr,
        )
        return EXIT_FAILURE
    seconds = time.monotonic() - started
    rate = acked / seconds if seconds > 0 else 0.0
    print(
        f"published {acked} event(s) to {topic} in {seconds:.2f}s ({rate:,.0f}/s)",
        file=stdout,
    )
    if acked < len(records):
        print(f"resend-consumer publish: interrupted after {acked} of {len(records)}", file=stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK
