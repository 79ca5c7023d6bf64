"""`resend-consumer health`: probe a running service's health endpoint.

For exec probes (Docker HEALTHCHECK, Kubernetes exec probes where HTTP probes
are not possible): exit 0 when the probe answers 200, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Final, Literal, get_args

from consumer.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from consumer.health import HEALTHZ, READYZ
from consumer.settings import Settings

__all__ = ["HealthArgs", "add_arguments", "probe", "probe_url"]

Check = Literal["live", "ready"]

#: defaults of the flags: the readiness probe, three seconds
CHECK: Final[Check] = "ready"
TIMEOUT: Final = 3.0

_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - compared, not bound


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check",
        choices=get_args(Check),
        default=CHECK,
        help="which probe: live (/healthz) or ready (/readyz, default)",
    )
    parser.add_argument(
        "--url",
        default=None,
        help="full URL to probe (default: http://127.0.0.1:HEALTH_PORT/readyz or /healthz)",
    )
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT, help="seconds before the probe fails (default 3)"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing, only exit code")


@dataclass(frozen=True, kw_only=True, slots=True)
class HealthArgs:
    """What `health` is asked: which probe (or a URL), how long to wait, whether to print."""

    check: Check = CHECK
    url: str | None = None
    timeout: float = TIMEOUT
    quiet: bool = False

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> HealthArgs:
        return cls(
            check=ns.check or CHECK,
            url=ns.url,
            timeout=float(ns.timeout or TIMEOUT),
            quiet=ns.quiet,
        )


def probe_url(settings: Settings, check: Check) -> str:
    """Where the running service on this host answers the given probe."""
    host = settings.health_host
    if host in _WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    path = HEALTHZ if check == "live" else READYZ
    return f"http://{host}:{settings.health_port}{path}"


def probe(settings: Settings, args: HealthArgs) -> int:
    """Exit 0 when the probe answers 200, 1 otherwise (refused, timeout, 503)."""
    url = args.url or probe_url(settings, args.check)
    if not url.startswith(("http://", "https://")):
        print(f"resend-consumer health: not an http(s) URL: {url}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:  # noqa: S310 - scheme checked
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (OSError, urllib.error.URLError) as exc:
        if not args.quiet:
            reason = getattr(exc, "reason", exc)
            print(f"resend-consumer health: {url}: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    if not args.quiet:
        print(f"{status} {body.decode('utf-8', 'replace').strip()}")
    return EXIT_OK if status == 200 else EXIT_FAILURE
