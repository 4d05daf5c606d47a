"""The code's shape, checked from the source: no import cycle, modeling code never imports
``train`` or lightning, every file under 400 lines, every config dataclass in one module."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("encoders", "diffusion", "multimodal", "train")
MODELING = ("encoders", "diffusion", "multimodal")
CONFIG_MODULE = "multimodal.config"


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports at run time (top level or inside functions; not under
    ``if TYPE_CHECKING``), as full dotted names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in known)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for imported in _imports(name, path, known):
            # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
            parts = imported.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known)
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = targets - {name} - ancestors  # a package's __init__ always runs before its modules
    return graph


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert "multimodal.model" in graph["multimodal.pipeline"]  # the walk sees real edges


def test_modeling_never_imports_train_or_lightning():
    known = _modules()
    bad = []
    for name, path in known.items():
        if name.split(".")[0] not in MODELING or name == "multimodal.cli":  # the command may import everything, lazily
            continue
        for imported in _imports(name, path, known):
            if imported.split(".")[0] in ("train", "lightning", "pytorch_lightning"):
                bad.append(f"{name} imports {imported}")
    assert not bad, bad
    # and the config module (with its dict helpers and file reading) imports nothing but the standard library
    helpers = {"multimodal", "multimodal.config_dicts", "multimodal.files", "multimodal.presets"}
    for name in (CONFIG_MODULE, *helpers - {"multimodal"}):
        imports = {i for i in _imports(name, known[name], known)} - helpers
        assert {i.split(".")[0] for i in imports} <= {"__future__", "dataclasses", "json", "types", "typing", "pathlib", "io", "os", "stat"}, imports


def test_no_file_over_400_lines():
    files = [p for pkg in PACKAGES + ("tests", "benchmarks") for p in (ROOT / pkg).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_every_config_dataclass_lives_in_the_config_module():
    suffixes = ("Config", "Args", "Limits", "Settings", "Options")
    elsewhere = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(suffixes) and name != CONFIG_MODULE:
                elsewhere.append(f"{name}.{node.name}")
    assert not elsewhere, elsewhere


def test_no_module_shares_its_name_with_a_reexported_function():
    for name, path in _modules().items():
        if path.name != "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                clash = [a.name for a in node.names if (path.parent / f"{a.name}.py").exists() and a.name != node.module]
                assert not clash, f"{name} re-exports {clash}, hiding the module(s) of that name"
