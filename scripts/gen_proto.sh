#!/usr/bin/env bash
# Regenerate the Python stubs of proto/ into fedgrid/v1 (or into the folder given as $1).
# The proto folder mirrors the import path, so the generated imports need no fix-ups.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
PY="${PYTHON:-$root/.venv/bin/python}"
mkdir -p "$out/fedgrid/v1"
"$PY" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root"/proto/fedgrid/v1/*.proto
