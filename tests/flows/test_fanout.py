"""Scale-out: the `extract` flow's shard groups fanned out as flow runs of `extract/gpu`
(deployments/prefect.yaml) over two process workers ("GPU nodes") of the `gpu` pool, against a real
`prefect server start` on loopback.

- a clean fan-out completes every group, both workers run groups, and the store holds every pair
  exactly once, bitwise equal to a single-process extraction of the same config;
- a group whose flow-run process is SIGKILLed mid-group (test-only entrypoint fanout_entry.py) fails
  the parent; rerunning the parent resumes that group after its committed shard, and the store is
  again complete, without duplicates, and equal to the single-process one;
- (no server) a shard group run into a deleted and recreated store is re-extracted, not served from
  the task cache (the dispatched-group path; a regression test);
- (no server) a worker's EGPT_GPU_LIMIT=gpu:<node> is the limit its runs' GPU sections occupy, and a
  name the server lacks is a ConfigError.

Run with -s for the figures (timings, which worker ran which group, slots left held by the kill).
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from prefect_cluster import REPO, Cluster, prefect_cluster

GROUPS = 4
WORKERS = ("node-a", "node-b")

#: figures printed at the end of the module (pytest -s) and kept for the report
FIGURES: dict[str, object] = {}


def _cfg(fixture_paths, store, **update):
    """12 pairs (4 scenes x 3 questions) in 4 groups of 3/4/1/4 pairs; batch_size=1 makes every pair's
    rows independent of which other pairs share its batch, and shard_size=1 gives every pair its own
    shard, so a grouped store and a single-process one have the very same shards."""
    from egpt_core.config import ExtractConfig
    from flows.demo import CPU_FP32

    return ExtractConfig(dataset=str(fixture_paths["dataset"]), drafter=str(fixture_paths["eventgpt"]),
                         target=str(fixture_paths["videollava"]), store=str(store), load=CPU_FP32,
                         max_new_tokens=8, batch_size=1, shard_size=1, shard_groups=GROUPS, **update)


def _snapshot(url: str) -> dict:
    """What a consumer sees: every pair record (any status; not where it sits), the shards (name +
    sha256), rows bitwise, the LM head; plus the raw list of pair ids to count duplicates."""
    from egpt_core.store import StoreReader

    r = StoreReader(url)
    r.verify()  # every committed shard matches its sha256
    return {
        "ids": r.pair_ids(status=None),
        "pairs": r.pairs().sort_by("pair_id").drop_columns(["row_offset", "shard"]).to_pylist(),
        "shards": sorted((s["name"], s["sha256"]["pairs"], s["sha256"]["tensors"]) for s in r.manifest["shards"]),
        "counts": r.counts,
        "rows": {p.pair_id: (p.drafter, p.target) for p in r.iter_pairs()},
        "lm_head": r.lm_head(),
    }


def _assert_equals_reference(got: dict, want: dict) -> None:
    assert len(got["ids"]) == len(set(got["ids"])), Counter(got["ids"]).most_common(3)  # no duplicates
    assert sorted(got["ids"]) == sorted(want["ids"])  # none lost
    assert got["pairs"] == want["pairs"] and got["counts"] == want["counts"]
    assert got["shards"] == want["shards"]
    assert got["rows"].keys() == want["rows"].keys()
    for k, (d, t) in want["rows"].items():
        assert torch.equal(got["rows"][k][0], d) and torch.equal(got["rows"][k][1], t), k
    assert torch.equal(got["lm_head"], want["lm_head"])


@pytest.fixture(scope="module")
def reference(fixture_paths, tmp_path_factory) -> dict:
    """The same config extracted by one process, no Prefect (egpt_core.run_extraction, all groups)."""
    from egpt_core.extraction import run_extraction

    url = str(tmp_path_factory.mktemp("reference") / "store")
    t0 = time.perf_counter()
    run_extraction(_cfg(fixture_paths, url))
    FIGURES["single-process extraction (s)"] = round(time.perf_counter() - t0, 1)
    return _snapshot(url)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """README "Multi-node" steps on a loopback server: the `gpu` pool, every deployment of
    prefect.yaml, and two workers, each a node of its own (own PREFECT_HOME, --name, --limit 2: room
    for a fan-out parent next to a group) with its own GPU limit `gpu:<node>` (EGPT_GPU_LIMIT). The
    limits have 2 slots, not 1, so that the slot the kill test leaks (held until its lease expires,
    300 s) does not stall that node."""
    t0 = time.perf_counter()
    with prefect_cluster(tmp_path_factory.mktemp("cluster")) as c:
        c.cli("work-pool", "create", "gpu", "--type", "process")
        c.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        for name in WORKERS:
            c.cli("gcl", "create", f"gpu:{name}", "--limit", "2")
            c.start_worker(name, limit=2, EGPT_REPO_DIR=str(REPO), CUDA_VISIBLE_DEVICES="", EGPT_GPU_LIMIT=f"gpu:{name}")
        FIGURES["server + pool + deploy + 2 workers (s)"] = round(time.perf_counter() - t0, 1)
        yield c
    print("\nfan-out figures:", *(f"  {k}: {v}" for k, v in FIGURES.items()), sep="\n")


def _run_parent(c: Cluster, deployment: str, cfg, timeout_s: float = 300):
    """Trigger `deployment` as the UI does, fanning out over ``deployment`` too; wait for it and its
    children. Returns (parent FlowRun, {group index: child FlowRun})."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with c.client() as client:
        dep = client.read_deployment_by_name(deployment)
        run = client.create_flow_run_from_deployment(
            dep.id, parameters={"cfg": cfg.model_dump(mode="json"), "deployment": deployment})
    run = c.wait_final(run.id, timeout_s)
    with c.client() as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    by_group = {}
    for child in children:
        by_group[child.parameters["cfg"]["group_index"]] = c.wait_final(child.id, 60)
    return run, by_group


