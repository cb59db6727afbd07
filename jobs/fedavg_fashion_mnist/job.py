"""FedAvg on Fashion-MNIST with the MLP 784-512-512-10, submitted to a running federation.

    ./start_fl.sh 4
    python jobs/fedavg_fashion_mnist/job.py --n_clients 4 --num_rounds 5 --alpha 1.0

Prepares the data split if it is missing (in data/ of the current folder), builds the job with the recipe
API (the sites' training script is fedgrid/examples/fashion_mnist_train.py, shipped in the package), submits
it with the newest admin kit under workspaces/ of the current folder, prints one line per round and, at the
end, where the downloaded result is.
"""

import argparse

from fedgrid.jobcli import add_common_args, fashion_mnist_recipe, main_guard, run_recipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    return run_recipe(fashion_mnist_recipe("fedavg_fashion_mnist", args), args)


if __name__ == "__main__":
    main_guard(main)
