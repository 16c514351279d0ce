"""Store comparisons shared by the storage-fault and concurrent-run tests."""

from __future__ import annotations

import hashlib
import os

import torch

from egpt_core.store import StoreReader, StoreWriter
from egpt_core.store import manifest as mf


def local_root(url: str) -> str:
    """The local directory behind a path, file:// or flaky:// store URL."""
    for prefix in ("flaky://", "file://"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return url


def assert_consistent(url: str) -> dict:
    """What a reader sees is whole: every committed file matches its sha256 and size, every shard's
    pairs table and tensors agree with the manifest, no pair is in two shards. Returns the manifest."""
    r = StoreReader(url)
    r.verify()
    seen: dict[str, str] = {}
    for sh, data in zip(r.shards, r.iter_shards(), strict=True):  # iter_shards checks the row offsets
        table = r._table(sh)
        assert table.num_rows == sh["pairs"], (sh["name"], table.num_rows, sh["pairs"])
        assert data.drafter.shape[0] == data.target.shape[0] == sh["rows"], sh["name"]
        for pid in table.column("pair_id").to_pylist():
            assert pid not in seen, f"pair {pid} is in shards {seen[pid]} and {sh['name']}"
            seen[pid] = sh["name"]
    assert sum(r.manifest["counts"].values()) == len(seen) == r.manifest["totals"]["pairs"]
    return r.manifest


def snapshot(url: str) -> dict:
    """Everything a store holds that must not depend on how it was written (faults, retries, races)."""
    manifest = assert_consistent(url)
    r = StoreReader(url)
    pairs = r.pairs().sort_by("pair_id").to_pylist()
    rows = {p.pair_id: (p.drafter, p.target) for p in r.iter_pairs()}
    root = local_root(url)
    features = {}
    fdir = os.path.join(root, mf.FEATURES_DIR)
    for name in sorted(os.listdir(fdir)) if os.path.isdir(fdir) else []:
        with open(os.path.join(fdir, name), "rb") as f:
            features[name] = hashlib.sha256(f.read()).hexdigest()
    return {
        "pair_ids": [p["pair_id"] for p in pairs],
        "pairs": pairs,
        "rows": rows,
        "counts": manifest["counts"],
        "totals": manifest["totals"],
        "reasons": manifest["reasons"],
        "shards": sorted((s["name"], s["pairs"], s["rows"], s["sha256"]["pairs"], s["sha256"]["tensors"])
                         for s in manifest["shards"]),
        "fingerprint": manifest["fingerprint"],
        "lm_head": (manifest.get("lm_head") or {}).get("sha256"),
        "features": features,
    }


def assert_same_rows(got: dict, want: dict) -> None:
    assert sorted(got["rows"]) == sorted(want["rows"])
    for pid, (d, t) in want["rows"].items():
        gd, gt = got["rows"][pid]
        assert torch.equal(gd, d) and torch.equal(gt, t), f"pair {pid}: rows differ"


def assert_same_store(got: dict, want: dict) -> None:
    """Identical stores: pairs (every column), bitwise rows, counts, shard sha256s, fingerprint,
    LM head, cached features."""
    for key in ("pair_ids", "counts", "totals", "reasons", "shards", "lm_head", "features", "fingerprint"):
        assert got[key] == want[key], key
    assert got["pairs"] == want["pairs"]
    assert_same_rows(got, want)


def leftovers(url: str) -> list[str]:
    """Files a finished run must not leave: orphan shard files, temporaries, the commit lock."""
    found = []
    root = local_root(url)
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f == mf.LOCK or ".flaky-put-" in f or mf.TMP_MARK in f:
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    if mf.LOCK not in found:  # gc takes the lock
        found += StoreWriter(url, {}, lock_timeout_s=5).gc(min_tmp_age_s=0, dry_run=True)
    return sorted(set(found))
