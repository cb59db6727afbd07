"""From a job spec to its `JobTracking`: the one place that knows both the job spec and the tracking API."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedgrid import extras
from fedgrid.errors import JobSpecError
from fedserver.tracking.hub import JobTracking, TrackerConfig

if TYPE_CHECKING:
    from fedgrid.jobspec import JobSpec


def make_factory(*, default_mlflow_uri: str, allowed_uris: Sequence[str] = ()) -> Callable[..., JobTracking]:
    """A builder the server calls once per job; `default_mlflow_uri` serves MLflow trackers without a URI,
    and a job may name only the URIs in `allowed_uris` (checked again here for jobs stored before a change)."""

    def build(*, job_id: str, spec: JobSpec, job_dir: Path, sites: Sequence[str]) -> JobTracking:
        check_uris(spec, allowed_uris)
        tracking = JobTracking(
            job_id=job_id,
            job_name=spec.name,
            job_dir=job_dir,
            trackers=[TrackerConfig(t.type, t.tracking_uri, t.experiment_name) for t in spec.server.tracking],
            default_mlflow_uri=default_mlflow_uri,
            sites=sites,
        )
        tracking.log_params(job_params(spec, sites))
        return tracking

    return build


def check_installed(spec: JobSpec) -> None:
    """Refuse, at submit, a job whose tracker needs an extra this server lacks: it would fail once running."""
    for tracker in spec.server.tracking:
        problem = extras.missing(tracker.type)
        if problem:
            raise JobSpecError(
                f"{spec.server_app}/config/server.json: tracking {tracker.type!r} cannot run on this server: "
                f"{problem}; install it where the server runs and restart the server, "
                "or remove this tracker from the job"
            )


def check_uris(spec: JobSpec, allowed: Sequence[str]) -> None:
    """Refuse a tracker whose URI the server operator has not listed in `tracking_uris`: where a job's
    metrics go, and which addresses the server connects to for it, is the operator's decision."""
    for tracker in spec.server.tracking:
        if tracker.tracking_uri and tracker.tracking_uri not in allowed:
            choices = ", ".join(repr(uri) for uri in allowed)
            raise JobSpecError(
                f"{spec.server_app}/config/server.json: tracking {tracker.type!r} names tracking_uri "
                f"{tracker.tracking_uri!r}, which this server does not allow; "
                + (f"use one of {choices}, or leave it empty" if allowed else "leave it empty")
                + " for the server's own store (the server's operator lists allowed URIs in "
                "local/server.json tracking_uris)"
            )


def job_params(spec: JobSpec, sites: Sequence[str]) -> dict[str, str | float | int]:
    """The job's settings as MLflow params, so runs can be compared by them."""
    params: dict[str, str | float | int] = {"job_name": spec.name, "sites": len(sites)}
    for name in type(spec.server).model_fields:
        value = getattr(spec.server, name)
        if isinstance(value, bool | int | float | str):
            params[name] = value
    params["strategy"] = spec.server.strategy.describe()
    if spec.server.evaluator:
        params["evaluator"] = spec.server.evaluator
    target = spec.server.target_metric
    if target is not None:
        params["target_metric"] = f"{target.name} {'>=' if target.mode == 'max' else '<='} {target.value}"
    return params
