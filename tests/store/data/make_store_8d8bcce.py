"""Writes tests/store/data/store_8d8bcce with the store code of commit 8d8bcce (before store/schema.py),
with the meta extraction wrote then (``egpt_core.extraction.run.store_meta``: model and config
fingerprints, compat settings), input fingerprints, row digests and an LM head with its vocabulary.

    git archive 8d8bcce | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/store/data/make_store_8d8bcce.py tests/store/data/store_8d8bcce
"""

import sys

import torch

from egpt_core.fingerprint import hash_json
from egpt_core.store import StoreWriter

D = 8
POSITION_CONVENTION = "row t = final post-norm hidden state at input position P-1+t (predicts g_t)"


def records(g: torch.Generator, prefix: str, n: int, bad: tuple[int, ...] = ()):
    rs, ds, ts = [], [], []
    for i in range(n):
        pid = f"scene{prefix}{i}|q0000000{i}"
        base = {"pair_id": pid, "scene_id": f"scene{prefix}{i}", "question_idx": i, "question": "What moves?",
                "input_fingerprint": f"event={prefix}{i},video={prefix}{i},question=q{i}"}
        if i in bad:
            rs.append({**base, "status": "failed", "reason": "file not found"})
            ds.append(None)
            ts.append(None)
            continue
        L = 3 + i
        rs.append({**base, "status": "ok", "length": L, "drafter_prompt_ids": [1, 5, 6],
                   "target_prompt_ids": [1, 7, 8, 9], "target_response_ids": list(range(10, 10 + L)),
                   "drafter_response_ids": list(range(10, 10 + L)), "target_text": "t", "drafter_text": "d"})
        ds.append(torch.randn(L, D, generator=g))
        ts.append(torch.randn(L, D, generator=g))
    return rs, ds, ts


def main(out: str) -> None:
    g = torch.Generator().manual_seed(15)
    models = {"drafter": {"path": "/ckpt/eventgpt", "fingerprint": "d1d1d1d1d1d1d1d1"},
              "target": {"path": "/ckpt/videollava", "fingerprint": "t1t1t1t1t1t1t1t1"}}
    generation = {"max_new_tokens": 8, "min_tokens": 1, "greedy": True}
    settings = {"version": 3, "mode": "shared_prefix", "generation": generation, "events": {"n_frames": 1},
                "n_video_frames": 8, "models": {k: v["fingerprint"] for k, v in models.items()}, "retf_side": None,
                "load": {"quantize": "none"}}
    meta = {"model_fingerprints": settings["models"],
            "config_fingerprint": hash_json({k: v for k, v in settings.items() if k != "models"}),
            "mode": "shared_prefix", "position_convention": POSITION_CONVENTION, "hidden_size": D,
            "dtype": "bfloat16", "models": models, "generation": generation, "events": {"n_frames": 1},
            "n_video_frames": 8, "frame_sampling": "linspace", "dataset": "/data/dataset", "source_store": None,
            "compat_key": hash_json(settings), "compat_settings": settings}
    w = StoreWriter(out, meta)
    w.write_lm_head(torch.randn(16, D, generator=g), "t1t1t1t1t1t1t1t1", dtype="float32",
                    vocab=[f"tok{i}" for i in range(15)] + [None])
    w.commit_shard(*records(g, "a", 3, bad=(1,)))
    w.commit_shard(*records(g, "b", 2))


if __name__ == "__main__":
    main(sys.argv[1])
