"""The docs stay true: README.md is the front page, the reference in docs/ matches the code.

Every setting, command and metric is documented where the front page says it is, the
quickstart is the two commands CI and a newcomer run, every measured figure lives in
docs/benchmarks.md, and every relative link resolves. (tests/test_documented_commands.py
runs the commands the pages show.)
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from consumer.cli import build_parser, main
from consumer.metrics import METRIC_NAMES
from consumer.settings import FIELDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
#: every page: the front page and the reference
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
CONFIGURATION = (DOCS / "configuration.md").read_text()
OPERATING = (DOCS / "operating.md").read_text()
BENCHMARKS = DOCS / "benchmarks.md"
#: the front page stays a front page (about 200 lines)
FRONT_PAGE_MAX_LINES = 220

_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE_SPAN = re.compile(r"`[^`\n]*`")
#: what only a measurement says: µs, percentiles and memory peaks with a number
_FIGURE = re.compile(r"\d\s?µs|\bp(?:50|90|99) \d|RSS \d|peak RSS")


def prose(text: str) -> str:
    """The text outside fenced code blocks (code may hold anything that looks like a link)."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if _FENCE.match(line):
            inside = not inside
            continue
        out.append("" if inside else line)
    return "\n".join(out)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Anchors of every heading of a page (GitHub numbers repeated ones: x, x-1, ...)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for m in re.finditer(r"^#{1,6} (.+)$", prose(text), re.MULTILINE):
        base = github_anchor(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> Iterator[str]:
    """Every link target in the page's prose (inline code left out)."""
    for m in _LINK.finditer(_CODE_SPAN.sub("", prose(page.read_text()))):
        yield m.group(1)


def test_configuration_table_is_the_one_the_code_prints() -> None:
    """docs/configuration.md's table is exactly `resend-consumer config`."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["config"]) == 0
    table = out.getvalue().strip()
    assert table in CONFIGURATION
    for f in FIELDS:
        assert f"`{f.env}`" in table


def test_every_command_is_documented() -> None:
    """Each top-level command (and dlq replay) appears in docs/configuration.md's table."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = set(sub.choices)  # type: ignore[arg-type]
    assert names >= {"run", "sandbox", "render", "check", "publish", "health", "dlq", "quickstart"}
    for name in names - {"dlq"}:
        assert f"`resend-consumer {name}" in CONFIGURATION, name
    assert "`resend-consumer dlq replay" in CONFIGURATION


def test_quickstart_has_exactly_two_commands_that_exist() -> None:
    """Quickstart is two commands, the main job and the tests; .ci/run calls the latter."""
    block = re.search(r"## Quickstart\n\n```sh\n(.*?)```", README, re.S)
    assert block is not None
    commands = [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert commands == ["deploy/dev quickstart", "deploy/dev test"]
    assert (ROOT / "deploy" / "dev").exists()
    assert "deploy/dev test" in (ROOT / ".ci" / "run").read_text()


def test_every_metric_is_documented() -> None:
    """Each exposed metric family has a row in docs/operating.md."""
    for name in METRIC_NAMES:
        assert f"`{name}`" in OPERATING, name


def test_every_feedback_metric_is_documented() -> None:
    """Each family the webhook receiver exposes has a row in docs/operating.md."""
    from consumer.feedback import FEEDBACK_METRIC_NAMES

    for name in FEEDBACK_METRIC_NAMES:
        assert f"`{name}`" in OPERATING, name


def test_readme_is_a_front_page_that_links_every_docs_page() -> None:
    """README stays short, and every page under docs/ is one link away from it."""
    assert len(README.splitlines()) <= FRONT_PAGE_MAX_LINES
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    for page in DOCS.glob("*.md"):
        assert page.resolve() in linked, f"README does not link {page.relative_to(ROOT)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_measured_figures_live_in_the_benchmarks_page(page: Path) -> None:
    """Only docs/benchmarks.md states measured figures, so measuring changes one page."""
    if page == BENCHMARKS:
        assert _FIGURE.search(page.read_text()), "the benchmarks page holds the figures"
        return
    found = [m.group(0) for m in _FIGURE.finditer(prose(page.read_text()))]
    assert found == [], f"{page.relative_to(ROOT)}: move figures to docs/benchmarks.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    """Each relative link names a file of the repository, and its #anchor a heading there."""
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        assert not target.startswith("/"), f"{page.name}: {target} is not relative"
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert resolved.suffix == ".md", f"{page.name}: {target}: anchor into a non-page"
            assert anchor in anchors(resolved.read_text()), f"{page.name}: {target}: no heading"


def test_the_link_checker_sees_links() -> None:
    """The checks above look at something: pages link each other, anchors included."""
    targets = [t for page in PAGES for t in links(page)]
    assert any(t.startswith("docs/") for t in targets)
    assert any(".md#" in t for t in targets)
    assert "delivery-feedback-resend-consumer-webhooks" in anchors(OPERATING)
