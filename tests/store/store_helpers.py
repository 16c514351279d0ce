"""Helpers for the store tests: small synthetic pairs (D = 16)."""

from __future__ import annotations

import torch

D = 16
META = {
    "hidden_size": D,
    "dtype": "bfloat16",
    "mode": "shared_prefix",
    "models": {"drafter": "tiny-eventgpt", "target": "tiny-videollava"},
    "model_fingerprints": {"drafter": "d" * 16, "target": "t" * 16},
    "dataset_fingerprint": "a" * 16,
    "config_fingerprint": "c" * 16,
}


def make_pairs(n: int, prefix: str = "p", seed: int = 0, start: int = 0, min_len: int = 3, max_len: int = 9):
    """``n`` ok pairs: (records, drafter list, target list) with fp32 rows [L, D]."""
    g = torch.Generator().manual_seed(seed)
    records, drafter, target = [], [], []
    for i in range(start, start + n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        records.append(
            {
                "pair_id": f"{prefix}{i:04d}",
                "scene_id": f"scene{i // 3:03d}",
                "question_idx": i % 3,
                "question": f"What is in scene {i // 3}? ({i % 3})",
                "status": "ok",
                "length": L,
                "drafter_prompt_ids": [1, 319, 1234],
                "target_prompt_ids": [1, 3148, 29901],
                "drafter_response_ids": list(range(100, 100 + L)),
                "target_response_ids": list(range(200, 200 + L)),
                "drafter_text": f"drafter answer {i}",
                "target_text": f"target answer {i}",
            }
        )
        drafter.append(torch.randn(L, D, generator=g))
        target.append(torch.randn(L, D, generator=g))
    return records, drafter, target


