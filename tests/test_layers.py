"""The package's import graph: one-way layers, no cycle, no private name taken from another module.

The layer order is written once, as the README's layout block: each line names a module or a
package of spra_tools/ (lines inside a package are indented), top to bottom. A module may import
only modules whose line stands below its own; the modules of one package import each other,
without cycles. Imports inside functions count. The block lists every module and nothing else.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "spra_tools"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layout() -> list[tuple[str, bool]]:
    """(path, is a top-level line) of every line of the README's layout block, top to bottom."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^Layout\b.*?^```\n(.*?)^```", readme, re.S | re.M)
    assert block, "README.md has no Layout block"
    return [(line.split()[0], not line.startswith(" ")) for line in block.group(1).splitlines() if line.strip()]


def _line_of(module: str) -> str:
    """The top-level layout line a module stands under: its file, or its package's directory."""
    if module == "spra_tools":
        return "spra_tools/__init__.py"
    parts = module.split(".")
    if len(parts) > 2 or MODULES[module].name == "__init__.py":
        return f"spra_tools/{parts[1]}/"
    return f"spra_tools/{parts[1]}.py"


class Import(NamedTuple):
    module: str  # the spra_tools module imported
    name: str | None  # the name taken from it, when that is not a module itself
    bound: str | None  # the local name bound to the module, if any
    line: int


def _imports(module: str, path: Path) -> list[Import]:
    """Every import of a spra_tools module in the file, at any depth."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "spra_tools":
                    found.append(Import(a.name, None, a.asname, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] != "spra_tools":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:
                    found.append(Import(sub, None, a.asname or a.name, node.lineno))
                else:
                    found.append(Import(target, a.name, None, node.lineno))
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(REPO)}:{line}"


def test_the_layout_lists_every_module_and_nothing_else():
    listed = [path for path, _ in _layout()]
    modules = {p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    packages = {p.parent.relative_to(REPO).as_posix() + "/" for p in PACKAGE.rglob("*/__init__.py")}
    expected = modules | packages | {"spra_tools/__init__.py"}
    own = [path for path in listed if path.startswith("spra_tools/")]
    assert sorted(expected - set(own)) == [], "modules missing from the README's layout"
    assert sorted(set(own) - expected) == [], "the README's layout names modules that do not exist"
    assert len(own) == len(set(own)), "the README's layout lists a module twice"
    assert [p for p in listed if not (REPO / p).exists()] == [], "the README's layout names missing paths"
    # The lines inside a package follow its own line.
    for path, top in _layout():
        if path.startswith("spra_tools/") and not top:
            package = path.rsplit("/", 1)[0] + "/"
            heads = [p for p, t in _layout()[: listed.index(path)] if t]
            assert heads[-1] == package, f"{path} is not listed under {package}"


def test_no_import_reaches_upward():
    rank = {path: i for i, (path, top) in enumerate(_layout()) if top}
    unplaced = sorted({_line_of(m) for m in MODULES} - set(rank))
    assert unplaced == [], f"not on a top-level line of the README's layout: {unplaced}"
    upward = [
        f"{_where(m, line)} imports {target}"
        for m, imports in GRAPH.items()
        for target, _, _, line in imports
        if rank[_line_of(target)] < rank[_line_of(m)]
    ]
    assert upward == [], "imports against the README's layer order:\n" + "\n".join(upward)


def _packages_run_by(module: str, target: str) -> list[str]:
    """The packages whose __init__ importing `target` runs first: those `module` is not already inside."""
    parts = target.split(".")
    return [p for p in (".".join(parts[:k]) for k in range(2, len(parts))) if not module.startswith(p + ".")]


def test_no_import_cycle():
    edges = {
        m: sorted({t for i in imports for t in [i.module, *_packages_run_by(m, i.module)] if t != m})
        for m, imports in GRAPH.items()
    }
    done: set[str] = set()

    def cycle_from(m: str, path: list[str]) -> list[str] | None:
        for t in edges[m]:
            if t in path:
                return path[path.index(t) :] + [t]
            if t not in done and (cycle := cycle_from(t, [*path, t])):
                return cycle
        done.add(m)
        return None

    for m in sorted(edges):
        cycle = cycle_from(m, [m])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_a_private_name_of_another():
    found = []
    for m, imports in GRAPH.items():
        others = [i for i in imports if i.module != m]
        found += [f"{_where(m, i.line)} imports {i.module}.{i.name}" for i in others if i.name and _private(i.name)]
        bound = {i.bound: i.module for i in others if i.bound}  # `from . import support as sup` -> sup
        for node in ast.walk(ast.parse(MODULES[m].read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
                if node.value.id in bound:
                    found.append(f"{_where(m, node.lineno)} uses {bound[node.value.id]}.{node.attr}")
    assert found == [], "private names used across modules:\n" + "\n".join(found)
