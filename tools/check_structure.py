"""The package's shape, checked: every part imports only parts of its own layer or below (so no
import cycle between parts), no function is longer than a screen, no private name is imported
from another part. Prints every breach; exit status 1 if any.

A part is a subpackage (``unlearn/data``) or a top-level module (``unlearn/engine.py``). The
package's ``__init__`` stands above all of them; a part not in ``LAYERS`` is a breach.

    python tools/check_structure.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "unlearn"
MAX_LINES = 80
# the pipeline, lowest first: a part may import from its own layer and the ones before it
LAYERS = [
    {"io", "settings"},  # files written atomically, typed settings
    {"data"},  # LUME rows, MIA documents, corpora, the synthetic benchmark
    {"accel", "models"},  # loading, presets, token sequences, the forward pass
    {"measure"},  # per-row scores, generation, token losses, the official numbers
    {"training", "methods", "anchor", "tracing"},  # the optimizer loop, objectives, tracing
    {"plan"},  # the memory a run will need, from the model's config alone
    {"engine", "selection", "target"},  # `unlearn run`, its model selection, `unlearn target`
    {"evaluation"},  # `unlearn eval`: files, audit, report
    {"leaderboard", "demo", "cli"},  # `unlearn bench`, `unlearn demo`, the command line
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """``unlearn.evaluation.nll`` -> ``evaluation``; ``unlearn.engine`` -> ``engine``."""
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
        if mine and mine not in RANK:
            breaches.append(f"{where}: part {mine!r} is in no layer of LAYERS")
        for module, names, line in imported(path, tree):
            theirs = part_of(module)
            if theirs and theirs != mine and mine:
                edges.setdefault(mine, set()).add(theirs)
                if RANK.get(theirs, -1) > RANK.get(mine, -1):
                    breaches.append(f"{where}:{line}: {mine} imports {theirs}, a layer above it")
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
