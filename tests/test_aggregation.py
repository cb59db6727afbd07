"""FedAvg arithmetic and the round loop, without sockets: the controller runs against the real
TaskBoard with sites played by coroutines (the seam between controller and transport)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest

from fedgrid import tensors
from fedgrid.errors import PayloadError
from fedgrid.jobspec import ServerConfig, TargetMetric
from fedserver.aggregation import WeightedMean, weighted_metrics
from fedserver.fedavg import FedAvg, Model, PlainAggregator, RoundFailed
from fedserver.grid import Result, TaskBoard

LAYOUT_ARRAYS = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def test_weighted_mean_weights_by_sample_count() -> None:
    mean = WeightedMean(tensors.layout_of(LAYOUT_ARRAYS))
    mean.add({"w": np.full((3, 2), 1.0, np.float32), "b": np.ones(2, np.float32)}, 1.0, "a")
    mean.add({"w": np.full((3, 2), 4.0, np.float32), "b": np.full(2, 4.0, np.float32)}, 3.0, "b")
    result = mean.result()
    assert result["w"].dtype == np.float32
    np.testing.assert_allclose(result["w"], 3.25)
    assert mean.total_weight == 4.0 and mean.count == 2


def test_half_precision_updates_are_weighted_in_float64_and_do_not_overflow() -> None:
    layout = {"h": np.zeros(3, np.float16)}
    mean = WeightedMean(tensors.layout_of(layout))
    mean.add({"h": np.full(3, 60000.0, np.float16)}, 1000.0, "a")
    mean.add({"h": np.full(3, 59968.0, np.float16)}, 3000.0, "b")
    result = mean.result()["h"]
    assert result.dtype == np.float16
    np.testing.assert_array_equal(result, np.float16(59976.0))


@pytest.mark.parametrize(
    ("update", "weight", "message"),
    [
        ({"w": np.zeros((3, 2), np.float32)}, 1.0, "missing b"),
        ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, 1.0, "shape"),
        ({"w": np.zeros((3, 2), np.float64), "b": np.zeros(2, np.float32)}, 1.0, "dtype"),
        ({"w": np.full((3, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}, 1.0, "NaN"),
        ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}, 0.0, "positive"),
    ],
)
def test_a_bad_update_is_refused_and_changes_nothing(update: dict, weight: float, message: str) -> None:
    mean = WeightedMean(tensors.layout_of(LAYOUT_ARRAYS))
    mean.add({"w": np.full((3, 2), 2.0, np.float32), "b": np.ones(2, np.float32)}, 2.0, "good")
    with pytest.raises(PayloadError, match=message):
        mean.add(update, weight, "bad")
    assert mean.count == 1
    np.testing.assert_allclose(mean.result()["w"], 2.0)


def test_weighted_metrics_skip_missing_and_non_finite() -> None:
    got = weighted_metrics([({"accuracy": 0.5, "loss": 1.0}, 100), ({"accuracy": 1.0, "loss": float("nan")}, 300)])
    assert got == {"accuracy": pytest.approx(0.875), "loss": pytest.approx(1.0)}


def test_safetensors_round_trip_refuses_garbage() -> None:
    data = tensors.encode(LAYOUT_ARRAYS)
    assert set(tensors.decode(data)) == {"w", "b"}
    with pytest.raises(PayloadError, match="not a valid safetensors"):
        tensors.decode(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")


def test_our_safetensors_writer_is_read_back_exactly_by_the_safetensors_library(tmp_path: Path) -> None:
    from safetensors.numpy import load_file as st_load_file
    from safetensors.torch import load as torch_load

    rng = np.random.default_rng(0)
    arrays = {
        "f16": rng.standard_normal((3, 5)).astype(np.float16),
        "f32": rng.standard_normal((7, 4)).astype(np.float32),
        "f64.big_endian": rng.standard_normal(6).astype(">f8"),
        "i8": rng.integers(-100, 100, 9).astype(np.int8),
        "i16": rng.integers(-100, 100, (2, 2)).astype(np.int16),
        "i32": np.array(7, np.int32),
        "i64.empty": np.zeros((0, 3), np.int64),
        "u8": rng.integers(0, 255, 5).astype(np.uint8),
        "bool": rng.random(11) > 0.5,
        "f32.transposed": rng.standard_normal((4, 3)).astype(np.float32).T,
    }
    for decoded in (tensors.decode(tensors.encode(arrays)), _saved_and_loaded(arrays, tmp_path, st_load_file)):
        assert set(decoded) == set(arrays)
        for name, array in arrays.items():
            assert decoded[name].shape == array.shape and decoded[name].dtype == array.dtype.newbyteorder("=")
            np.testing.assert_array_equal(decoded[name], array)
    assert torch_load(tensors.encode({"w": np.arange(6, dtype=np.float32)}))["w"].tolist() == list(range(6))
    with pytest.raises(PayloadError, match="'c'.*complex64"):
        tensors.encode({"c": np.zeros(2, np.complex64)})


def _saved_and_loaded(arrays: dict, tmp_path: Path, load_file: object) -> dict:
    tensors.save_file(arrays, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors.tmp").exists()
    return load_file(str(tmp_path / "model.safetensors"))  # type: ignore[operator]


async def _site(board: TaskBoard, name: str, tmp: Path, value: float, samples: int, slow_rounds: set[int]) -> None:
    """A site as fedclient.api plays it: evaluate what a task brings if asked, then train on it; the
    evaluation's answer arrives with the training result."""
    last = ""
    while True:
        task = await board.next_task(name, last, timeout=5)
        if task is None or task.kind == "end":
            return
        last = task.task_id
        if task.round in slow_rounds:
            await asyncio.sleep(0.6)
        if task.evaluate_task_id:
            board.deliver(Result(name, task.evaluate_task_id, samples, {"accuracy": value / 10}, "", None))
        if task.kind == "evaluate":
            result = Result(name, task.task_id, samples, {"accuracy": value / 10}, "", None)
        else:
            path = tmp / f"{name}-{task.task_id}.safetensors"
            arrays = {k: np.full(v.shape, value, np.float32) for k, v in LAYOUT_ARRAYS.items()}
            tensors.save_file(arrays, path)
            result = Result(name, task.task_id, samples, {}, tensors.FORMAT, path, path.stat().st_size)
        if not board.deliver(result):
            result.discard()


