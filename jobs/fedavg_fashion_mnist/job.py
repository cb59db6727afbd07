"""FedAvg on Fashion-MNIST with the MLP 784-512-512-10, submitted to a running federation.

    ./start_fl.sh 4
    python jobs/fedavg_fashion_mnist/job.py --n_clients 4 --num_rounds 5 --alpha 1.0

Prepares the data split if it is missing, builds the job with the recipe API, submits it with the
newest admin kit, prints one line per round and, at the end, where the downloaded result is.
"""

import argparse
from pathlib import Path

from fedgrid.jobcli import add_common_args, ensure_data, main_guard, run_recipe
from fedgrid.models import build_model
from fedgrid.recipe import FedAvgRecipe

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    data_root = ensure_data(args)
    recipe = FedAvgRecipe(
        name="fedavg_fashion_mnist",
        model=build_model(args.model),
        train_script=HERE / "train.py",
        train_args=[
            "--data_root",
            str(data_root),
            "--model",
            args.model,
            "--epochs",
            str(args.epochs),
            "--lr",
            str(args.lr),
            "--batch_size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
        ],
        num_rounds=args.num_rounds,
        min_clients=args.n_clients,
        round_timeout=args.round_timeout,
        seed=args.seed,
    )
    return run_recipe(recipe, args)


if __name__ == "__main__":
    main_guard(main)
