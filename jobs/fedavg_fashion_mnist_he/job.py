"""FedAvg on Fashion-MNIST with homomorphically encrypted updates (CKKS): the server adds ciphertexts
it cannot read, the sites decrypt the new global model.

    provision -p workspaces/project.yml      # `he: {enabled: true}` gives sites the secret context
    ./start_fl.sh 4
    python jobs/fedavg_fashion_mnist_he/job.py --n_clients 4 --num_rounds 5

The training script is the plain job's, unchanged: fedclient.api encrypts and decrypts for it. At the
end one site (the first, or --release_site) uploads the decrypted final and best models, by policy,
so that the result folder holds them; the server never decrypts anything.
"""

import argparse

from fedgrid.jobcli import add_common_args, fashion_mnist_recipe, main_guard, run_recipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--release_site", default="", help="site that uploads the decrypted final model")
    args = parser.parse_args()
    recipe = fashion_mnist_recipe("fedavg_fashion_mnist_he", args, encryption=True, release_site=args.release_site)
    return run_recipe(recipe, args)


if __name__ == "__main__":
    main_guard(main)
