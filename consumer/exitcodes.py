"""Process exit codes, stable for scripts and probes: declared here and only here.

A module of its own rather than part of `errors.py`: exit codes are the
command layer's vocabulary, not exceptions. Every command returns one of
these: `consumer.cli`, the modules of `consumer.commands`, and the long-running
ones' entry points (`service.run_service`, `feedback.run_webhooks`,
`sandbox.cli.serve`); none of them imports `cli` for them.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE"]

#: done as asked (for `health`: the probe answered 200)
EXIT_OK: Final = 0
#: the command ran and failed (a ConsumerError, an unreachable probe, a 503)
EXIT_FAILURE: Final = 1
#: bad arguments or configuration (a SettingsError: RoutesError, ...; a non-http URL)
EXIT_USAGE: Final = 2
#: the input given (an event file, a publish line) is not valid (BadInput)
EXIT_BAD_INPUT: Final = 3
#: stopped by SIGINT/SIGTERM before finishing (128 + SIGINT)
EXIT_INTERRUPTED: Final = 130
