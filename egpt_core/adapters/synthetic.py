"""A synthetic hidden-state store for adapter tests, benchmarks and demos.

Target rows are a fixed random affine map of the drafter rows plus small noise, so a correct
adapter/trainer reaches a high cosine similarity quickly.
"""

from __future__ import annotations

from typing import Any

import torch

from egpt_core.fsio import Location


def write_synthetic_pair_store(url: str | Location, *, hidden_size: int = 32, n_scenes: int = 20, pairs_per_scene: int = 10,
                               min_len: int = 3, max_len: int = 12, noise: float = 0.01, seed: int = 0,
                               shard_size: int = 50, dtype: str = "float32", map_seed: int = 1234,
                               n_failed: int = 0, scene_prefix: str = "scene", normalize_rows: bool = True,
                               storage_options: dict | None = None, meta: dict | None = None) -> dict[str, Any]:
    """Write ``n_scenes * pairs_per_scene`` ok pairs (+ ``n_failed`` failed ones) with the store's
    StoreWriter into the store ``url`` (a Location, or a URL with its ``storage_options``); returns
    {"url", "pairs", "scenes", "hidden_size", "rows"}.

    ``map_seed`` fixes the affine map (use the same value for train and val stores).
    ``normalize_rows`` standardises each drafter row (mean 0, variance 1), as final-norm hidden
    states roughly are. ``meta``: further store metadata (e.g. ``model_fingerprints``).
    """
    from egpt_core.store import StoreWriter

    d = hidden_size
    gm = torch.Generator().manual_seed(map_seed)
    weight = torch.randn(d, d, generator=gm) / d**0.5
    bias = 0.5 * torch.randn(d, generator=gm)
    g = torch.Generator().manual_seed(seed)
    writer = StoreWriter(url, {"hidden_size": d, "dtype": dtype, "mode": "synthetic", "notes": "synthetic affine map",
                               **(meta or {})}, storage_options=storage_options)
    records, dra, tgt = [], [], []
    rows = 0

    def flush():
        if records:
            writer.commit_shard(list(records), list(dra), list(tgt))
            records.clear()
            dra.clear()
            tgt.clear()

    for s in range(n_scenes):
        scene = f"{scene_prefix}{s:04d}"
        for q in range(pairs_per_scene):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            h_d = torch.randn(length, d, generator=g)
            if normalize_rows:  # like final post-norm hidden states: every row has mean 0, variance 1
                h_d = torch.nn.functional.layer_norm(h_d, (d,))
            h_t = h_d @ weight + bias + noise * torch.randn(length, d, generator=g)
            ids = torch.randint(3, 1000, (length,), generator=g).tolist()
            records.append({"pair_id": f"{scene}|q{q:04d}", "scene_id": scene, "question_idx": q,
                            "question": f"question {q}?", "status": "ok", "length": length,
                            "drafter_response_ids": ids, "target_response_ids": ids})
            dra.append(h_d)
            tgt.append(h_t)
            rows += length
            if len(records) >= shard_size:
                flush()
    for i in range(n_failed):
        records.append({"pair_id": f"failed|q{i:04d}", "scene_id": f"{scene_prefix}{i % max(n_scenes, 1):04d}",
                        "question_idx": 10_000 + i, "status": "failed", "reason": "synthetic failure"})
        dra.append(None)
        tgt.append(None)
    flush()
    return {"url": writer.url, "pairs": n_scenes * pairs_per_scene, "scenes": n_scenes, "hidden_size": d, "rows": rows}
