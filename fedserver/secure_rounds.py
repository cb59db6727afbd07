"""SecAgg+ at the server: one round's steps between its sites, and the aggregator that unmasks only their sum.

A SecAgg+ round is an ordinary round of the loop (fedserver/rounds.py) whose aggregator is a
`SecureAggregator`. The sites' steps reach it through their Work streams (fedserver/privacy_io.py); each
step's answer waits until the step closes for every site:

    step 1  advertise   closes when every site asked (still in the job) advertised, or at round_timeout
    step 2  share keys  closes when every site that advertised shared, or step_timeout after step 1
    step 3  masked      the masked updates arrive as the round's results (payload "secagg+") and are added
                        mod 2^k as they come; a site that shared keys and sends nothing within step_timeout
                        after step 2 is dropped
    step 4  unmask      once the results are in (`complete`), the survivors learn who survived and who dropped
                        and send their shares (step_timeout); the sum is unmasked from them, or refused

A site left out of a step gets no later step, and the round's result for it is an empty placeholder that the
aggregator refuses with the reason (the round loop logs it like any refused update), so the loop never waits
for a masked update that cannot come. The server holds one masked sum the size of the model; it never sees
an update. The mean divides the sum by the number of survivors (each site counts once), or under
differential privacy by the number of sites asked (a fixed denominator; the sites added the noise).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedgrid import dp, secagg, tensors
from fedgrid.errors import PayloadError, PrivacyError, StateError
from fedgrid.privacy_config import SecAggConfig
from fedgrid.v1 import federation_pb2 as fpb
from fedserver.grid import Result, Task, TaskBoard
from fedserver.model import Model
from fedserver.strategies.base import build_model, read_tensor

FORMAT = "secagg+"
POLL = 0.2
"""Seconds between looks at the job's sites while a step waits (a site may leave meanwhile)."""


