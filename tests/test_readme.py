"""README stays true: every setting, every command, the quickstart and the metrics."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from pathlib import Path

from consumer.cli import build_parser, main
from consumer.metrics import METRIC_NAMES
from consumer.settings import FIELDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_configuration_table_is_the_one_the_code_prints() -> None:
    """The README's configuration table is exactly `resend-consumer config`."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["config"]) == 0
    table = out.getvalue().strip()
    assert table in README
    for f in FIELDS:
        assert f"`{f.env}`" in table


def test_every_command_is_documented() -> None:
    """Each top-level command (and dlq replay) appears in README's command table."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = set(sub.choices)  # type: ignore[arg-type]
    assert names >= {"run", "sandbox", "render", "check", "publish", "health", "dlq", "quickstart"}
    for name in names - {"dlq"}:
        assert f"`resend-consumer {name}" in README, name
    assert "`resend-consumer dlq replay" in README


def test_quickstart_has_exactly_two_commands_that_exist() -> None:
    """Quickstart is two commands, the main job and the tests; .ci/run calls the latter."""
    block = re.search(r"## Quickstart\n\n```sh\n(.*?)```", README, re.S)
    assert block is not None
    commands = [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert commands == ["deploy/dev quickstart", "deploy/dev test"]
    assert (ROOT / "deploy" / "dev").exists()
    assert "deploy/dev test" in (ROOT / ".ci" / "run").read_text()


def test_every_metric_is_documented() -> None:
    """Each exposed metric family has a row in README."""
    for name in METRIC_NAMES:
        assert f"`{name}`" in README, name


def test_every_feedback_metric_is_documented() -> None:
    """Each family the webhook receiver exposes has a row in README."""
    from consumer.feedback import FEEDBACK_METRIC_NAMES

    for name in FEEDBACK_METRIC_NAMES:
        assert f"`{name}`" in README, name
