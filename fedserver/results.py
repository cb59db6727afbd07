"""A job's result as admins get it: the metrics files and plot of its result folder, the downloadable zip,
and its logs."""

from __future__ import annotations

import csv
import dataclasses
import gc
import io
import json
import zipfile
from pathlib import Path
from typing import BinaryIO

from fedgrid import jobspec
from fedgrid.errors import NotFoundError
from fedgrid.files import write_atomic
from fedgrid.serde import JobInfo, RoundInfo
from fedserver import memory


def write_metrics(result_dir: Path, rounds: list[RoundInfo]) -> None:
    """metrics.json (a list of rounds) and metrics.csv (one row per round, one column per metric)."""
    rows = [
        {
            "round": r.round,
            "sites_asked": r.sites_asked,
            "sites_answered": r.sites_answered,
            "seconds": round(r.seconds, 4),
            "bytes_moved": r.bytes_moved,
            **r.metrics,
        }
        for r in rounds
    ]
    write_atomic(result_dir / "metrics.json", json.dumps(rows, indent=2))
    columns = ["round", "sites_asked", "sites_answered", "seconds", "bytes_moved"]
    columns += sorted({k for r in rounds for k in r.metrics})
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(result_dir / "metrics.csv", table.getvalue())


def plot_metrics(result_dir: Path, rounds: list[RoundInfo], title: str) -> Path | None:
    """metrics.png: accuracy (left) and loss (right) of the global model by round, and for a private job the
    privacy spent, ε (third panel).

    Drawn on a Figure of its own, not through pyplot (whose registry of figures is global and not
    thread-safe). A matplotlib figure is a web of reference cycles that only a full garbage collection
    frees, which a quiet server seldom runs: without the collection below, each job left ~3 MB behind
    until one came (bench/soak.py).
    """
    if not rounds:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = sorted({k for r in rounds for k in r.metrics})
    privacy = [n for n in names if n == "epsilon"]
    accuracy = [n for n in names if "acc" in n.lower()]
    loss = [n for n in names if "loss" in n.lower()]
    other = [n for n in names if n not in accuracy and n not in loss and n not in privacy]
    panels = [(accuracy or other, "accuracy"), (loss, "loss")]
    if privacy:
        panels.append((privacy, "ε spent (at the job's δ)"))
    fig = Figure(figsize=(5 * len(panels), 4))
    axes = fig.subplots(1, len(panels))
    for ax, (group, label) in zip(axes, panels, strict=True):
        for name in group:
            points = [(r.round, r.metrics[name]) for r in rounds if name in r.metrics]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if group:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = result_dir / "metrics.png"
    fig.savefig(path, dpi=100)
    del fig, axes
    gc.collect()
    memory.trim()
    return path


def zip_result(job_dir: Path, info: JobInfo, out: BinaryIO) -> None:
    """Write the downloadable result to `out` (a file: a result is as large as its models): the result
    folder, the job's meta.json and its record (job_info.json)."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((job_dir / "result").rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(job_dir / "result").as_posix())
        meta = job_dir / "job" / jobspec.META_FILE
        if meta.exists():
            archive.write(meta, f"job/{jobspec.META_FILE}")
        fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(JobInfo)}
        archive.writestr("job_info.json", json.dumps(fields, indent=2))


def log_path(job_dir: Path, info: JobInfo, source: str) -> Path:
    """The server's log of a job ("" or "server"), or a site's as the site sent it at the job's end."""
    if not source or source == "server":
        return job_dir / "log.txt"
    if source not in info.sites:
        raise NotFoundError(f"{source} is not a site of job {info.job_id} (sites: {', '.join(info.sites)})")
    path = job_dir / "result" / "sites" / source / "log.txt"
    if not path.exists():
        raise NotFoundError(f"{source} has not sent its log of job {info.job_id} yet (sites send it when the job ends)")
    return path
