#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up (.venv, test tools, Fashion-MNIST), lint, pytest, then
# scripts/check_wheel.py (the wheel installed into a fresh environment outside the checkout runs a job).
# Tests start real daemons from real startup kits over mutual TLS on loopback, a real mlflow server,
# and real TenSEAL contexts. Extra arguments go to pytest and skip the wheel check
# (e.g. scripts/test.sh -k provision).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh" --test
PY="$root/.venv/bin/python"
echo "== ruff check"
"$PY" -m ruff check .
echo "== pytest"
# Two test files at a time (pytest-xdist): most of a test's time is spent waiting for daemons to start,
# rounds to end and deadlines to pass, so two files share the 2 cores of a CI machine well (the suite took
# 11 minutes so, 15 one file at a time). A file stays on one worker, with its module fixtures.
set +e
"$PY" -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
if [ "$#" -eq 0 ]; then
  echo "== the wheel, installed outside the checkout (scripts/check_wheel.py)"
  "$PY" scripts/check_wheel.py || { echo "the wheel check failed (see above)" >&2; exit 1; }
fi
exit "$rc"
