"""Writes tests/store/data/store_0ff812c with the store code of commit 0ff812c.

    git archive 0ff812c egpt_core | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/store/data/make_store_0ff812c.py tests/store/data/store_0ff812c
"""

import sys

import torch

from egpt_core.store import StoreWriter

D = 8


def records(g: torch.Generator, prefix: str, n: int, bad: tuple[int, ...] = ()):
    rs, ds, ts = [], [], []
    for i in range(n):
        pid = f"scene{prefix}{i}|q0000000{i}"
        if i in bad:
            rs.append({"pair_id": pid, "scene_id": f"scene{prefix}{i}", "question_idx": 0, "question": "What?",
                       "status": "failed", "reason": "file not found"})
            ds.append(None)
            ts.append(None)
            continue
        L = 3 + i
        rs.append({"pair_id": pid, "scene_id": f"scene{prefix}{i}", "question_idx": 0, "question": "What?",
                   "status": "ok", "length": L, "target_response_ids": list(range(10, 10 + L)),
                   "drafter_response_ids": list(range(10, 10 + L)), "target_text": "t", "drafter_text": "d"})
        ds.append(torch.randn(L, D, generator=g))
        ts.append(torch.randn(L, D, generator=g))
    return rs, ds, ts


def main(out: str) -> None:
    g = torch.Generator().manual_seed(13)
    meta = {"hidden_size": D, "dtype": "bfloat16", "mode": "shared_prefix", "compat_key": "old-compat-key",
            "models": {"drafter": {"path": "eventgpt", "fingerprint": "d0d0d0d0d0d0d0d0"},
                       "target": {"path": "videollava", "fingerprint": "t0t0t0t0t0t0t0t0"}},
            "dataset": "/data/old-dataset"}
    w = StoreWriter(out, meta)
    w.commit_shard(*records(g, "a", 3, bad=(1,)))
    w.commit_shard(*records(g, "b", 2))
    w.write_lm_head(torch.randn(16, D, generator=g), "t0t0t0t0t0t0t0t0")


if __name__ == "__main__":
    main(sys.argv[1])
