"""Helpers of the evaluation tests: small synthetic stores (real StoreWriter), nested-result comparison."""

from __future__ import annotations

import pytest
import torch

D, V = 16, 50


def build_store(url: str, *, identical: bool = False, n_shards: int = 4, per_shard: int = 3, seed: int = 0,
                lm_head: bool = True, mode: str = "shared_prefix", min_len: int = 3, max_len: int = 12):
    """Store with ``n_shards`` shards of ``per_shard`` ok pairs (+ one failed pair in shard 0).

    Target token ids = argmax of the LM head on the target rows, except that in pair 1 of every shard
    the last stored id is replaced (a reference token the target row does not predict).
    Returns (lm_head, list of (drafter [L, D], target [L, D], target ids)) in store order.
    """
    from egpt_core.store import StoreWriter

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g)
    w = StoreWriter(url, {"hidden_size": D, "dtype": "float32", "mode": mode})
    pairs = []
    for s in range(n_shards):
        recs, ds, ts = [], [], []
        for j in range(per_shard):
            L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            t = torch.randn(L, D, generator=g)
            d = t.clone() if identical else t + 0.7 * torch.randn(L, D, generator=g)
            ids = (t @ W.T).argmax(-1).tolist()
            if j == 1 and not identical:
                ids[-1] = (ids[-1] + 1) % V
            recs.append({"pair_id": f"s{s}|q{j}", "scene_id": f"s{s}", "question_idx": j, "status": "ok",
                         "length": L, "target_response_ids": ids, "drafter_response_ids": ids})
            ds.append(d)
            ts.append(t)
            pairs.append((d, t, ids))
        if s == 0:
            recs.append({"pair_id": "s0|bad", "status": "failed", "reason": "truncated .npy"})
            ds.append(None)
            ts.append(None)
        w.commit_shard(recs, ds, ts)
    if lm_head:
        w.write_lm_head(W, fingerprint="test-head")
    return W, pairs




def assert_close(a, b, path="root"):
    """Recursive equality of JSON-like results; floats within 1e-5."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-5), path
    else:
        assert a == b, path