def _worker(run) -> str | None:
    """The worker that executed a flow run (the label a worker gives every run it submits)."""
    return (run.labels or {}).get("prefect.worker.name")


def _logs(c: Cluster, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with c.client() as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[flow_run_id])))]


def _progress(c: Cluster, flow_run_id) -> tuple[int, int]:
    """(pairs done, pairs pending) from a group run's last extraction progress line."""
    lines = [m for m in _logs(c, flow_run_id) if re.search(r"\d+/\d+ pairs, \d+ shards committed", m)]
    done, pending = re.search(r"(\d+)/(\d+) pairs", lines[-1]).groups()
    return int(done), int(pending)


@pytest.mark.slow
def test_fanout_over_two_workers_equals_single_process(cluster, fixture_paths, tmp_path, reference):
    cfg = _cfg(fixture_paths, tmp_path / "store")
    t0 = time.perf_counter()
    parent, children = _run_parent(cluster, "extract/gpu", cfg)
    FIGURES["clean fan-out, parent run wall (s)"] = round(time.perf_counter() - t0, 1)
    assert parent.state.is_completed(), f"{parent.state.name}: {parent.state.message}\n{cluster.logs_tail()}"
    assert sorted(children) == list(range(GROUPS))
    assert all(ch.state.is_completed() for ch in children.values()), {g: ch.state.name for g, ch in children.items()}
    _assert_equals_reference(_snapshot(cfg.store), reference)

    placement = {g: _worker(ch) for g, ch in sorted(children.items())}
    FIGURES["clean fan-out: group -> worker"] = placement
    FIGURES["clean fan-out: parent on"] = _worker(parent)
    assert set(placement.values()) == set(WORKERS), placement  # both "nodes" did GPU work
    for g, ch in children.items():  # the labelled worker's own log shows it started that run (the other
        # worker may log the id too, when it lost the race to claim the run: "Aborted submission")
        assert f"submitting flow run '{ch.id}'" in cluster.worker_log(placement[g]), g
    for g, ch in children.items():  # each group held its own node's GPU slot (the worker's env)
        assert any(f"holding a 'gpu:{placement[g]}' slot" in m for m in _logs(cluster, ch.id)), g


