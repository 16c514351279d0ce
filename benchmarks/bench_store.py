"""Store size and read speed.

* ``store_bytes_vs_research_format``: bytes per pair of our store (packed, unpadded bf16 safetensors +
  parquet + manifest) over the research format (one padded fp32 ``torch.save`` chunk + index.json)
  for the same 200 synthetic pairs, D = 256, lengths uniform in 11..50. Goal <= 0.4.
* ``store_read_pairs_per_s``: pairs per second streamed by ``StoreReader.iter_pairs`` from a local
  store (fresh reader each pass, so shard files are really read). Random access (``get``) and the
  Dataset path are reported alongside.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from egpt_core.store import StoreReader, StoreWriter

D = 256
N_PAIRS = 200
SHARD = 64


def _pairs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(11, 51, (N_PAIRS,), generator=g).tolist()
    recs, dr, tg = [], [], []
    for i, L in enumerate(lens):
        recs.append({
            "pair_id": f"scene{i // 10:04d}|q{i % 10:08x}", "scene_id": f"scene{i // 10:04d}", "question_idx": i % 10,
            "question": "What are the key elements in this scene?", "status": "ok", "length": L,
            "drafter_response_ids": torch.randint(0, 32000, (L,), generator=g).tolist(),
            "target_response_ids": torch.randint(0, 32000, (L,), generator=g).tolist(),
            "drafter_text": "In the scene, there is a car driving down the road " * 2,
            "target_text": "The image shows a street with several vehicles and trees " * 2,
        })
        dr.append(torch.randn(L, D, generator=g))
        tg.append(torch.randn(L, D, generator=g))
    return recs, dr, tg


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _write_research(root: Path, recs, dr, tg) -> None:
    (root / "chunks").mkdir(parents=True)
    S = max(r["length"] for r in recs)
    eg = torch.zeros(len(recs), S, D)
    vl = torch.zeros(len(recs), S, D)
    meta = []
    for i, (r, d, t) in enumerate(zip(recs, dr, tg)):
        L = r["length"]
        eg[i, :L], vl[i, :L] = d, t
        meta.append({"sample_idx": i // 10, "question_idx": i % 10, "question": r["question"],
                     "egpt_text": r["drafter_text"], "vl_text": r["target_text"], "seq_len": L})
    torch.save({"egpt_hidden": eg, "vl_hidden": vl, "seq_lens": torch.tensor([r["length"] for r in recs]),
                "metadata": meta, "chunk_id": 0, "n_samples": len(recs)}, root / "chunks" / "chunk_000000.pt")
    (root / "index.json").write_text(json.dumps({
        "total_samples": len(recs), "chunk_size": 1000,
        "chunks": [{"path": "chunk_000000.pt", "start_idx": 0, "n_samples": len(recs)}],
        "config": {"split": "test", "duration": "1s", "quant": "4bit", "max_questions": 10,
                   "max_new_tokens": 50, "hidden_dim": D}, "created": "2026-01-01T00:00:00"}))


def _rate(fn, min_s: float = 0.6) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        n += fn()
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return n / dt


def run() -> dict:
    recs, dr, tg = _pairs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = tmp / "store"
        w = StoreWriter(str(store), {"hidden_size": D, "dtype": "bfloat16", "mode": "shared_prefix"})
        for i in range(0, N_PAIRS, SHARD):
            w.commit_shard(recs[i:i + SHARD], dr[i:i + SHARD], tg[i:i + SHARD])
        _write_research(tmp / "research", recs, dr, tg)
        ours = _dir_bytes(store) / N_PAIRS
        theirs = _dir_bytes(tmp / "research") / N_PAIRS

        def stream() -> int:
            return sum(1 for _ in StoreReader(str(store)).iter_pairs())

        reader = StoreReader(str(store))
        ids = reader.pair_ids()
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0)).tolist()

        def random_get() -> int:
            for k in order[:50]:
                reader.get(ids[k])
            return 50

        def dataset() -> int:
            ds = StoreReader(str(store)).dataset()
            for i in range(len(ds)):
                ds[i]
            return len(ds)

        stream_rate = _rate(stream)
        get_rate = _rate(random_get, 0.3)
        ds_rate = _rate(dataset, 0.3)
    return {
        "store_bytes_vs_research_format": {
            "ratio": round(ours / theirs, 4), "goal": "<= 0.4", "unit": "x (bytes per pair)",
            "store_bytes_per_pair": round(ours), "research_bytes_per_pair": round(theirs),
            "pairs": N_PAIRS, "hidden_size": D,
        },
        "store_read_pairs_per_s": {
            "ratio": round(stream_rate, 1), "goal": None, "unit": "pairs/s",
            "random_get_pairs_per_s": round(get_rate, 1), "dataset_items_per_s": round(ds_rate, 1),
            "hidden_size": D, "cpu_count": os.cpu_count(),
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
