"""The package's layers only point down (issue 23): the import-linter contracts in
pyproject.toml hold, no module imports another package's private names, and the engine trains
without knowing the built-in methods (they register from the layer above)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autoskd"

#: (importer, imported module) pairs that import a private name across packages today, each with
#: the change that removes it. An entry that no longer matches fails too: delete it then.
PENDING_PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    exe = str(exe) if exe.exists() else shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed: pip install -e '.[test]'")
    done = subprocess.run([exe, "--no-cache", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_import_contracts_hold():
    out = _lint_imports()
    assert "0 broken" in out and "layers only point down KEPT" in out, out


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _owner(module: str) -> str:
    """The package a module belongs to for privacy: ``autoskd.<first part>``."""
    return ".".join(module.split(".")[:2])


def private_imports() -> set[tuple[str, str]]:
    """``(importer, imported)`` for every ``from X import _name`` that crosses packages."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = here[:len(here) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private and target.startswith("autoskd") and _owner(target) != _owner(module):
                found.add((module, target))
    return found


def test_no_private_names_cross_packages():
    found = private_imports()
    new = sorted(found - PENDING_PRIVATE_IMPORTS)
    assert not new, f"private names imported across packages (make them public or move them): {new}"
    stale = sorted(PENDING_PRIVATE_IMPORTS - found)
    assert not stale, f"fixed, so delete from PENDING_PRIVATE_IMPORTS: {stale}"


def test_the_engine_alone_names_the_package_that_registers_the_methods():
    code = ("import sys\n"
            "from autoskd.engine.methods import get_method\n"
            "from autoskd.errors import AutoSKDError\n"
            "try:\n    get_method('kd')\nexcept AutoSKDError as err:\n    print(err)\n"
            "assert 'autoskd.methods' not in sys.modules\n"
            "import autoskd.methods\n"
            "print(type(get_method('kd')).__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()[-2:]
    assert "unknown method 'kd'" in first and "importing autoskd.methods" in first
    assert second == "KD"
