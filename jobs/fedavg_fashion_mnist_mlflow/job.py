"""FedAvg on Fashion-MNIST with the sites' training metrics streamed through the server into MLflow.

    mlflow server --host 127.0.0.1 --port 5000          # in another terminal (or leave out --tracking_uri)
    ./start_fl.sh 4
    python jobs/fedavg_fashion_mnist_mlflow/job.py --n_clients 4 --num_rounds 5 --tracking_uri http://localhost:5000

The training script is the plain job's: it records with `fedclient.api.SummaryWriter`, the site never
connects to MLflow. In MLflow: one experiment per job name, one run per job (named by the job id, tag
job_id) with the global metrics per round, and one nested run per site with that site's metrics.
Without --tracking_uri the server writes to its own MLflow store (SQLite in its workspace).
"""

import argparse

from fedgrid.jobcli import add_common_args, fashion_mnist_recipe, main_guard, run_recipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--tracking_uri", default="", help="MLflow tracking server (default: the server's own store)")
    parser.add_argument("--experiment_name", default="", help="MLflow experiment (default: the job name)")
    parser.add_argument("--tensorboard", action="store_true", help="also write TensorBoard files into the result")
    args = parser.parse_args()
    recipe = fashion_mnist_recipe("fedavg_fashion_mnist_mlflow", args)
    recipe.add_experiment_tracking("mlflow", tracking_uri=args.tracking_uri, experiment_name=args.experiment_name)
    if args.tensorboard:
        recipe.add_experiment_tracking("tensorboard")
    return run_recipe(recipe, args)


if __name__ == "__main__":
    main_guard(main)