def _run(tmp: Path, config: ServerConfig, sites: dict[str, tuple[float, int, set[int]]]) -> tuple:
    async def main() -> tuple:
        board = TaskBoard("job", list(sites))
        rounds = []

        async def on_round(record: object) -> None:
            rounds.append(record)

        workflow = FedAvg(
            config=config,
            board=board,
            aggregator=lambda model: PlainAggregator(tensors.layout_of(LAYOUT_ARRAYS), model, config.clip_norm),
            result_dir=tmp / "result",
            checkpoint_dir=tmp / "checkpoint",
            log=logging.getLogger("test"),
            on_round=on_round,
        )
        workers = [asyncio.create_task(_site(board, n, tmp, *args)) for n, args in sites.items()]
        try:
            outcome = await workflow.run(Model.of(tensors.FORMAT, tensors.encode(LAYOUT_ARRAYS)))
        finally:
            await board.close()
            await asyncio.gather(*workers, return_exceptions=True)
        return outcome, rounds

    return asyncio.run(main())


def test_fedavg_rounds_weighted_result_checkpoints_and_best_model(tmp_path: Path) -> None:
    config = ServerConfig(num_rounds=3, min_clients=2)
    outcome, rounds = _run(tmp_path, config, {"a": (1.0, 100, set()), "b": (4.0, 300, set())})
    assert [r.round for r in rounds] == [1, 2, 3]
    assert all(r.sites_answered == 2 for r in rounds)
    final = tensors.load_file(outcome.final_model)
    np.testing.assert_allclose(final["w"], 3.25)
    assert outcome.final_metrics["accuracy"] == pytest.approx(0.325)
    assert (tmp_path / "checkpoint" / "global_model.safetensors").exists()
    assert outcome.best_model is not None and outcome.best_model.exists()


