"""irishost's code stays readable in pieces: no class over 300 lines, no
function over 80 (issue 12), measured on the source with ``ast``, in every
subpackage; and its layers hold (issue 16): each subpackage imports only
from the layers below it, read from the import statements themselves.

The layers, top down::

    cli, __main__                  the command line
    supervisor/                    the loop and everything it drives
    forks/                         the fork server (the process), its messages
    ops/                           control socket, metrics, systemd notify
    worker/                        the worker process
    wire/                          rings, frames, the wake-up pipe
    config, loader, exits          what every layer reads

``supervisor`` reaches ``forks`` only through ``forks.messages`` (what
crosses the socket), never the server process's code, and never imports
``worker``: a worker is a process it talks to over rings.
"""

from __future__ import annotations

import ast
from pathlib import Path

import irishost

PACKAGE = Path(irishost.__file__).parent
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 300, 80

BASE = {"config", "loader", "exits"}
# What each subpackage may import from irishost, besides itself and BASE.
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "worker": {"wire"},
    "ops": {"wire"},
    "forks": {"wire", "worker"},
    "supervisor": {"wire", "ops", "forks.messages"},
}


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def definitions() -> list[tuple[str, ast.AST]]:
    found = []
    for path in sources():
        where = path.relative_to(PACKAGE)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{where}:{node.lineno} {node.name}", node))
    return found


def lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_the_package_has_classes_and_functions_to_measure():
    names = {node.name for _, node in definitions()}
    assert {"Supervisor", "WorkerTable", "RelayLink", "Respawner", "Rollout", "WorkerCore"} <= names


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


def imported_modules(path: Path) -> set[str]:
    """The irishost modules ``path`` imports, dotted below irishost ("wire.ring")."""
    package = list(path.relative_to(PACKAGE).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = [*base, *(node.module.split(".") if node.module else [])]
                names = [[*module, alias.name] for alias in node.names] if not node.module else []
                found.update(".".join(name) for name in [module, *names] if name)
            elif node.module and node.module.startswith("irishost."):
                found.add(node.module.removeprefix("irishost."))
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.removeprefix("irishost.")
                for alias in node.names
                if alias.name.startswith("irishost.")
            )
    return found


def test_the_layers_import_only_downwards():
    broken = {}
    for path in sources():
        layer = path.relative_to(PACKAGE).parts[0]
        if layer not in ALLOWED:
            continue
        allowed = ALLOWED[layer] | BASE | {layer}
        wrong = sorted(
            module
            for module in imported_modules(path)
            if not any(module == ok or module.startswith(ok + ".") for ok in allowed)
        )
        if wrong:
            broken[str(path.relative_to(PACKAGE))] = wrong
    assert broken == {}


def test_the_layer_check_sees_imports_of_every_form():
    """The checker itself: relative imports from any depth, and absolute ones."""
    spawner = PACKAGE / "supervisor" / "spawner.py"
    assert {"forks.messages", "wire.ring", "config"} <= imported_modules(spawner)
    server = PACKAGE / "forks" / "server.py"
    assert "worker.process" in imported_modules(server)
