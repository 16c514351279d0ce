"""The Ray path of deployments/README.md §8, as users run it: `flows/extract_ray.py` on a local Ray
cluster (loopback, 2 GPUs faked with `--num-gpus`, as the README does) against a real `prefect server`.

The store equals `egpt extract` of the same config bitwise; every task run the Ray workers ran ends
Completed on the server (with the embedded API they would report to temporary servers of their own
and stay "Running"); a rerun is served from the cache and leaves the store as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect_cluster import REPO, free_port, prefect_cluster, stop
from test_fanout import _assert_equals_reference, _snapshot

pytestmark = pytest.mark.slow

#: the Ray settings of the test cluster: loopback addresses (Ray maps 127.0.0.1 to the host's
#: address unless the "single-machine" mode is on), no usage reporting
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

DRIVER = """
import json, sys
from egpt_core.config import ExtractConfig
from flows.extract_ray import extract_ray
state = extract_ray(ExtractConfig.model_validate_json(sys.argv[1]), return_state=True)
print("RESULT " + json.dumps({"run": str(state.state_details.flow_run_id), "state": state.name,
                              "store": state.result().model_dump() if state.is_completed() else state.message}))
"""


@contextlib.contextmanager
def ray_head(env: dict[str, str], num_gpus: int = 2) -> Iterator[str]:
    """`ray start --head --block` on loopback (its own temp dir, short enough for Ray's socket
    paths); yields the address; SIGTERM to the blocking `ray start` stops every process it started."""
    temp = Path(tempfile.mkdtemp(prefix="egpt-ray-", dir="/tmp"))
    port = free_port()
    log = open(temp / "head.log", "w")  # noqa: SIM115 (closed below)
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", f"--ray-client-server-port={free_port()}", "--num-cpus=2", f"--num-gpus={num_gpus}",
         "--object-store-memory=100000000", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in (temp / "head.log").read_text(errors="replace"):
            assert head.poll() is None, (temp / "head.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "ray head not started after 180 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        stop(head, timeout_s=60)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _cfg(fixture_paths, store):
    """6 pairs (2 scenes x 3 questions) in 2 shard groups; batch_size=1 and shard_size=1 make every
    pair's rows and shard independent of the grouping, so the stores can be compared bitwise."""
    from egpt_core.config import ExtractConfig
    from flows.demo import CPU_FP32

    return ExtractConfig(dataset=str(fixture_paths["dataset"]), drafter=str(fixture_paths["eventgpt"]),
                         target=str(fixture_paths["videollava"]), store=str(store), load=CPU_FP32, max_scenes=2,
                         max_new_tokens=8, batch_size=1, shard_size=1, shard_groups=2)


def _run_driver(cfg, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", DRIVER, cfg.model_dump_json()], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"driver failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_extract_ray_flow_equals_egpt_extract(fixture_paths, tmp_path):
    cfg = _cfg(fixture_paths, tmp_path / "ray-store")
    reference = cfg.model_copy(update={"store": str(tmp_path / "cli-store")})
    (tmp_path / "cli.json").write_text(reference.model_dump_json())
    cli = subprocess.run([str(Path(sys.executable).with_name("egpt")), "extract", "--config", str(tmp_path / "cli.json")],
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
                              "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr

    with prefect_cluster(tmp_path / "prefect") as cluster:
        env = {**cluster.env, **RAY_ENV, "PYTHONPATH": str(REPO)}
        with ray_head(env) as address:
            driver_env = {**env, "RAY_ADDRESS": address, "PREFECT_HOME": str(tmp_path / "driver")}
            first = _run_driver(cfg, driver_env)
            assert first["state"] == "Completed", first
            assert first["store"]["counts"] == {"ok": 6, "failed": 0, "skipped": 0}
            _assert_equals_reference(_snapshot(cfg.store), _snapshot(reference.store))

            with cluster.client() as client:
                from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first["run"]])))
            states = {r.name: r.state.name for r in runs}
            assert sum(n.startswith("extract-") for n in states) == 2 and any(n.startswith("features-") for n in states)
            assert set(states.values()) == {"Completed"}, states  # reported to the server, not left "Running"

            before = _snapshot(cfg.store)
            again = _run_driver(cfg, driver_env)
            assert again["state"] == "Completed" and again["store"] == first["store"]
            with cluster.client() as client:
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again["run"]])))
            cached = {r.name: r.state.name for r in runs if r.name.startswith(("features-", "extract-"))}
            assert len(cached) == 3 and set(cached.values()) == {"Cached"}, cached
            _assert_equals_reference(_snapshot(cfg.store), before)
