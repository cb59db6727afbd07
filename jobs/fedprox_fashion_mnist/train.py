"""Site-side training for FedProx on Fashion-MNIST: the FedAvg script plus one line, the proximal term.

The server sends mu with each training task; `api.proximal_term(model, task)` is mu/2·||w − w_global||²,
which keeps a site whose data differ from the others' near the global model.
"""

import argparse
from pathlib import Path

import torch
from torch import nn

from fedclient import api
from fedgrid.data import load_site
from fedgrid.models import build_model
from fedgrid.training import evaluate, make_loader


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_root", default="", help="folder with one sub-folder per site")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_samples", type=int, default=0, help="train on at most this many samples (0: all)")
    args = parser.parse_args()

    api.init()
    site = api.get_site_name()
    data = load_site(Path(args.data_root or api.get_site_config()["data_root"]) / site)
    x_train, y_train = data.x_train, data.y_train
    if args.max_samples:
        x_train, y_train = x_train[: args.max_samples], y_train[: args.max_samples]
    torch.manual_seed(args.seed)
    model = build_model(args.model)
    train_loader = make_loader(x_train, y_train, args.batch_size, shuffle=True, seed=args.seed)
    val_loader = make_loader(data.x_val, data.y_val, 1000, shuffle=False)
    loss_fn = nn.CrossEntropyLoss()

    while api.is_running():
        task = api.receive()
        if task is None:
            break
        model.load_state_dict(task.params)
        if task.is_evaluate:
            loss, accuracy = evaluate(model, val_loader)
            api.send(metrics={"accuracy": accuracy, "loss": loss}, num_samples=len(data.y_val))
            continue
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
        model.train()
        total, count = 0.0, 0
        for _ in range(args.epochs):
            for xb, yb in train_loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                total, count = total + loss.item() * len(yb), count + len(yb)
                (loss + api.proximal_term(model, task)).backward()  # FedProx: the one line
                optimizer.step()
        print(f"{site}: round {task.current_round} trained (mu {task.settings.get('mu')}), loss {total / count:.4f}")
        api.send(model.state_dict(), num_samples=len(y_train), metrics={"train_loss": total / count})


if __name__ == "__main__":
    main()
