"""Site-side training for FedAvg on Fashion-MNIST: plain PyTorch plus fedclient.api.

Each task brings the global model: on "evaluate" the site scores it on its validation data (its
share of the test set); on "train" it trains locally for --epochs and sends back its weights with
its number of training samples, which is the weight of its update in the average.
"""

import argparse
from pathlib import Path

import torch

from fedclient import api
from fedgrid.data import load_site
from fedgrid.models import build_model
from fedgrid.training import evaluate, make_loader, train_epoch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_root", default="", help="folder with one sub-folder per site")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--hidden", type=int, default=0, help="the MLP's width (0: 512)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_samples", type=int, default=0, help="train on at most this many samples (0: all)")
    parser.add_argument(
        "--device", default="cpu", help='where to train: "cpu", "cuda", or "auto" (CUDA if torch sees it)'
    )
    args = parser.parse_args()
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )

    api.init()
    site = api.get_site_name()
    root = Path(args.data_root or api.get_site_config()["data_root"])
    data = load_site(root / site)
    x_train, y_train = data.x_train, data.y_train
    if args.max_samples:
        x_train, y_train = x_train[: args.max_samples], y_train[: args.max_samples]
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.hidden).to(device)
    train_loader = make_loader(x_train, y_train, args.batch_size, shuffle=True, seed=args.seed)
    val_loader = make_loader(data.x_val, data.y_val, 1000, shuffle=False)
    writer = api.SummaryWriter()
    writer.log_params({"site": site, "train_samples": len(y_train), **vars(args)})
    print(f"{site}: {len(y_train)} training and {len(data.y_val)} validation samples")

    while api.is_running():
        task = api.receive()
        if task is None:
            break
        model.load_state_dict(task.params)
        if task.is_evaluate:
            loss, accuracy = evaluate(model, val_loader, device)
            writer.add_scalar("val_accuracy", accuracy, task.current_round)
            writer.add_scalar("val_loss", loss, task.current_round)
            api.send(metrics={"accuracy": accuracy, "loss": loss}, num_samples=len(data.y_val))
            continue
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
        for epoch in range(args.epochs):
            train_loss = train_epoch(model, train_loader, optimizer, device=device)
            step = (task.current_round - 1) * args.epochs + epoch
            writer.add_scalar("train_loss", train_loss, step)
        print(f"{site}: round {task.current_round} trained, loss {train_loss:.4f}")
        api.send(model.state_dict(), num_samples=len(y_train), metrics={"train_loss": train_loss})


if __name__ == "__main__":
    main()
