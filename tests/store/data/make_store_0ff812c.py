"""Writes tests/store/data/store_0ff812c with the store code of commit 0ff812c (run with PYTHONPATH=<that code>)."""
import sys
import torch
from egpt_core.store import StoreWriter

out = sys.argv[1]
D = 8
g = torch.Generator().manual_seed(13)
meta = {"hidden_size": D, "dtype": "bfloat16", "mode": "shared_prefix", "compat_key": "old-compat-key",
        "models": {"drafter": {"path": "eventgpt", "fingerprint": "d0d0d0d0d0d0d0d0"},
                   "target": {"path": "videollava", "fingerprint": "t0t0t0t0t0t0t0t0"}},
        "dataset": "/data/old-dataset"}
w = StoreWriter(out, meta)
def recs(prefix, n, bad=()):
    rs, ds, ts = [], [], []
    for i in range(n):
        pid = f"scene{prefix}{i}|q0000000{i}"
        if i in bad:
            rs.append({"pair_id": pid, "scene_id": f"scene{prefix}{i}", "question_idx": 0, "question": "What?",
                       "status": "failed", "reason": "file not found"})
            ds.append(None); ts.append(None)
            continue
        L = 3 + i
        rs.append({"pair_id": pid, "scene_id": f"scene{prefix}{i}", "question_idx": 0, "question": "What?",
                   "status": "ok", "length": L, "target_response_ids": list(range(10, 10 + L)),
                   "drafter_response_ids": list(range(10, 10 + L)), "target_text": "t", "drafter_text": "d"})
        ds.append(torch.randn(L, D, generator=g)); ts.append(torch.randn(L, D, generator=g))
    return rs, ds, ts
w.commit_shard(*recs("a", 3, bad=(1,)))
w.commit_shard(*recs("b", 2))
w.write_lm_head(torch.randn(16, D, generator=g), "t0t0t0t0t0t0t0t0")
print("ok")
