#!/usr/bin/env python3
"""The shape of the house, measured: import root(s), layers and the arrows between them, import cycles, module
sizes, YAML readers and run mechanisms. tests/unit/test_layout.py asserts on the same functions.

    python scripts/house.py            # the numbers
    python scripts/house.py --wheel    # also build the wheel and list its top-level names (~20 s)
"""

from __future__ import annotations

import argparse
import ast
import collections
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"compactlm": "compactlm", "compress": "compactlm.compress", "engines": "compactlm.engines"}
FOLDERS |= {"serve": "compactlm.serve", "bench": "compactlm.bench"}
"""Source folder -> the package it installs as."""
LAYERS = ("core", "compress", "engines", "serve", "bench", "job", "cli")
"""Lowest first: a module may import its own layer and the layers before it, never one after."""
GENERIC = ("compress", "engines", "bench", "serve")
"""Names PyPI has other packages by: never importable from an install of compactlm."""


def modules(repo: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every module compactlm installs."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((repo / folder).rglob("*.py")):
            parts = path.relative_to(repo / folder).with_suffix("").parts
            if folder == "compactlm" and parts[0] in GENERIC:
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def layer(module: str) -> str:
    """The layer a module belongs to (compactlm.__init__ / __main__ count as the CLI's)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "cli"


def _type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level, line) for every import in a file (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for block in ast.walk(tree) if _type_checking(block) for n in ast.walk(block)}
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]  # a submodule, or a name in node.module
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(name, id(node) in top, node.lineno) for name in names]
    return found


def graph(mods: dict[str, Path], module_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> the compactlm modules it imports."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = collections.defaultdict(set)
    for mod, path in mods.items():
        for name, top, _ in imports(path):
            target = resolve(name)
            if target and target != mod and (top or not module_level_only):
                edges[mod].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), a package's __init__ re-exports left out."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    packages = {m for m in edges for t in edges[m] if t.startswith(m + ".")}  # an __init__ importing its own
    trimmed = {m: {t for t in ts if not (m in packages and t.startswith(m + "."))} for m, ts in edges.items()}
    for v in list(trimmed):
        if v not in index:
            visit(v)
    return out


def upward(mods: dict[str, Path]) -> list[str]:
    """Imports that point up the layers (`file:line: a -> b`)."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    found = []
    for mod, path in mods.items():
        for name, _, line in imports(path):
            if not name.startswith("compactlm."):
                continue
            if rank[layer(name)] > rank[layer(mod)]:
                found.append(f"{path.relative_to(REPO)}:{line}: {mod} -> {name}")
    return found


def bare_imports(paths) -> list[str]:
    """Imports of `compress`, `engines`, `bench` or `serve` as top-level names."""
    found = []
    for path in paths:
        for name, _, line in imports(path):
            if name.split(".")[0] in GENERIC:
                found.append(f"{path.relative_to(REPO)}:{line}: import {name}")
    return found


def sizes(mods: dict[str, Path]) -> list[tuple[int, str]]:
    return sorted((len(path.read_text().splitlines()), mod) for mod, path in mods.items())


def yaml_readers(mods: dict[str, Path]) -> list[str]:
    """Modules that parse YAML themselves (the loader is meant to be the only one)."""
    calls = ("yaml.load(", "yaml.safe_load(", "yaml.compose(", "yaml.full_load(")
    return [mod for mod, path in mods.items() if any(c in path.read_text() for c in calls)]


def run_folders(mods: dict[str, Path]) -> list[str]:
    """Modules that open a resumable run folder (the run mechanism itself, and its users)."""
    return sorted(mod for mod, path in mods.items() if "Run.claim(" in path.read_text())


def wheel_names(repo: Path = REPO) -> tuple[set[str], set[str]]:
    """(top-level names, every file) of the wheel `pip wheel` builds from the checkout."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp, str(repo)],
            check=True,
            capture_output=True,
            text=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        files = set(zipfile.ZipFile(wheel).namelist())
    return {name.split("/")[0] for name in files}, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", action="store_true", help="Also build the wheel and list its top-level names.")
    args = parser.parse_args()
    mods = modules()
    every = graph(mods)
    lines = sizes(mods)
    counts = [n for n, _ in lines]
    print(
        f"modules: {len(mods)}; lines per module: median {statistics.median(counts):.0f}, max {lines[-1][0]} "
        f"({lines[-1][1]}); over 500: {sum(n > 500 for n in counts)}"
    )
    for label, edges in (("any import", every), ("module-level imports", graph(mods, module_level_only=True))):
        found = cycles(edges)
        print(f"import cycles ({label}): {len(found)}" + "".join(f"\n    {' <-> '.join(c)}" for c in found))
    found = upward(mods)
    print(f"imports against the layers ({' < '.join(LAYERS)}): {len(found)}" + "".join(f"\n    {u}" for u in found))
    print(f"modules that parse YAML: {len(yaml_readers(mods))} ({', '.join(yaml_readers(mods))})")
    print(f"modules that open a run folder: {', '.join(run_folders(mods))}")
    if args.wheel:
        top, _ = wheel_names()
        print(f"top-level names in the wheel: {', '.join(sorted(top))}")


if __name__ == "__main__":
    main()
