"""A local server that answers like Resend's email API (see shared/resend/CONTRACT.md).

Used by the tests, the benchmarks and the quickstart, and by users in CI and
staging: `resend-consumer sandbox --port 8025`, or in-process::

    async with Sandbox(config=SandboxConfig(rate_limit=100)) as sb:
        ...  # point the client at sb.url; inspect sb.deliveries(), sb.stats()
"""

from __future__ import annotations

from consumer.sandbox.config import Faults, ForcedStatus, SandboxConfig
from consumer.sandbox.server import Sandbox
from consumer.sandbox.state import Answered, Delivery

__all__ = ["Answered", "Delivery", "Faults", "ForcedStatus", "Sandbox", "SandboxConfig"]
