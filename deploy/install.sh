#!/usr/bin/env bash
# Installs pdmesh, pinning torch so that a host without a GPU gets the CPU build
# (an unpinned `torch` would pull a multi-GB CUDA build). On this kind of
# machine torch==2.13.0 resolves to the CPU wheel kept on local disk (pip's
# find-links); on CUDA hosts the default index serves the CUDA build; hosts
# whose index serves only CUDA builds but have no GPU name a CPU wheel index in
# PIP_EXTRA_INDEX_URL, which pip reads itself.
#
# Where it installs: into the active virtual environment; else into the repo's
# .venv if one was made before; else, when python3 is a distribution's Python
# that refuses pip installs (PEP 668: an EXTERNALLY-MANAGED marker, as on
# current Debian and Ubuntu), into a new .venv (with Debian's python3-venv
# installed first if the venv module lacks it); else into python3's own
# environment (pyenv, conda, a container's Python). `. deploy/env` then puts
# the chosen environment first on PATH (a no-op outside .venv).
# Usage: deploy/install.sh [EXTRAS]      e.g. deploy/install.sh test
#        deploy/install.sh --python      only choose (or make) the environment and print its python
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="${PDMESH_TORCH_VERSION:-2.13.0}"

sudo_if_needed() { if [ "$(id -u)" -ne 0 ]; then sudo "$@"; else "$@"; fi; }

# The python of the environment to install into (see the top of this file), on stdout.
choose_python() {
    local where
    where=$(python3 -c 'import os, sys, sysconfig
venv = sys.prefix != sys.base_prefix
managed = os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
print("venv" if venv else "managed" if managed else "own")')
    if [ "$where" = own ] && ! python3 -m pip --version >/dev/null 2>&1; then
        where=managed  # a distribution's Python without pip (older Debian, Ubuntu): a venv brings its own
    fi
    if [ "$where" = venv ]; then
        command -v python3
    elif [ -x .venv/bin/python ]; then
        echo "$PWD/.venv/bin/python"
    elif [ "$where" = managed ]; then
        echo "install: $(command -v python3) is the system's (externally managed, PEP 668, or without pip):" \
             "installing into a new .venv" >&2
        if ! python3 -m venv .venv >&2; then
            rm -rf .venv
            if ! command -v apt-get >/dev/null 2>&1; then
                echo "install: python3 cannot make a virtual environment: install its venv module" >&2
                exit 1
            fi
            echo "install: Debian's python3-venv (python3 -m venv needs it)" >&2
            sudo_if_needed apt-get update -qq >/dev/null
            sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                python3-venv >/dev/null
            python3 -m venv .venv >&2
        fi
        echo "$PWD/.venv/bin/python"
    else
        command -v python3
    fi
}

python=$(choose_python)
if [ "${1:-}" = "--python" ]; then
    echo "$python"
    exit 0
fi
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: NVIDIA GPU found: torch==${torch_version} (CUDA build)" >&2
else
    echo "install: no GPU found: torch==${torch_version} (CPU build)" >&2
fi
echo "install: into $("$python" -c 'import sys; print(sys.prefix)')" >&2
"$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "torch==${torch_version}" -e "$spec"
# The deploy tests run a real Prometheus (and its promtool): Debian's package, on
# hosts that have apt; elsewhere they say what is missing.
if [[ ",${1:-}," == *,test,* || ",${1:-}," == *,dev,* ]] && ! command -v prometheus >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "install: Debian's prometheus package (for tests/deploy)" >&2
        sudo_if_needed apt-get update -qq >/dev/null
        sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            prometheus >/dev/null
    else
        echo "install: no apt-get: install Prometheus (prometheus, promtool) for tests/deploy yourself" >&2
    fi
fi
# pyenv's shims only see a new console script after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
# The CPU kernels (decode attention, few-row products) are compiled on first use; build it now, so that no
# actor's first start waits for the compiler (it says why if it cannot be built).
"$python" -c "from mesh.engine import cpu_kernels; cpu_kernels.available()" || true
