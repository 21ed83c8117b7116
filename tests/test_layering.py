"""The layering of the code, checked: import-linter's contracts (pyproject.toml) on the import
graph, and no module importing another module's private names.

`core/` is imported as `lscape` with `plugins/` and `cli/` mapped into it by setuptools; an
import graph built from the installed package would see only `core/`, so the contracts are
checked on a scratch copy laid out as the import package (`lscape/` with `plugins/` and `cli/`
inside)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = {"core": (), "plugins": ("plugins",), "cli": ("cli",)}


def _package_copy(dest: Path) -> Path:
    pkg = dest / "lscape"
    for folder, inside in TREES.items():
        shutil.copytree(ROOT / folder, pkg.joinpath(*inside), ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return pkg


def test_import_linter_contracts_hold(tmp_path):
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra: pip install -e '.[dev]'")
    _package_copy(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout and "Contracts: 2 kept, 0 broken" in out.stdout, out.stdout[-2000:]


def test_import_linter_catches_a_core_module_importing_a_plugin(tmp_path):
    """The contract is not vacuous: a core module that imports a plugin breaks it."""
    pytest.importorskip("importlinter")
    pkg = _package_copy(tmp_path)
    (pkg / "stray.py").write_text("from lscape.plugins.basics import grad_norm\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "lscape.stray -> lscape.plugins.basics" in out.stdout, out.stdout[-2000:]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    head = {"core": ["lscape"], "plugins": ["lscape", "plugins"], "cli": ["lscape", "cli"]}[parts[0]]
    parts = head + parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, level: int, target: str | None, is_package: bool) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def private_imports(path: Path) -> list[str]:
    """``from X import _name`` where ``_name`` is not a submodule, and ``alias._name`` on a
    module imported from another lscape module."""
    module, is_package = _module_name(path), path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, node.level, node.module, is_package)
            if not source.startswith("lscape") or source == module:
                continue
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__"):
                    if not _is_module(f"{source}.{name}"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {source} import {name}")
                elif _is_module(f"{source}.{name}"):
                    aliases[alias.asname or name] = f"{source}.{name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lscape") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and not _is_module(f"{aliases[node.value.id]}.{node.attr}")):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def _is_module(name: str) -> bool:
    parts = name.split(".")
    if parts[:2] == ["lscape", "plugins"]:
        base, rest = ROOT / "plugins", parts[2:]
    elif parts[:2] == ["lscape", "cli"]:
        base, rest = ROOT / "cli", parts[2:]
    else:
        base, rest = ROOT / "core", parts[1:]
    target = base.joinpath(*rest)
    return target.with_suffix(".py").exists() or (target / "__init__.py").exists()


def test_no_module_imports_another_modules_private_names():
    files = [p for folder in TREES for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 40
    bad = [hit for p in files for hit in private_imports(p)]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_private_import_check_is_not_vacuous(tmp_path, monkeypatch):
    probe = ROOT / "core" / "_layering_probe_tmp.py"
    probe.write_text("from lscape.store import _not_public\nfrom lscape import store as st\nst._hidden\n")
    try:
        hits = private_imports(probe)
    finally:
        probe.unlink()
    assert len(hits) == 2, hits
