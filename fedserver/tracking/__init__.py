"""The server's metric receivers: site and server metrics into MLflow and TensorBoard, reliably.

Sites never reach a tracking system; their SummaryWriter events travel to the server, and one
`JobTracking` per job takes them from there:

- `events`: what a site may send (`TrackingEvent`), the limits (`EventLimits`) and the pure checks;
- `journal`: the append-only per-run files under `<job>/tracking/` that are the delivery queue;
- `hub`: `JobTracking` (the server's interface) and its `DeliveryReport`;
- `intake`: what the server accepts: judging, seq de-duplication, budgets, appending to the journal;
- `runs`: the job's runs (its own and one per site), their judging state and `runs.json`;
- `delivery`: the courier threads that carry journaled records to each tracker, with backoff;
- `mlflow_sink`, `tensorboard_sink`: the two trackers, each the only importer of its library;
- `factory`: builds a `JobTracking` from a job spec for the server.

Importing this package is cheap: MLflow and TensorBoard are imported by the courier threads.
"""

from fedserver.tracking.events import EventLimits, TrackingEvent
from fedserver.tracking.hub import DeliveryReport, JobTracking, TrackerConfig, TrackerReport

__all__ = ["DeliveryReport", "EventLimits", "JobTracking", "TrackerConfig", "TrackerReport", "TrackingEvent"]
