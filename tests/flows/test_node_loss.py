"""A whole GPU node dies mid-group (issue 13, "also left from the last round"): its worker and the
group's flow-run process are SIGKILLed together, so nobody ever reports that run's end. On 0ff812c
the fan-out parent waited for it forever and the node's GPU slot stayed taken for the 300 s lease.

Now the parent marks the silent run Crashed after three missed heartbeats (heartbeats every 30 s
here), fails naming the group, the dead holder's GPU slot is free again within its 60 s lease, and a
rerun on a replacement node completes the store. Real `prefect server start` and process workers on
loopback (prefect_cluster.py): the parent runs on its own "head" pool, the groups on the "gpu" pool.

Also (no server, default suite): the silence detector itself, and the slot of a run stopped by
SIGTERM (which Prefect sees) is released at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect_cluster import REPO, prefect_cluster

HEARTBEAT = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}


def _cfg(fixture_paths, store):
    from egpt_core.config import ExtractConfig
    from flows.demo import CPU_FP32

    return ExtractConfig(dataset=str(fixture_paths["dataset"]), drafter=str(fixture_paths["eventgpt"]),
                         target=str(fixture_paths["videollava"]), store=str(store), load=CPU_FP32,
                         max_new_tokens=8, batch_size=1, shard_size=1, shard_groups=2)


def _slots(c, name: str) -> int:
    with c.client() as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


@pytest.mark.slow
def test_parent_fails_and_the_slot_returns_when_a_node_dies(fixture_paths, tmp_path):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from egpt_core.extraction import pair_group, plan_pairs
    from egpt_core.store import StoreReader

    cfg = _cfg(fixture_paths, tmp_path / "store")
    victim = pair_group(plan_pairs(cfg)[0].pair_id, 2)
    marker = tmp_path / "hung"
    with prefect_cluster(tmp_path / "cluster") as c:
        c.cli("work-pool", "create", "gpu", "--type", "process")
        c.cli("work-pool", "create", "head", "--type", "process")
        c.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        c.cli("gcl", "create", "gpu:doomed", "--limit", "2")
        c.cli("gcl", "create", "gpu:spare", "--limit", "2")
        with c.client() as client:
            src = client.read_deployment_by_name("extract/gpu")
            common = dict(flow_id=src.flow_id, pull_steps=src.pull_steps, work_queue_name="default",
                          parameter_openapi_schema=src.parameter_openapi_schema, enforce_parameter_schema=True)
            env = src.job_variables.get("env", {})
            client.create_deployment(name="head", entrypoint="flows/extract.py:extract", work_pool_name="head",
                                     job_variables={"env": env}, **common)
            client.create_deployment(name="hang", entrypoint="tests/flows/fanout_entry.py:extract",
                                     work_pool_name="gpu", job_variables={"env": {
                                         **env, "EGPT_TEST_HANG_GROUP": str(victim),
                                         "EGPT_TEST_HANG_MARKER": str(marker)}}, **common)
        c.start_worker("head", pool="head", limit=2, EGPT_REPO_DIR=str(REPO), CUDA_VISIBLE_DEVICES="", **HEARTBEAT)
        c.start_worker("doomed", limit=2, EGPT_REPO_DIR=str(REPO), CUDA_VISIBLE_DEVICES="",
                       EGPT_GPU_LIMIT="gpu:doomed", **HEARTBEAT)

        with c.client() as client:
            dep = client.read_deployment_by_name("extract/head")
            parent = client.create_flow_run_from_deployment(
                dep.id, parameters={"cfg": cfg.model_dump(mode="json"), "deployment": "extract/hang"})
        deadline = time.monotonic() + 300
        while not marker.exists():  # the victim group is inside its GPU section, hanging
            assert time.monotonic() < deadline, f"the victim group never started\n{c.logs_tail()}"
            time.sleep(1)
        assert _slots(c, "gpu:doomed") >= 1
        while True:  # let the other group finish, so only the hung run is left on the node
            with c.client() as client:
                kids = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
            others = [k for k in kids if k.parameters["cfg"]["group_index"] != victim]
            if others and all(k.state.is_final() for k in others):
                break
            assert time.monotonic() < deadline, f"the other group did not finish\n{c.logs_tail()}"
            time.sleep(1)
        c.kill_node("doomed")
        killed_at = time.monotonic()

        # the parent does not wait forever: the silent run is marked Crashed, the parent fails naming it
        run = c.wait_final(parent.id, timeout_s=600)
        waited = time.monotonic() - killed_at
        assert run.state.is_failed(), f"{run.state.name}: {run.state.message}\n{c.logs_tail()}"
        assert f"group {victim}" in run.state.message and "no heartbeat" in run.state.message, run.state.message
        with c.client() as client:
            hung = [k for k in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
                if k.parameters["cfg"]["group_index"] == victim]
        assert [k.state.name for k in hung] == ["Crashed"]

        # the dead node's GPU slot comes back with its lease (60 s + the server's 15 s reaper loop)
        while _slots(c, "gpu:doomed"):
            assert time.monotonic() - killed_at < 300, "the dead holder's GPU slot was never freed"
            time.sleep(2)
        freed = time.monotonic() - killed_at

        # a replacement node; the rerun (product deployment) completes every group
        c.start_worker("spare", limit=2, EGPT_REPO_DIR=str(REPO), CUDA_VISIBLE_DEVICES="", EGPT_GPU_LIMIT="gpu:spare",
                       **HEARTBEAT)
        with c.client() as client:
            rerun = client.create_flow_run_from_deployment(
                dep.id, parameters={"cfg": cfg.model_dump(mode="json"), "deployment": "extract/gpu"})
        rerun = c.wait_final(rerun.id, timeout_s=600)
        assert rerun.state.is_completed(), f"{rerun.state.name}: {rerun.state.message}\n{c.logs_tail()}"
    reader = StoreReader(cfg.store)
    ids = reader.pair_ids(status=None)
    assert len(ids) == len(set(ids)) == len(plan_pairs(cfg))  # every pair once
    print(f"\nnode loss: parent failed {waited:.0f} s after the kill; GPU slot free after {freed:.0f} s")


# --------------------------------------------------------------------------------------------------
# default suite: the session's test server
# --------------------------------------------------------------------------------------------------
def test_a_silent_running_run_is_marked_crashed_and_a_live_one_is_not():
    """wait_for_live_run: no heartbeat for stale_s -> Crashed (it would otherwise be waited for
    forever); a run that keeps sending heartbeats, then completes, is returned Completed."""
    from prefect import flow, get_client
    from prefect.events import emit_event
    from prefect.states import Completed, Running

    from tasks.runtime import wait_for_live_run

    @flow
    def child():  # only its flow id is needed: runs are created through the API below
        return 1

    with get_client(sync_client=True) as client:
        silent = client.create_flow_run(child, state=Running())
        live = client.create_flow_run(child, state=Running())

    @flow
    def waiter(run_id, stale_s: float):
        return wait_for_live_run(run_id, poll_s=0.2, stale_s=stale_s)

    got = waiter(silent.id, 2.0)
    assert got.state.name == "Crashed" and "no heartbeat" in got.state.message

    stop = threading.Event()

    def beat():  # 25 s of heartbeats, then the run completes (generous margins: events are ingested asynchronously)
        for _ in range(100):
            if stop.wait(0.25):
                return
            emit_event(event="prefect.flow-run.heartbeat", resource={"prefect.resource.id": f"prefect.flow-run.{live.id}"})
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(live.id, Completed())

    t = threading.Thread(target=beat)
    t.start()
    try:
        got = waiter(live.id, 15.0)
    finally:
        stop.set()
        t.join()
    assert got.state.name == "Completed"


_HOLDER = """
import os, sys, time
from prefect import flow, task
from tasks.runtime import gpu_slot

@task
def hold():
    with gpu_slot():
        open(sys.argv[1], "w").write(str(os.getpid()))
        time.sleep(600)

@flow
def holder():
    hold()

holder()
"""


def test_sigterm_releases_the_gpu_slot_at_once(prefect_api, tmp_path):
    """A run stopped by SIGTERM (a cancelled run, a drained node) is a crash Prefect detects: its slot
    is released on the way out, not held until the lease expires. (The test server runs no lease
    reaper: only an explicit release can free the slot here.)"""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = "gpu:sigterm-test"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    try:
        script = tmp_path / "hold.py"
        script.write_text(_HOLDER)
        marker = tmp_path / "holding"
        env = {**os.environ, **prefect_api, "EGPT_GPU_LIMIT": name, "PYTHONPATH": str(REPO),
               "PREFECT_HOME": str(tmp_path / "home")}
        proc = subprocess.Popen([sys.executable, str(script), str(marker)], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(name).active_slots == 1
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while True:
            with get_client(sync_client=True) as client:
                held = client.read_global_concurrency_limit_by_name(name).active_slots
            if held == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert held == 0
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(name)
    assert Path(marker).read_text()
