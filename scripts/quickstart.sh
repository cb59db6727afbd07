#!/usr/bin/env bash
# The README's first command: set up, provision the example project (a server, 4 sites, an admin),
# start the federation on this machine, run FedAvg on Fashion-MNIST (MLP, 4 IID sites, 5 rounds),
# print the accuracy per round and the result folder, and stop everything again.
# Options go to the job (e.g. scripts/quickstart.sh --num_rounds 10 --alpha 0.5).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh"
PY="$root/.venv/bin/python"
export FEDGRID_PYTHON="$PY"

if ! ls -d workspaces/example_project/prod_* >/dev/null 2>&1; then
  echo "== provisioning workspaces/project.yml"
  "$PY" -m provision -p workspaces/project.yml
fi
echo "== starting the server and 4 sites"
trap './stop_fl.sh' EXIT
./start_fl.sh 4
admin_kit="$(ls -d workspaces/example_project/prod_*/admin@nvidia.com | sort | tail -1)"
"$admin_kit/startup/fl_admin.sh" -c "check_status client"
echo "== running FedAvg on Fashion-MNIST"
"$PY" jobs/fedavg_fashion_mnist/job.py --n_clients 4 --num_rounds 5 --startup_kit "$admin_kit" "$@"