def test_a_rounds_seconds_end_at_its_aggregate_not_at_its_evaluation(tmp_path: Path) -> None:
    """Round 1's evaluation arrives with round 2's updates: a slow round 2 must not count in round 1."""
    _outcome, rounds = _run(tmp_path, ServerConfig(num_rounds=3, min_clients=1), {"a": (1.0, 100, {2})})
    assert rounds[0].seconds < 0.5 <= rounds[1].seconds


def test_straggler_is_dropped_after_round_timeout(tmp_path: Path) -> None:
    config = ServerConfig(num_rounds=2, min_clients=2, min_responses=1, round_timeout=0.3)
    outcome, rounds = _run(tmp_path, config, {"a": (1.0, 100, set()), "b": (9.0, 100, {1, 2})})
    assert [r.sites_answered for r in rounds] == [1, 1]
    np.testing.assert_allclose(tensors.load_file(outcome.final_model)["w"], 1.0)
    assert not list(tmp_path.glob("b-round-*-train.safetensors")), "late updates must be dropped, not kept"


def test_round_fails_below_min_responses(tmp_path: Path) -> None:
    config = ServerConfig(num_rounds=1, min_clients=2, min_responses=2, round_timeout=0.3)
    with pytest.raises(RoundFailed, match="1 of 2 sites sent a usable update, at least 2 needed"):
        _run(tmp_path, config, {"a": (1.0, 100, set()), "b": (9.0, 100, {1})})


def test_target_metric_stops_early(tmp_path: Path) -> None:
    config = ServerConfig(num_rounds=10, min_clients=1, target_metric=TargetMetric(name="accuracy", value=0.05))
    outcome, rounds = _run(tmp_path, config, {"a": (1.0, 100, set())})
    assert len(rounds) == 1
    assert "accuracy reached" in outcome.stopped_early


def test_client_fraction_chooses_at_least_min_clients(tmp_path: Path) -> None:
    config = ServerConfig(num_rounds=2, min_clients=2, client_fraction=0.25)
    sites = {n: (1.0, 10, set()) for n in "abcdef"}
    _outcome, rounds = _run(tmp_path, config, sites)
    assert [r.sites_asked for r in rounds] == [2, 2]


def test_clipping_bounds_each_update_before_averaging(tmp_path: Path) -> None:
    config = ServerConfig(num_rounds=1, min_clients=2, clip_norm=1.0)
    outcome, _rounds = _run(tmp_path, config, {"a": (0.0, 100, set()), "b": (100.0, 100, set())})
    final = tensors.load_file(outcome.final_model)
    norm_b = float(np.sqrt(8 * 100.0**2))
    np.testing.assert_allclose(final["w"], 0.5 * 100.0 / norm_b, rtol=1e-5)


def test_server_momentum_moves_further_than_plain_fedavg(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "fast").mkdir()
    plain, _ = _run(tmp_path / "plain", ServerConfig(num_rounds=1, min_clients=1), {"a": (1.0, 10, set())})
    fast, _ = _run(tmp_path / "fast", ServerConfig(num_rounds=1, min_clients=1, server_lr=2.0), {"a": (1.0, 10, set())})
    np.testing.assert_allclose(tensors.load_file(plain.final_model)["w"], 1.0)
    np.testing.assert_allclose(tensors.load_file(fast.final_model)["w"], 2.0)


def test_settings_that_need_plaintext_are_refused_with_encryption() -> None:
    from fedgrid.errors import JobSpecError
    from fedgrid.jobspec import parse_server_config

    base = {"num_rounds": 1, "min_clients": 1, "encryption": "ckks"}
    for extra, message in (({"server_lr": 0.5}, "server optimizer"), ({"clip_norm": 1.0}, "clipping on the server")):
        with pytest.raises(JobSpecError, match=f"cannot be combined with .*{message}"):
            parse_server_config({**base, **extra}, "app/config/server.json")
    assert parse_server_config(base, "x").encryption == "ckks"
