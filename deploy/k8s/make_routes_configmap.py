#!/usr/bin/env python3
"""Regenerate the routes ConfigMap (and its volume items) from schemas/.

    .venv/bin/python deploy/k8s/make_routes_configmap.py          # rewrite the files
    .venv/bin/python deploy/k8s/make_routes_configmap.py --check  # exit 1 if out of date

Every file under schemas/ (routes.yaml, the JSON Schemas, templates/, examples/)
becomes one key of the `resend-consumer-routes` ConfigMap. Keys cannot hold
"/", so `templates/x.html.j2` is stored as `templates__x.html.j2` and the
Deployment's volume `items` put it back at `templates/x.html.j2`; those items
are rewritten between the BEGIN/END markers of deployment.yaml.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SCHEMAS = ROOT / "schemas"
CONFIGMAP = HERE / "routes-configmap.yaml"
DEPLOYMENT = HERE / "deployment.yaml"
NAME = "resend-consumer-routes"
SEPARATOR = "__"
BEGIN = "# BEGIN generated items"
END = "# END generated items"
_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")

HEADER = """\
# GENERATED from schemas/ by deploy/k8s/make_routes_configmap.py; do not edit.
# Routes, JSON Schemas, templates and examples, mounted at /etc/resend-consumer
# (ROUTES_FILE=/etc/resend-consumer/routes.yaml). Subdirectories are flattened
# with "__" in keys; the Deployment's volume items restore them.
"""


def schema_files(root: Path = SCHEMAS) -> dict[str, str]:
    """ConfigMap key -> relative path, for every file under root."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            continue
        key = SEPARATOR.join(rel.parts)
        if not _KEY.match(key):
            raise SystemExit(f"{rel}: not a valid ConfigMap key: {key!r}")
        out[key] = rel.as_posix()
    return out


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def configmap_text(root: Path = SCHEMAS) -> str:
    files = schema_files(root)
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": "resend-consumer"}},
        "data": {key: (root / rel).read_text(encoding="utf-8") for key, rel in files.items()},
    }
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return HEADER + body


def deployment_text(current: str, root: Path = SCHEMAS) -> str:
    start, end = current.index(BEGIN), current.index(END)
    indent = current[:start].rsplit("\n", 1)[1]
    lines = [
        f"{indent}- key: {key}\n{indent}  path: {rel}" for key, rel in schema_files(root).items()
    ]
    return current[: start + len(BEGIN)] + "\n" + "\n".join(lines) + "\n" + indent + current[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the files are stale")
    args = parser.parse_args(argv)
    wanted = {
        CONFIGMAP: configmap_text(),
        DEPLOYMENT: deployment_text(DEPLOYMENT.read_text(encoding="utf-8")),
    }
    stale = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"out of date: {p.relative_to(ROOT)} (run {Path(__file__).name})")
        return 1 if stale else 0
    for p in stale:
        p.write_text(wanted[p], encoding="utf-8")
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
