"""Site-side training with sample-level differential privacy: DP-SGD through Opacus, on Fashion-MNIST.

The job's `privacy` setting protects each site as a whole (site-level DP: the server's accountant reports ε
for "did this site take part"); DP-SGD protects each training sample within a site (sample-level DP: each
example's gradient is clipped to --max_grad_norm and Gaussian noise of --sample_noise times that is added to
every batch). Opacus' own accountant gives this site's ε over its samples, which the script prints after
each round and records with the SummaryWriter (it reaches MLflow when the job tracks to it).

Opacus wraps the model for per-sample gradients; the script loads the global model into, and sends the
weights of, the module it wrapped, so the tensor names are the model's own.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedclient import api
from fedgrid.data import load_site
from fedgrid.models import build_model
from fedgrid.training import evaluate, make_loader


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_root", default="", help="folder with one sub-folder per site")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_samples", type=int, default=0, help="train on at most this many samples (0: all)")
    parser.add_argument("--sample_noise", type=float, default=1.0, help="DP-SGD noise multiplier")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="DP-SGD per-sample gradient clip")
    parser.add_argument("--sample_delta", type=float, default=1e-5, help="δ of the sample-level ε")
    args = parser.parse_args()

    api.init()
    site = api.get_site_name()
    writer = api.SummaryWriter()
    data = load_site(Path(args.data_root or api.get_site_config()["data_root"]) / site)
    x_train, y_train = data.x_train, data.y_train
    if args.max_samples:
        x_train, y_train = x_train[: args.max_samples], y_train[: args.max_samples]
    torch.manual_seed(args.seed)
    net = build_model(args.model)
    images = torch.from_numpy(((x_train.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None])
    loader = DataLoader(TensorDataset(images, torch.from_numpy(y_train.astype(np.int64))), batch_size=args.batch_size)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=net,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=args.sample_noise,
        max_grad_norm=args.max_grad_norm,
    )
    val_loader = make_loader(data.x_val, data.y_val, 1000, shuffle=False)
    loss_fn = nn.CrossEntropyLoss()

    while api.is_running():
        task = api.receive()
        if task is None:
            break
        net.load_state_dict(task.params)
        if task.is_evaluate:
            loss, accuracy = evaluate(net, val_loader)
            api.send(metrics={"accuracy": accuracy, "loss": loss}, num_samples=len(data.y_val))
            continue
        private.train()
        total, count = 0.0, 0
        for _ in range(args.epochs):
            for xb, yb in loader:
                if len(yb) == 0:
                    continue  # Poisson sampling may draw an empty batch
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(private(xb), yb)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(yb), count + len(yb)
        epsilon = engine.get_epsilon(args.sample_delta)
        print(
            f"{site}: round {task.current_round}: DP-SGD over this site's samples so far ε = {epsilon:.3f} "
            f"(δ {args.sample_delta:g}), loss {total / max(count, 1):.4f}",
            flush=True,
        )
        writer.add_scalar("sample_epsilon", epsilon, task.current_round)
        api.send(net.state_dict(), num_samples=len(y_train), metrics={"train_loss": total / max(count, 1)})


if __name__ == "__main__":
    main()
