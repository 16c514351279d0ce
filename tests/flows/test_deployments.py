"""deployments/README.md as written, against a real `prefect server start` (loopback, temporary
directories): the server and the worker are started by the README's own shell blocks (site values
replaced), with basic authentication; `prefect deploy --all` of deployments/prefect.yaml; runs
triggered as the UI triggers them.

- the UI's settings report the API address the README gives browsers and workers (issue 17.1);
- the API and its websockets refuse requests without the auth string; `egpt` clients name the
  missing or wrong setting instead of a 401 traceback (issue 19);
- deploy, worker and runs carry the auth string; the nightly's description states its time zone;
  the README's schedule pause/resume lines work (issue 17.1, 17.6);
- a run fans its shard groups out as flow runs of the same deployment;
- a pipeline run whose parameters have the UI's JSON-input shape runs on S3 (moto) with its
  credentials from a Prefect Secret block, the worker having none in its environment; afterwards the
  server's database file, the API's flow-run parameters, task runs, logs and the deployments hold
  no credential, and a run with credentials in its parameters is refused before it is stored
  (issues 17.2, 13.12);
- "Quick run" of the pipeline deployment (its defaults, the team's paths) fails before any task
  (issue 17.5);
- a worker launched in the background of a script stops on SIGTERM (issue 17.7).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from prefect_cluster import AUTH, REPO, alive, descendants, egpt_worker_pid, readme_block, readme_cluster

NAMES = ["extract/gpu", "extract-ray/ray", "train-adapter/gpu", "train-lora/gpu", "evaluate/gpu", "benchmark-e2e/gpu",
         "pipeline/gpu", "nightly-reextract/nightly"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with readme_cluster(tmp_path_factory.mktemp("readme-cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def deployed(cluster):
    """README §3 (pool, `gpu` limit, deploy --all) from a client with §2's settings, then one worker
    started by the README's §4 block."""
    cluster.cli("work-pool", "create", "gpu", "--type", "process")
    cluster.cli("gcl", "create", "gpu", "--limit", "1")
    cluster.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    cluster.start_readme_worker("node-0")
    return cluster


