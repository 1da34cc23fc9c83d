"""The dependency rule (pyproject.toml [tool.importlinter]) holds: `lint-imports` keeps every
contract on this tree, and breaks the right one on a copy with a forbidden import added, so
the check itself is known to work.

Needs import-linter (the test extra: pip install -e '.[test]').
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter checks the dependency rule: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "scenarios", "simtests", "mesh", "transport")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    # the console script of the running interpreter's import-linter, with cwd first on the path
    code = "import sys; sys.path.insert(0, '.'); from importlinter.cli import lint_imports_command; " \
           "sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_every_import_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("mesh/engine/kv_cache.py", "import transport.layout", "the engine and the transport are independent"),
    ("transport/plan.py", "import mesh.routing", "gateway -> scenarios -> mesh -> transport"),
    ("scenarios/whatif.py", "import gateway.observe", "gateway -> scenarios -> mesh -> transport"),
    ("simtests/pools.py", "import mesh.pool", "the simulator runs the live policies without Ray or a network"),
    ("gateway/metrics.py", "from mesh.attempt import Event", "the gateway imports mesh only through mesh and mesh.api"),
    ("gateway/chat.py", "import mesh.engine.tokenizer", "the gateway imports mesh only through mesh and mesh.api"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts")[1]
    assert contract in broken and module.removesuffix(".py").replace("/", ".") in broken, result.stdout
