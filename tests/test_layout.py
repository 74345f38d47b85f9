"""The package layout's rules (ARCHITECTURE.md), read from the source's import statements:
a stage never imports another stage; only `stages/` and `cli.py` import a stage; no module
imports another at load time in a cycle; no module is named like a standard-library one."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "laionbuild"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = ("laionbuild",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = PACKAGE) -> list[tuple[str, bool]]:
    """(imported laionbuild module, at load time?) for every import statement in `path`; an
    import inside a function body runs when called, not at load time."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names if a.name.split(".")[0] == "laionbuild")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == "laionbuild":
                    for alias in child.names:  # `from laionbuild.stages import embed` imports a module
                        candidate = f"{base}.{alias.name}"
                        known = (root.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                        found.append((candidate if known else base, top))
            visit(child, inner)

    visit(tree, True)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_stage(name: str) -> bool:
    return name.startswith("laionbuild.stages.")


def test_a_stage_never_imports_another_stage():
    bad = [(m, target) for m, p in MODULES.items() if is_stage(m)
           for target, _ in imports(p) if is_stage(target) and target != m]
    assert bad == []


def test_only_stages_and_cli_import_a_stage():
    allowed = {"laionbuild.cli", "laionbuild.stages"}
    bad = [(m, target) for m, p in MODULES.items() if not is_stage(m) and m not in allowed
           for target, _ in imports(p) if is_stage(target)]
    assert bad == []


def test_no_import_cycle_at_load_time():
    graph = {m: {t for t, top in imports(p) if top and t in MODULES and t != m} for m, p in MODULES.items()}
    # importing a submodule loads its packages' __init__ first
    for m in list(graph):
        parent = m.rpartition(".")[0]
        while parent:
            graph[m].add(parent) if parent != m else None
            parent = parent.rpartition(".")[0]
    cycles, state = [], {}

    def walk(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    # a package's __init__ importing its own submodule is the one cycle Python resolves by design
    real = [c for c in cycles if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(c, c[1:]))]
    assert real == []


def test_no_module_shadows_the_standard_library():
    # spark-submit puts a driver file's folder first on sys.path, and a module there named like
    # a standard-library one would shadow it
    shadowing = sorted(m for m in MODULES if m.rpartition(".")[2] in sys.stdlib_module_names)
    assert shadowing == []


def test_the_rules_see_what_they_check(tmp_path):
    """The checks read real imports: stages do import library modules, and a stage importing a
    sibling (written to a scratch copy) is caught."""
    assert ("laionbuild.project.layout", True) in imports(MODULES["laionbuild.stages.embed"])
    copy = tmp_path / "laionbuild" / "stages"
    copy.mkdir(parents=True)
    (copy / "embed.py").write_text((PACKAGE / "stages" / "embed.py").read_text()
                                   + "\nfrom laionbuild.stages.download import run as _r\n\ndef f():\n    from . import tag\n")
    (copy / "tag.py").write_text("")
    (copy / "download.py").write_text("")
    found = imports(copy / "embed.py", root=tmp_path / "laionbuild")
    assert ("laionbuild.stages.download", True) in found and ("laionbuild.stages.tag", False) in found
