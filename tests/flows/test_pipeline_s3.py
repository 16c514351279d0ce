"""The whole `pipeline` flow (extract, L1 + L4 adapters, L6 LoRA + merged-drafter export + retf
re-extraction, evaluations, comparison) with its store and run outputs on `s3://` (moto's standalone
S3 server on loopback, credentials from the environment) equals the same config on local disk: same
pairs, bitwise the same shards and tensors (both stores), the same metrics per run, and the S3
credentials appear in no output object and no task result."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

FIGURES: dict[str, object] = {}


def _pipeline_config(fixture_paths, root: Path, store: str, out: str, storage_options: dict):
    """The demo's pipeline (identity + L1 + L4 + L6 on the tiny fixtures, CPU float32) with the store
    and every run output at ``store`` / ``out``."""
    from flows.demo import demo_config

    base = demo_config(root, fixture_paths, lora=True)
    extract = base.extract.model_copy(update={"store": store, "storage_options": storage_options})
    return base.model_copy(update={"extract": extract, "lora": base.lora.model_copy(update={"store": store}),
                                   "out": out})


@pytest.fixture(scope="module")
def runs(fixture_paths, tmp_path_factory, s3_server):
    """{"local": (cfg, PipelineResult), "s3": (cfg, PipelineResult)}, both through the flow."""
    import uuid

    from egpt_core.fsio import url_to_fs
    from flows.pipeline import pipeline

    bucket = f"egpt-pipe-{uuid.uuid4().hex[:10]}"
    fs, _ = url_to_fs(f"s3://{bucket}", s3_server)
    fs.mkdir(bucket)
    local_root = tmp_path_factory.mktemp("pipeline-local")
    configs = {
        "local": _pipeline_config(fixture_paths, local_root, str(local_root / "store"), str(local_root / "runs"), {}),
        "s3": _pipeline_config(fixture_paths, tmp_path_factory.mktemp("pipeline-s3"), f"s3://{bucket}/store",
                               f"s3://{bucket}/runs", dict(s3_server)),
    }
    out = {}
    with pytest.MonkeyPatch.context() as mp:  # the merged drafter is fetched from S3 into this cache
        mp.setenv("EGPT_CACHE_DIR", str(tmp_path_factory.mktemp("egpt-cache")))
        for where, cfg in configs.items():
            t0 = time.perf_counter()
            state = pipeline(cfg, return_state=True)
            FIGURES[f"pipeline flow on {where} (s)"] = round(time.perf_counter() - t0, 1)
            assert state.is_completed(), f"{where}: {state.name}: {state.message}"
            out[where] = (cfg, state.result())
    yield out
    print("\npipeline S3 vs local:", *(f"  {k}: {v}" for k, v in FIGURES.items()), sep="\n")


def _metrics(out_url: str, storage_options: dict) -> dict:
    from egpt_core.fsio import join, url_to_fs

    fs, path = url_to_fs(join(out_url, "metrics.json"), storage_options)
    with fs.open(path, "rt") as f:
        return json.load(f)


def _numbers(obj, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a JSON document by its path (lists by index)."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _numbers(val, f"{prefix}.{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in _numbers(val, f"{prefix}[{i}]").items()}
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix: obj}
    return {}


def _same_number(a: float, b: float) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _store(url: str, storage_options: dict) -> dict:
    from egpt_core.store import StoreReader

    r = StoreReader(url, storage_options)
    r.verify()
    return {
        "ids": r.pair_ids(status=None),
        "pairs": r.pairs().sort_by("pair_id").drop_columns(["row_offset", "shard"]).to_pylist(),
        "shards": sorted((s["name"], s["sha256"]["pairs"], s["sha256"]["tensors"]) for s in r.manifest["shards"]),
        "counts": r.counts, "mode": r.meta["mode"],
        "rows": {p.pair_id: (p.drafter, p.target) for p in r.iter_pairs()},
        "lm_head": r.lm_head(),
    }


def test_pipeline_on_s3_equals_local_disk(runs):
    (_, local), (s3_cfg, remote) = runs["local"], runs["s3"]
    so = s3_cfg.extract.storage_options
    outputs = [remote.stores[0].url, remote.lora.adapter_dir, remote.lora.merged_drafter.path, remote.comparison.out_url,
               *(a.run_url for a in remote.adapters), *(r.out_url for r in remote.runs), remote.benchmark.out_url,
               *(r.out_url for r in remote.benchmark.runs)]
    assert all(u.startswith(f"{s3_cfg.out}/") or u == s3_cfg.extract.store for u in outputs), outputs

    # the extracted store and the L6 retf store (written from the merged drafter, read back from S3)
    local_l6, remote_l6 = (_metrics(r.runs[-1].out_url, o) for r, o in ((local, {}), (remote, so)))
    pairs_of = [(local.stores[0].url, remote.stores[0].url), (local_l6["inputs"]["store"], remote_l6["inputs"]["store"])]
    assert pairs_of[1][1].startswith(f"{s3_cfg.extract.store}-retf-")
    for local_url, remote_url in pairs_of:
        a, b = _store(local_url, {}), _store(remote_url, so)
        assert len(b["ids"]) == len(set(b["ids"])) and sorted(a["ids"]) == sorted(b["ids"]), remote_url
        assert a["pairs"] == b["pairs"] and a["counts"] == b["counts"] and a["mode"] == b["mode"], remote_url
        assert a["shards"] == b["shards"], remote_url  # byte-identical shard files
        assert a["rows"].keys() == b["rows"].keys()
        for k, (d, t) in a["rows"].items():
            assert torch.equal(b["rows"][k][0], d) and torch.equal(b["rows"][k][1], t), (remote_url, k)
        assert torch.equal(a["lm_head"], b["lm_head"])
        FIGURES[f"{a['mode']} store: pairs / shards equal"] = f"{len(a['ids'])} / {len(a['shards'])}"

    # every evaluation: the same numbers in metrics.json, per run name
    assert [r.name for r in local.runs] == [r.name for r in remote.runs] == ["identity", "L1", "L4", "L6"]
    for lr, rr in zip(local.runs, remote.runs):
        a, b = _numbers(_metrics(lr.out_url, {})), _numbers(_metrics(rr.out_url, so))
        assert a.keys() == b.keys(), (lr.name, a.keys() ^ b.keys())
        differ = {k: (a[k], b[k]) for k in a if not _same_number(a[k], b[k])}
        assert not differ, (lr.name, differ)
        assert lr.n_pairs == rr.n_pairs
        FIGURES[f"metrics {lr.name}: numbers equal"] = len(a)
    assert [(a.level, a.best_val_loss, a.epochs_run, a.n_train_pairs, a.n_val_pairs) for a in local.adapters] == \
           [(a.level, a.best_val_loss, a.epochs_run, a.n_train_pairs, a.n_val_pairs) for a in remote.adapters]
    # stage 5 read its pairs, LM head, adapters and the merged drafter from S3: the same measured rounds
    # (wall-clock figures differ from run to run, acceptance and losslessness do not)
    deterministic = ("acceptance_length", "simulated_acceptance_length", "round_agreement", "accept_rate",
                     "tokens_per_round", "lossless_mismatches")
    for lr, rr in zip(local.benchmark.runs, remote.benchmark.runs):
        assert lr.name == rr.name and lr.n_pairs == rr.n_pairs
        assert {k: v for k, v in lr.summary.items() if k.startswith(deterministic)} == \
               {k: v for k, v in rr.summary.items() if k.startswith(deterministic)}, lr.name
    # the comparison table too, but for the fingerprint of the L6 retf store: its manifest records where
    # its drafter and source store live (a local path vs an s3:// URL); the extracted store's is equal;
    # and but for the measured wall-clock speedup
    assert local.stores[0].fingerprint == remote.stores[0].fingerprint
    varying = {"store_fingerprint", "measured_speedup_e2e_gamma5"}
    assert [{k: v for k, v in row.items() if k not in varying} for row in local.comparison.rows] == \
           [{k: v for k, v in row.items() if k not in varying} for row in remote.comparison.rows]


def test_s3_credentials_stay_out_of_outputs_and_results(runs, s3_secret):
    from egpt_core.fsio import url_to_fs

    s3_cfg, remote = runs["s3"]
    secret = s3_secret
    assert secret not in remote.model_dump_json()
    fs, root = url_to_fs(s3_cfg.out.rsplit("/", 1)[0], s3_cfg.extract.storage_options)
    texts = [p for p in fs.find(root) if p.endswith((".json", ".md", ".yaml", ".txt"))]
    assert texts and not [p for p in texts if secret.encode() in fs.cat_file(p)]
