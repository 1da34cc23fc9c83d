#!/usr/bin/env bash
# Builds UCX with InfiniBand/RoCE verbs and RDMA-CM (and CUDA when a CUDA root is given) into a
# prefix, for the worker images. The libucx wheel that ucxx-cu12 brings has no verbs/rdmacm:
# with it, UCX on an RDMA NIC silently falls back to TCP. The images point ucxx at this build
# (RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true). The version is the wheel's, so ucxx's API matches.
# Usage: build-ucx.sh VERSION PREFIX [CUDA_ROOT]   (needs a C toolchain, libibverbs-dev, librdmacm-dev)
set -euo pipefail
version="$1" prefix="$2" cuda="${3:-}"
src="$(mktemp -d)"
curl -fsSL "https://github.com/openucx/ucx/releases/download/v${version}/ucx-${version}.tar.gz" | tar xz -C "$src"
cd "$src/ucx-${version}"
# --with-verbs/--with-rdmacm fail the configure step (not a cluster later) when their headers are missing
./contrib/configure-release --prefix="$prefix" --enable-mt --with-verbs --with-rdmacm \
    ${cuda:+--with-cuda="$cuda"} --without-java --without-go
make -j"$(nproc)" install
for module in ib rdmacm ${cuda:+cuda}; do
    ls "$prefix"/lib/ucx/libuct_${module}.so >/dev/null
done
rm -rf "$src"
