#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up (.venv, test tools, Fashion-MNIST), lint, then pytest.
# Tests start real daemons from real startup kits over mutual TLS on loopback, a real mlflow server,
# and real TenSEAL contexts. Extra arguments go to pytest (e.g. scripts/test.sh -k provision).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh" --test
PY="$root/.venv/bin/python"
echo "== ruff check"
"$PY" -m ruff check .
echo "== pytest"
set +e
"$PY" -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
