"""Differential privacy at a site: its update clipped, and under distributed DP its share of the noise added,
before anything leaves the worker (fedgrid/dp.py says what the guarantee covers).

    Δ = clip(x − g, C)                    always: the server re-clips under central DP, but cannot under HE or SecAgg+
    Δ + N(0, (z·C)²/n)                    where: sites; n = the sites asked in the round (the task says how many)
    sent: g + Δ (plaintext, HE) or Δ (SecAgg+), with weight 1: each site counts once in a private mean
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from fedgrid import dp
from fedgrid.errors import StateError
from fedgrid.privacy_config import SITES_SETTING

log = logging.getLogger("fedclient.api")


def private_difference(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    params: dp.DPParams,
    settings: Mapping[str, float],
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """The clipped difference of `update` to the global model `reference`, with this site's share of the
    noise under distributed DP; integer tensors' differences are zero (they are not released)."""
    clipped = dp.clip_update(update, reference, params.clip_norm, what="this site's update")
    if clipped.was_clipped:
        log.info("privacy: update clipped from norm %.4g to %.4g", clipped.norm, params.clip_norm)
    if params.where != "sites":
        return dict(clipped.delta)
    sites = int(settings.get(SITES_SETTING, 0))
    if sites < 1:
        raise StateError(f"privacy: the training task does not say how many sites share the noise ({SITES_SETTING})")
    return dp.add_noise(clipped.delta, dp.noise_std(params, sites), rng)


def private_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    params: dp.DPParams,
    settings: Mapping[str, float],
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """g + the private difference, in the model's dtypes: what a plaintext or encrypted private job sends."""
    difference = private_difference(update, reference, params, settings, rng)
    return {
        name: (np.asarray(reference[name]).astype(np.float64) + difference[name]).astype(np.asarray(value).dtype)
        if np.asarray(value).dtype.kind == "f"
        else np.asarray(reference[name]).copy()
        for name, value in update.items()
    }
