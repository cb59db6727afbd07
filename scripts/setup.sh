#!/usr/bin/env bash
# Set up what fedgrid needs on this machine: a virtual environment in .venv with fedgrid installed
# (torch==2.13.0 first: a loose torch pin would pull a CUDA build of several GB), and the
# Fashion-MNIST data set from Debian when it is missing. Safe to run again: it only does what is missing.
#   scripts/setup.sh          fedgrid with the tensorboard extra (everything a one-machine federation uses)
#   scripts/setup.sh --test   plus what the tests need (pytest, ruff, grpcio-tools, build, and Ray for the
#                             simulator's Ray pool; as root, iproute2 and nftables for the network namespace
#                             tests when missing)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
extras="[tensorboard]"
[ "${1:-}" = "--test" ] && extras="[test,ray]"

if ! command -v python3 >/dev/null; then
  echo "python3 is missing: install Python 3.11 (apt-get install -y python3 python3-venv)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "== creating the virtual environment in .venv"
  python3 -m venv .venv || { echo "python3 -m venv failed: apt-get install -y python3-venv, then run this again" >&2; exit 1; }
fi
PY="$root/.venv/bin/python"
stamp=".venv/.fedgrid-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)$extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing torch==2.13.0 (CPU) and fedgrid$extras into .venv (a few minutes the first time)"
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
  "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".$extras" 2>&1 | grep -v "is ignored" || true
  "$PY" -c "import torch, tenseal, mlflow, grpc, fedgrid" || { echo "installing fedgrid failed (see the messages above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "== installing the Fashion-MNIST data set (Debian package dataset-fashion-mnist)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
      || echo "warning: could not install dataset-fashion-mnist; jobs on real data need it (apt-get install dataset-fashion-mnist)" >&2
  else
    echo "warning: Fashion-MNIST is missing; as root run: apt-get install dataset-fashion-mnist" >&2
  fi
fi

# tests/test_netns.py puts the server and the sites in network namespaces (scripts/netns.py): iproute2, nftables.
if [ "$extras" = "[test,ray]" ]; then
  missing=""
  command -v ip >/dev/null || missing="$missing iproute2"
  command -v nft >/dev/null || missing="$missing nftables"
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
      echo "== installing$missing (the network namespace tests use them)"
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } >/dev/null 2>&1 \
        || echo "warning: could not install$missing; tests/test_netns.py will be skipped" >&2
    else
      echo "warning:$missing missing; tests/test_netns.py will be skipped (as root: apt-get install$missing)" >&2
    fi
  fi
fi
