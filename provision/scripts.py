"""The shell scripts of a kit: start.sh and stop.sh for daemons, fl_admin.sh for admins.

Scripts are the one kind of kit file that cannot be a dumped dict. Each is a fixed body; the only
per-kit value is the daemon's module name, set in one assignment at the top. The scripts find
their kit from their own location, so a kit works wherever it is copied.
"""

from __future__ import annotations

_PRELUDE = r"""#!/usr/bin/env bash
# {purpose}
# Part of a signed fedgrid startup kit: do not edit (the daemon refuses a changed kit).
set -euo pipefail
KIT="$(cd "$(dirname "${{BASH_SOURCE[0]}}")/.." && pwd)"
MODULE={module}
PY="${{FEDGRID_PYTHON:-python3}}"
"""

_DAEMON_FILES = r"""PID_FILE="$KIT/daemon.pid"
READY_FILE="$KIT/daemon.ready"
LOG_FILE="$KIT/log.txt"
"""

_CHECK_PYTHON = r"""
if ! "$PY" -c "import fedgrid" >/dev/null 2>&1; then
  echo "error: '$PY' cannot import fedgrid: activate the Python environment where fedgrid is" >&2
  echo "       installed, or set FEDGRID_PYTHON to that environment's python" >&2
  echo "       (e.g. FEDGRID_PYTHON=/opt/fedgrid/.venv/bin/python)" >&2
  exit 1
fi
"""

# A pid is ours only while that process still runs our module on this kit: a stale pid file must
# never make us refuse to start, nor make stop.sh signal an unrelated process that reused the pid.
_IS_OURS = r"""
is_ours() {
  local args
  [[ "$1" =~ ^[0-9]+$ ]] || return 1
  args="$(ps -ww -o args= -p "$1" 2>/dev/null)" || return 1
  [[ "$args" == *"-m $MODULE --kit $KIT"* ]]
}
"""

_START_BODY = (
    _DAEMON_FILES
    + r"""
usage() {
  echo "usage: $(basename "$0") [-f|--foreground]"
  echo "Starts the $MODULE daemon of this kit in the background (log: $LOG_FILE)."
  echo "  -f, --foreground   run in this terminal instead (Ctrl-C stops it)"
  echo "Environment: FEDGRID_PYTHON (python with fedgrid installed, default python3),"
  echo "             FEDGRID_START_TIMEOUT (seconds to wait until the daemon is ready, default 15)"
}
FOREGROUND=0
for arg in "$@"; do
  case "$arg" in
    -f|--foreground) FOREGROUND=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
"""
    + _CHECK_PYTHON
    + _IS_OURS
    + r"""
if [[ -f "$PID_FILE" ]]; then
  OLD_PID="$(cat "$PID_FILE" 2>/dev/null || true)"
  if is_ours "$OLD_PID"; then
    echo "already running, pid $OLD_PID (stop it with $KIT/startup/stop.sh)" >&2
    exit 1
  fi
  rm -f "$PID_FILE"
fi
rm -f "$READY_FILE"

if [[ "$FOREGROUND" == 1 ]]; then
  echo "$$" > "$PID_FILE"  # exec keeps this pid, so stop.sh works from another terminal too
  exec "$PY" -m "$MODULE" --kit "$KIT"
fi

nohup "$PY" -m "$MODULE" --kit "$KIT" >>"$LOG_FILE" 2>&1 </dev/null &
PID=$!
echo "$PID" > "$PID_FILE"
TIMEOUT="${FEDGRID_START_TIMEOUT:-15}"
DEADLINE=$((SECONDS + TIMEOUT))
while [[ ! -f "$READY_FILE" ]]; do
  if ! kill -0 "$PID" 2>/dev/null; then
    rm -f "$PID_FILE"
    echo "error: $MODULE exited during start-up; last lines of $LOG_FILE:" >&2
    tail -n 20 "$LOG_FILE" >&2 || true
    exit 1
  fi
  if (( SECONDS >= DEADLINE )); then
    echo "started $MODULE, pid $PID, but it is not ready after ${TIMEOUT} s; it keeps trying, watch $LOG_FILE"
    exit 0
  fi
  sleep 0.1
done
echo "started $MODULE, pid $PID, log $LOG_FILE"
"""
)

_STOP_BODY = (
    _DAEMON_FILES
    + _IS_OURS
    + r"""
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  echo "usage: $(basename "$0")"
  echo "Stops the $MODULE daemon of this kit: SIGTERM, then SIGKILL if it has not exited after 10 s."
  exit 0
fi
if [[ ! -f "$PID_FILE" ]]; then
  echo "not running (no $PID_FILE)"
  exit 0
fi
PID="$(cat "$PID_FILE" 2>/dev/null || true)"
if ! is_ours "$PID"; then
  rm -f "$PID_FILE" "$READY_FILE"
  echo "not running (removed the stale pid file)"
  exit 0
fi
kill -TERM "$PID" 2>/dev/null || true
for _ in $(seq 1 100); do
  is_ours "$PID" || break
  sleep 0.1
done
if is_ours "$PID"; then
  echo "pid $PID did not stop within 10 s; sending SIGKILL"
  kill -KILL "$PID" 2>/dev/null || true
  sleep 0.2
fi
rm -f "$PID_FILE" "$READY_FILE"
echo "stopped $MODULE, pid $PID"
"""
)

_ADMIN_BODY = (
    _CHECK_PYTHON
    + r"""
exec "$PY" -m fedgrid.console --kit "$KIT" "$@"
"""
)


def _prelude(purpose: str, module: str) -> str:
    return _PRELUDE.format(purpose=purpose, module=module)


def start_script(module: str, what: str) -> str:
    """start.sh for a daemon module ("fedserver" or "fedclient"); `what` names it in the comment."""
    return _prelude(f"Start the {what} of this kit (see --help).", module) + _START_BODY


def stop_script(module: str, what: str) -> str:
    return _prelude(f"Stop the {what} of this kit.", module) + _STOP_BODY


def admin_script() -> str:
    """fl_admin.sh: the admin console with this kit; arguments are passed on to it."""
    purpose = "The fedgrid admin console, connected with this admin kit."
    return _prelude(purpose, "fedgrid.console") + _ADMIN_BODY
