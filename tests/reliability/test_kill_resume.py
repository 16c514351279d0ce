"""Kill -9 of an extraction at six points, then rerun: the store equals an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from egpt_core.config import ExtractConfig, ModelLoadConfig
from egpt_core.extraction import load_models, run_extraction
from egpt_core.store import StoreReader

POINTS = ["features", "mid-generate", "tensor-write", "before-manifest", "manifest-write", "lm-head"]
RUNNER = Path(__file__).with_name("kill_runner.py")


def _cfg(fx: Path, store: str) -> ExtractConfig:
    return ExtractConfig(dataset=str(fx / "dataset"), drafter=str(fx / "eventgpt"), target=str(fx / "videollava"),
                         store=store, max_new_tokens=6, min_tokens=2, batch_size=2, shard_size=2, max_scenes=3,
                         max_questions=2, load=ModelLoadConfig(dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def kill_models(fixtures_dir, tmp_path_factory):
    return load_models(_cfg(fixtures_dir, str(tmp_path_factory.mktemp("m"))))


@pytest.fixture(scope="module")
def baseline(fixtures_dir, tmp_path_factory, kill_models):
    url = str(tmp_path_factory.mktemp("baseline") / "store")
    run_extraction(_cfg(fixtures_dir, url), models=kill_models)
    return url


def _visible(url: str) -> dict:
    r = StoreReader(url)
    r.verify()  # every committed shard matches its sha256
    pairs = r.pairs().sort_by("pair_id").drop_columns(["row_offset", "shard"]).to_pylist()
    rows = {p.pair_id: (p.drafter, p.target) for p in r.iter_pairs()}
    return {"pairs": pairs, "rows": rows, "counts": r.manifest["counts"], "head": r.lm_head(),
            "shards": sorted((s["name"], s["sha256"]["tensors"]) for s in r.manifest["shards"])}


@pytest.mark.parametrize("point", POINTS)
def test_kill9_then_rerun_equals_uninterrupted(point, tmp_path, fixtures_dir, baseline, kill_models):
    url = str(tmp_path / "store")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(_cfg(fixtures_dir, url).model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, str(RUNNER), str(cfg_file), point], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    if Path(url, "manifest.json").exists():  # readers see only committed shards, never a torn file
        partial = StoreReader(url)
        partial.verify()
        assert len(partial.pair_ids(status=None)) == sum(s["pairs"] for s in partial.manifest["shards"])
    run_extraction(_cfg(fixtures_dir, url), models=kill_models)
    got, want = _visible(url), _visible(baseline)
    assert got["pairs"] == want["pairs"] and got["counts"] == want["counts"]
    assert got["shards"] == want["shards"]
    assert torch.equal(got["head"], want["head"])
    for k in want["rows"]:
        assert torch.equal(got["rows"][k][0], want["rows"][k][0]) and torch.equal(got["rows"][k][1], want["rows"][k][1])
    ids = StoreReader(url).pair_ids(status=None)
    assert len(ids) == len(set(ids)) == 6  # nothing lost, nothing duplicated
