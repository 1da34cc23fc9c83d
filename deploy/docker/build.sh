#!/usr/bin/env bash
# Builds pdmesh's container images from the repo root with one set of versions, so
# that every image of a Ray cluster has the same Python and Ray (Ray refuses to mix).
# Usage: deploy/docker/build.sh [gateway|worker-cuda|worker-ascend ...]   (default: all)
# Tags are $PDMESH_REGISTRY/<name>:<pdmesh version>, the names deploy/k8s uses
# (PDMESH_REGISTRY defaults to "pdmesh"; kustomize's `images:` can rewrite them).
set -euo pipefail
cd "$(dirname "$0")/../.."
registry="${PDMESH_REGISTRY:-pdmesh}"
version="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
args=(--build-arg "PYTHON_VERSION=${PYTHON_VERSION:-3.11}" --build-arg "RAY_VERSION=${RAY_VERSION:-2.60.0}"
      --build-arg "PDMESH_TORCH_VERSION=${PDMESH_TORCH_VERSION:-2.13.0}")
[ -n "${CANN_IMAGE:-}" ] && args+=(--build-arg "CANN_IMAGE=${CANN_IMAGE}")
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(gateway worker-cuda worker-ascend)
for name in "${names[@]}"; do
    docker build -f "deploy/docker/${name}.Dockerfile" -t "${registry}/${name}:${version}" "${args[@]}" .
done
