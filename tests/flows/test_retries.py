"""Retries: a transient fault in an extraction shard is retried and the run completes; bad input,
config and validation errors fail after one attempt; the GPU slot is strict only where it exists."""

from __future__ import annotations

import contextlib

import pytest
from pydantic import ValidationError

from egpt_core.errors import BadInputError, ConfigError


def _small_extract(fixture_paths, store):
    from egpt_core.config import ExtractConfig
    from flows.demo import CPU_FP32

    return ExtractConfig(dataset=str(fixture_paths["dataset"]), drafter=str(fixture_paths["eventgpt"]),
                         target=str(fixture_paths["videollava"]), store=str(store), load=CPU_FP32, max_scenes=2,
                         max_new_tokens=8, shard_size=3, batch_size=3)


@pytest.fixture
def no_retry_delay(monkeypatch):
    from tasks.extract import extract_group

    monkeypatch.setattr(extract_group, "retry_delay_seconds", [0.0])
    monkeypatch.setattr(extract_group, "retry_jitter_factor", None)


def _validation_error() -> ValidationError:
    from egpt_core.config import EvalConfig

    try:
        EvalConfig(store="s", out="o", batch_size=0)
    except ValidationError as exc:
        return exc
    raise AssertionError("expected a ValidationError")


def test_transient_shard_error_is_retried_and_the_run_completes(fixture_paths, tmp_path, monkeypatch,
                                                                 no_retry_delay, task_runs):
    from egpt_core.store import StoreWriter
    from flows.extract import extract

    real_commit = StoreWriter.commit_shard
    injected: list[str] = []

    def flaky_commit(self, *args, **kwargs):
        if not injected:
            injected.append("once")
            raise OSError("injected: connection reset while writing a shard")
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "commit_shard", flaky_commit)
    state = extract(_small_extract(fixture_paths, tmp_path / "store"), return_state=True)
    assert state.is_completed(), state.message
    assert injected == ["once"]
    assert state.result().counts == {"ok": 6, "failed": 0, "skipped": 0}
    runs = {r.name: r for r in task_runs(state.state_details.flow_run_id)}
    [extract_run] = [r for name, r in runs.items() if name.startswith("extract-")]
    assert extract_run.run_count == 2 and extract_run.state.name == "Completed"


@pytest.mark.parametrize(("error", "attempts"), [
    (BadInputError("scene-7.npy", "truncated .npy"), 1),
    (ConfigError("drafter hidden size 64 != target hidden size 32"), 1),
    (_validation_error(), 1),
    (OSError("S3 503 Slow Down"), 4),  # transient: 1 + 3 retries
])
def test_only_transient_errors_are_retried(fixture_paths, tmp_path, monkeypatch, no_retry_delay, error, attempts):
    from prefect import flow

    import tasks.extract

    calls: list[int] = []

    def broken_extraction(cfg, progress=None, only_pairs=None):
        calls.append(1)
        raise error

    monkeypatch.setattr(tasks.extract, "run_extraction", broken_extraction)

    @flow
    def one_group(cfg):
        return tasks.extract.extract_group(cfg)

    state = one_group(_small_extract(fixture_paths, tmp_path / "store"), return_state=True)
    assert state.is_failed()
    assert len(calls) == attempts


def test_a_real_config_error_fails_fast(tmp_path, task_runs):
    """egpt_core's own ConfigError, raised inside the task (an L6 LoRA evaluated on a store whose drafter
    rows were not re-extracted with it), ends the evaluate flow after one attempt."""
    from egpt_core.adapters.synthetic import write_synthetic_pair_store
    from egpt_core.config import EvalConfig
    from flows.evaluate import evaluate

    store = str(tmp_path / "store")  # inputs that exist: the flow's input check passes, the task refuses
    write_synthetic_pair_store(store, hidden_size=8, n_scenes=2, pairs_per_scene=2, shard_size=4)
    (tmp_path / "lora").mkdir()
    cfg = EvalConfig(store=store, out=str(tmp_path / "eval"), lora=str(tmp_path / "lora"))
    state = evaluate(cfg, return_state=True)
    assert state.is_failed()
    [run] = task_runs(state.state_details.flow_run_id)
    assert run.run_count == 1 and "re-extracted teacher-forced" in run.state.message


def test_two_prediction_sources_are_refused_before_any_run(tmp_path):
    """The one-prediction-source rule lives in EvalConfig itself: it fails when the config is built,
    (CLI, UI form and Python alike), before a flow or task run exists."""
    from egpt_core.config import EvalConfig

    with pytest.raises(ValidationError, match="exactly one prediction source"):
        EvalConfig(store=str(tmp_path), out=str(tmp_path / "eval"), identity=True, adapter_run=str(tmp_path))


def test_a_diverging_training_run_is_not_retried(tmp_path, task_runs):
    """A non-finite loss is deterministic: the train-adapter task fails once (no 3 retries, ~70 s of
    back-off on 0ff812c, which also ended the run Completed with NaN)."""
    from egpt_core.adapters.synthetic import write_synthetic_pair_store
    from egpt_core.config import TrainAdapterConfig
    from flows.train import train_adapter

    store = str(tmp_path / "store")
    write_synthetic_pair_store(store, hidden_size=16, n_scenes=6, pairs_per_scene=4, shard_size=24)
    state = train_adapter(TrainAdapterConfig(train=[store], out=str(tmp_path / "run"), epochs=2, lr=1e30),
                          return_state=True)
    assert state.is_failed()
    [run] = task_runs(state.state_details.flow_run_id)
    assert run.run_count == 1 and "diverged" in run.state.message


def test_gpu_slot_is_strict_only_when_the_server_has_the_limit(monkeypatch):
    from prefect import flow, get_client, task
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    import tasks.runtime as runtime

    acquired: list[tuple] = []

    @contextlib.contextmanager
    def spy(names, occupy=1, strict=False, lease_duration=300):
        acquired.append((names, occupy, strict, lease_duration))
        yield

    monkeypatch.setattr(runtime, "concurrency", spy)

    @task
    def gpu_work() -> int:
        with runtime.gpu_slot():
            return 1

    @flow
    def uses_gpu() -> int:
        return gpu_work()

    assert uses_gpu() == 1 and acquired == []
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=runtime.GPU_LIMIT, limit=1))
        try:
            assert uses_gpu() == 1
            assert acquired == [("gpu", 1, True, runtime.GPU_LEASE_S)]  # a dead holder's slot: back in 60 s
        finally:
            client.delete_global_concurrency_limit_by_name(runtime.GPU_LIMIT)
