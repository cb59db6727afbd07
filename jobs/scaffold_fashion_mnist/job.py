"""SCAFFOLD on Fashion-MNIST split across sites by Dirichlet(alpha) label skew, submitted to a running federation.

    ./start_fl.sh 4
    python jobs/scaffold_fashion_mnist/job.py --n_clients 4 --num_rounds 20 --alpha 0.1 --lr 0.05 --momentum 0

The server's control variate travels with each training task; the sites' script (train.py beside this
file) corrects its gradient steps with it and keeps its own control variate in its job folder. Works with
--encrypt too: the control variates are summed as ciphertexts like the updates.
"""

import argparse
from pathlib import Path

from fedgrid.jobcli import add_common_args, fashion_mnist_recipe, main_guard, run_recipe
from fedgrid.recipe import ScaffoldRecipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--server_lr", type=float, default=1.0, help="global step size η_g (default 1.0)")
    parser.add_argument("--encrypt", action="store_true", help="CKKS: the server adds ciphertexts only")
    parser.set_defaults(alpha=0.1, lr=0.05, momentum=0.0)
    args = parser.parse_args()
    script = Path(__file__).with_name("train.py")
    recipe = fashion_mnist_recipe(
        "scaffold_fashion_mnist", args, ScaffoldRecipe, script, server_lr=args.server_lr, encryption=args.encrypt
    )
    return run_recipe(recipe, args)


if __name__ == "__main__":
    main_guard(main)
