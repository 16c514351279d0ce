"""What stops a run before it stores a secret or takes a GPU slot: credentials in a config are refused
before any flow run exists (issue 13.12); storage credentials come from a Prefect Secret block named
in storage_options; a run whose inputs do not exist (the deployment defaults on a machine without
the team's paths: the UI's "Quick run") fails before any task starts, naming the fields to fill
(issue 17.5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KEY, SECRET = "AKIAEGPTPIPELINE0001", "egpt-pipeline-config-S3CRET-91d2"


def test_pipeline_command_refuses_credentials_in_its_config(tmp_path):
    """`egpt pipeline --config` with key/secret in storage_options stored them in flow_run.parameters;
    now it exits 2 before Prefect creates anything, says where to put credentials, echoes none."""
    config = {"extract": {"dataset": "/data/ds", "drafter": "/models/egpt", "target": "/models/vl",
                          "store": "s3://egpt-stores/x", "storage_options": {"key": KEY, "secret": SECRET,
                                                                             "endpoint_url": "http://127.0.0.1:9"}},
              "out": "s3://egpt-runs/x"}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "egpt_core.cli", "pipeline", "--config", str(path)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "storage_options hold credentials (key, secret)" in out.stderr
    assert "secret_block" in out.stderr and "AWS_ACCESS_KEY_ID" in out.stderr
    assert KEY not in out.stdout + out.stderr and SECRET not in out.stdout + out.stderr
    stored = [p for p in home.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()] if home.exists() else []
    assert not stored


def test_storage_credentials_come_from_a_secret_block(s3_server, s3_bucket):
    """A config names the block; the credentials reach s3fs only inside the process (moto checks that
    a request is signed, so without them the write fails)."""
    from prefect.blocks.system import Secret

    import tasks  # noqa: F401  (flows import it: it installs the Secret-block resolver)
    from egpt_core.fsio import url_to_fs
    from egpt_core.store.manifest import put_whole

    Secret(value={"key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ["AWS_SECRET_ACCESS_KEY"]}).save(
        "egpt-test-s3", overwrite=True)
    options = {**s3_server, "secret_block": "egpt-test-s3", "skip_instance_cache": True}
    with pytest.MonkeyPatch.context() as mp:  # no credentials in the environment: only the block's
        mp.delenv("AWS_ACCESS_KEY_ID")
        mp.delenv("AWS_SECRET_ACCESS_KEY")
        fs, path = url_to_fs(f"{s3_bucket}/block.txt", options)
        put_whole(fs, path, b"signed with the block's credentials")
        assert fs.cat_file(path) == b"signed with the block's credentials"
        fs, path = url_to_fs(f"{s3_bucket}/env.txt", {**s3_server, "skip_instance_cache": True})
        with pytest.raises(Exception, match="(?i)credentials"):
            fs.pipe_file(path, b"unsigned")


def test_a_missing_secret_block_is_named(tmp_path):
    import tasks  # noqa: F401
    from egpt_core.errors import ConfigError
    from egpt_core.fsio import url_to_fs

    with pytest.raises(ConfigError, match="secret_block='egpt-no-such-block': no Prefect Secret block of that name"):
        url_to_fs(str(tmp_path), {"secret_block": "egpt-no-such-block"})


def test_outside_prefect_a_secret_block_is_refused_with_the_way_out(tmp_path):
    import egpt_core.fsio as fsio
    from egpt_core.errors import ConfigError

    resolver = fsio._secret_resolver
    fsio.set_secret_resolver(None)  # what a plain `egpt` command sees: tasks/ never imported
    try:
        with pytest.raises(ConfigError, match="only Prefect runs .* resolve; outside Prefect give the credentials"):
            fsio.url_to_fs(str(tmp_path), {"secret_block": "egpt-s3"})
    finally:
        fsio.set_secret_resolver(resolver)


def _deployment_defaults(name: str) -> dict:
    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    return next(d for d in doc["deployments"] if d["entrypoint"].endswith(f":{name}"))["parameters"]


def test_quick_run_with_the_deployment_defaults_fails_before_any_task():
    """The pipeline deployment's own defaults (what "Quick run" starts) on a machine without the
    team's paths: Failed within the flow, naming each field to fill, with no task run (so no model
    load and no GPU slot)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline

    params = _deployment_defaults("pipeline")
    state = pipeline(**params, return_state=True)
    assert state.is_failed()
    for field in ("extract.dataset = '/data/EventGPT/DSEC'", "extract.drafter = '/models/EventGPT-7b'",
                  "extract.target = '/models/Video-LLaVA-7B-hf'"):
        assert field in state.message, state.message
    assert "nothing was started" in state.message and "Custom run" in state.message
    with get_client(sync_client=True) as client:  # the flow run's final state is written after its task runs'
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert runs == []


def test_stage_flows_name_their_missing_inputs(tmp_path):
    from egpt_core.config import EvalConfig, TrainAdapterConfig
    from flows.evaluate import evaluate
    from flows.train import train_adapter

    state = train_adapter(TrainAdapterConfig(train=[str(tmp_path / "no-store")], out=str(tmp_path / "run")),
                          return_state=True)
    assert state.is_failed() and f"train[0] = '{tmp_path / 'no-store'}': no store there" in state.message
    state = evaluate(EvalConfig(store=str(tmp_path / "s"), out=str(tmp_path / "e"), adapter_run=str(tmp_path / "r")),
                     return_state=True)
    assert state.is_failed() and "store = " in state.message and "adapter_run = " in state.message


def test_extract_ray_deployment_defaults_fail_before_any_task():
    """The `extract-ray/ray` deployment's defaults on a machine without the team's paths: the flow body
    stops at once, naming the fields (no feature task, no Ray GPU asked for)."""
    from egpt_core.errors import ConfigError
    from flows.extract_ray import extract_ray

    params = extract_ray.validate_parameters(_deployment_defaults("extract_ray"))
    with pytest.raises(ConfigError, match="extract-ray: nothing was started") as refused:
        extract_ray.fn(**params)
    for field in ("dataset = '/data/EventGPT/DSEC'", "drafter = '/models/EventGPT-7b'",
                  "target = '/models/Video-LLaVA-7B-hf'"):
        assert field in str(refused.value), refused.value


def test_extract_ray_refuses_a_ray_cluster_without_gpus(monkeypatch):
    """prefect-ray's address="auto" without RAY_ADDRESS or a Ray node silently starts a local Ray with
    no GPUs, where every num_gpus=1 task waits forever: the flow refuses such a cluster, saying why."""
    import ray

    from egpt_core.errors import ConfigError
    from flows.extract_ray import _require_ray_gpus

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    with pytest.raises(ConfigError, match="has no GPUs .*RAY_ADDRESS=None.*Ray node"):
        _require_ray_gpus()
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 2.0})
    _require_ray_gpus()  # a cluster with GPUs: the run goes on
