"""`resend-consumer`: the edge. Signal handling lives here and nowhere else.

The parser tree, the settings flags, and for each command the step from its
parsed flags to its typed arguments; the commands themselves are in
`consumer.commands`, one module per family, and return `consumer.exitcodes`.

Every setting in `settings.FIELDS` is also a flag of the commands that take
settings: `KAFKA_BOOTSTRAP_SERVERS` is `--kafka-bootstrap-servers`, and so on.
A flag wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from consumer import __version__
from consumer.errors import ConsumerError
from consumer.exitcodes import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK
from consumer.settings import FIELDS, Settings, defaults_table

__all__ = [
    "build_parser",
    "flag_for",
    "main",
    "run_async",
    "settings_from",
]


def flag_for(env: str) -> str:
    return "--" + env.lower().replace("_", "-")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also an environment variable)")
    for f in FIELDS:
        group.add_argument(
            flag_for(f.env),
            dest=f"setting_{f.name}",
            metavar=f.env,
            default=None,
            help=f.help,
        )


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, each given flag replacing its variable.

    Flags hold raw text and are parsed exactly like the variables, so a bad
    flag gives the same one-line SettingsError (exit 2) as a bad variable,
    and never echoes a secret or a URL's credentials as argparse would.
    """
    env = dict(os.environ)
    for f in FIELDS:
        raw = getattr(args, f"setting_{f.name}", None)
        if raw is not None:
            env[f.env] = raw
    return Settings.from_env(env)


def run_async(make: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run a coroutine with SIGTERM/SIGINT wired to a stop event.

    The first signal sets the event (the command drains and exits by itself);
    a second one exits at once.
    """

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                sys.stderr.write(f"second {signal.Signals(signum).name}: exiting now\n")
                sys.stderr.flush()
                os._exit(EXIT_INTERRUPTED)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await make(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    return asyncio.run(runner())


# -- commands: each translates its parsed flags into typed arguments ----------------


def cmd_run(args: argparse.Namespace) -> int:
    from consumer.service import run_service

    settings = settings_from(args)
    return run_async(lambda stop: run_service(settings, stop))


def cmd_webhooks(args: argparse.Namespace) -> int:
    from consumer.feedback import run_webhooks

    settings = settings_from(args)
    return run_async(lambda stop: run_webhooks(settings, stop))


def cmd_sandbox(args: argparse.Namespace) -> int:
    from consumer.sandbox.cli import serve

    return run_async(lambda stop: serve(args, stop))


def cmd_render(args: argparse.Namespace) -> int:
    from consumer.commands.render import RenderArgs, render

    return render(settings_from(args), RenderArgs.from_namespace(args))


def cmd_check(args: argparse.Namespace) -> int:
    from consumer.commands.render import CheckArgs, check

    return check(settings_from(args), CheckArgs.from_namespace(args))


def cmd_publish(args: argparse.Namespace) -> int:
    from consumer.commands.publish import PublishArgs, publish

    settings, options = settings_from(args), PublishArgs.from_namespace(args)
    return run_async(lambda stop: publish(settings, options, stop))


def cmd_health(args: argparse.Namespace) -> int:
    from consumer.commands.health import HealthArgs, probe

    return probe(settings_from(args), HealthArgs.from_namespace(args))


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from consumer.commands.dlq import ReplayArgs, replay

    settings, options = settings_from(args), ReplayArgs.from_namespace(args)
    return run_async(lambda stop: replay(settings, options, stop))


def cmd_quickstart(args: argparse.Namespace) -> int:
    from consumer.commands.quickstart import QuickstartArgs, quickstart

    # the quickstart starts what the environment does not already name
    options = QuickstartArgs.from_namespace(
        args,
        external_kafka=bool(
            os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or args.setting_kafka_bootstrap_servers
        ),
        external_resend=bool(
            os.environ.get("RESEND_API_KEY")
            or os.environ.get("RESEND_API_KEY_FILE")
            or args.setting_resend_api_key
            or args.setting_resend_api_key_file
        ),
    )
    settings = settings_from(args)
    return run_async(lambda stop: quickstart(settings, options, stop))


def cmd_config(args: argparse.Namespace) -> int:
    """Print every setting as a Markdown table (README's table comes from here)."""
    print("| variable | flag | default | meaning |")
    print("|---|---|---|---|")
    for env, default, meaning in defaults_table():
        print(f"| `{env}` | `{flag_for(env)}` | `{default}` | {meaning} |")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from consumer.commands import dlq, health, publish, quickstart, render
    from consumer.sandbox import cli as sandbox

    parser = argparse.ArgumentParser(
        prog="resend-consumer",
        description="Kafka domain events to transactional emails through Resend.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help_: str,
        *,
        settings: bool = True,
        parent: Any = sub,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        if settings:
            _add_settings_flags(p)
        return p

    add("run", cmd_run, "run the service: consume events, send emails, commit offsets")

    add(
        "webhooks",
        cmd_webhooks,
        "receive Resend's delivery webhooks: verify, then produce CloudEvents to FEEDBACK_TOPIC",
    )

    p = add("sandbox", cmd_sandbox, "run the local Resend-compatible sandbox", settings=False)
    sandbox.add_arguments(p)

    p = add("render", cmd_render, "dry run: print the idempotency key and exact request body")
    render.add_render_arguments(p)

    p = add("check", cmd_check, "validate settings, routes, schemas and templates")
    render.add_check_arguments(p)

    p = add("publish", cmd_publish, "publish domain events to a topic")
    publish.add_arguments(p)

    p = add("health", cmd_health, "probe a running service's health endpoint (exec probes)")
    health.add_arguments(p)

    dlq_parser = sub.add_parser("dlq", help="dead-letter topic tools")
    dlq_sub = dlq_parser.add_subparsers(dest="dlq_command", required=True, metavar="DLQ_COMMAND")
    p = add(
        "replay", cmd_dlq_replay, "republish dead letters to their source topic", parent=dlq_sub
    )
    dlq.add_arguments(p)

    p = add(
        "quickstart",
        cmd_quickstart,
        "start local Kafka, the sandbox and the webhook receiver, run the service, "
        "publish the examples",
    )
    quickstart.add_arguments(p)

    add("config", cmd_config, "print every setting as a Markdown table", settings=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConsumerError as exc:
        print(f"resend-consumer: {exc.describe()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`... | head`): no traceback; keep the interpreter's
        # final flush from failing on the same closed pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
