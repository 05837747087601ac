"""The code's structure, checked: the library imports no Prefect (and works without it), imports point one
way (no two modules import each other), and the packaging installs every package under a unique name."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "neuropredictor"
FLOWS = ROOT / "flows"
COMMAND_LINE = ("neuropredictor.cli", "neuropredictor.__main__")  # orchestration's users (and their submodules)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "flows":
        parts[0] = "neuropredictor_flows"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for folder in (LIBRARY, FLOWS) for p in sorted(folder.rglob("*.py"))}


def _imports(name: str, path: Path, modules: set[str] = frozenset()) -> set[str]:
    """Every module the file imports, at the top or inside functions (relative imports resolved);
    `from pkg import mod` counts as importing pkg.mod when that is one of `modules`."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{alias.name}" for alias in node.names} & set(modules)
            out.update(subs or {base})
    return out


def test_library_imports_no_prefect_and_no_flows():
    offenders = {}
    for name, path in _sources().items():
        if name.startswith(COMMAND_LINE) or name.startswith("neuropredictor_flows"):
            continue
        bad = {m for m in _imports(name, path) if m.split(".")[0] in ("prefect", "neuropredictor_flows", "flows")}
        if bad:
            offenders[name] = sorted(bad)
    assert not offenders, offenders


def test_no_two_modules_import_each_other():
    sources = _sources()
    graph = {name: {m for m in _imports(name, path, set(sources)) if m in sources and m != name}
             for name, path in sources.items()}
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, set())})
    assert not pairs, pairs


def test_core_modules_import_with_prefect_absent():
    """Every library module imports in a fresh interpreter where `import prefect` fails."""
    core = sorted(n for n in _sources() if n.startswith("neuropredictor") and not n.startswith(COMMAND_LINE)
                  and not n.startswith("neuropredictor_flows") and not n.endswith("__main__"))
    script = (
        "import importlib, importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('prefect', 'neuropredictor_flows'):\n"
        "            raise ImportError(f'{name} is blocked: the library must not need it')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not any(m.split('.')[0] == 'prefect' for m in sys.modules)\n"
        "print(len(sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(core) > 30


def test_packaging_lists_every_package_under_a_unique_name():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {_module_name(p) for folder in (LIBRARY, FLOWS) for p in folder.rglob("__init__.py")}
    assert set(setup["packages"]) == folders
    assert setup["package-dir"] == {"neuropredictor_flows": "flows"}
    assert "flows" not in setup["packages"]
