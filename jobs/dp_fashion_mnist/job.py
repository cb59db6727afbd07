"""Differential privacy on Fashion-MNIST at both granularities, submitted to a running federation.

    ./start_fl.sh 4
    pip install -c constraints.txt opacus          # the sites' DP-SGD (requirements.txt beside this file)
    python jobs/dp_fashion_mnist/job.py --n_clients 4 --num_rounds 5

Site level (the job's `privacy`): each site's update is clipped to --clip_norm and Gaussian noise of
--noise_multiplier times that is added to the sum (by the server, or by the sites with --where sites); the
server's accountant (dp-accounting) prints ε after every round, the budget spent for "did this site take
part", and --target_epsilon stops the job before the round that would exceed it. Sample level (the sites'
script, train.py beside this file): DP-SGD through Opacus, each site printing its own ε over its samples.

With four sites, site-level noise that means something (a noise multiplier near 1) drowns the model's
update: site-level DP needs hundreds of sites per round. The defaults keep the model useful and show the
mechanics; the ε they print says how little such noise protects.
"""

import argparse
from pathlib import Path

from fedgrid.jobcli import add_common_args, fashion_mnist_recipe, main_guard, run_recipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--clip_norm", type=float, default=2.0, help="site-level clip norm of an update")
    parser.add_argument("--noise_multiplier", type=float, default=0.01, help="site-level noise multiplier")
    parser.add_argument("--delta", type=float, default=1e-3, help="δ of the site-level ε")
    parser.add_argument("--where", choices=("server", "sites"), default="server", help="who adds the noise")
    parser.add_argument("--target_epsilon", type=float, default=0.0, help="stop before exceeding it (0: no limit)")
    parser.add_argument("--sample_noise", type=float, default=1.0, help="DP-SGD noise multiplier at the sites")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="DP-SGD per-sample clip norm")
    parser.set_defaults(lr=0.05, momentum=0.0, batch_size=64)
    args = parser.parse_args()
    privacy = {
        "clip_norm": args.clip_norm,
        "noise_multiplier": args.noise_multiplier,
        "delta": args.delta,
        "where": args.where,
    }
    if args.target_epsilon:
        privacy["target_epsilon"] = args.target_epsilon
    recipe = fashion_mnist_recipe(
        "dp_fashion_mnist", args, train_script=Path(__file__).with_name("train.py"), privacy=privacy
    )
    recipe.train_args += ["--sample_noise", str(args.sample_noise), "--max_grad_norm", str(args.max_grad_norm)]
    return run_recipe(recipe, args)


if __name__ == "__main__":
    main_guard(main)
