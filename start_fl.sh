#!/usr/bin/env bash
# Start the server and N sites of the newest provisioned project on this machine (default N=2),
# wait until all N are registered, and print where each log is. Stop them with ./stop_fl.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
PY="${FEDGRID_PYTHON:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export FEDGRID_PYTHON="$PY"
cd "$root"
exec "$PY" -m fedgrid.localfl start "${1:-2}" --workspaces "$root/workspaces" "${@:2}"
