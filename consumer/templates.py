"""Email templates: Jinja2 in an immutable sandbox, compiled once, rendered per event.

HTML files (`.html.j2`) are autoescaped; text files (`.txt.j2`) and subjects
are not. `StrictUndefined` turns a missing field into an error instead of an
empty string, and the `random` filter and `lipsum` global are removed because
the same event must render the same bytes on every attempt.

Templates come from one folder only (`ConfinedLoader`): a name holding `..`,
starting with `/`, or resolving outside the folder through a symlink is not
found, and `check_references` refuses at load an `include`, `import` or
`extends` whose name is not a literal inside that folder, so a routes file
cannot make an email quote `/proc/self/environ`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import markupsafe
from jinja2.exceptions import SecurityError
from jinja2.loaders import split_template_path
from jinja2.runtime import new_context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from consumer.errors import TemplateReferenceError
from consumer.events import Reason, invalid


class TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with JSON object keys looked up before attributes.

    Event data are dicts: `data.items` means the "items" field, not `dict.items`,
    and looking the key up first skips the AttributeError the stock lookup
    raises on every field access (the hot path). Dict values are data, never
    Python internals, so this opens nothing the sandbox closes.
    """

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


class TemplateOutside(jinja2.TemplateNotFound):
    """A template name that would leave the templates folder (absolute, `..`, symlink)."""


