"""A tiny training script for the job tests: a linear model on random data, plus switches that make one
site slow (a straggler), crash, hang, or end early, so that tests can watch the server handle it."""

import argparse
import os
import time

import numpy as np
import torch

from fedclient import api

parser = argparse.ArgumentParser()
parser.add_argument("--samples", type=int, default=50)
parser.add_argument("--slow_site", default="")
parser.add_argument("--slow_seconds", type=float, default=0.0)
parser.add_argument("--crash_site", default="")
parser.add_argument("--crash_round", type=int, default=1)
parser.add_argument("--step_seconds", type=float, default=0.0)
parser.add_argument("--stop_site", default="")
parser.add_argument("--stop_after_evaluating", type=int, default=0)
parser.add_argument("--tracking", action="store_true")
parser.add_argument("--scribble", action="store_true", help="zero each evaluation's tensors after using them")
parser.add_argument(
    "--scribble_training", action="store_true", help="zero each training task's tensors once loaded, and refuse zeros"
)
args = parser.parse_args()

api.init()
site = api.get_site_name()
print(f"training script of {site} running at niceness {os.nice(0)}", flush=True)
rng = np.random.default_rng(abs(hash(site)) % 2**32)
x = torch.from_numpy(rng.normal(size=(args.samples, 8)).astype(np.float32))
y = (x.sum(dim=1, keepdim=True) > 0).float()
model = torch.nn.Linear(8, 1)
writer = api.SummaryWriter() if args.tracking else None
torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()  # warm up autograd before round 1
evaluated: list[torch.Tensor] | None = None

while api.is_running():
    task = api.receive()
    if task is None:
        break
    if args.scribble_training and not task.is_evaluate:
        if all(not tensor.any() for tensor in task.params.values()):
            raise RuntimeError(f"{site} received a model another site had zeroed: the sites share its memory")
    model.load_state_dict(task.params)
    if args.scribble_training and not task.is_evaluate:
        for tensor in task.params.values():
            tensor.zero_()
    with torch.no_grad():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).item()
        accuracy = ((model(x) > 0).float() == y).float().mean().item()
    if task.is_evaluate:
        if args.scribble:
            evaluated = [tensor.clone() for tensor in task.params.values()]
            for tensor in task.params.values():
                tensor.zero_()
        if writer is not None:
            writer.add_scalar("val_accuracy", accuracy, task.current_round)
        api.send(metrics={"accuracy": accuracy, "loss": loss}, num_samples=args.samples)
        if site == args.stop_site and task.current_round == args.stop_after_evaluating:
            break  # the training that came with this evaluation is never done
        continue
    if evaluated is not None:
        if not all(torch.equal(a, b) for a, b in zip(evaluated, task.params.values(), strict=True)):
            raise RuntimeError("the training half of a task got the model as its evaluation left it")
        evaluated = None
    if site == args.crash_site and task.current_round == args.crash_round:
        raise RuntimeError(f"deliberate failure at {site} in round {task.current_round}")
    if site == args.slow_site:
        time.sleep(args.slow_seconds)
    time.sleep(args.step_seconds)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        optimizer.zero_grad()
        train_loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        train_loss.backward()
        optimizer.step()
        if writer is not None:
            writer.add_scalar("train_loss", train_loss.item(), (task.current_round - 1) * 5 + step)
    api.send(model.state_dict(), num_samples=args.samples, metrics={"train_loss": train_loss.item()})
print(f"training script of {site} ended", flush=True)
