"""A training script whose answers are known functions of what it receives, so that a test can replay
every round with numpy (tests/replay.py) and compare with what the server made of them.

Training sends `trained(global model, shift, round)` with the site's sample count as its weight, moved
by one gradient step of size STEP through fedclient.api's strategy helpers: the gradient of
`api.proximal_term` (FedProx) plus `api.scaffold_correction` (SCAFFOLD), both zero under other strategies;
under SCAFFOLD, `api.scaffold_update` then counts that one step.
Evaluation reports "accuracy" from the --accuracy curve (its value for the round whose model is
evaluated), "mean" (the mean of every value of the model received) and "shift" (the site's own).

    --site NAME:SHIFT:SAMPLES     one per site of the job (a site not listed: shift 0, 10 samples)
    --accuracy 0.3,0.8,0.6        the accuracy reported for the models of rounds 1, 2, 3 (default 0.5)
    --slow NAME:ROUND:SECONDS     that site sleeps this long in its training of that round
    --gate DIR                    before sending each update, a site writes DIR/<site>-<round>.waiting and
                                  waits until the test makes DIR/<site>-<round> (at most 5 minutes)

It prints when it starts, each task it receives and each sleep, on the monotonic clock (the server's
too), so that a test can place the server's round times among them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

KEEP = 0.5
ROUND_STEP = 0.25
STEP = 0.5
"""The learning rate of the one strategy-helper gradient step after `trained`."""


def trained(model: dict[str, np.ndarray], shift: float, round_no: int) -> dict[str, np.ndarray]:
    """A site's update: half the global model it received, plus its shift, plus a step per round."""
    return {name: (KEEP * value + shift + ROUND_STEP * round_no).astype(value.dtype) for name, value in model.items()}


def wait_at_gate(gate: Path, timeout: float = 300.0) -> None:
    """Say that this site is at `gate`, then wait until the test opens it (makes the file)."""
    gate.with_suffix(".waiting").touch()
    deadline = time.monotonic() + timeout
    while not gate.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"the gate {gate} stayed shut for {timeout:.0f} s")
        time.sleep(0.05)
    print(f"clock passed gate {gate.name} {time.monotonic():.6f}", flush=True)


def helper_step(api: object, task: object, update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One step of size STEP along the gradient that FedProx's and SCAFFOLD's helpers give at `update`."""
    import torch

    params = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.from_numpy(v.copy())) for n, v in update.items()})
    penalty = api.proximal_term(params, task)
    if penalty.requires_grad:
        penalty.backward()
    for param in params.values():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    api.scaffold_correction(params, task)
    with torch.no_grad():
        for param in params.values():
            param -= STEP * param.grad
    api.scaffold_update(params, task, lr=STEP)
    return {name: param.detach().numpy() for name, param in params.items()}


def main() -> None:
    from fedclient import api  # here, so that tests/replay.py loads `trained` without a job worker

    parser = argparse.ArgumentParser()
    parser.add_argument("--site", action="append", default=[])
    parser.add_argument("--accuracy", default="")
    parser.add_argument("--slow", action="append", default=[])
    parser.add_argument("--gate", default="")
    args = parser.parse_args()

    print(f"clock start {time.monotonic():.6f}", flush=True)
    api.init()
    site = api.get_site_name()
    shift, samples = 0.0, 10
    for entry in args.site:
        name, value, count = entry.split(":")
        if name == site:
            shift, samples = float(value), int(count)
    curve = [float(v) for v in args.accuracy.split(",") if v]
    slow = {int(r): float(s) for name, r, s in (e.split(":") for e in args.slow) if name == site}

    while api.is_running():
        task = api.receive()
        if task is None:
            break
        print(f"clock received {task.kind} {task.current_round} {time.monotonic():.6f}", flush=True)
        model = {name: tensor.numpy() for name, tensor in task.params.items()}
        if task.is_evaluate:
            accuracy = curve[task.current_round - 1] if task.current_round <= len(curve) else 0.5
            mean = float(np.mean(np.concatenate([v.ravel() for v in model.values()]).astype(np.float64)))
            api.send(metrics={"accuracy": accuracy, "mean": mean, "shift": shift}, num_samples=samples)
            continue
        if task.current_round in slow:
            began = time.monotonic()
            time.sleep(slow[task.current_round])
            print(f"clock slept {task.current_round} {began:.6f} {time.monotonic():.6f}", flush=True)
        if args.gate:
            wait_at_gate(Path(args.gate) / f"{site}-{task.current_round}")
        api.send(helper_step(api, task, trained(model, shift, task.current_round)), num_samples=samples)
    print(f"training script of {site} ended", flush=True)


if __name__ == "__main__":
    main()
