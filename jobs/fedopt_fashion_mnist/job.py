"""FedOpt (FedAdam, FedYogi, FedAdagrad or FedAvgM) on Fashion-MNIST split by Dirichlet(alpha) label skew.

    ./start_fl.sh 4
    python jobs/fedopt_fashion_mnist/job.py --n_clients 4 --num_rounds 20 --alpha 0.1 --optimizer adam --server_lr 0.01

The sites train exactly as under FedAvg (the packaged script, fedgrid/examples/fashion_mnist_train.py); the
server applies the optimizer to the averaged update (Reddi et al. 2021). Not for encrypted jobs: the server
needs the plaintext mean.
"""

import argparse

from fedgrid.examples import FASHION_MNIST_TRAIN
from fedgrid.jobcli import add_common_args, fashion_mnist_recipe, main_guard, run_recipe
from fedgrid.recipe import FedOptRecipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--optimizer", default="adam", choices=("avgm", "adam", "yogi", "adagrad"))
    parser.add_argument("--server_lr", type=float, default=None, help="η (default 1.0 for avgm, else 0.01)")
    parser.add_argument("--beta1", type=float, default=0.9)
    parser.add_argument("--beta2", type=float, default=0.99)
    parser.add_argument("--tau", type=float, default=0.001)
    parser.set_defaults(alpha=0.1)
    args = parser.parse_args()
    recipe = fashion_mnist_recipe(
        f"fedopt_{args.optimizer}_fashion_mnist",
        args,
        FedOptRecipe,
        FASHION_MNIST_TRAIN,
        optimizer=args.optimizer,
        server_lr=args.server_lr,
        beta1=args.beta1,
        beta2=args.beta2,
        tau=args.tau,
    )
    return run_recipe(recipe, args)


if __name__ == "__main__":
    main_guard(main)
