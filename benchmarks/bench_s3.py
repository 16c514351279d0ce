"""s3_vs_local_extract: extraction wall time with the store on a loopback S3 server (moto) vs local disk."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path


def _moto() -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    return proc, {"key": "bench", "secret": "bench", "endpoint_url": endpoint}


def run() -> dict:
    from egpt_core.config import ExtractConfig, ModelLoadConfig
    from egpt_core.extraction import load_models, run_extraction
    from egpt_core.fsio import url_to_fs
    from egpt_core.models.commands import write_fixtures

    proc, opts = _moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fx = Path(tmp) / "fx"
            write_fixtures(fx, scenes=8, questions=6)

            def cfg(store, **kw):
                # default generation/batching/shard settings (max_new_tokens 50, batch 8, shard 64)
                return ExtractConfig(dataset=str(fx / "dataset"), drafter=str(fx / "eventgpt"),
                                     target=str(fx / "videollava"), store=store,
                                     load=ModelLoadConfig(dtype="float32", device="cpu"), **kw)

            models = load_models(cfg(str(Path(tmp) / "warm")))
            run_extraction(cfg(str(Path(tmp) / "warm")), models=models)  # warm-up
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            url_to_fs(f"s3://{bucket}", opts)[0].mkdir(bucket)
            local_t, s3_t = [], []
            for i in range(3):
                t0 = time.perf_counter()
                run_extraction(cfg(str(Path(tmp) / f"local{i}")), models=models)
                local_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                run_extraction(cfg(f"s3://{bucket}/s{i}", storage_options=opts), models=models)
                s3_t.append(time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return {"s3_vs_local_extract": {
        "ratio": round(min(s3_t) / min(local_t), 3), "goal": "<= 1.3",
        "unit": f"x wall time: 48 pairs x 50 tokens (default batch/shard settings), store on loopback S3 (moto) {min(s3_t):.2f}s vs local disk {min(local_t):.2f}s",
    }}
