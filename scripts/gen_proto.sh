#!/usr/bin/env bash
# Regenerates the Python stubs beside the .proto files (they are committed; tests check they are current).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-proto}"
python -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  proto/roundhouse/v1/*.proto
