"""The engine's CPU kernels (csrc/*.cpp), built once per machine into one library.

The kernels are compiled on first use with the host's compiler and instruction
set; torch keeps the build in its extensions folder (TORCH_EXTENSIONS_DIR) under
a name that holds a hash of the CPU's flags and of the sources, so a build copied
to another CPU is not loaded there, and a changed source is built anew. Where
they cannot be built (no compiler, no ninja), the engine says why once and runs
torch's own ops instead.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_FOLDER = Path(__file__).parent / "csrc"
_SOURCES = sorted(_FOLDER.glob("*.cpp"))


@functools.cache
def available() -> bool:
    """Whether torch.ops.pdmesh's kernels can run here (builds them on the first call;
    concurrent builds of one folder wait on torch's lock file there)."""
    try:
        from torch.utils import cpp_extension
        built = library_path()
        if built.exists():
            # Loaded directly: torch's build path takes a lock file in the build folder even
            # when there is nothing to build, and a process killed holding it would leave
            # every later start waiting on it.
            torch.ops.load_library(str(built))
            return True
        _clear_stale_lock(built.parent)
        cpp_extension.load(name=built.stem, sources=[str(s) for s in _SOURCES],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
        return True
    except Exception as e:  # no compiler or ninja: torch's ops still serve
        log.warning("CPU kernels not built (%s); running torch's ops instead, slower: install g++ and "
                    "ninja to build them", str(e).splitlines()[0] if str(e) else e)
        return False


@functools.cache
def enabled(switch: str) -> bool:
    """Whether the kernel that the environment variable `switch` governs runs here: built, and
    not switched off (switch=0 runs torch's ops instead, to compare the two)."""
    if os.environ.get(switch, "1") == "0":
        log.info("%s=0: a CPU kernel is switched off, torch's ops run instead", switch)
        return False
    return available()


def library_path() -> Path:
    """Where the kernels for this CPU and these sources are built (torch's extensions folder)."""
    from torch.utils import cpp_extension
    digest = hashlib.sha256(_cpu_flags().encode())
    for source in sorted(_FOLDER.glob("*.[ch]*")):  # the headers too
        digest.update(source.read_bytes())
    name = f"pdmesh_cpu_kernels_{digest.hexdigest()[:16]}"
    return Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so"


def _clear_stale_lock(folder: Path, older_than_s: float = 600.0) -> None:
    """A build takes under a minute: a lock file older than that was left by a killed build."""
    lock = folder / "lock"
    try:
        if time.time() - lock.stat().st_mtime > older_than_s:
            lock.unlink()
    except FileNotFoundError:
        pass


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (the build uses -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()
