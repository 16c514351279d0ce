"""Session fixtures: tiny seeded checkpoints + a synthetic dataset, built once through `egpt fixtures`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_RECORDING = SHARED_DATA / "eventgpt_sample1.npy"


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    """OUTDIR with eventgpt/, videollava/ and dataset/ (4 scenes x 3 questions)."""
    from egpt_core.models.commands import write_fixtures

    out = tmp_path_factory.mktemp("fixtures")
    write_fixtures(out, scenes=4, questions=3, seed=0)
    return out


@pytest.fixture(scope="session")
def fp32():
    from egpt_core.config import ModelLoadConfig

    return ModelLoadConfig(dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def drafter(fixtures_dir, fp32):
    from egpt_core.models import load_eventgpt

    return load_eventgpt(str(fixtures_dir / "eventgpt"), fp32)


@pytest.fixture(scope="session")
def target(fixtures_dir, fp32):
    from egpt_core.models import load_videollava

    return load_videollava(str(fixtures_dir / "videollava"), fp32)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the S3 credentials of the test session: given the standard way, as AWS variables of the environment
#: (configs refuse credentials in storage_options)
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "egpt-test-key", "AWS_SECRET_ACCESS_KEY": "egpt-test-SECRET-do-not-log"}


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on a loopback port; yields storage_options for it
    (``{"endpoint_url": ...}``); its credentials are in this process's environment while it runs."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto S3 server did not start") from None
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in S3_TEST_CREDENTIALS}
    os.environ.update(S3_TEST_CREDENTIALS)
    try:
        yield {"endpoint_url": endpoint}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def s3_secret() -> str:
    """The secret access key of the moto session (to check that it never leaks)."""
    return S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; yields its s3:// URL."""
    import uuid

    from egpt_core.fsio import url_to_fs

    name = f"egpt-{uuid.uuid4().hex[:12]}"
    fs, _ = url_to_fs(f"s3://{name}", s3_server)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> dict[str, str]:
    """THE Prefect test server of the session (one per process: Prefect's event/log workers are
    process-global), task results under a temp dir (not ~/.prefect). Opt-in: only Prefect-level
    tests pay for it (~10 s, once).

    Yields the settings a child process needs to use the same server and result storage.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(storage)}):
        with prefect_test_harness(server_startup_timeout=90):
            yield {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(storage)}
