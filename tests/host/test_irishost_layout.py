"""irishost's code stays readable in pieces: no class over 300 lines, no
function over 80 (issue 12), measured on the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import irishost

PACKAGE = Path(irishost.__file__).parent
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 300, 80


def definitions() -> list[tuple[str, ast.AST]]:
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{path.name}:{node.lineno} {node.name}", node))
    return found


def lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_the_package_has_classes_and_functions_to_measure():
    names = {node.name for _, node in definitions()}
    assert {"Supervisor", "WorkerTable", "RelayLink", "Respawner", "Rollout"} <= names


def test_no_class_is_over_300_lines():
    too_long = {
        where: lines(node)
        for where, node in definitions()
        if isinstance(node, ast.ClassDef) and lines(node) > MAX_CLASS_LINES
    }
    assert too_long == {}


def test_no_function_is_over_80_lines():
    too_long = {
        where: lines(node)
        for where, node in definitions()
        if not isinstance(node, ast.ClassDef) and lines(node) > MAX_FUNCTION_LINES
    }
    assert too_long == {}
