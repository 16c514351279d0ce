"""The pipeline flow end to end on tiny fixtures: a cold run, a rerun served from the cache, and a
run with one adapter's settings changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: task-run name prefixes of the tasks that do model work
EXPENSIVE = ("features-", "extract-", "train-", "evaluate-", "export-drafter", "speculate-")


@pytest.fixture(scope="module")
def cfg(fixture_paths, tmp_path_factory, secret):
    """The demo's pipeline; its storage options name a Prefect Secret block holding a credential,
    which every filesystem call of the run receives (the local filesystem ignores it)."""
    from prefect.blocks.system import Secret

    from flows.demo import demo_config

    Secret(value={"key": secret}).save("egpt-test-credentials", overwrite=True)
    base = demo_config(tmp_path_factory.mktemp("pipeline"), fixture_paths, lora=True)
    extract = base.extract.model_copy(update={"storage_options": {"secret_block": "egpt-test-credentials"}})
    return base.model_copy(update={"extract": extract})


@pytest.fixture(scope="module")
def first_run(cfg):
    from flows.pipeline import pipeline

    return pipeline(cfg, return_state=True)


def _artifacts(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_pipeline_end_to_end(first_run, states_by_name):
    assert first_run.is_completed(), first_run.message
    result = first_run.result()
    states = states_by_name(first_run)
    assert states and "Cached" not in states.values()
    store = result.stores[0]
    assert store.counts == {"ok": 12, "failed": 0, "skipped": 0} and store.lm_head and store.mode == "shared_prefix"
    assert [r.name for r in result.runs] == ["identity", "L1", "L4", "L6"]
    for run in result.runs:
        assert (Path(run.out_url) / "metrics.json").is_file() and run.n_pairs == 3  # the held-out scene: 1 of 4 (seeded split by scene)
    l6 = json.loads((Path(result.runs[-1].out_url) / "metrics.json").read_text())
    assert l6["inputs"]["store_mode"] == "retf" and "-retf-" in l6["inputs"]["store"]
    assert result.lora.merged_drafter and (Path(result.lora.merged_drafter.path) / "config.json").is_file()
    assert (Path(result.comparison.out_url) / "comparison.md").is_file()
    assert all(row in result.comparison.markdown for row in ("| identity |", "| L1 |", "| L4 |", "| L6 |"))

    # stage 5: every configuration measured in the real loop on the evaluated (held-out) pairs, lossless,
    # its measured columns next to the simulated ones, L6 cross-checked against its retf store
    bench = result.benchmark
    assert [r.name for r in bench.runs] == ["target_only", "identity", "L1", "L4", "L6"]
    for run in bench.runs[1:]:
        assert run.n_pairs == 3 and run.mode == "resync"
        assert all(run.summary[f"lossless_mismatches_gamma{g}"] == 0 for g in (1, 3, 5))
        assert (Path(run.out_url) / "sd_pairs.parquet").is_file()
    l6_sd = json.loads((Path(bench.runs[-1].out_url) / "sd_metrics.json").read_text())
    assert "-retf-" in l6_sd["inputs"]["store"] and l6_sd["cross_check"]["per_gamma"]["5"]["round_agreement"] >= 0.99
    assert "measured acc len γ=5" in result.comparison.markdown
    rows = {r["name"]: r for r in result.comparison.rows}
    assert rows["L1"]["measured_acceptance_length_gamma5"] == bench.runs[2].summary["acceptance_length_gamma5"]
    assert (Path(bench.out_url) / "benchmark.md").is_file() and (Path(bench.out_url) / "speedup_per_configuration.png").is_file()

    artifacts = _artifacts(first_run.state_details.flow_run_id)
    keys = {a.key for a in artifacts}
    assert {"pipeline-report", "comparison", "store-store", "eval-identity", "eval-l4", "sd-benchmark",
            "sd-l1"} <= keys
    assert any(a.type == "progress" and a.data == 100.0 for a in artifacts)


def test_credentials_never_leak(cfg, first_run, secret, prefect_harness, task_runs):
    """The Secret block's credential stays out of flow and task parameters, logs, artifacts, run
    names, results, output files and the server's database (only the block's name is stored)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    import egpt_core.fsio

    assert secret in egpt_core.fsio._secrets  # the credential did reach the filesystem layer
    run_id = first_run.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        flow_run = client.read_flow_run(run_id)
    assert logs and not [log.message for log in logs if secret in log.message]
    assert secret not in flow_run.name
    assert flow_run.parameters["cfg"]["extract"]["storage_options"] == {"secret_block": "egpt-test-credentials"}
    assert secret not in json.dumps(flow_run.parameters)
    runs = task_runs(run_id)
    assert runs and not [r.name for r in runs if secret in r.model_dump_json()]
    database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    db_files = [f for f in database.parent.iterdir() if f.name.startswith(database.name)]  # with -wal, -shm
    assert database in db_files and not [f for f in db_files if secret.encode() in f.read_bytes()]
    for a in _artifacts(run_id):
        assert secret not in json.dumps(a.data, default=str) + str(a.description)
    assert secret not in first_run.result().model_dump_json()
    roots = [Path(cfg.out), Path(cfg.extract.store), prefect_harness]
    leaked = [p for root in roots for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked


def test_rerun_with_unchanged_inputs_is_served_from_cache(cfg, first_run, states_by_name, monkeypatch):
    """Every expensive task ends Cached, nothing loads a model or trains, the store is untouched."""
    import tasks.evaluate
    import tasks.extract
    import tasks.speculate
    import tasks.train
    from flows.pipeline import pipeline

    calls: list[str] = []

    def spy(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: (calls.append(name), real(*a, **k))[1])

    import egpt_core.models.loading as loading

    for module, name in ((tasks.extract, "run_extraction"), (tasks.extract, "compute_scene_features"),
                         (loading, "load_eventgpt"), (loading, "load_videollava"), (loading, "videollava_identity"),
                         (tasks.train, "train_adapter"), (tasks.train, "train_lora"),
                         (tasks.train, "export_drafter"), (tasks.evaluate, "evaluate"),
                         (tasks.speculate, "run_speculative")):
        spy(module, name)
    manifest = Path(cfg.extract.store) / "manifest.json"
    before = manifest.read_bytes()

    state = pipeline(cfg, return_state=True)
    assert state.is_completed()
    states = states_by_name(state)
    expensive = {name: s for name, s in states.items() if name.startswith(EXPENSIVE)}
    assert len(expensive) == 17, states  # features + extract (x2 stores), 3 train, export, 4 evaluate, 5 speculate
    assert set(expensive.values()) == {"Cached"}, expensive
    assert calls == []
    assert manifest.read_bytes() == before
    assert state.result().comparison.markdown == first_run.result().comparison.markdown


def test_changed_adapter_reruns_only_its_training_and_evaluation(cfg, first_run, states_by_name):
    from flows.pipeline import pipeline

    changed = cfg.model_copy(deep=True)
    # a setting that changes what is trained (epochs does not: more epochs continue the same run,
    # tests/flows/test_plan.py::test_epochs_are_not_part_of_a_run_directory)
    changed.adapters[1] = changed.adapters[1].model_copy(update={"lr": changed.adapters[1].lr / 2})  # L4
    state = pipeline(changed, return_state=True)
    assert state.is_completed()
    ran = sorted(name for name, s in states_by_name(state).items()
                 if s != "Cached" and name.startswith(EXPENSIVE))
    assert [name.split("-")[:2] for name in ran] == [["evaluate", "L4"], ["speculate", "L4"], ["train", "L4"]], ran
    adapters = {a.level: a.run_url for a in state.result().adapters}
    assert adapters["L1"] == first_run.result().adapters[0].run_url
    assert adapters["L4"] != first_run.result().adapters[1].run_url  # a new, content-addressed run dir

