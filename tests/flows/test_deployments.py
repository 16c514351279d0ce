"""deployments/prefect.yaml against a real `prefect server start` (loopback, temp PREFECT_HOME):
`prefect deploy --all`, a process worker on the `gpu` pool, a run triggered as the UI does it
(fanning its shard groups out as flow runs of the same deployment), and the nightly schedule."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect_cluster import free_port as _free_port
from prefect_cluster import stop as _stop
from prefect_cluster import wait_healthy as _wait_healthy

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server on a free loopback port; yields (api_url, env for CLI/worker processes)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_UI_ENABLED="false")
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(api, proc)
        yield api, env
    finally:
        _stop(proc)
        log.close()


def _cli(env, *args) -> str:
    out = subprocess.run([*PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    """README steps: pool, `gpu` limit, deploy --all, one worker (CUDA_VISIBLE_DEVICES set)."""
    api, env = server
    _cli(env, "work-pool", "create", "gpu", "--type", "process")
    _cli(env, "gcl", "create", "gpu", "--limit", "1")
    _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    worker_env = {**env, "EGPT_REPO_DIR": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "gpu", "--type", "process", "--name", "node-0"],
                              env=worker_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield api, log_path
    finally:
        _stop(worker)  # workers before the server (a worker hangs on SIGTERM once the API is gone)
        log.close()


def _client(api):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            self._settings = temporary_settings(updates={PREFECT_API_URL: api})
            self._settings.__enter__()
            self._client = get_client(sync_client=True).__enter__()
            return self._client

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Ctx()


def test_every_flow_is_deployed_and_nightly_has_its_schedule(deployed):
    api, _ = deployed
    with _client(api) as client:
        names = ["extract/gpu", "train-adapter/gpu", "train-lora/gpu", "evaluate/gpu", "benchmark-e2e/gpu",
                 "pipeline/gpu", "nightly-reextract/nightly"]
        deployments = {n: client.read_deployment_by_name(n) for n in names}
        nightly = deployments["nightly-reextract/nightly"]
    assert {d.work_pool_name for d in deployments.values()} == {"gpu"}
    [schedule] = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Europe/Zurich"
    assert schedule.active
    assert "cfg" in nightly.parameter_openapi_schema["properties"]
    assert nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $EGPT_REPO_DIR }}"


def test_ui_triggered_run_fans_out_and_completes(deployed, fixture_paths, tmp_path):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from egpt_core.config import ExtractConfig
    from egpt_core.store import StoreReader
    from flows.demo import CPU_FP32

    api, worker_log = deployed
    cfg = ExtractConfig(dataset=str(fixture_paths["dataset"]), drafter=str(fixture_paths["eventgpt"]),
                        target=str(fixture_paths["videollava"]), store=str(tmp_path / "store"), load=CPU_FP32,
                        max_scenes=2, max_new_tokens=8, shard_size=2, batch_size=2, shard_groups=2)
    with _client(api) as client:
        deployment = client.read_deployment_by_name("extract/gpu")
        run = client.create_flow_run_from_deployment(  # what the UI's "Custom run" button sends
            deployment.id, parameters={"cfg": cfg.model_dump(mode="json"), "deployment": "extract/gpu"})
        deadline = time.monotonic() + 400
        while not (run := client.read_flow_run(run.id)).state.is_final():
            assert time.monotonic() < deadline, f"run still {run.state.name}:\n{worker_log.read_text()[-4000:]}"
            time.sleep(1)
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{worker_log.read_text()[-4000:]}"
    assert len(children) == 2 and all(c.state.is_completed() for c in children)
    assert sorted(c.name for c in children) == ["extract-shared_prefix-store-g0of2", "extract-shared_prefix-store-g1of2"]
    assert StoreReader(cfg.store).counts == {"ok": 6, "failed": 0, "skipped": 0}
    log = worker_log.read_text()
    assert "holding a 'gpu' slot" in log and "without a GPU slot" not in log  # the README's `gpu` limit is used
