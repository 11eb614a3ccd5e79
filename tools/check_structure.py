"""The package's shape, checked: no import cycle between its parts, no function longer than a
screen, no private name imported from another part. Prints every breach; exit status 1 if any.

A part is a subpackage (``unlearn/data``) or a top-level module (``unlearn/engine.py``).

    python tools/check_structure.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "unlearn"
MAX_LINES = 80


def part_of(module: str) -> str:
    """``unlearn.evaluate.nll`` -> ``evaluate``; ``unlearn.engine`` -> ``engine``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    pieces = list(relative.parts)
    return ".".join(pieces[:-1] if pieces[-1] == "__init__" else pieces)


def imported(path: Path, tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` for every import of the package, relative ones resolved."""
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # a module's relative imports start from its package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return [f for f in found if f[0].split(".")[0] == "unlearn"]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's smallest representative, found by depth-first search."""
    found = set()

    def walk(path: list[str]) -> None:
        for nxt in sorted(edges.get(path[-1], ())):
            if nxt == path[0]:
                found.add(tuple(path))
            elif nxt not in path and nxt > path[0]:
                walk(path + [nxt])

    for start in sorted(edges):
        walk([start])
    return [list(c) for c in sorted(found)]


def main() -> int:
    breaches, edges = [], {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(PACKAGE.parent)
        mine = part_of(module_name(path))
        for module, names, line in imported(path, tree):
            theirs = part_of(module)
            if theirs and theirs != mine and mine:
                edges.setdefault(mine, set()).add(theirs)
                private = [n for n in names if n.startswith("_")]
                if private:
                    breaches.append(f"{where}:{line}: imports private {', '.join(private)} "
                                    f"from {module}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    breaches.append(f"{where}:{node.lineno}: {node.name} is {length} lines "
                                    f"(at most {MAX_LINES})")
    for cycle in cycles(edges):
        breaches.append("import cycle: " + " -> ".join(cycle + cycle[:1]))
    print("\n".join(breaches) or "structure: no breach")
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main())
