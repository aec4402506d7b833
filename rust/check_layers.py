"""Checks the Rust crate's layering: the order of layers written at the top of `src/lib.rs`.

A file may use items of its own layer and of the layers listed before it, never of a later one;
and no two files may import each other in a circle, except that a child module may use its
parent's (and ancestors') items. Exits non-zero, naming each offending import, otherwise.

Usage: python rust/check_layers.py [rust/src]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LAYER_LINE = re.compile(r"^//! +\d+\. +`(\w+)`")
CRATE_PATH = re.compile(r"\bcrate((?:::\w+)+)")
SUPER_PATH = re.compile(r"\b((?:super::)+)(\w+(?:::\w+)*)")
CHILD_MOD = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", re.MULTILINE)
# Generated code the root re-exports; it belongs to the first layer.
GENERATED = {"proto", "tfproto", "generated"}


def module_path(src: Path, file: Path) -> tuple[str, ...]:
    parts = file.relative_to(src).with_suffix("").parts
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)


def resolve(path: tuple[str, ...], modules: set[tuple[str, ...]]) -> tuple[str, ...]:
    """The longest prefix of `path` that is a module of the crate."""
    for end in range(len(path), 0, -1):
        if path[:end] in modules:
            return path[:end]
    return ()


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "src")
    layers = [
        match.group(1)
        for line in (src / "lib.rs").read_text().splitlines()
        if (match := LAYER_LINE.match(line))
    ]
    if not layers:
        print(f"{src / 'lib.rs'} lists no layers", file=sys.stderr)
        return 1
    rank = {name: index for index, name in enumerate(layers)}
    rank.update(dict.fromkeys(GENERATED, rank.get("proto", 0)))
    files = {module_path(src, file): file for file in sorted(src.rglob("*.rs"))}
    modules = set(files)
    problems = []
    edges: dict[tuple[str, ...], set[tuple[str, ...]]] = {module: set() for module in modules}
    for module, file in files.items():
        text = strip_comments(file.read_text())
        used = [tuple(m.group(1).split("::")[1:]) for m in CRATE_PATH.finditer(text)]
        for match in SUPER_PATH.finditer(text):
            up = match.group(1).count("super::")
            base = module[: len(module) - up] if up <= len(module) else ()
            used.append(base + tuple(match.group(2).split("::")))
        children = set(CHILD_MOD.findall(text))
        for child in children:
            used.append((*module, child))
        if module and module[0] not in rank:
            problems.append(f"{file}: its folder {module[0]!r} is not a layer listed in lib.rs")
            continue
        for path in used:
            if path and path[0] in GENERATED:
                target: tuple[str, ...] = (path[0],)
            else:
                target = resolve(path, modules)
            if not target or target == module:
                continue
            if module and rank[target[0]] > rank[module[0]]:
                problems.append(
                    f"{file}: imports {'::'.join(target)}, of layer {target[0]!r}, which comes "
                    f"after its own layer {module[0]!r}"
                )
            is_ancestor = module[: len(target)] == target
            if target in modules and not is_ancestor:
                edges[module].add(target)
    problems.extend(circles(edges, files))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"layers ok: {len(files)} files in {len(layers)} layers ({', '.join(layers)})")
    return 0


def circles(
    edges: dict[tuple[str, ...], set[tuple[str, ...]]], files: dict[tuple[str, ...], Path]
) -> list[str]:
    """Every set of files that import each other in a circle (Tarjan's strongly connected
    components)."""
    index: dict[tuple[str, ...], int] = {}
    low: dict[tuple[str, ...], int] = {}
    stack: list[tuple[str, ...]] = []
    found = []

    def visit(node: tuple[str, ...]) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in edges[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                names = ", ".join(str(files[member]) for member in sorted(component))
                found.append(f"an import circle: {names}")

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


if __name__ == "__main__":
    sys.exit(main())