def _request(url: str, auth: str | None = None, body: dict | None = None) -> int:
    req = urllib.request.Request(url, method="POST" if body is not None else "GET",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _readme_url(template: str, cluster) -> str:
    host, port = re.match(r"http://([^:/]+):(\d+)/api", cluster.api).groups()
    return template.replace("$SERVER_ADDR", host).replace("$SERVER_PORT", port)


def test_ui_settings_report_the_api_url_the_readme_gives_browsers_and_workers(cluster):
    ui_template = re.search(r"PREFECT_UI_API_URL=(\S+)", readme_block("server-start")).group(1)
    worker_template = re.search(r"PREFECT_API_URL=(\S+)", readme_block("worker-start")).group(1)
    assert ui_template == worker_template  # browsers and workers reach the server at one address
    root = cluster.api.removesuffix("/api")
    with urllib.request.urlopen(f"{root}/ui-settings", timeout=30) as r:
        settings = json.load(r)
    assert settings["api_url"] == _readme_url(ui_template, cluster) == cluster.api
    assert settings["auth"] == "BASIC"


def test_the_api_and_its_websockets_refuse_requests_without_the_auth_string(cluster):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    assert _request(f"{cluster.api}/flows/filter", body={}) == 401
    assert _request(f"{cluster.api}/flows/filter", auth="egpt-test:wrong", body={}) == 401
    assert _request(f"{cluster.api}/deployments/filter", body={}) == 401
    assert _request(f"{cluster.api}/flows/filter", auth=AUTH, body={}) == 200
    assert _request(f"{cluster.api}/health") == 200  # probes stay open (README: what is not protected)

    ws = cluster.api.replace("http://", "ws://") + "/events/out"
    for token in (None, "egpt-test:wrong"):
        with connect(ws, subprotocols=["prefect"], open_timeout=30) as conn:
            conn.send(json.dumps({"type": "auth", "token": token}))
            with pytest.raises(ConnectionClosed) as closed:
                conn.recv(timeout=30)
        assert closed.value.rcvd.code == 1008  # policy violation: no/invalid token
    with connect(ws, subprotocols=["prefect"], open_timeout=30) as conn:
        conn.send(json.dumps({"type": "auth", "token": AUTH}))
        assert json.loads(conn.recv(timeout=30))["type"] == "auth_success"

    env = {k: v for k, v in cluster.env.items() if k != "PREFECT_API_AUTH_STRING"}
    out = subprocess.run(["prefect", "work-pool", "ls"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "401" in out.stdout + out.stderr


def test_egpt_clients_name_the_missing_or_wrong_auth_setting(cluster):
    without = {k: v for k, v in cluster.env.items() if k != "PREFECT_API_AUTH_STRING"}
    out = subprocess.run(["egpt", "check-server"], env=without, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "requires authentication and PREFECT_API_AUTH_STRING is not set" in out.stderr
    wrong = {**cluster.env, "PREFECT_API_AUTH_STRING": "egpt-test:wrong"}
    out = subprocess.run(["egpt", "worker", "--pool", "gpu"], env=wrong, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "refused PREFECT_API_AUTH_STRING (HTTP 401)" in out.stderr
    assert "Traceback" not in out.stderr and "egpt-test:wrong" not in out.stderr
    # with the right string the README's worker (`egpt worker`) runs: the `deployed` fixture's runs complete


def test_every_flow_is_deployed_and_nightly_states_its_schedule(deployed):
    with deployed.client() as client:
        deployments = {n: client.read_deployment_by_name(n) for n in NAMES}
    nightly = deployments["nightly-reextract/nightly"]
    assert {d.work_pool_name for d in deployments.values()} == {"gpu"}
    ray, extract = deployments["extract-ray/ray"], deployments["extract/gpu"]  # issue 18: the Ray flow deployed too
    assert ray.entrypoint == "flows/extract_ray.py:extract_ray" and ray.enforce_parameter_schema
    assert ray.parameters["cfg"] == extract.parameters["cfg"] and "RAY_ADDRESS" in ray.description
    assert ray.parameter_openapi_schema["properties"]["cfg"]["$ref"] == "#/definitions/ExtractConfig"
    [schedule] = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Europe/Zurich"
    assert schedule.active
    minute, hour = schedule.schedule.cron.split()[:2]
    assert f"{int(hour):02d}:{int(minute):02d} {schedule.schedule.timezone}" in nightly.description  # the list view
    assert "cfg" in nightly.parameter_openapi_schema["properties"]
    assert nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $EGPT_REPO_DIR }}"

    # the README's pause lines, as written (the schedule's id found the way it says)
    lines = readme_block("schedule-pause").splitlines()
    pause = "\n".join(line for line in lines if not line.startswith("prefect deployment schedule resume"))
    out = subprocess.run(["bash", "-ec", pause], env=deployed.env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert str(schedule.id) in out.stdout  # `schedule ls` shows the id
    with deployed.client() as client:
        [paused] = client.read_deployment_by_name("nightly-reextract/nightly").schedules
        assert paused.id == schedule.id and paused.active is False
        client.update_deployment_schedule(nightly.id, schedule.id, active=True)  # what the resume line does
    assert any(line.startswith('prefect deployment schedule resume nightly-reextract/nightly "$id"') for line in lines)


def test_ui_triggered_run_fans_out_and_completes(deployed, fixture_paths, tmp_path):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from egpt_core.config import ExtractConfig
    from egpt_core.store import StoreReader
    from flows.demo import CPU_FP32

    cfg = ExtractConfig(dataset=str(fixture_paths["dataset"]), drafter=str(fixture_paths["eventgpt"]),
                        target=str(fixture_paths["videollava"]), store=str(tmp_path / "store"), load=CPU_FP32,
                        max_scenes=2, max_new_tokens=8, shard_size=2, batch_size=2, shard_groups=2)
    with deployed.client() as client:
        deployment = client.read_deployment_by_name("extract/gpu")
        run = client.create_flow_run_from_deployment(  # what the UI's "Custom run" button sends
            deployment.id, parameters={"cfg": cfg.model_dump(mode="json"), "deployment": "extract/gpu"})
    run = deployed.wait_final(run.id, timeout_s=400)
    with deployed.client() as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{deployed.logs_tail()}"
    assert len(children) == 2 and all(c.state.is_completed() for c in children)
    assert sorted(c.name for c in children) == ["extract-shared_prefix-store-g0of2", "extract-shared_prefix-store-g1of2"]
    assert StoreReader(cfg.store).counts == {"ok": 6, "failed": 0, "skipped": 0}
    log = deployed.worker_log("node-0")
    assert "holding a 'gpu' slot" in log and "without a GPU slot" not in log  # the README's `gpu` limit is used


def _ui_json(value) -> dict:
    """A form section in the UI's "Use JSON Input" mode."""
    return {"__prefect_kind": "json", "value": json.dumps(value, indent=2)}


def test_ui_json_mode_run_on_s3_keeps_credentials_out_of_prefect(deployed, fixture_paths, s3_server):
    """The pipeline on moto S3, its parameters in the UI's JSON-input shape (the section as JSON text,
    storage_options inside it as the UI's own JSON placeholder, naming a Secret block), run by a
    worker with no AWS credentials: it completes, and no credential is anywhere in Prefect. (The
    server's schema refuses a placeholder in a typed section; free-form dicts like storage_options
    are where one reached the flow: tests/flows/test_parameters.py covers the empty placeholder.)"""
    from prefect.blocks.system import Secret
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.exceptions import PrefectHTTPStatusError

    from egpt_core.fsio import url_to_fs
    from egpt_core.store import StoreReader

    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]  # the moto session's
    bucket = f"egpt-ui-{uuid.uuid4().hex[:10]}"
    fs, _ = url_to_fs(f"s3://{bucket}", s3_server)
    fs.mkdir(bucket)
    refused_key, refused_secret = "AKIAEGPTREFUSED00001", "egpt-refused-S3CRET-4c1e"
    form = {"extract": {"dataset": str(fixture_paths["dataset"]), "drafter": str(fixture_paths["eventgpt"]),
                        "target": str(fixture_paths["videollava"]), "store": f"s3://{bucket}/store",
                        "storage_options": _ui_json({**s3_server, "secret_block": "egpt-s3"}),
                        "load": {"dtype": "float32", "quant": "none", "device": "cpu"}, "max_scenes": 2,
                        "max_new_tokens": 8, "shard_size": 2, "batch_size": 2},
            "adapters": [], "lora": None, "out": f"s3://{bucket}/runs", "val_fraction": 0.5}
    with deployed.client() as client:
        Secret(value={"key": key, "secret": secret}).save("egpt-s3", overwrite=True)
        deployment = client.read_deployment_by_name("pipeline/gpu")
        with_credentials = json.loads(json.dumps(form))
        with_credentials["extract"]["storage_options"] = {"key": refused_key, "secret": refused_secret}
        with pytest.raises(PrefectHTTPStatusError) as refused:  # the form's schema: refused before it is stored
            client.create_flow_run_from_deployment(deployment.id, parameters={"cfg": with_credentials})
        assert refused.value.response.status_code == 409
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"cfg": _ui_json(form),
                                                                                  "extract_deployment": None})
    assert run.parameters["cfg"]["extract"]["storage_options"]["__prefect_kind"] == "json"  # passed on as sent
    run = deployed.wait_final(run.id, timeout_s=600)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{deployed.logs_tail()}"
    store = StoreReader(f"s3://{bucket}/store", s3_server)
    assert store.counts["ok"] == 6
    worker, _ = deployed.workers["node-0"]  # the worker and its processes have no AWS credentials
    environs = [open(f"/proc/{p}/environ", "rb").read() for p in descendants(worker.pid)]
    assert environs and not [e for e in environs if b"AWS_ACCESS_KEY_ID=" in e or b"AWS_SECRET_ACCESS_KEY=" in e]

    with deployed.client() as client:
        flow_runs = client.read_flow_runs()
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        deployments = [client.read_deployment_by_name(n) for n in NAMES]
    credentials = (key, secret, refused_key, refused_secret)
    api_text = {"flow-run parameters": json.dumps([r.parameters for r in flow_runs]),
                "task runs": json.dumps([t.model_dump(mode="json") for t in task_runs]),
                "logs": json.dumps([entry.message for entry in logs]),
                "deployments (schemas, defaults)": json.dumps([d.model_dump(mode="json") for d in deployments])}
    assert task_runs and logs and len(flow_runs) >= 2
    for what, text in api_text.items():
        assert not [c for c in credentials if c in text], what
    db_files = list((deployed.root / "server").glob("prefect.db*"))  # with -wal / -shm
    assert db_files and not [(f.name, c) for f in db_files for c in credentials if c.encode() in f.read_bytes()]
    outputs = [p for p in fs.find(bucket) if p.endswith((".json", ".md"))]
    assert outputs and not [p for p in outputs for c in credentials if c.encode() in fs.cat_file(p)]


def test_quick_run_with_the_deployment_defaults_fails_before_any_task(deployed):
    """"Quick run" sends no parameters: the deployment's defaults (the team's paths) run as they are."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with deployed.client() as client:
        deployment = client.read_deployment_by_name("pipeline/gpu")
        run = client.create_flow_run_from_deployment(deployment.id)
    run = deployed.wait_final(run.id, timeout_s=300)
    assert run.state.is_failed()
    for field in ("extract.dataset", "extract.drafter", "extract.target"):
        assert f"{field} = '/" in run.state.message, run.state.message
    with deployed.client() as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert tasks == []


def test_a_worker_launched_in_the_background_stops_on_sigterm(deployed):
    """`cmd &` in a script leaves SIGINT ignored (a plain `prefect worker start` launched that way
    never stops on SIGTERM, since it turns SIGTERM into a SIGINT to itself); the README's worker
    launched that way stops on one SIGTERM."""
    script, env = deployed.readme_worker("background")
    log = Path(env["PREFECT_HOME"]) / "worker.log"
    launcher = subprocess.Popen(["bash", "-c", f"bash -c {shlex.quote(script)} > {shlex.quote(str(log))} 2>&1 &\nwait"],
                                env=env, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 180
    while "started!" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "started!" in log.read_text(), log.read_text()
    worker, tree = egpt_worker_pid(launcher.pid), descendants(launcher.pid)
    # what every `&` job of a script gets: SIGINT ignored (the trap of a plain `prefect worker start`)
    probe = "import signal, sys; sys.exit(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    assert subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(probe)} &\nwait $!"]).returncode == 1
    os.kill(worker, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in tree if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    launcher.wait()
    assert not left, log.read_text()
    assert "stopped!" in log.read_text()
