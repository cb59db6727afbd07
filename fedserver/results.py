"""The files of a job's result folder that summarize its rounds: metrics as JSON and CSV, and a plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fedserver.jobstore import RoundRecord


def write_metrics(result_dir: Path, rounds: list[RoundRecord]) -> None:
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
    (result_dir / "metrics.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    columns = ["round", "sites_asked", "sites_answered", "seconds", "bytes_moved"]
    columns += sorted({k for r in rounds for k in r.metrics})
    with open(result_dir / "metrics.csv", "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_metrics(result_dir: Path, rounds: list[RoundRecord], title: str) -> Path | None:
    """metrics.png: accuracy (left) and loss (right) of the global model by round."""
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = sorted({k for r in rounds for k in r.metrics})
    accuracy = [n for n in names if "acc" in n.lower()]
    loss = [n for n in names if "loss" in n.lower()]
    other = [n for n in names if n not in accuracy and n not in loss]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, group, label in ((axes[0], accuracy or other, "accuracy"), (axes[1], loss, "loss")):
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
    plt.close(fig)
    return path
