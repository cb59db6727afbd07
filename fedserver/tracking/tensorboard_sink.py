"""TensorBoard as a tracking sink: event files in the job's result folder, one sub-folder per run.

```
<job>/result/tensorboard/server/     the job's own run: global metrics per round, job params
<job>/result/tensorboard/<site>/     one site: its scalars (own steps, original wall times), text, params
```

`tensorboard --logdir <job>/result/tensorboard` then shows every site and the server side by side,
after `download_job`. The only module of fedserver importing the TensorBoard writer (PyTorch's
`SummaryWriter`, which needs the `tensorboard` package).

Delivery is local and the watermark moves right after `flush()`, so a replay can only happen if the
server dies between that flush and the watermark write; TensorBoard would then show those points twice
in a new event file. The window is a few microseconds per batch; MLflow, the system of record, has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from fedserver.tracking.events import file_name
from fedserver.tracking.journal import ARTIFACT, METRIC, PARAMS, TEXT, Record
from fedserver.tracking.sink import Delivery, RunRef

SERVER_FOLDER = "server"


class TensorBoardSink:
    """Writes one job's records as TensorBoard event files under `root`."""

    max_records = 2000

    def __init__(self, root: Path) -> None:
        self.root = root
        self._writers: dict[str, SummaryWriter] = {}

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def deliver(self, run: RunRef, records: Sequence[Record], *, verify: bool) -> Delivery:
        writer = self._writer(run)
        for r in records:
            wall_time = r.timestamp_ms / 1000
            if r.kind == METRIC:
                writer.add_scalar(r.key, r.value, r.step, walltime=wall_time)
            elif r.kind == TEXT:
                writer.add_text(r.key, r.text, r.step, walltime=wall_time)
            elif r.kind == PARAMS:
                table = "| param | value |\n| --- | --- |\n" + "\n".join(
                    f"| {_cell(k)} | {_cell(v)} |" for k, v in sorted(r.params.items())
                )
                writer.add_text("params", table, r.step, walltime=wall_time)
            elif r.kind == ARTIFACT:
                # TensorBoard holds no files; list the artifact so the run says where it lives.
                writer.add_text("artifacts", f"`{_cell(r.path)}`", 0, walltime=wall_time)
        writer.flush()
        return Delivery()

    def finish(self, run: RunRef, status: str) -> None:
        writer = self._writers.pop(run.key, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def _writer(self, run: RunRef) -> SummaryWriter:
        writer = self._writers.get(run.key)
        if writer is None:
            writer = SummaryWriter(log_dir=str(self.root / folder_for(run)), flush_secs=3600)
            self._writers[run.key] = writer
        return writer


def folder_for(run: RunRef) -> str:
    """`server` for the job's run, the site's name otherwise (made file-safe, never `server`)."""
    if run.site is None:
        return SERVER_FOLDER
    folder = file_name(run.site)
    return f"site-{folder}" if folder == SERVER_FOLDER else folder


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