class SecureAggregator:
    """One SecAgg+ round: the steps' state, the running masked sum, and the unmasked mean at the end."""

    payload_format = FORMAT

    def __init__(
        self,
        *,
        job_id: str,
        task: Task,
        sites: list[str],
        layout: tensors.Layout,
        config: SecAggConfig,
        privacy: dp.DPParams | None,
        board: TaskBoard,
        round_timeout: float,
        log: logging.Logger,
    ) -> None:
        if task.model is None:
            raise StateError("a SecAgg+ round needs the model its task brings")
        self.task = task
        self.sites = sorted(sites)
        self.layout = layout
        self.config = config
        self.privacy = privacy
        self.board = board
        self.log = log
        self.grace = 3 * config.step_timeout
        session = secagg.session_of(job_id, task.task_id)
        self.setup = secagg.setup_round(session, self.sites, config.params(len(self.sites)), secagg.graph_seed(session))
        self.params = self.setup.params
        self.reference = task.model.source("the round's task")
        self.length = secagg.vector_length(layout)
        self.adverts: dict[str, fpb.SecAggAdvert] = {}
        self.commitments: dict[str, bytes] = {}
        self.inbox: dict[str, dict[str, bytes]] = {site: {} for site in self.sites}
        self.total = np.zeros(self.length, self.params.dtype)
        self.survivors: set[str] = set()
        self.reveals: dict[str, secagg.Reveal] = {}
        self.dropped: set[str] = set()
        self.unmasked: np.ndarray | None = None
        self._closed = [asyncio.Event() for _ in range(4)]
        """Steps 1-4 closed."""
        self._changed = asyncio.Event()
        first = time.monotonic() + round_timeout if round_timeout else None
        self._driver = asyncio.get_running_loop().create_task(self._drive(first), name=f"secagg-{task.task_id}")

    # ------------------------------------------------------------------ the steps, as the sites reach them

    async def advertise(self, site: str, advert: fpb.SecAggAdvert) -> fpb.SecAggKeys:
        self._open(site, 0, "advertise")
        if advert.site != site:
            raise PrivacyError(f"secagg: {site} sent an advertisement in the name of {advert.site}")
        self.adverts[site] = advert
        self._changed.set()
        await self._closed[0].wait()
        neighbours = self.setup.neighbours[site]
        return fpb.SecAggKeys(sites=self.sites, adverts=[self.adverts[v] for v in neighbours if v in self.adverts])

    async def share(self, site: str, shares: fpb.SecAggShares) -> fpb.SecAggInbox:
        self._open(site, 1, "share keys")
        if site not in self.adverts:
            raise StateError(f"secagg: {site} did not advertise keys in step 1 of {self.task.task_id}")
        allowed = set(self.setup.neighbours[site]) & set(self.adverts)
        if set(shares.shares) - allowed:
            raise PrivacyError(f"secagg: {site} sent shares to sites that are not its advertising neighbours")
        self.commitments[site] = bytes(shares.commitment)
        for recipient, blob in shares.shares.items():
            self.inbox[recipient][site] = bytes(blob)
        self._changed.set()
        await self._closed[1].wait()
        return fpb.SecAggInbox(shares={sender: blob for sender, blob in self.inbox[site].items()})

    async def unmask_request(self, site: str) -> fpb.SecAggSurvivors:
        if site not in self.sites:
            raise StateError(f"secagg: {site} is not a site of {self.task.task_id}")
        await self._closed[2].wait()
        if site not in self.survivors:
            raise StateError(f"secagg: the masked update of {site} is not in the sum of {self.task.task_id}")
        return fpb.SecAggSurvivors(survivors=sorted(self.survivors), dropped=sorted(self.dropped))

    async def reveal(self, site: str, message: fpb.SecAggReveal) -> None:
        self._open(site, 3, "unmask")
        if not self._closed[2].is_set() or site not in self.survivors:
            raise StateError(f"secagg: unmasking shares from {site}, which is not a survivor of {self.task.task_id}")
        if site in self.reveals:
            raise PrivacyError(f"secagg: {site} answered the unmasking request twice")
        self.reveals[site] = secagg.Reveal(
            site,
            seed_shares={v: secagg.Share(s.index, bytes(s.data)) for v, s in message.seed_shares.items()},
            key_shares={v: secagg.Share(s.index, bytes(s.data)) for v, s in message.key_shares.items()},
        )
        self._changed.set()

    def _open(self, site: str, step: int, what: str) -> None:
        if site not in self.sites:
            raise StateError(f"secagg: {site} is not a site of {self.task.task_id}")
        if self._closed[step].is_set():
            raise StateError(f"secagg: step {what} of {self.task.task_id} closed before {site}'s message arrived")

    # ------------------------------------------------------------------ the aggregator the round loop drives

    @property
    def count(self) -> int:
        return len(self.survivors)

    @property
    def total_weight(self) -> float:
        return float(len(self.survivors))

    def add(self, result: Result) -> None:
        """Add a survivor's masked update to the sum (mod 2^k); a placeholder is refused with its reason."""
        what = f"masked update from {result.site}"
        if result.site not in self.commitments:
            raise PayloadError(f"{what}: refused: it did not share its keys in step 2 of the round")
        if result.payload_format != FORMAT or not result.has_payload:
            raise PayloadError(
                f"{result.site} dropped out of secure aggregation after sharing its keys: no masked update "
                f"within secagg.step_timeout ({self.config.step_timeout:g} s)"
                if not result.has_payload
                else f"{what}: expected a {FORMAT} payload, got {result.payload_format or 'none'}"
            )
        vector = secagg.decode_masked(result.read(), self.params, self.length, what)
        self.total += vector
        self.total &= self.params.dtype.type(self.params.mask)
        self.survivors.add(result.site)

    def close(self) -> None:
        """Stop closing steps on time (the round is over, or the next one begins)."""
        self._driver.cancel()

    async def complete(self) -> None:
        """Step 4: tell the survivors who survived, take their shares, and unmask the sum (or refuse)."""
        self.close()
        self.dropped = set(self.commitments) - self.survivors
        self._closed[2].set()
        self.log.info(
            "round %d: secagg: %d masked updates in the sum, %d dropped after sharing keys%s",
            self.task.round,
            len(self.survivors),
            len(self.dropped),
            f" ({', '.join(sorted(self.dropped))})" if self.dropped else "",
        )
        await self._until(lambda: self.survivors - set(self.board.gone) <= set(self.reveals),
                          time.monotonic() + self.config.step_timeout)
        self._closed[3].set()
        adverts = {site: secagg.Advertisement(site, bytes(a.mask_key), bytes(a.channel_key))
                   for site, a in self.adverts.items()}
        try:
            self.unmasked = await asyncio.to_thread(
                secagg.unmask_total,
                self.setup,
                adverts,
                self.commitments,
                self.survivors,
                self.total,
                list(self.reveals.values()),
            )
        except PrivacyError as exc:
            raise PrivacyError(f"round {self.task.round}: {exc}") from None

    def finish(self, folder: Path, name: str) -> Model:
        """The task's tensors plus the mean of the survivors' differences (integer tensors unchanged)."""
        if self.unmasked is None:
            raise StateError("secagg: the sum was not unmasked")
        denominator = len(self.sites) if self.privacy is not None else len(self.survivors)
        mean = secagg.dequantize_sum(self.unmasked, len(self.survivors), self.params) / denominator
        offsets, start = {}, 0
        for tensor_name in secagg.masked_names(self.layout):
            size = int(np.prod(self.layout[tensor_name].shape))
            offsets[tensor_name] = (start, start + size)
            start += size

        def tensor(tensor_name: str) -> np.ndarray:
            base = read_tensor(self.reference, tensor_name)
            if tensor_name not in offsets:
                return base
            low, high = offsets[tensor_name]
            return (base.astype(np.float64) + mean[low:high].reshape(base.shape)).astype(base.dtype)

        return build_model(self.layout, tensor, folder, name)

    # ------------------------------------------------------------------ steps 1-3 closing on time

    async def _drive(self, first_deadline: float | None) -> None:
        """Close steps 1 and 2 when every site still in the job answered or on their deadlines, and drop the
        sites whose masked update does not come within step_timeout after step 2; each site left out gets
        a placeholder result, so that the round loop stops waiting for it."""
        step = self.config.step_timeout
        await self._until(lambda: set(self._active()) <= set(self.adverts), first_deadline)
        self._close(0, set(self.sites) - set(self.adverts), "did not advertise keys in step 1")
        await self._until(lambda: set(self._active()) & set(self.adverts) <= set(self.commitments),
                          time.monotonic() + step)
        self._close(1, set(self.adverts) - set(self.commitments), "did not share keys in step 2")
        await self._until(
            lambda: not any(self.board.accepts(site, self.task.task_id) for site in self.commitments),
            time.monotonic() + step,
        )
        late = {site for site in self.commitments if self.board.accepts(site, self.task.task_id)}
        for site in sorted(late):
            self._placeholder(site)

    def _close(self, step: int, missing: set[str], why: str) -> None:
        self._closed[step].set()
        done = len(self.adverts) if step == 0 else len(self.commitments)
        self.log.info("round %d: secagg: step %d closed with %d sites", self.task.round, step + 1, done)
        for site in sorted(missing):
            self.log.warning("round %d: secagg: %s %s; the round goes on without it", self.task.round, site, why)
            self._placeholder(site)

    def _placeholder(self, site: str) -> None:
        self.board.deliver(
            Result(site=site, task_id=self.task.task_id, num_samples=0.0, metrics={}, payload_format="", path=None)
        )

    def _active(self) -> list[str]:
        return [site for site in self.sites if site not in self.board.gone]

    async def _until(self, done: Callable[[], bool], deadline: float | None) -> None:
        """Wait until `done()` or `deadline` (monotonic seconds; None: no deadline)."""
        while not done():
            remaining = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if remaining <= 0:
                return
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                pass


class SecureRounds:
    """The SecAgg+ round in progress of one job, which the sites' steps reach by its task id."""

    def __init__(self, job_id: str, config: SecAggConfig, privacy: dp.DPParams | None, board: TaskBoard) -> None:
        self.job_id = job_id
        self.config = config
        self.privacy = privacy
        self.board = board
        self.current: SecureAggregator | None = None

    def new_round(
        self, task: Task, sites: list[str], layout: tensors.Layout, round_timeout: float, log: logging.Logger
    ) -> SecureAggregator:
        if self.current is not None:
            self.current.close()
        self.current = SecureAggregator(
            job_id=self.job_id,
            task=task,
            sites=sites,
            layout=layout,
            config=self.config,
            privacy=self.privacy,
            board=self.board,
            round_timeout=round_timeout,
            log=log,
        )
        return self.current

    def round_of(self, task_id: str) -> SecureAggregator:
        if self.current is None or self.current.task.task_id != task_id:
            raise StateError(f"secagg: {task_id} is not the round in progress (its steps closed or never began)")
        return self.current
