"""deploy/install.sh chooses where to install as its header says, on real interpreters: a
distribution's externally managed Python (PEP 668) gets a new .venv, which `. deploy/env` puts
first on PATH and a second run reuses; an active virtual environment, or a Python that takes
installs, is used as it is. Its `--python` mode makes the environment and installs nothing;
pip in the new .venv then resolves torch==2.13.0 from this machine's local wheels and indexes
alone (offline). The whole `deploy/install.sh test && . deploy/env && ...` on Debian's Python
was run by hand (75 s; it needs PyPI here, which alone has ray>=2.59): too slow for each run."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH = re.search(r"PDMESH_TORCH_VERSION:-([\d.]+)", (REPO / "deploy/install.sh").read_text()).group(1)


def _managed_python() -> str | None:
    """A system Python with PEP 668's marker (Debian's /usr/bin/python3 here)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.access(candidate, os.X_OK):
            continue
        stdlib = subprocess.run([candidate, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
        if (Path(stdlib) / "EXTERNALLY-MANAGED").is_file():
            return candidate
    return None


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    (root / "deploy").mkdir(parents=True)
    for name in ("install.sh", "env"):
        shutil.copy(REPO / "deploy" / name, root / "deploy" / name)
    return root


def _env(tmp_path, python3: str, virtual_env: str | None = None) -> dict:
    """An environment whose `python3` is the given interpreter (and no other virtual environment is active)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").unlink(missing_ok=True)
    (bin_dir / "python3").symlink_to(python3)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    if virtual_env:
        env["VIRTUAL_ENV"] = virtual_env
        env["PATH"] = f"{virtual_env}/bin:{env['PATH']}"
    return env


def _chosen(repo: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "deploy/install.sh"), "--python"], env=env, capture_output=True,
                          text=True, timeout=120)


def _local_pip_sources() -> dict:
    """pip's settings that reach only this machine's disk: the configured file:// indexes in place of
    PyPI (find-links and constraints come from pip's configuration as they are)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60).stdout
    local = [url for url in re.findall(r"file://\S+?(?=[\s'])", listed)]
    if not local:
        pytest.skip("no local (file://) package index is configured for pip on this machine")
    return {"PIP_INDEX_URL": local[0], "PIP_EXTRA_INDEX_URL": " ".join(local[1:])}


def test_an_externally_managed_python_gets_a_venv_that_env_activates_and_pip_fills_offline(repo, tmp_path):
    python3 = _managed_python()
    if python3 is None:
        pytest.skip("no externally managed (PEP 668) Python on this machine")
    env = _env(tmp_path, python3)
    first = _chosen(repo, env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"{repo}/.venv/bin/python" and "installing into a new .venv" in first.stderr
    assert (repo / ".venv/pyvenv.cfg").is_file()
    again = _chosen(repo, env)
    assert again.stdout == first.stdout and "new .venv" not in again.stderr  # reused
    activated = subprocess.run(["bash", "-euc", "cd repo && . deploy/env && command -v python3 pdmesh || true"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert activated.stdout.splitlines()[0] == f"{repo}/.venv/bin/python3", activated.stderr
    resolved = subprocess.run([f"{repo}/.venv/bin/python", "-m", "pip", "install", "--dry-run", "--no-deps",
                               "--disable-pip-version-check", f"torch=={TORCH}"],
                              env={**env, **_local_pip_sources()}, capture_output=True, text=True, timeout=300)
    assert f"Would install torch-{TORCH}" in resolved.stdout, resolved.stdout + resolved.stderr


def test_an_active_virtual_environment_is_used_as_it_is(repo, tmp_path):
    venv = tmp_path / "active"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    chosen = _chosen(repo, _env(tmp_path, sys.executable, str(venv)))
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() == f"{venv}/bin/python3" and not (repo / ".venv").exists()


def test_a_python_that_takes_installs_is_used_as_it_is(repo, tmp_path):
    if sys.prefix != sys.base_prefix:
        pytest.skip("the tests run in a virtual environment: no plain Python at hand")
    if (Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED").is_file():
        pytest.skip("the tests' own Python is externally managed")
    chosen = _chosen(repo, _env(tmp_path, sys.executable))
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() == f"{tmp_path}/bin/python3" and not (repo / ".venv").exists()
