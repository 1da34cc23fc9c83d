"""The tests' own rule: shared helpers live in support modules and fixtures, so no test file
imports a conftest or another test module (each test module can run, move or go alone)."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_test_modules(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                 [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found += [n for n in names if n.split(".")[-1] == "conftest" or n.split(".")[-1].startswith("test_")]
    return found


def test_no_test_file_imports_a_conftest_or_a_test_module():
    bad = {str(p.relative_to(TESTS)): names for p in sorted(TESTS.rglob("*.py"))
           if (names := _imported_test_modules(p))}
    assert not bad, f"move what these import into a support module or a fixture: {bad}"


def test_the_check_sees_both_kinds_of_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from tests.gateway.conftest import API_KEY\nfrom .test_admin import x\nimport tests.support\n")
    assert _imported_test_modules(probe) == ["tests.gateway.conftest", "test_admin"]
