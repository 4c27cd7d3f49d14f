#!/usr/bin/env bash
# Regenerates the committed Python code for the mlxfleet.v1 contract.
# Needs grpcio-tools (the project's [test] extra). tests/protos checks the result has no diff.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python -m grpc_tools.protoc -I "$here" \
  --python_out="$here" --pyi_out="$here" --grpc_python_out="$here" \
  "$here/mlxfleet/v1/fleet.proto"
