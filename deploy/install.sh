#!/usr/bin/env bash
# Installs pdmesh into the current Python environment, pinning torch so that a
# host without a GPU gets the CPU build (an unpinned `torch` would pull a
# multi-GB CUDA build). On this kind of machine torch==2.13.0 resolves to the
# CPU wheel kept on local disk; on CUDA hosts the default index serves the CUDA
# build; hosts whose index serves only CUDA builds but have no GPU name a CPU
# wheel index in PIP_EXTRA_INDEX_URL, which pip reads itself.
# Usage: deploy/install.sh [EXTRAS]      e.g. deploy/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="${PDMESH_TORCH_VERSION:-2.13.0}"
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: NVIDIA GPU found: torch==${torch_version} (CUDA build)" >&2
else
    echo "install: no GPU found: torch==${torch_version} (CPU build)" >&2
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "torch==${torch_version}" -e "$spec"
# The deploy tests run a real Prometheus (and its promtool): Debian's package, on
# hosts that have apt; elsewhere they say what is missing.
if [[ ",${1:-}," == *,test,* || ",${1:-}," == *,dev,* ]] && ! command -v prometheus >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
        echo "install: Debian's prometheus package (for tests/deploy)" >&2
        $sudo apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        echo "install: no apt-get: install Prometheus (prometheus, promtool) for tests/deploy yourself" >&2
    fi
fi
# pyenv's shims only see a new console script after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
