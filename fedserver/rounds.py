"""The round loop of every job: it reads top to bottom, and a `Strategy` decides what varies per algorithm.

Each round: the strategy chooses the sites (by default a fraction C of those still in the job, at least
min_clients) and what their training task carries (the global model, settings such as FedProx's mu,
tensors such as SCAFFOLD's control variate); each update is folded into a running weighted mean as it
arrives; the round closes when everyone answered (or after `round_timeout` with at least `min_responses`
updates; a straggler's late update is dropped); the strategy turns the aggregate into the new global model
(FedOpt's server optimizer, SCAFFOLD's steps). Every site then evaluates that model on its validation data
(riding on the next round's task), the strategy combines the metrics, and an operator's server-side
evaluator may add its own. Checkpoint (with the strategy's state), track the best model, stop at
`num_rounds` or once the target metric is reached.

With encryption the same loop runs on ciphertexts: the aggregator adds them without decrypting, the
sites decrypt, and at the end one site (by policy) uploads the decrypted final and best models. Under
SecAgg+ the aggregator folds masked updates and, once they are in, gathers what unmasks their sum
(fedserver/secure_rounds.py). With differential privacy a ledger charges every round to the job's privacy
budget: ε goes into the round's record, and a round that would exceed the target is not started.

One module of about 500 lines: the loop is meant to be read in one place, top to bottom, because its steps
share one round's state (the task that carries the previous model's evaluation, the aggregator, the scores,
the pending record); what varies is outside it, in fedserver/strategies/, the aggregators
(fedserver/aggregation.py, fedserver/privacy.py, fedserver/secure_rounds.py) and the checkpoint
(fedserver/checkpoint.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedgrid import tensors
from fedgrid.errors import EncryptionError, FedgridError, PayloadError, StateError
from fedgrid.files import write_atomic
from fedgrid.jobspec import ServerConfig
from fedgrid.privacy_config import SITES_SETTING
from fedgrid.serde import RoundInfo
from fedgrid.tensor_file import copy_file
from fedserver import checkpoint, metrics
from fedserver.aggregation import Aggregator
from fedserver.checkpoint import Checkpoint
from fedserver.grid import Result, SiteGone, Task, TaskBoard
from fedserver.model import Model
from fedserver.privacy import PrivacyLedger
from fedserver.server_evaluation import ServerEvaluator
from fedserver.strategies import Aggregate, RoundContext, Strategy

T = TypeVar("T")


class RoundFailed(FedgridError):
    """A round could not close: too few sites answered with a usable update."""


@dataclass
class Outcome:
    rounds: list[RoundInfo] = field(default_factory=list)
    evaluated: list[Model] = field(default_factory=list)
    """The models whose evaluation was recorded, in order: the last is the final model."""
    best: Model | None = None
    stopped_early: str = ""
    best_round: int = 0
    best_value: float | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    final_model: Path | None = None
    best_model: Path | None = None


@dataclass
class Finished:
    """A round whose model is aggregated and waits for its evaluation (which rides on the next round)."""

    round: int
    model: Model
    seconds: float
    """From sending the round's task to its aggregate: the evaluation rides on the next round."""
    asked: int
    answered: int
    moved: int
    recorded: bool = False
    server_metrics: asyncio.Future[dict[str, float]] | None = None
    """The server-side evaluation of `model`, running while the next round trains."""
    privacy: dict[str, float] = field(default_factory=dict)
    """Private jobs: ε spent once this round's model is released."""


