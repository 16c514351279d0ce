"""L6 data path: drafter hidden rows for the same pairs by one teacher-forced forward vs AR generation.

The research note (TEACHER_FORCED_VS_AR.md) motivates L6's teacher forcing with ~0.3 s vs ~2.5 s per
50-token sample (~8x) on EventGPT-7B. Here, side by side on the tiny seeded drafter (CPU, fp32), per
pair: greedy AR generation of 50 tokens (EOS suppressed so every pair really produces 50) vs one TF
forward over prompt + the same 50 tokens. The rows are checked to agree (position convention) so the
two timings produce the same thing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.timing import best_time

MAX_NEW_TOKENS = 50
N_SCENES, N_QUESTIONS = 2, 2
REPEATS = 3




def _generate_fixed(drafter, prompt: list[int], feats: torch.Tensor, n: int):
    """Greedy AR of exactly n tokens (EOS suppressed) -> ids, rows [n, D] (same call as drafter.generate)."""
    from egpt_core.models.eventgpt import split_generation

    emb = drafter.model.splice_embeddings(prompt, feats)[None]
    with torch.no_grad():
        out = drafter.model.generate(
            inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long), max_new_tokens=n,
            min_new_tokens=n, do_sample=False, num_beams=1, output_hidden_states=True, return_dict_in_generate=True,
            pad_token_id=drafter.tokenizer.pad_token_id, eos_token_id=drafter.tokenizer.eos_token_id,
        )
    ids, rows = split_generation(out.sequences, out.hidden_states, None)
    return ids[0], rows[0]


def run() -> dict:
    from egpt_core.config import EventRenderConfig, ModelLoadConfig
    from egpt_core.data import build_pairs, load_questions, load_scenes
    from egpt_core.extraction.features import scene_event_frames
    from egpt_core.models import load_eventgpt
    from egpt_core.models.commands import write_fixtures

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_fixtures(Path(tmp) / "fx", scenes=N_SCENES, questions=N_QUESTIONS, seed=0)
        drafter = load_eventgpt(str(paths["eventgpt"]), ModelLoadConfig(dtype="float32", device="cpu"))
        scenes = load_scenes(str(paths["dataset"]))
        pairs = build_pairs(scenes, load_questions(str(Path(paths["dataset"]) / "questions.json")))
        render = EventRenderConfig()
        feats = {s.scene_id: drafter.event_features(scene_event_frames(s, render)) for s in scenes}
        t_ar = t_tf = 0.0
        max_err = 0.0
        for p in pairs:
            prompt, f = drafter.prompt_ids(p.question), feats[p.scene.scene_id]
            ids, rows = _generate_fixed(drafter, prompt, f, MAX_NEW_TOKENS)
            assert len(ids) == MAX_NEW_TOKENS
            tf = drafter.teacher_forced([prompt], [ids], [f])[0]
            max_err = max(max_err, (tf - rows).abs().max().item())
            t_ar += best_time(lambda prompt=prompt, f=f: _generate_fixed(drafter, prompt, f, MAX_NEW_TOKENS), REPEATS)
            t_tf += best_time(lambda prompt=prompt, f=f, ids=ids: drafter.teacher_forced([prompt], [ids], [f]), REPEATS)
        if max_err > 1e-3:
            raise AssertionError(f"TF rows differ from AR rows by {max_err:.2e}: the timings would not compare")
    n = len(pairs)
    return {
        "lora_tf_step_vs_ar": {
            "ratio": t_ar / t_tf,
            "goal": ">= 8",
            "unit": "x: hidden rows for the same pairs by one TF forward vs AR generation (tiny drafter, CPU)",
            "pairs": n,
            "tokens_per_pair": MAX_NEW_TOKENS,
            "ar_ms_per_pair": round(1000 * t_ar / n, 2),
            "tf_ms_per_pair": round(1000 * t_tf / n, 2),
            "max_abs_row_diff": max_err,
        }
    }


if __name__ == "__main__":
    print(run())
