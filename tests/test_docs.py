"""The docs stay true: docs/operations.md lists every operation method, and every test it names
exists."""

from __future__ import annotations

import ast
import inspect
import pathlib
import re

import saferring

ROOT = pathlib.Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"

# Ring methods that are not operations (life cycle, waiting, introspection).
NOT_OPERATIONS = {"close", "submit", "wait", "run", "stats", "fixed_file", "probe"}


def _public_methods() -> set[str]:
    return {name for name, value in inspect.getmembers(saferring.Ring)
            if not name.startswith("_") and callable(value) and name not in NOT_OPERATIONS}


def _tests_defined() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        names |= {f"{path.name}::{node.name}" for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    return names


def test_every_operation_method_is_documented() -> None:
    """Each public Ring method that queues a request (or registers something) has a table row."""
    text = OPERATIONS.read_text()
    documented = set(re.findall(r"(?:`|ring\.)([a-z_0-9]+)\(", text))
    missing = sorted(_public_methods() - documented)
    assert not missing, f"docs/operations.md does not list: {missing}"


def test_every_named_test_exists() -> None:
    """Every test the operations table names is defined (and no row is left without one)."""
    text = OPERATIONS.read_text()
    assert "TEST:" not in text, "a row of docs/operations.md still lacks its test"
    named = set(re.findall(r"`(test_[a-z0-9_]+\.py::test_[a-z0-9_]+)`", text))
    assert named, "no test names found in docs/operations.md"
    missing = sorted(named - _tests_defined())
    assert not missing, f"docs/operations.md names tests that do not exist: {missing}"


def test_readme_kernel_table_is_generated() -> None:
    """The README's kernel table is exactly what saferring.features.kernel_table() generates."""
    from saferring.features import kernel_table

    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- kernel-table:begin[^>]*-->\n(.*?)\n<!-- kernel-table:end -->", text, re.S)
    assert match, "README.md has no kernel table markers"
    assert match.group(1) == kernel_table()