class RoundLoop:
    def __init__(
        self,
        *,
        config: ServerConfig,
        board: TaskBoard,
        strategy: Strategy,
        layout: tensors.Layout,
        aggregator: Callable[[Model, tensors.Layout, Task, list[str]], Aggregator],
        result_dir: Path,
        checkpoint_dir: Path,
        model_dir: Path,
        log: logging.Logger,
        on_round: Callable[[RoundInfo], Awaitable[None]],
        on_round_start: Callable[[int], Awaitable[None]] | None = None,
        release_model: Callable[[Model, str], Awaitable[Path]] | None = None,
        keep_dir: Path | None = None,
        evaluator: ServerEvaluator | None = None,
        resume: Checkpoint | None = None,
        attempt: int = 0,
        recorded: list[RoundInfo] | None = None,
        privacy: PrivacyLedger | None = None,
    ) -> None:
        self.config = config
        self.board = board
        self.strategy = strategy
        self.layout = layout
        """The global model's tensors (a training result may hold more: `strategy.result_layout`)."""
        self.new_aggregator = aggregator
        self.result_dir = result_dir
        self.checkpoint_dir = checkpoint_dir
        self.model_dir = model_dir
        """Where global models too large to keep in memory live while they are needed."""
        self.log = log
        self.on_round = on_round
        self.on_round_start = on_round_start
        self.release_model = release_model
        self.keep_dir = keep_dir
        """When set, received updates are moved here after folding instead of deleted (audit)."""
        self.evaluator = evaluator
        self.context = RoundContext(
            sites=tuple(board.active_sites()),
            client_fraction=config.client_fraction,
            min_clients=config.min_clients,
            rng=random.Random(config.seed),
            model_dir=model_dir,
        )
        self.resume = resume
        """The checkpoint a job restarted by the server continues from (None: from round 1)."""
        self.attempt = attempt
        """How many times the job was resumed: task ids carry it, so no worker mistakes a task for one it did."""
        self.recorded = recorded or []
        """Rounds the job store already holds (a resumed job's)."""
        self.privacy = privacy
        """Private jobs: the accountant of the job's privacy budget."""
        self.model: Model | None = None
        self._recording = Background()
        """Round records on their way to the store, the watchers and the best-model file."""
        self._saving = Background()
        """The checkpoint being written while the next round runs."""

    async def _compute(self, small: bool, work: Callable[..., T], *args: Any) -> T:
        """A round's arithmetic: on the event loop when `small` (a few ms on plaintext models in memory, less
        than handing it to a thread and back costs: bench/round_overhead.py), else in a thread, so that
        large models and ciphertexts never hold up the other streams."""
        if small:
            return work(*args)
        return await asyncio.to_thread(work, *args)

    @staticmethod
    def _small(payload: Model | Result | None) -> bool:
        """A plaintext model or update held in memory (up to fedserver.model.MEMORY_LIMIT)."""
        return payload is not None and payload.data is not None and payload.payload_format == tensors.FORMAT

    @property
    def _built_in(self) -> bool:
        """Whether the strategy is one of ours (an operator's `module:` strategy always runs in a thread)."""
        return type(self.strategy).__module__.startswith("fedserver.strategies.")

    def min_responses(self) -> int:
        return self.config.min_responses or self.config.min_clients

    def active_sites(self, round_no: int) -> list[str]:
        active = self.board.active_sites()
        if len(active) < self.config.min_clients:
            raise RoundFailed(
                f"round {round_no}: only {len(active)} sites are still in the job "
                f"({', '.join(active) or 'none'}); min_clients is {self.config.min_clients}"
            )
        return active

    async def run(self, initial: Model) -> Outcome:
        """Rounds until `num_rounds` or the target metric; returns what the job produced.

        The evaluation of round r's model rides on round r+1's training task (each site scores the model
        it receives, answers, then trains on it), so a round costs one exchange, not two; sites not
        chosen to train that round get the evaluation alone. The last model is evaluated on its own.
        """
        try:
            return await self._rounds(initial)
        finally:
            await self._saving.wait()
            await self._recording.wait()

    def _task_id(self, round_no: int, kind: str) -> str:
        return f"round-{round_no}-{kind}" + (f".{self.attempt}" if self.attempt else "")

    def _resumed(self, initial: Model, outcome: Outcome) -> tuple[Model, Finished | None, int]:
        """(the model, the finished round waiting for its record, the first round to run): from round 1, or
        from the checkpoint of a resumed job with its strategy, random state and best model restored."""
        point = self.resume
        if point is None:
            return initial, None, 1
        self.strategy.restore(point.strategy)
        if self.privacy is not None:
            self.privacy.restore(point.privacy)
        if point.rng_state is not None:
            self.context.rng.setstate(point.rng_state)
        figures = point.figures
        previous = Finished(point.round, point.model, figures.seconds, figures.asked, figures.answered, figures.moved)
        previous.privacy = self.privacy.metrics() if self.privacy is not None else {}
        previous.recorded = any(r.round == point.round for r in self.recorded)
        outcome.rounds = list(self.recorded)
        for record in self.recorded:
            if self._improved(record.metrics, outcome.best_value):
                outcome.best_round, outcome.best_value = record.round, record.metrics.get(self.config.key_metric)
        best_file = self.result_dir / "best_model.safetensors"
        if point.model.payload_format != tensors.FORMAT:
            outcome.best = point.model if outcome.best_round == point.round else point.best
        elif best_file.exists():
            outcome.best = Model.in_memory(tensors.FORMAT, best_file.read_bytes())
        if outcome.rounds:
            outcome.final_metrics = outcome.rounds[-1].metrics
        self.log.info(
            "resuming after round %d from its checkpoint (attempt %d; rounds recorded: %d)",
            point.round,
            self.attempt,
            len(self.recorded),
        )
        return point.model, previous, point.round + 1

    async def _rounds(self, initial: Model) -> Outcome:
        outcome = Outcome()
        cfg = self.config
        model, previous, first = self._resumed(initial, outcome)
        for round_no in range(first, cfg.num_rounds + 1):
            if self.privacy is not None:
                spent = await asyncio.to_thread(self.privacy.stop_reason, round_no)
                if spent:
                    outcome.stopped_early = spent
                    self.log.info("stopping early: %s", spent)
                    if previous is not None and not previous.recorded:
                        await self._evaluate_alone(previous, outcome)
                    break
            started = time.monotonic()
            if self.on_round_start is not None:
                await self.on_round_start(round_no)
            active = self.active_sites(round_no)
            small = self._small(model) and self._built_in
            plan = await self._compute(small, self.strategy.configure_train, round_no, active, model, self.context)
            evaluation = self._evaluation_task(previous) if previous is not None else None
            settings = dict(plan.settings)
            if self.privacy is not None:
                settings[SITES_SETTING] = float(len(plan.sites))  # each site's share of the noise
            train = Task(
                task_id=self._task_id(round_no, "train"),
                kind="train",
                round=round_no,
                total_rounds=cfg.num_rounds,
                model=plan.payload,
                evaluate_task_id=evaluation.task_id if evaluation else "",
                evaluate_round=evaluation.round if evaluation else 0,
                settings=settings,
            )
            self.model = model
            trained = await self._round(train, plan.sites, evaluation, previous, outcome)
            if trained is None:
                break
            seconds = time.monotonic() - started
            previous = Finished(round_no, trained[0], seconds, len(plan.sites), trained[1], trained[2])
            if self.privacy is not None:
                await asyncio.to_thread(self.privacy.charge, len(plan.sites), trained[1])
                previous.privacy = self.privacy.metrics()
                self.log.info("round %d: ε spent %.4g (δ %g)", round_no, self.privacy.spent, self.privacy.params.delta)
            if self.evaluator is not None:
                previous.server_metrics = self.evaluator.start(round_no, previous.model)
            model = previous.model
            self._prune([model, train.model, outcome.best])
            point = checkpoint.Checkpoint(
                round=round_no,
                attempt=self.attempt,
                model=model,
                figures=checkpoint.RoundFigures(previous.seconds, previous.asked, previous.answered, previous.moved),
                strategy=self.strategy.state(),
                rng_state=self.context.rng.getstate(),
                best_round=outcome.best_round,
                best_value=outcome.best_value,
                best=outcome.best if model.payload_format != tensors.FORMAT else None,
                privacy=self.privacy.state() if self.privacy is not None else [],
            )
            await self._saving.start(
                asyncio.to_thread(checkpoint.write, self.checkpoint_dir, point, self.strategy.name)
            )
        else:
            if previous is not None and not previous.recorded:
                await self._evaluate_alone(previous, outcome)
        await self._recording.wait()
        final = outcome.evaluated[-1] if outcome.evaluated else model
        outcome.final_model, outcome.best_model = await self._finish(final, outcome.best)
        return outcome

    def _evaluation_task(self, finished: Finished) -> Task:
        model = finished.model
        return Task(
            task_id=self._task_id(finished.round, "evaluate"),
            kind="evaluate",
            round=finished.round,
            total_rounds=self.config.num_rounds,
            model=model,
        )

    async def _round(
        self, train: Task, sites: list[str], evaluation: Task | None, previous: Finished | None, outcome: Outcome
    ) -> tuple[Model, int, int] | None:
        """One exchange: train `sites` on the current model and, riding on it, evaluate that model on
        every site. Returns (new model, updates folded, bytes moved), or None once the evaluation shows
        the target metric reached (the round's training is then dropped)."""
        cfg = self.config
        active = self.board.active_sites()
        expect = {train.task_id: sites}
        if evaluation is not None:
            expect[evaluation.task_id] = active
            self.board.expect(evaluation.task_id, sites)
            others = [s for s in active if s not in sites]
            if others:
                await self.board.ask(evaluation, others)
        await self.board.ask(train, sites)
        self.log.info("round %d: model sent to %s", train.round, ", ".join(sites))
        aggregator = self.new_aggregator(self.model, self.strategy.result_layout(self.layout), train, sites)
        moved = train.model.size * len(active) if train.model else 0
        refused: list[str] = []
        scores: list[tuple[dict[str, float], float]] = []
        scoring = set(active) if evaluation is not None else set()
        timeout = cfg.round_timeout + aggregator.grace if cfg.round_timeout else 0.0
        async for item in self.board.collect(expect, timeout):
            if isinstance(item, SiteGone):
                self.log.warning("round %d: %s left the job: %s", train.round, item.site, item.reason)
                if item.site in sites:
                    refused.append(f"{item.site}: {item.reason}")
                scoring.discard(item.site)
            elif evaluation is not None and item.task_id == evaluation.task_id:
                scores.append((item.metrics, item.num_samples))
                item.discard()
                scoring.discard(item.site)
            else:
                moved += item.size
                await self._fold(aggregator, item, train, refused)
            if evaluation is not None and previous is not None and not scoring and not previous.recorded:
                if await self._record(previous, scores, outcome):
                    return None
        if evaluation is not None and previous is not None and not previous.recorded:
            if await self._record(previous, scores, outcome):
                return None
        answered = aggregator.count
        missing = len(sites) - answered - len(refused)
        if missing > 0:
            self.log.warning(
                "round %d: %d of %d sites did not answer within %.0f s; their late updates will be dropped",
                train.round,
                missing,
                len(sites),
                cfg.round_timeout,
            )
        need = min(self.min_responses(), len(sites))
        if answered < need:
            detail = f" ({'; '.join(refused)})" if refused else ""
            raise RoundFailed(
                f"round {train.round}: {answered} of {len(sites)} sites sent a usable update, "
                f"at least {need} needed{detail}"
            )
        await aggregator.complete()
        started = time.perf_counter()
        suffix = "safetensors" if aggregator.payload_format == tensors.FORMAT else "ckks"
        small = self._small(self.model) and aggregator.payload_format == tensors.FORMAT
        model = await self._compute(small, aggregator.finish, self.model_dir, f"round-{train.round}.{suffix}")
        self.log.info(
            "round %d: aggregate of %d updates serialized in %.3f s (%d bytes%s)",
            train.round,
            aggregator.count,
            time.perf_counter() - started,
            model.size,
            "" if model.data is not None else f", in {model.path}",
        )
        aggregate = Aggregate(model, aggregator.count, aggregator.total_weight)
        assert self.model is not None
        step, small = self.strategy.aggregate_train, self._small(model) and self._built_in
        model = await self._compute(small, step, train.round, self.model, aggregate, self.context)
        return model, answered, moved

    async def _fold(self, aggregator: Aggregator, item: Result, task: Task, refused: list[str]) -> None:
        try:
            started = time.perf_counter()
            await self._compute(self._small(item), aggregator.add, item)
            self.log.info(
                "round %d: update from %s folded in (%d samples, %d bytes, %.3f s)",
                task.round,
                item.site,
                item.num_samples,
                item.size,
                time.perf_counter() - started,
            )
        except (PayloadError, EncryptionError) as exc:
            self.log.warning("round %d: update from %s refused: %s", task.round, item.site, exc)
            metrics.update_refused(exc)
            refused.append(f"{item.site}: {exc}")
        finally:
            self._dispose(item, task)

    async def _evaluate_alone(self, finished: Finished, outcome: Outcome) -> None:
        """The last model has no next round to ride on: an evaluation task of its own for every site."""
        task = self._evaluation_task(finished)
        sites = self.board.active_sites()
        await self.board.ask(task, sites)
        finished.moved += finished.model.size * len(sites)
        scores: list[tuple[dict[str, float], float]] = []
        async for item in self.board.results(task, sites, self.config.round_timeout):
            if isinstance(item, Result):
                scores.append((item.metrics, item.num_samples))
                item.discard()
        await self._record(finished, scores, outcome)

    async def _record(self, finished: Finished, scores: list[tuple[dict[str, float], float]], outcome: Outcome) -> bool:
        """Keep a round's weighted metrics, best model and progress; True when the target is reached."""
        finished.recorded = True
        if not scores:
            self.log.warning("round %d: no site reported evaluation metrics", finished.round)
        metrics = self.strategy.aggregate_evaluate(finished.round, scores)
        self.log.info(
            "round %d: global model evaluated by %d sites: %s",
            finished.round,
            len(scores),
            ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()) or "no metrics",
        )
        if finished.server_metrics is not None:
            metrics = {**metrics, **await finished.server_metrics}
        metrics = {**metrics, **finished.privacy}
        record = RoundInfo(
            round=finished.round,
            sites_asked=finished.asked,
            sites_answered=finished.answered,
            seconds=finished.seconds,
            metrics=metrics,
            bytes_moved=finished.moved,
        )
        outcome.rounds.append(record)
        outcome.evaluated.append(finished.model)
        outcome.final_metrics = metrics
        best = None
        if self._improved(metrics, outcome.best_value):
            outcome.best_round, outcome.best_value = finished.round, metrics.get(self.config.key_metric)
            outcome.best = finished.model
            best = finished.model if finished.model.payload_format == tensors.FORMAT else None
        # The next round need not wait for the disk, the job store and the watchers.
        await self._recording.start(self._keep(record, best))
        target = self.config.target_metric
        if target is not None and target.reached(metrics):
            outcome.stopped_early = (
                f"{target.name} reached {metrics[target.name]:.4f} (target {target.mode} {target.value}) "
                f"in round {finished.round}"
            )
            self.log.info("stopping early: %s", outcome.stopped_early)
            return True
        return False

    async def _keep(self, record: RoundInfo, best: Model | None) -> None:
        if best is not None:
            await asyncio.to_thread(best.save, self.result_dir / "best_model.safetensors")
        await self.on_round(record)

    def _prune(self, keep: list[Model | None]) -> None:
        """Delete the model files of earlier rounds that no task, evaluation or best model refers to."""
        wanted = {m.path for m in keep if m is not None and m.path is not None}
        for path in self.model_dir.glob("round-*"):
            if path not in wanted:
                path.unlink(missing_ok=True)

    def _dispose(self, item: Result, task: Task) -> None:
        if self.keep_dir is not None and item.has_payload:
            self.keep_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.keep_dir / f"{task.task_id}-{item.site}.{item.payload_format or 'bin'}", item.read())
        item.discard()

    def _improved(self, metrics: dict[str, float], best: float | None) -> bool:
        value = metrics.get(self.config.key_metric)
        if value is None:
            return best is None
        if best is None:
            return True
        return value > best if self.config.key_metric_mode == "max" else value < best

    async def _finish(self, final: Model, best: Model | None) -> tuple[Path, Path | None]:
        final_path = self.result_dir / "final_model.safetensors"
        best_path = self.result_dir / "best_model.safetensors"
        if final.payload_format == tensors.FORMAT:
            await asyncio.to_thread(final.save, final_path)
            return final_path, best_path if best_path.exists() else None
        if self.release_model is None:
            raise StateError("encrypted job without a release policy: no site may upload the final model")
        await self.release_model(final, "final")
        if best is not None and best is not final:
            await self.release_model(best, "best")
        elif best is final:
            await asyncio.to_thread(copy_file, final_path, best_path)
        return final_path, best_path if best_path.exists() else None


class Background:
    """One piece of work at a time that runs while the rounds go on; the next waits for the previous,
    so what it writes lands in order, and its errors surface at the next `start` or `wait`."""

    def __init__(self) -> None:
        self._task: asyncio.Future[None] | None = None

    async def start(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await self.wait()
        except BaseException:
            work.close()
            raise
        self._task = asyncio.ensure_future(work)

    async def wait(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await task
