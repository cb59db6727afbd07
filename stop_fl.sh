#!/usr/bin/env bash
# Stop the daemons that ./start_fl.sh started (each by its own kit's stop.sh, by PID).
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
PY="${FEDGRID_PYTHON:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
cd "$root"
exec "$PY" -m fedgrid.localfl stop --workspaces "$root/workspaces" "$@"
