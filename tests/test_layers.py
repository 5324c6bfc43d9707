"""Layers import downward only (docs/architecture.md): every `import thrifty.x` in a module of layer L, at module
level or inside a function, names a package of layer <= L. A dependency that wants to point up is a protocol to
move down (a registry, a callable passed in)."""

from __future__ import annotations

import ast
from pathlib import Path

import thrifty


LAYERS = [
    {"errors", "version", "values", "registry"},
    {"io", "runtime", "backbones"},
    {"data", "metrics"},
    {"features"},
    {"objectives", "tuners"},
    {"train"},
    {"bench", "serve", "compress", "longtail"},
    {"cli"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
RANK["__root__"] = len(LAYERS)  # `from thrifty import x` of a non-package loads the root, which imports every layer
ROOT = Path(thrifty.__file__).parent


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "thrifty":
        return None
    return parts[1] if len(parts) > 1 else "__root__"


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "thrifty":
                out += [(node.lineno, f"thrifty.{a.name}" if a.name in RANK else "thrifty") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if not p.name.startswith("__")}
    packages -= {"py"}  # py.typed
    assert packages <= set(RANK), f"give these a layer in LAYERS and docs/architecture.md: {packages - set(RANK)}"


def test_no_module_imports_upward():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts == ("__init__.py",):  # the package root re-exports the public API of every layer
            continue
        own = RANK[rel.parts[0].removesuffix(".py")]
        for line, module in _imports(path):
            target = _package(module)
            if target is not None and RANK[target] > own:
                upward.append(f"{rel}:{line} imports {module}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from thrifty.cli.main import main\n")
    assert _imports(bad) == [(2, "thrifty.cli.main")] and RANK[_package("thrifty.cli.main")] > RANK["train"]
