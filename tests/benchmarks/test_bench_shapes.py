"""The shape benchmark: 7B configurations checked on the meta device (no allocation), and the whole
GPU code path run at the tiny shape on CPU so a GPU node cannot fail on a typo."""

import math

import numpy as np
import pytest
import torch

from benchmarks.model_shapes import (
    SHAPES,
    build_eventgpt,
    build_videollava,
    parameter_count,
    shape_tokenizer,
)

#: CLIP ViT-L/14 vision model (embeddings, 24 layers, pre/post LN) at 224 px: 257 positions
CLIP_L14_224 = 303_179_776
CLIP_POS_ROW = 1024  # one positional-embedding row


def llama_params(vocab: int, d: int = 4096, inter: int = 11008, layers: int = 32) -> int:
    """Embedding + LM head + layers (q/k/v/o, gate/up/down, two RMSNorms) + final norm."""
    return 2 * vocab * d + layers * (4 * d * d + 3 * d * inter + 2 * d) + d


@pytest.fixture(scope="module")
def tok():
    return shape_tokenizer()


@pytest.fixture(scope="module")
def meta_7b(tok):
    shape = SHAPES["7b"]
    return build_eventgpt(shape, tok, device="meta"), build_videollava(shape, tok, device="meta")


def test_7b_models_have_the_real_parameter_counts_without_allocating(meta_7b):
    drafter, target = meta_7b
    assert llama_params(32000) == 6_738_415_616  # the published Llama-2/Vicuna-7B count
    projector = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)
    adaptor = 4096 * 4096 + 4096
    clip_336 = CLIP_L14_224 + (577 - 257) * CLIP_POS_ROW
    assert parameter_count(drafter.model) == llama_params(32000) + clip_336 + projector + adaptor  # 7.08 B
    assert parameter_count(target.model) == llama_params(32064) + 2 * CLIP_L14_224 + projector  # 7.37 B
    for model in (drafter.model, target.model):
        assert {p.device.type for p in model.parameters()} == {"meta"}
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cfg = target.model.config
    assert cfg.text_config.vocab_size == 32064 and cfg.vision_feature_layer == -2
    assert drafter.model.config.clip_config["image_size"] == 336 and drafter.hidden_size == target.hidden_size == 4096


def test_7b_prompts_have_real_lengths(meta_7b):
    """8 frames x 257 tokens at 224 px for the target; 577 + 1 pooled event tokens at 336 px for the drafter."""
    drafter, target = meta_7b
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(8)]
    ids, pixels = target.prepare("What is this scene about?", frames)
    video_id = target.model.config.video_token_index
    assert sum(1 for i in ids if i == video_id) == 8 * 257
    assert tuple(pixels.shape) == (8, 3, 224, 224)
    assert tuple(drafter.preprocess_frames(frames[:1]).shape) == (1, 3, 336, 336)


def test_tiny_shape_runs_every_part_of_the_gpu_benchmark_on_cpu():
    from benchmarks import bench_shapes

    res = bench_shapes.run(device="cpu", shape="tiny")
    expected = {"tiny_extract_b16_pairs_per_s", "tiny_extract_b1_pairs_per_s", "tiny_extract_b16_vs_b1",
                "tiny_extract_outside_forward_fraction", "tiny_target_tf_vs_ar", "tiny_adapter_L4_train_pairs_per_s",
                "tiny_lora_nf4_step_s", "nf4_tiny_rows_cos_vs_bf16"}
    assert set(res) == expected
    for key, r in res.items():
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, (key, r)
    b16 = res["tiny_extract_b16_pairs_per_s"]
    assert b16["pairs"] == 8 and res["tiny_extract_b1_pairs_per_s"]["pairs"] == 2
    assert b16["target_params"] == parameter_count(build_videollava(SHAPES["tiny"], shape_tokenizer(), "meta").model)
    assert 0 < res["tiny_extract_outside_forward_fraction"]["forward_s"] <= b16["call_s"]
    assert res["tiny_lora_nf4_step_s"]["trainable_params"] == 2 * 4 * 16 * (64 + 64)  # layers x q/k/v/o x r x (in+out)
    assert res["nf4_tiny_rows_cos_vs_bf16"]["ratio"] > 0.9


def test_shapes_are_skipped_on_cpu_without_a_shape_and_refuse_bad_parts():
    from benchmarks import bench_shapes

    assert bench_shapes.run(device="cpu") == {}
    with pytest.raises(ValueError, match="extraction"):
        bench_shapes.run(device="cpu", shape="tiny", parts=["lora"])
    with pytest.raises(ValueError, match="unknown parts"):
        bench_shapes.run(device="cpu", shape="tiny", parts=["extract"])
    with pytest.raises(ValueError, match="unknown model shape"):
        bench_shapes.run(device="cpu", shape="13b")


@pytest.mark.slow
def test_gpu_run_script_end_to_end_on_cpu_at_tiny_shape(tmp_path):
    """benchmarks/gpu_run.sh as a GPU node runs it, but on CPU at the tiny shape: every part merges."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, GPU_RUN_DEVICE="cpu", GPU_RUN_SHAPE="tiny", PYTHON=sys.executable,
               PYTHONPATH=str(repo))
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_run.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "_failed_parts" not in results, results.get("_failed_parts")
    assert {"tiny_extract_b16_pairs_per_s", "tiny_lora_nf4_step_s", "tiny_adapter_L4_train_pairs_per_s",
            "nf4_tiny_rows_cos_vs_bf16"} <= set(results)
    assert "torch" in (tmp_path / "out" / "env.txt").read_text()


def test_random_target_generates_exactly_50_tokens_the_drafter_can_embed(tok):
    """With EOS and the ids past the drafter's vocabulary made the most likely tokens, the benchmark's
    generation settings still give 50 tokens, all inside the drafter's vocabulary."""
    from benchmarks.bench_shapes import NEW_TOKENS, _fixed_length_generation

    target = build_videollava(SHAPES["tiny"], tok, device="cpu", dtype=torch.float32)
    old = target.model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[300:] = 50.0  # ids the drafter (vocab 300 here) could not embed
        head.bias[tok.eos_token_id] = 100.0  # EOS first of all
    target.model.lm_head = head
    rng = np.random.default_rng(0)
    prompt, video = target.prepare("What is this scene about?",
                                   [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(8)])
    ids, _ = target.generate([prompt], [video], NEW_TOKENS)
    assert ids[0] == [tok.eos_token_id]  # control: without the settings it stops at once
    _fixed_length_generation(target, drafter_vocab=300)
    ids, rows = target.generate([prompt], [video], NEW_TOKENS)
    assert len(ids[0]) == NEW_TOKENS and rows[0].shape[0] == NEW_TOKENS
    assert max(ids[0]) < 300 and tok.eos_token_id not in ids[0]
