"""S3 through fsspec/s3fs against moto's standalone S3 server on loopback."""

from __future__ import annotations

import shutil

import torch

from egpt_core.config import ExtractConfig, ModelLoadConfig
from egpt_core.extraction import run_extraction
from egpt_core.fsio import url_to_fs
from egpt_core.store import StoreReader


def _cfg(fx, store, **kw):
    base = dict(dataset=str(fx / "dataset"), drafter=str(fx / "eventgpt"), target=str(fx / "videollava"),
                store=store, max_new_tokens=6, min_tokens=2, batch_size=4, shard_size=3, max_scenes=2,
                load=ModelLoadConfig(dtype="float32", device="cpu"))
    base.update(kw)
    return ExtractConfig(**base)


def test_extraction_to_s3_equals_local(tmp_path, fixtures_dir, s3_server, s3_bucket, s3_secret):
    from egpt_core.extraction import load_models

    models = load_models(_cfg(fixtures_dir, str(tmp_path / "x")))
    local = str(tmp_path / "local")
    remote = f"{s3_bucket}/stores/run1"
    run_extraction(_cfg(fixtures_dir, local), models=models)
    run_extraction(_cfg(fixtures_dir, remote, storage_options=s3_server), models=models)
    a, b = StoreReader(local), StoreReader(remote, s3_server)
    assert [(s["name"], s["sha256"]) for s in a.manifest["shards"]] == \
           [(s["name"], s["sha256"]) for s in b.manifest["shards"]]  # byte-identical shards
    for pa, pb in zip(a.iter_pairs(), b.iter_pairs()):
        assert pa.pair_id == pb.pair_id
        assert torch.equal(pa.drafter, pb.drafter) and torch.equal(pa.target, pb.target)
    # random access by byte ranges on the object store == streaming
    some = b.pair_ids()[-1]
    got = b.get(some)
    ref = next(p for p in a.iter_pairs() if p.pair_id == some)
    assert torch.equal(got.drafter, ref.drafter) and got.target_response_ids == ref.target_response_ids
    assert torch.equal(a.lm_head(), b.lm_head())
    # credentials never land in the store
    fs, root = url_to_fs(remote, s3_server)
    for path in fs.find(root):
        if path.endswith(".json"):
            assert s3_secret.encode() not in fs.cat(path)


def test_s3_checkpoints_fetched_once_into_local_cache(tmp_path, fixtures_dir, s3_server, s3_bucket, monkeypatch):
    from egpt_core.models import load_eventgpt

    monkeypatch.setenv("EGPT_CACHE_DIR", str(tmp_path / "cache"))
    fs, _ = url_to_fs(s3_bucket, s3_server)
    local_copy = tmp_path / "egpt"
    shutil.copytree(fixtures_dir / "eventgpt", local_copy)
    fs.put(str(local_copy), f"{s3_bucket.removeprefix('s3://')}/ckpt/eventgpt", recursive=True)
    load = ModelLoadConfig(dtype="float32", device="cpu")
    remote = load_eventgpt(f"{s3_bucket}/ckpt/eventgpt", load, storage_options=s3_server)
    ref = load_eventgpt(str(fixtures_dir / "eventgpt"), load)
    assert remote.fingerprint == ref.fingerprint
    cached = list((tmp_path / "cache" / "checkpoints").iterdir())
    assert len(cached) == 1
    before = {p: p.stat().st_mtime_ns for p in cached[0].rglob("*")}
    load_eventgpt(f"{s3_bucket}/ckpt/eventgpt", load, storage_options=s3_server)  # served from the cache
    assert {p: p.stat().st_mtime_ns for p in cached[0].rglob("*")} == before
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, remote.model.state_dict()[k]), k
