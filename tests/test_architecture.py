"""The architecture of refimpl/ (DESIGN.md "Layout"), enforced by parsing every module's imports.

Layers, bottom to top; a module may import only from its own layer or a layer below. Inside a layer, modules may
import each other, but the import graph of the whole package must have no cycle. A ``_private`` name or module
may be imported only inside its own sub-package (a top-level ``refimpl/_x.py`` module counts as the bottom
layer's public utility: ``_validate``, ``_env``). Function-level imports are allowed only for optional
dependencies, marked with a comment containing "optional".
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import refimpl

PKG = Path(__file__).resolve().parents[1] / "refimpl"

LAYERS = [
    {"refimpl._validate", "refimpl._env", "refimpl.cliargs"},
    {"refimpl.softmax", "refimpl.encoders", "refimpl.optim", "refimpl.testing"},
    {"refimpl.data"},
    {"refimpl.text", "refimpl.gcide"},
    {"refimpl.index"},
    {"refimpl.sampling"},
    {"refimpl.nystrom"},
    {"refimpl.mining"},
    {"refimpl.training"},
    {"refimpl.reproduce", "refimpl.reproduce_report"},
    {"refimpl.experiments"},
    {"refimpl.benchmarks", "refimpl.cli", "refimpl.__main__", "refimpl"},
]
BOTTOM_UTILITIES = {"refimpl._validate", "refimpl._env"}


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The layer unit a module belongs to: its sub-package (refimpl.index, ...) or the top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else module


def layer_of(module: str) -> int:
    unit = unit_of(module)
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{module}: not assigned to a layer in tests/test_architecture.py")


def collect(root: Path = PKG):
    """Every import of the package: (importer, imported module, imported names, line, function-level, comment)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        src = path.read_text()
        lines = src.splitlines()
        tree = ast.parse(src)
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    for a in child.names:
                        out.append((mod, a.name, [], child.lineno, in_function, lines[child.lineno - 1]))
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = pkg.split(".")
                        base = base[: len(base) - child.level + 1]
                        target = ".".join(base + ([child.module] if child.module else []))
                    else:
                        target = child.module or ""
                    names = [a.name for a in child.names]
                    # `from refimpl.x import y` where y is a sub-module counts as importing refimpl.x.y
                    for n in names:
                        sub = f"{target}.{n}"
                        is_mod = (root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                            root.parent / Path(*sub.split("."))).is_dir()
                        out.append((mod, sub if is_mod else target, [] if is_mod else [n], child.lineno,
                                    in_function, lines[child.lineno - 1]))
                visit(child, fn)

        visit(tree, False)
    return [r for r in out if r[1] == "refimpl" or r[1].startswith("refimpl.") or r[4]]


def violations(root: Path = PKG) -> list[str]:
    bad = []
    imports = collect(root)
    graph: dict[str, set[str]] = {}
    for mod, target, names, line, in_function, text in imports:
        where = f"{mod}:{line}"
        if in_function and "optional" not in text.lower():
            bad.append(f"{where}: function-level import of {target} (only for optional dependencies, with a comment)")
        if not (target == "refimpl" or target.startswith("refimpl.")):
            continue
        if target != "refimpl" and mod != "refimpl":
            graph.setdefault(mod, set()).add(target)
        if mod == "refimpl" or target == "refimpl":
            continue
        if layer_of(target) > layer_of(mod):
            bad.append(f"{where}: {unit_of(mod)} imports {target} from a higher layer")
        src_unit, dst_unit = unit_of(mod), unit_of(target)
        if src_unit != dst_unit and target not in BOTTOM_UTILITIES:
            private_mod = any(p.startswith("_") and p != "__init__" for p in target.split(".")[1:])
            private_names = [n for n in names if n.startswith("_")]
            if private_mod or private_names:
                bad.append(f"{where}: private {'module ' + target if private_mod else ', '.join(private_names)} "
                           f"imported from another sub-package")
    # cycles in the module graph (modules that exist as files only)
    nodes = set(graph) | {t for ts in graph.values() for t in ts}
    color = dict.fromkeys(nodes, 0)

    def dfs(u, stack):
        color[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if color.get(v, 0) == 1:
                bad.append("import cycle: " + " -> ".join(stack[stack.index(v):] + [v]))
            elif color.get(v, 0) == 0:
                dfs(v, stack)
        stack.pop()
        color[u] = 2

    for n in sorted(nodes):
        if color[n] == 0:
            dfs(n, [])
    return sorted(set(bad))


def test_layers_cycles_and_private_names():
    bad = violations()
    assert not bad, "architecture violations:\n" + "\n".join(bad)


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


@pytest.mark.parametrize("case", ["cycle", "upward", "private", "function_level"])
def test_checker_catches_each_kind_of_violation(tmp_path, case):
    """Negative controls: a small fake package with one deliberate violation of each kind must be reported."""
    root = tmp_path / "refimpl"
    _write(root, "__init__.py", "")
    _write(root, "_validate.py", "")
    _write(root, "index/__init__.py", "")
    _write(root, "index/_kernels.py", "def k():\n    pass\n")
    _write(root, "sampling/__init__.py", "")
    if case == "cycle":
        _write(root, "index/a.py", "from refimpl.index import b\n")
        _write(root, "index/b.py", "from refimpl.index import a\n")
        _write(root, "sampling/s.py", "")
        want = "import cycle"
    elif case == "upward":
        _write(root, "index/a.py", "from refimpl.sampling import s\n")
        _write(root, "sampling/s.py", "")
        want = "higher layer"
    elif case == "private":
        _write(root, "sampling/s.py", "from refimpl.index._kernels import k\n")
        want = "private"
    else:
        _write(root, "sampling/s.py", "def f():\n    from refimpl.index import _kernels\n")
        want = "function-level"
    bad = violations(root)
    assert any(want in b for b in bad), bad
    _write(root, "index/a.py", "")
    _write(root, "index/b.py", "")
    _write(root, "sampling/s.py", "from refimpl.index import k\n")
    assert violations(root) == []


def test_every_public_name_resolves():
    """Each name of the package's public contract (``refimpl.__all__``) imports; none is stale."""
    for name in refimpl.__all__:
        assert getattr(refimpl, name) is not None, name
