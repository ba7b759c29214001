"""Every environment variable the settings read has a row in docs/settings.md.

The settings modules are parsed, not imported: importing them creates
directories and reads the real environment. No database is needed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SETTINGS_DIR = REPO / "config" / "settings"
DOC = REPO / "docs" / "settings.md"

# Sections of the doc for variables read elsewhere (uvicorn, the Procfile,
# tests): their rows need not be read by config/settings/.
_ELSEWHERE = ("Read outside the settings", "Tests and benchmarks only")

# `| `NAME` | …`: a table row whose first cell is one variable.
_ROW = re.compile(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|")


def _literal(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _root(node: ast.expr) -> str:
    """Return the dotted name a call or subscript is made on: `env.str` → "env.str"."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _is_env_reader(name: str) -> bool:
    """Whether a call reads a variable: env(...), env.<cast>(...), os.getenv(...),
    os.environ.get/setdefault/pop(...)."""
    return (
        name == "env"
        or (name.startswith("env.") and name.count(".") == 1)
        or name in ("os.getenv", "os.environ.get", "os.environ.setdefault", "os.environ.pop")
    )


def names_read(source: str, filename: str = "<settings>") -> tuple[set[str], list[str]]:
    """Return the variable names a settings module reads, and the reads whose
    name is not a string literal (which this test cannot check)."""
    found: set[str] = set()
    unreadable: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call) and _is_env_reader(_root(node.func)):
            arg = node.args[0] if node.args else None
            for kw in node.keywords:
                if kw.arg in ("var", "key"):
                    arg = kw.value
            name = _literal(arg)
            if name is None:
                unreadable.append(f"{filename}:{node.lineno}")
            else:
                found.add(name)
        elif isinstance(node, ast.Subscript) and _root(node.value) == "os.environ":
            name = _literal(node.slice)
            if name is None:
                unreadable.append(f"{filename}:{node.lineno}")
            else:
                found.add(name)
    return found, unreadable


def settings_variables() -> set[str]:
    found: set[str] = set()
    unreadable: list[str] = []
    for path in sorted(SETTINGS_DIR.glob("*.py")):
        names, bad = names_read(path.read_text(), str(path.relative_to(REPO)))
        found |= names
        unreadable += bad
    assert not unreadable, f"reads whose variable name is not a literal: {unreadable}"
    return found


def documented_rows() -> dict[str, str]:
    """Return {variable: section heading} for each row of docs/settings.md's tables."""
    rows: dict[str, str] = {}
    section = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif match := _ROW.match(line):
            rows[match.group(1)] = section
    return rows


def test_the_parser_sees_every_way_a_settings_module_reads_the_environment():
    source = """
import os
A = env.str("V_STR", default="")
B = env.int("V_INT", default=1)
C = env.bool("V_BOOL", default=False)
D = env.float("V_FLOAT", default=None)
E = env.list("V_LIST", default=[])
F = env.json("V_JSON", default={})
G = {"default": env.db("V_DB")}
H = env("V_CALL", default="")
I = env.str(var="V_KEYWORD")
os.environ.setdefault("V_SETDEFAULT", "x")
J = os.environ.get("V_GET", "")
K = os.environ["V_SUBSCRIPT"]
L = os.getenv("V_GETENV")
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)
"""
    found, unreadable = names_read(source)
    assert found == {
        "V_STR", "V_INT", "V_BOOL", "V_FLOAT", "V_LIST", "V_JSON", "V_DB", "V_CALL",
        "V_KEYWORD", "V_SETDEFAULT", "V_GET", "V_SUBSCRIPT", "V_GETENV",
    }  # fmt: skip
    assert unreadable == []
    assert names_read("X = env.str(NAME)")[1] == ["<settings>:1"]


def test_every_environment_variable_the_settings_read_is_in_docs_settings_md():
    read = settings_variables()
    # A parser that silently stopped matching would pass with nothing found.
    assert {"DATABASE_URL", "CHAT_DATA_DIR", "DJANGO_HSTS_SECONDS", "CHAT_TIMEOUTS"} <= read
    missing = sorted(read - documented_rows().keys())
    assert not missing, f"not documented in docs/settings.md: {', '.join(missing)}"


def test_docs_settings_md_lists_no_settings_variable_that_nothing_reads():
    read = settings_variables()
    stale = sorted(
        name
        for name, section in documented_rows().items()
        if section not in _ELSEWHERE and name not in read
    )
    assert not stale, (
        f"docs/settings.md lists variables config/settings/ does not read: {', '.join(stale)}"
        " (move them under 'Read outside the settings' if something else reads them)"
    )
