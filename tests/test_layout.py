"""The package keeps its size rule (issue 12): modules up to 400 lines, functions up to 50.

A unit past its limit is listed in LONGER with the reason it is clearer whole;
a new one fails here, and so does a listed one that no longer needs its place.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE_LINES = 400
FUNCTION_LINES = 50

#: Units allowed past the limit, and why each is clearer whole.
LONGER = {
    "greentask/daemon/master.py":
        "the master's policy (its loop, signals, deaths, generations and control answers) "
        "changes one state; everything it drives is in modules of its own",
    "greentask/daemon/connection.py":
        "one peer's state and every move of it (reading, admitting, closing, the idle "
        "checks) in one class: split in two, each half would reach into the other's fields",
    "greentask/daemon/connection.py:Connection.__init__":
        "the declaration of a connection's state, one documented field per line",
    "greentask/examples/mail.py:send_bulk":
        "an example task meant to be read top to bottom: its docstring is a fifth of it",
}


def units_over_limit(package: Path) -> dict[str, int]:
    """Every module and function of ``package`` past its limit, with its length."""
    over = {}
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package.parent).as_posix()
        text = path.read_text()
        if len(text.splitlines()) > MODULE_LINES:
            over[name] = len(text.splitlines())
        for scope, node in _functions(ast.parse(text)):
            length = node.end_lineno - node.lineno + 1
            if length > FUNCTION_LINES:
                over[f"{name}:{scope}{node.name}"] = length
    return over


def _functions(tree: ast.AST, scope: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield scope, node
            yield from _functions(node, f"{scope}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{scope}{node.name}.")


def test_no_module_or_function_grows_past_its_limit_unexplained():
    over = units_over_limit(ROOT / "greentask")
    unexplained = {unit: length for unit, length in over.items() if unit not in LONGER}
    assert not unexplained, (
        f"past {MODULE_LINES} lines a module, or {FUNCTION_LINES} a function: {unexplained}; "
        "split it where it has two jobs, or list it in LONGER with the reason it is "
        "clearer whole")
    assert set(LONGER) <= set(over), f"within the limit now, drop from LONGER: " \
                                     f"{sorted(set(LONGER) - set(over))}"


def test_the_check_finds_a_long_function_and_a_long_module(tmp_path: Path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "".join(f"        x{i} = {i}\n" for i in range(FUNCTION_LINES))
    (package / "short.py").write_text(f"class A:\n    def f(self):\n{body}")
    (package / "long.py").write_text("x = 1\n" * (MODULE_LINES + 1))
    assert units_over_limit(package) == {"pkg/short.py:A.f": FUNCTION_LINES + 1,
                                         "pkg/long.py": MODULE_LINES + 1}
