"""FedProx on Fashion-MNIST split across sites by Dirichlet(alpha) label skew, submitted to a running federation.

    ./start_fl.sh 4
    python jobs/fedprox_fashion_mnist/job.py --n_clients 4 --num_rounds 20 --alpha 0.1 --mu 0.01

The server sends mu with each training task; the sites' script (train.py beside this file) adds the
proximal term mu/2·||w − w_global||² to its loss with `api.proximal_term`. Data preparation, submission
and progress lines as in jobs/fedavg_fashion_mnist/job.py.
"""

import argparse
from pathlib import Path

from fedgrid.jobcli import add_common_args, fashion_mnist_recipe, main_guard, run_recipe
from fedgrid.recipe import FedProxRecipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--mu", type=float, default=0.01, help="proximal term weight (default 0.01)")
    parser.set_defaults(alpha=0.1)
    args = parser.parse_args()
    script = Path(__file__).with_name("train.py")
    return run_recipe(fashion_mnist_recipe("fedprox_fashion_mnist", args, FedProxRecipe, script, mu=args.mu), args)


if __name__ == "__main__":
    main_guard(main)
