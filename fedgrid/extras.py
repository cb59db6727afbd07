"""The optional parts of fedgrid, each installed by a pip extra (`pip install 'fedgrid[tensorboard]'`).

A site or an admin needs none of them; a server needs one only for the jobs that use it. Whoever is
about to use one asks `missing()` first, so that a job that needs an absent extra is refused with the
command that installs it, rather than failing once it runs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Extra:
    name: str
    """The pip extra: fedgrid[<name>]."""
    module: str
    """The module whose presence shows the extra is installed."""
    purpose: str


EXTRAS = {
    extra.name: extra
    for extra in (
        Extra("tensorboard", "tensorboard", "TensorBoard tracking"),
        Extra("ray", "ray", "the simulator's workers on Ray"),
    )
}


def installed(name: str) -> bool:
    """Whether extra `name` is installed in this Python environment (found, not imported: that is cheap)."""
    return importlib.util.find_spec(EXTRAS[name].module) is not None


def install_command(name: str) -> str:
    return f"pip install 'fedgrid[{name}]'"


def missing(name: str) -> str:
    """Empty when `name` is not an extra or is installed, else which package is missing and the command
    that installs it."""
    if name not in EXTRAS or installed(name):
        return ""
    extra = EXTRAS[name]
    return f"{extra.purpose} needs the {extra.module} package, which is not installed ({install_command(name)})"
