#!/usr/bin/env bash
# Regenerates the committed Python code for the pdmesh.v1 protos (needs grpcio-tools):
#   gateway/proto/generate.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
    gateway/proto/inference.proto gateway/proto/admin.proto
