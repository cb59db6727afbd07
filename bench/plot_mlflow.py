"""Plot a finished job's accuracy curves from MLflow: every site's and the global model's.

    python bench/plot_mlflow.py --tracking-uri URI --job-id ID --out fig.png [--metric accuracy]

Reads only what fedgrid put in MLflow (the job's run and its nested site runs, found by the `job_id`
tag in any experiment), so it works against a remote `mlflow server` as well as the server's own
SQLite store, and shows what a researcher who cannot reach the sites sees. Each run contributes every
metric whose name contains `--metric` (case-insensitive); site curves are drawn against the site's own
steps, the global curve against rounds, in two panels. Exits 1 with a message if the job has no runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load_curves(tracking_uri: str, job_id: str, metric: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{run label: {metric key: [(step, value), ...]}}; the job's own run is labelled "global"."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    if not experiments:
        return curves
    quote = "'" if "'" not in job_id else '"'
    token = None
    while True:
        page = client.search_runs(
            experiments, filter_string=f"tags.job_id = {quote}{job_id}{quote}", max_results=1000, page_token=token
        )
        for run in page:
            tags = run.data.tags
            label = "global" if tags.get("fedgrid.role") == "job" else tags.get("site", run.info.run_name)
            keys = [k for k in run.data.metrics if metric.lower() in k.lower()]
            series = {}
            for key in sorted(keys):
                history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
                series[key] = [(m.step, m.value) for m in history]
            curves[label] = series
        token = page.token
        if not token:
            return curves


def plot(curves: dict[str, dict[str, list[tuple[int, float]]]], job_id: str, metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (sites_ax, global_ax) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for label in sorted(k for k in curves if k != "global"):
        for key, points in curves[label].items():
            if points:
                sites_ax.plot(*zip(*points, strict=True), marker=".", linewidth=1, label=f"{label}: {key}")
    for key, points in curves.get("global", {}).items():
        if points:
            global_ax.plot(*zip(*points, strict=True), marker="o", linewidth=2, label=f"global: {key}")
    sites_ax.set(title="per site", xlabel="site step", ylabel=metric)
    global_ax.set(title="global model", xlabel="round")
    from matplotlib.ticker import MaxNLocator

    for ax in (sites_ax, global_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(f"job {job_id}: {metric}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="MLflow tracking URI (http://... or sqlite:///...)")
    parser.add_argument("--job-id", required=True, help="the fedgrid job id (the job_id tag of its runs)")
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write")
    parser.add_argument(
        "--metric", default="accuracy", help="plot metrics whose name contains this (default: accuracy)"
    )
    args = parser.parse_args(argv)
    curves = load_curves(args.tracking_uri, args.job_id, args.metric)
    if not curves:
        print(f"no MLflow runs tagged job_id={args.job_id} at {args.tracking_uri}", file=sys.stderr)
        return 1
    if not any(points for series in curves.values() for points in series.values()):
        print(f"job {args.job_id} has no metric containing {args.metric!r}", file=sys.stderr)
        return 1
    plot(curves, args.job_id, args.metric, args.out)
    sites = sum(1 for k in curves if k != "global")
    print(f"wrote {args.out} ({sites} sites{' + global' if 'global' in curves else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
