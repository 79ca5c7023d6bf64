"""`resend-consumer sandbox`: flags and the serve loop (signals are wired in consumer/cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from consumer.exitcodes import EXIT_OK, EXIT_USAGE
from consumer.sandbox.config import Faults, ForcedStatus, SandboxConfig
from consumer.sandbox.server import Sandbox
from consumer.settings import parse_duration


def _pair(text: str) -> tuple[float, float]:
    parts = text.replace(":", ",").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 5,50, got {text!r}")
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 5,50, got {text!r}") from None


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share must be within [0, 1], got {text}")
    return value


def _duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _forced(text: str) -> ForcedStatus:
    status, _, name = text.partition(":")
    try:
        return ForcedStatus(status=int(status), name=name or "service_unavailable")
    except ValueError as exc:
        msg = f"expected STATUS:NAME like 503:service_unavailable ({exc})"
        raise argparse.ArgumentTypeError(msg) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8025, help="port (0 picks a free one)")
    parser.add_argument(
        "--api-key",
        default=None,
        help="accept only this bearer token (default: any non-empty token)",
    )
    parser.add_argument(
        "--rate-limit", type=float, default=10.0, help="requests per second per API key"
    )
    parser.add_argument(
        "--idempotency-ttl",
        type=_duration,
        default=86400.0,
        help="how long idempotency keys are remembered, e.g. 2s, 5m, 24h",
    )
    parser.add_argument("--daily-quota", type=int, default=None, help="emails per UTC day")
    parser.add_argument("--monthly-quota", type=int, default=None, help="emails per UTC month")
    parser.add_argument("--seed", type=int, default=0, help="seed of ids and fault draws")
    parser.add_argument(
        "--log",
        type=Path,
        default=None,
        metavar="FILE",
        help="append accepted emails as JSON lines",
    )
    hooks = parser.add_argument_group("delivery webhooks (email.sent, then delivered/bounced/...)")
    hooks.add_argument(
        "--webhook-url", default=None, help="post signed webhooks for accepted emails here"
    )
    hooks.add_argument(
        "--webhook-secret", default=None, metavar="WHSEC", help="whsec_... secret to sign with"
    )
    hooks.add_argument(
        "--webhook-time-scale",
        type=float,
        default=1.0,
        help="multiply Resend's retry delays (5 s, 5 min, ... 10 h) by this, e.g. 0.001",
    )
    faults = parser.add_argument_group("faults (also settable at run time: POST /_sandbox/faults)")
    faults.add_argument("--latency-ms", type=float, default=0.0, help="fixed latency")
    faults.add_argument(
        "--latency-uniform-ms", type=_pair, default=None, metavar="LO,HI", help="uniform latency"
    )
    faults.add_argument(
        "--latency-lognormal",
        type=_pair,
        default=None,
        metavar="MEDIAN_MS,SIGMA",
        help="log-normal latency",
    )
    faults.add_argument("--error-rate", type=_share, default=0.0, help="share of 500/503 answers")
    faults.add_argument(
        "--html-error-share", type=_share, default=0.0, help="share of those with an HTML body"
    )
    faults.add_argument(
        "--drop-after-accept-rate",
        type=_share,
        default=0.0,
        help="share recorded as sent, then dropped without an answer",
    )
    faults.add_argument("--hang-rate", type=_share, default=0.0, help="share never answered")
    faults.add_argument(
        "--storm-429-rate", type=_share, default=0.0, help="share answered 429 regardless"
    )
    faults.add_argument(
        "--force-status",
        type=_forced,
        default=None,
        metavar="STATUS:NAME",
        help="answer every /emails request with this, e.g. 503:service_unavailable",
    )
    faults.add_argument(
        "--refuse-to",
        action="append",
        default=[],
        metavar="TEXT",
        help="refuse (422 validation_error) each email whose `to` contains TEXT; repeatable",
    )


def config_from(args: argparse.Namespace) -> SandboxConfig:
    faults = Faults(
        latency_ms=args.latency_ms,
        latency_uniform_ms=args.latency_uniform_ms,
        latency_lognormal=args.latency_lognormal,
        error_rate=args.error_rate,
        html_error_share=args.html_error_share,
        drop_after_accept_rate=args.drop_after_accept_rate,
        hang_rate=args.hang_rate,
        storm_429_rate=args.storm_429_rate,
        force_status=args.force_status,
        refuse_to=tuple(args.refuse_to),
    )
    return SandboxConfig(
        api_key=args.api_key,
        rate_limit=args.rate_limit,
        idempotency_ttl=args.idempotency_ttl,
        daily_quota=args.daily_quota,
        monthly_quota=args.monthly_quota,
        seed=args.seed,
        log_path=args.log,
        faults=faults,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        webhook_time_scale=args.webhook_time_scale,
    )


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Serve until `stop` is set; print the URL once listening."""
    try:
        config = config_from(args)
    except ValueError as exc:
        print(f"resend-consumer sandbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sandbox = Sandbox(config=config)
    await sandbox.start(host=args.host, port=args.port)
    try:
        print(f"sandbox listening on {sandbox.url}", flush=True)
        await stop.wait()
    finally:
        await sandbox.stop()
    return EXIT_OK