class ConfinedLoader(jinja2.BaseLoader):
    """Loads templates from one folder and nowhere else, symlinks included.

    Jinja's FileSystemLoader already refuses `..`, but it drops a leading `/`
    silently and follows symlinks wherever they point; this loader resolves
    every name and refuses what lands outside the (resolved) folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        if template.startswith("/") or "\\" in template:
            raise TemplateOutside(template, f"{template}: absolute template names are refused")
        path = self.root.joinpath(*split_template_path(template)).resolve()
        if not path.is_relative_to(self.root):
            raise TemplateOutside(template, f"{template}: resolves outside the templates folder")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise jinja2.TemplateNotFound(template) from None
        return source, str(path), lambda: True


def check_references(env: jinja2.Environment, source: str, *, name: str) -> None:
    """Refuse, at load, template references that are dynamic, missing or outside the folder.

    Jinja resolves `include` and friends at render time; checking them once
    here (recursively) means a bad reference stops start-up instead of
    failing every event, and an event's data can never choose the file.
    """
    seen: set[str] = set()
    pending = [(name, source)]
    while pending:
        current, text = pending.pop()
        try:
            names = list(jinja2.meta.find_referenced_templates(env.parse(text)))
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateReferenceError(f"{current} line {exc.lineno}: {exc.message}") from None
        for ref in names:
            if ref is None:
                raise TemplateReferenceError(
                    f"{current}: include/import/extends must name a template literally"
                )
            if ref in seen:
                continue
            seen.add(ref)
            loader = env.loader
            assert loader is not None
            try:
                ref_source, _, _ = loader.get_source(env, ref)
            except TemplateOutside as exc:
                raise TemplateReferenceError(f"{current}: {exc.message}") from None
            except jinja2.TemplateNotFound:
                raise TemplateReferenceError(
                    f"{current}: template {ref} not found in the templates folder"
                ) from None
            pending.append((ref, ref_source))


def environment(templates_dir: Path, *, html: bool) -> ImmutableSandboxedEnvironment:
    """The sandbox for one kind of template: autoescaping for HTML, none for text."""
    env = TemplateEnvironment(
        loader=ConfinedLoader(templates_dir),
        undefined=jinja2.StrictUndefined,
        autoescape=html,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    # Nondeterministic helpers would change the bytes between attempts.
    env.filters.pop("random", None)
    env.globals.pop("lipsum", None)
    return env


def _plain_escape(text: str) -> str:
    return str(markupsafe.escape(text))


#: markupsafe's own text escaper (C speedups when built); the public escape otherwise
_escape_text: Callable[[str], str] = getattr(markupsafe, "_escape_inner", _plain_escape)


def _escape_to_str(value: Any) -> str:
    """markupsafe.escape without wrapping the result in Markup (see Compiled)."""
    if value.__class__ is str:
        return _escape_text(value)
    if hasattr(value, "__html__"):
        return str(value.__html__())
    return _escape_text(str(value))


class Compiled:
    """A compiled Jinja2 template, set up once for a cheaper render per event.

    Two measured savings on the hot path (three renders per event):

    - `Template.render` copies the environment's globals out of a ChainMap on
      every call; merging a prepared plain dict into a shared context gives
      the same output at a third of the cost;
    - an autoescaped template calls `markupsafe.escape` on every `{{ }}`
      output, which builds a `Markup` object only to be joined into the
      result. The compiled module's `escape` is swapped for one producing the
      same escaped text as a plain str (about 40% off an HTML render). Jinja
      applies `escape` only where it writes output; blocks that need Markup
      (set blocks, macros) wrap their joined output themselves, so the text
      is the same. Tests compare against a stock render.
    """

    __slots__ = ("_globals", "_simple", "template")

    def __init__(self, template: jinja2.Template, *, source: str | None = None) -> None:
        self.template = template
        self._globals = dict(template.globals)
        namespace = template.root_render_func.__globals__
        if namespace.get("escape") is markupsafe.escape:
            namespace["escape"] = _escape_to_str
        # Only text templates: the shortcut does no HTML escaping.
        autoescape = template.environment.autoescape
        self._simple = _simple_parts(source) if source is not None and not autoescape else None

    def __repr__(self) -> str:
        return f"Compiled({self.template.name or '<string>'})"

    def render(self, variables: dict[str, Any]) -> str:
        if self._simple is not None:
            text = _render_simple(self._simple, variables)
            if text is not None:
                return text
        template = self.template
        context = new_context(
            template.environment,
            template.name,
            template.blocks,
            {**self._globals, **variables},
            shared=True,
            globals=self._globals,
        )
        return "".join(template.root_render_func(context))


def render_template(template: Compiled, context: dict[str, Any], field: str) -> str:
    """Render a compiled template; InvalidEvent(template_error | template_security)."""
    try:
        return template.render(context)
    except SecurityError:
        raise invalid(
            Reason.TEMPLATE_SECURITY, f"{field}: the template reached for Python internals"
        ) from None
    except jinja2.UndefinedError as exc:
        raise invalid(Reason.TEMPLATE_ERROR, f"{field}: {exc.message}") from None
    except Exception as exc:
        # Other messages may quote event values (tokens): report the kind only.
        raise invalid(
            Reason.TEMPLATE_ERROR, f"{field}: {type(exc).__name__} while rendering"
        ) from None


#: a one-line text template made only of literal text and `{{ data.a.b }}` fields
_SIMPLE = re.compile(r"^(?:[^{}\r\n]|\{\{ *data(?:\.[A-Za-z_][A-Za-z0-9_]*)+ *\}\})*\Z")
_SIMPLE_FIELD = re.compile(r"\{\{ *data((?:\.[A-Za-z_][A-Za-z0-9_]*)+) *\}\}")
SimpleParts = tuple[str | tuple[str, ...], ...]


def _simple_parts(source: str) -> SimpleParts | None:
    """Literal text and field paths of a simple subject, or None to always use Jinja.

    Subjects are usually "Your order {{ data.order_number }} is confirmed";
    filling them without a Jinja render saves a context and a generator per
    event. Anything else (filters, tags, non-dict data) renders through Jinja.
    """
    if not _SIMPLE.match(source):
        return None
    parts: list[str | tuple[str, ...]] = []
    pos = 0
    for match in _SIMPLE_FIELD.finditer(source):
        if match.start() > pos:
            parts.append(source[pos : match.start()])
        parts.append(tuple(match.group(1).split(".")[1:]))
        pos = match.end()
    if pos < len(source):
        parts.append(source[pos:])
    return tuple(parts)


def _render_simple(parts: SimpleParts, variables: dict[str, Any]) -> str | None:
    """Jinja's own output for strings and integers found in dicts; None to fall back."""
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value = variables.get("data")
        for step in part:
            if type(value) is not dict or step not in value:
                return None
            value = value[step]
        if type(value) is str:
            out.append(value)
        elif type(value) is int:
            out.append(str(value))
        else:
            return None
    return "".join(out)
