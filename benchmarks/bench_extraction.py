"""Extraction speed on the tiny real-format models (CPU), measured side by side in one run.

- tf_vs_ar_extraction: hidden rows for the same pairs by one teacher-forced forward vs AR generate.
- ar_batch16_vs_batch1: AR extraction throughput (pairs/s) at batch 16 vs batch 1.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import best_time


def run() -> dict:
    from egpt_core.config import ModelLoadConfig
    from egpt_core.models import load_videollava
    from egpt_core.models.tiny import write_tiny_models

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_tiny_models(Path(tmp))
        target = load_videollava(str(paths["videollava"]), ModelLoadConfig(dtype="float32", device="cpu"))
        # never stop early: measure full 50-token generations
        target.tokenizer.eos_token_id = None
        target.model.generation_config.eos_token_id = None
        rng = np.random.default_rng(0)
        questions = ["What is this scene about?", "Describe the following scene.",
                     "What are the key elements in this scene?", "What do you see happening in this scene?"]
        preps = [target.prepare(questions[i % 4], [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
                                                   for _ in range(8)]) for i in range(16)]
        prompts, videos = [p[0] for p in preps], [p[1] for p in preps]
        new = 50
        ids, _ = target.generate(prompts[:4], videos[:4], new)
        t_ar = best_time(lambda: target.generate(prompts[:4], videos[:4], new))
        t_tf = best_time(lambda: target.teacher_forced(prompts[:4], ids, videos[:4]))
        t_b1 = best_time(lambda: [target.generate([p], [v], new) for p, v in zip(prompts, videos)], repeats=1)
        t_b16 = best_time(lambda: target.generate(prompts, videos, new), repeats=2)
    return {
        "tf_vs_ar_extraction": {
            "ratio": round(t_ar / t_tf, 2), "goal": ">= 8",
            "unit": f"x faster: rows of 4 pairs x {new} tokens by one TF forward ({t_tf * 1e3:.0f} ms) "
                    f"vs AR generate ({t_ar * 1e3:.0f} ms), tiny Video-LLaVA, CPU fp32",
        },
        "ar_batch16_vs_batch1": {
            "ratio": round(t_b1 / t_b16, 2), "goal": ">= 4",
            "unit": f"x pairs/s: 16 pairs x {new} tokens at batch 16 ({16 / t_b16:.1f} pairs/s) "
                    f"vs batch 1 ({16 / t_b1:.1f} pairs/s)",
        },
    }
