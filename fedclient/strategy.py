"""A site's part of the strategies that need one: FedProx's proximal term and SCAFFOLD's control variates.

The training script calls these through `fedclient.api` (`proximal_term`, `scaffold_correction`,
`scaffold_update`); the job worker (job_session.py) sets them up for each training task and sends what
they staged with the result.

SCAFFOLD (Karimireddy et al. 2020, option II), as fedserver/strategies/scaffold.py runs it at the server:
the site corrects every gradient step by c − c_i, and after K steps of learning rate η_l sets
c_i⁺ = c_i − c + (x − y)/(K·η_l). It keeps c_i in its job folder, so a restarted worker continues with it,
and sends beside its model u = (c + (|S|/N)·(c_i⁺ − c_i)) / n under SCAFFOLD_PREFIX, which the server
(or, under encryption, the sites after decrypting) turns into the new c.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgrid import tensors
from fedgrid.errors import PayloadError, StateError
from fedgrid.strategy_config import SCAFFOLD_PREFIX
from fedgrid.transfer import CKKS_FORMAT

CONTROL_FILE = "scaffold_control.safetensors"
"""The site's control variate c_i, in the site's job folder."""


def split_reserved(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the model's tensors, a strategy's tensors under SCAFFOLD_PREFIX by model tensor name)."""
    model = {name: value for name, value in arrays.items() if not name.startswith(SCAFFOLD_PREFIX)}
    extra = {name.removeprefix(SCAFFOLD_PREFIX): v for name, v in arrays.items() if name.startswith(SCAFFOLD_PREFIX)}
    return model, extra


def proximal_term(model: torch.nn.Module, reference: Mapping[str, torch.Tensor] | None, mu: float) -> torch.Tensor:
    """mu/2·||w − w_global||² over the model's trainable parameters (a zero tensor when mu is 0)."""
    if not mu or reference is None:
        return torch.zeros(())
    total = torch.zeros(())
    for name, param in model.named_parameters():
        if param.requires_grad and name in reference:
            total = total + (param - reference[name]).pow(2).sum()
    return 0.5 * mu * total


class ScaffoldRound:
    """SCAFFOLD at a site for one training task: the correction while it trains, the new c_i after."""

    def __init__(
        self,
        job_dir: Path,
        control: dict[str, np.ndarray],
        reference: dict[str, np.ndarray],
        settings: Mapping[str, float],
    ) -> None:
        self.path = job_dir / CONTROL_FILE
        self.c = control
        self.x = reference
        self.share = settings["scaffold_chosen"] / settings["scaffold_sites"]
        """|S|/N: the sites asked this round over the sites of the job."""
        self.c_i = self._load(control)
        self._difference: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.staged: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
        """(c_i⁺, c + (|S|/N)·(c_i⁺ − c_i)) once `update` ran."""

    def _load(self, control: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.path.exists():
            return {name: np.zeros_like(value) for name, value in control.items()}
        kept = tensors.load_file(self.path, what=f"this site's SCAFFOLD control variate {self.path}")
        tensors.check_layout(kept, tensors.layout_of(control), f"SCAFFOLD control variate {self.path}")
        return kept

    def correct(self, model: torch.nn.Module) -> None:
        """Add c − c_i to every trainable parameter's gradient; call after backward(), before step()."""
        if not self._difference:
            self._difference = {name: torch.from_numpy(self.c[name] - self.c_i[name]) for name in self.c}
        for name, param in model.named_parameters():
            if param.grad is not None and name in self._difference:
                param.grad.add_(self._difference[name].to(param.grad.dtype).view_as(param.grad))
        self.steps += 1

    def update(self, model: torch.nn.Module | Mapping[str, Any], lr: float, steps: int | None = None) -> None:
        """Stage c_i⁺ = c_i − c + (x − y)/(K·lr) from the trained weights y, K steps (those corrected, unless
        given) of learning rate `lr`; tensors that are not trainable parameters keep c_i."""
        steps = self.steps if steps is None else steps
        if steps <= 0 or lr <= 0:
            raise StateError(
                f"SCAFFOLD: the control variate needs the local steps and learning rate (got {steps} steps, lr {lr}); "
                "call api.scaffold_correction(model, task) after each backward() or pass steps="
            )
        if isinstance(model, torch.nn.Module):
            trainable = {name for name, param in model.named_parameters() if param.requires_grad}
            weights = model.state_dict()
        else:
            weights, trainable = model, set(model)
        new_c_i, message = {}, {}
        for name, c in self.c.items():
            # float32 (float64 for float64 tensors), as the server's state: x − y of close values is exact.
            work, c_i = np.result_type(c.dtype, np.float32), self.c_i[name]
            if name in trainable:
                updated = np.subtract(self.x[name], _numpy(weights[name]).reshape(c.shape), dtype=work)
                updated /= steps * lr
                updated += c_i
                updated -= c
            else:
                updated = c_i.astype(work)
            new_c_i[name] = updated.astype(c.dtype, copy=False)
            change = updated - c_i
            change *= self.share
            change += c
            message[name] = change
        self.staged = (new_c_i, message)

    def result_tensors(self, num_samples: float) -> dict[str, np.ndarray]:
        """What goes beside the model in the result: u = message / n under SCAFFOLD_PREFIX."""
        if self.staged is None:
            raise StateError("SCAFFOLD job: call api.scaffold_update(model, task, lr=...) before api.send()")
        if num_samples <= 0:
            raise PayloadError(f"SCAFFOLD: num_samples must be positive, got {num_samples}")
        staged = self.staged[1]
        return {SCAFFOLD_PREFIX + n: (m / num_samples).astype(self.c[n].dtype, copy=False) for n, m in staged.items()}

    def commit(self) -> None:
        """The server took the result: c_i⁺ becomes this site's control variate (in its job folder)."""
        if self.staged is not None:
            tensors.save_file(self.staged[0], self.path)


def server_control(
    extra: dict[str, np.ndarray], payload_format: str, total_weight: float, settings: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """The server's c from a task's SCAFFOLD tensors: as sent (plaintext), or from an encrypted aggregate,
    whose decrypted part is Σ u_i·n_i / W: c = that·W / k, with k = settings["scaffold_updates"]."""
    if payload_format != CKKS_FORMAT:
        return extra
    updates = settings.get("scaffold_updates", 0.0)
    if updates <= 0 or total_weight <= 0:
        raise PayloadError("SCAFFOLD: an encrypted task without its update count or total weight")
    scale = total_weight / updates
    return {name: (value.astype(np.float64) * scale).astype(value.dtype) for name, value in extra.items()}


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