@pytest.mark.slow
def test_group_killed_mid_run_is_resumed_by_a_rerun(cluster, fixture_paths, tmp_path, reference):
    from egpt_core.extraction import pair_group, plan_pairs
    from egpt_core.store import StoreReader

    cfg = _cfg(fixture_paths, tmp_path / "store")
    sizes = Counter(pair_group(p.pair_id, GROUPS) for p in plan_pairs(cfg))
    victim = max(sizes, key=lambda g: (sizes[g], g))  # a group of 4 pairs: 1 committed, 1 torn, 2 pending
    marker = tmp_path / "killed"
    with cluster.client() as client:  # extract/gpu with the test-only entrypoint and the fault armed
        src = client.read_deployment_by_name("extract/gpu")
        client.create_deployment(
            flow_id=src.flow_id, name="killable", entrypoint="tests/flows/fanout_entry.py:extract",
            work_pool_name="gpu", work_queue_name="default", pull_steps=src.pull_steps,
            parameter_openapi_schema=src.parameter_openapi_schema, enforce_parameter_schema=True,
            job_variables={"env": {**src.job_variables.get("env", {}), "EGPT_TEST_DIE_GROUP": str(victim),
                                   "EGPT_TEST_DIE_MARKER": str(marker)}})

    # 1. the victim's flow-run process dies: its run ends Crashed, the others complete, the parent fails
    t0 = time.perf_counter()
    parent, children = _run_parent(cluster, "extract/killable", cfg)
    FIGURES["killed fan-out, parent run wall (s)"] = round(time.perf_counter() - t0, 1)
    assert marker.is_file(), f"the fault never fired\n{cluster.logs_tail()}"
    assert parent.state.is_failed() and f"group {victim}" in parent.state.message, parent.state.message
    states = {g: ch.state.name for g, ch in sorted(children.items())}
    assert states == {g: "Crashed" if g == victim else "Completed" for g in range(GROUPS)}, states
    FIGURES["killed fan-out: group -> (worker, state, run name)"] = {g: (_worker(ch), ch.state.name, ch.name)
                                                          for g, ch in sorted(children.items())}
    after_kill = StoreReader(cfg.store)
    victim_ids = {p.pair_id for p in plan_pairs(cfg.model_copy(update={"group_index": victim}))}
    committed = victim_ids & set(after_kill.pair_ids(status=None))
    assert len(committed) == 1  # its first shard; the second was placed, never named by the manifest
    torn = marker.read_text().split()[1]
    assert torn not in {s["name"] for s in after_kill.shards}
    assert list(Path(cfg.store).rglob(f"*{torn}*")), "the killed commit left no files behind"
    with cluster.client() as client:  # the dead process's GPU slot stays taken until its lease expires
        FIGURES["GPU slots held after the kill (all runs final)"] = {
            f"gpu:{n}": client.read_global_concurrency_limit_by_name(f"gpu:{n}").active_slots for n in WORKERS}

    # 2. rerun the parent with the product deployment: every group completes, the victim resumes
    t0 = time.perf_counter()
    parent2, children2 = _run_parent(cluster, "extract/gpu", cfg)
    FIGURES["rerun, parent run wall (s)"] = round(time.perf_counter() - t0, 1)
    assert parent2.state.is_completed(), f"{parent2.state.name}: {parent2.state.message}\n{cluster.logs_tail()}"
    assert all(ch.state.is_completed() for ch in children2.values()) and sorted(children2) == list(range(GROUPS))
    done, pending = _progress(cluster, children2[victim].id)
    assert done == pending == sizes[victim] - 1, (done, pending)  # resumed after the committed shard
    FIGURES["rerun: victim group pairs extracted / group size"] = f"{done}/{sizes[victim]}"
    FIGURES["rerun: group -> worker"] = {g: _worker(ch) for g, ch in sorted(children2.items())}
    _assert_equals_reference(_snapshot(cfg.store), reference)


def test_group_run_into_a_recreated_store_is_not_served_from_the_cache(fixture_paths, tmp_path, states_by_name):
    """What a dispatched group run does (`extract` with cfg.group_index set, the store already
    created by its parent): its extraction's cached result belongs to the deleted store, not the new one."""
    from egpt_core.store import StoreReader
    from flows.extract import extract
    from flows.plan import group_configs

    cfg = _cfg(fixture_paths, tmp_path / "store", max_scenes=2).model_copy(update={"shard_groups": 2, "shard_size": 2})
    g0, g1 = group_configs(cfg)
    for group in (g0, g1):
        assert extract(group, return_state=True).is_completed()
    full = StoreReader(cfg.store).counts
    shutil.rmtree(cfg.store)  # (its manifest's `created` second is seconds ago: two flow runs)
    assert extract(g1, return_state=True).is_completed()  # (re)creates the store: here, the parent's role
    again = extract(g0, return_state=True)
    assert again.is_completed()
    assert states_by_name(again)["extract-shared_prefix-g0of2-store"] == "Completed"
    assert StoreReader(cfg.store).counts == full


def test_gpu_limit_named_by_the_worker_environment(monkeypatch):
    """EGPT_GPU_LIMIT=gpu:<node> on a worker: its runs occupy that limit; a name the server lacks is a
    ConfigError (never retried, never unlimited)."""
    import contextlib

    from prefect import flow, get_client, task
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    import tasks.runtime as runtime
    from egpt_core.errors import ConfigError

    acquired: list[str] = []

    @contextlib.contextmanager
    def spy(name, occupy=1, strict=False, **kwargs):
        acquired.append(name)
        yield

    monkeypatch.setattr(runtime, "concurrency", spy)
    monkeypatch.setenv("EGPT_GPU_LIMIT", "gpu:node-x")

    @task
    def gpu_work() -> int:
        with runtime.gpu_slot():
            return 1

    @flow
    def uses_gpu():
        return gpu_work(return_state=True)

    missing = uses_gpu(return_state=True)
    assert missing.is_failed() and acquired == []
    with pytest.raises(ConfigError, match="gpu:node-x"):
        missing.result()
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu:node-x", limit=1))
        try:
            assert uses_gpu().result() == 1 and acquired == ["gpu:node-x"]
        finally:
            client.delete_global_concurrency_limit_by_name("gpu:node-x")
