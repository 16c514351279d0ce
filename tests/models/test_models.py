"""Model layer: real-format tiny checkpoints, the position convention, batching, NF4."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from egpt_core.config import ModelLoadConfig
from egpt_core.errors import ConfigError
from egpt_core.models import load_eventgpt, load_videollava, response_row_slice, tf_input_ids
from egpt_core.models.eventgpt import EVENT_TOKEN_INDEX, spatio_temporal_pool
from egpt_core.models.tiny import write_tiny_models

QUESTIONS = ["What is this scene about?", "What type of vehicles are present in the scene and how are they positioned?",
             "Describe the following scene."]


def _frames(seed: int, n: int, hw=(48, 64)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*hw, 3), dtype=np.uint8) for _ in range(n)]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_position_helpers():
    assert tf_input_ids([1, 2, 3], [7, 8, 9]) == [1, 2, 3, 7, 8]
    assert response_row_slice(3, 3) == slice(2, 5)
    with pytest.raises(ValueError):
        response_row_slice(0, 2)


def test_checkpoints_are_real_format_and_deterministic(tmp_path, fixtures_dir):
    a = write_tiny_models(tmp_path / "a")
    cfg = json.loads((a["eventgpt"] / "config.json").read_text())
    assert cfg["model_type"] == "EventChat_llama"
    assert cfg["mm_visual_tower"] == "clip-vit-tiny" and cfg["event_feature_adaptor"] is True
    from safetensors import safe_open

    with safe_open(str(a["eventgpt"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.visual_projector.") for k in keys)
    assert any(k.startswith("model.feature_adaptor.") for k in keys)
    assert not any(k.startswith("model.visual_tower.") for k in keys)  # CLIP comes from its own dir
    assert json.loads((a["videollava"] / "config.json").read_text())["model_type"] == "video_llava"
    # same seed -> identical weights as the session fixtures (written by `egpt fixtures`)
    for rel in ("eventgpt/model.safetensors", "eventgpt/clip-vit-tiny/model.safetensors",
                "videollava/model.safetensors", "eventgpt/tokenizer.json"):
        assert _sha(tmp_path / "a" / rel) == _sha(fixtures_dir / rel), rel


def test_eventgpt_clip_tower_loaded_from_its_directory(drafter, fixtures_dir):
    from safetensors.torch import load_file

    clip = load_file(str(fixtures_dir / "eventgpt" / "clip-vit-tiny" / "model.safetensors"))
    vt = drafter.model.model.visual_tower.state_dict()
    for k, v in clip.items():
        key = k.removeprefix("vision_model.")
        match = [n for n in vt if n.endswith(key)]
        assert match, k
        assert torch.equal(vt[match[0]], v), k


def test_missing_clip_tower_is_a_config_error(tmp_path, fixtures_dir):
    import shutil

    shutil.copytree(fixtures_dir / "eventgpt", tmp_path / "egpt", ignore=shutil.ignore_patterns("clip-vit-tiny"))
    with pytest.raises(ConfigError, match="clip-vit-tiny"):
        load_eventgpt(str(tmp_path / "egpt"), ModelLoadConfig(dtype="float32", device="cpu"))


def test_prompt_has_one_sentinel_and_features_shape(drafter):
    ids = drafter.prompt_ids(QUESTIONS[0])
    assert ids.count(EVENT_TOKEN_INDEX) == 1 and ids[0] == drafter.tokenizer.bos_token_id
    feats1 = drafter.event_features(_frames(0, 1))
    feats3 = drafter.event_features(_frames(0, 3))
    s = (32 // 8) ** 2 + 1  # CLIP tokens incl. CLS
    assert feats1.shape == (1 + s, 64) and feats3.shape == (3 + s, 64)


def test_feature_adaptor_applied_once_unless_compat_flag(drafter):
    frames = _frames(1, 2)
    pv = drafter.preprocess_frames(frames)
    inner = drafter.model.model
    with torch.no_grad():
        x = inner.visual_tower(pixel_values=pv).last_hidden_state
        once = spatio_temporal_pool(inner.feature_adaptor(inner.visual_projector(x)))
        twice = inner.feature_adaptor(once)
    torch.testing.assert_close(drafter.model.encode_event_frames(pv), once)
    torch.testing.assert_close(drafter.model.encode_event_frames(pv, double_adaptor=True), twice)
    assert not torch.allclose(once, twice)


def test_spatio_temporal_pool_formula():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    out = spatio_temporal_pool(x)
    assert out.shape == (2 + 3, 4)
    torch.testing.assert_close(out[0], x[0].mean(0))
    torch.testing.assert_close(out[2 + 1], x[:, 1].mean(0))


def test_eventgpt_ar_rows_equal_tf_rows_batched(drafter):
    prompts = [drafter.prompt_ids(q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) >= 2  # different prompt lengths
    feats = [drafter.event_features(_frames(i, 1 + i % 2)) for i in range(3)]
    ids, rows = drafter.generate(prompts, feats, max_new_tokens=10)
    W = drafter.model.get_output_embeddings().weight
    for b in range(3):
        assert rows[b].shape == (len(ids[b]), 64)
        assert (rows[b] @ W.T).argmax(-1).tolist() == ids[b]  # row t predicts g_t
    tf = drafter.teacher_forced(prompts, ids, feats)
    for a, t in zip(rows, tf):
        torch.testing.assert_close(a, t, atol=1e-4, rtol=1e-4)
    # batch of 1 == batched
    ids1, rows1 = drafter.generate(prompts[1:2], feats[1:2], max_new_tokens=10)
    assert ids1[0] == ids[1]
    torch.testing.assert_close(rows1[0], rows[1], atol=1e-4, rtol=1e-4)


def test_off_by_one_slice_would_fail(drafter):
    """The research L6 slice (last T positions of prompt + g_0..g_{T-1}) predicts g_{t+1}: not our rows."""
    p = [drafter.prompt_ids(QUESTIONS[0])]
    f = [drafter.event_features(_frames(3, 1))]
    ids, rows = drafter.generate(p, f, max_new_tokens=8)
    emb = drafter.model.splice_embeddings(p[0] + ids[0], f[0])
    with torch.no_grad():
        h = drafter.model.model(inputs_embeds=emb[None]).last_hidden_state[0]
    wrong = h[-len(ids[0]):]
    assert not torch.allclose(wrong, rows[0], atol=1e-3)


def test_videollava_ar_rows_equal_tf_rows_batched(target):
    preps = [target.prepare(q, _frames(10 + i, 8)) for i, q in enumerate(QUESTIONS)]
    prompts, videos = [p[0] for p in preps], [p[1] for p in preps]
    assert videos[0].shape[0] == 8
    ids, rows = target.generate(prompts, videos, max_new_tokens=10)
    W = target.lm_head_weight()
    for b in range(3):
        assert (rows[b] @ W.T).argmax(-1).tolist() == ids[b]
    tf = target.teacher_forced(prompts, ids, videos)
    for a, t in zip(rows, tf):
        torch.testing.assert_close(a, t, atol=1e-4, rtol=1e-4)
    ids1, rows1 = target.generate(prompts[2:], videos[2:], max_new_tokens=10)
    assert ids1[0] == ids[2]
    torch.testing.assert_close(rows1[0], rows[2], atol=1e-4, rtol=1e-4)


def test_nf4_load_and_forward_on_cpu(fixtures_dir):
    import bitsandbytes as bnb

    load = ModelLoadConfig(dtype="bfloat16", quant="nf4", device="cpu")
    d = load_eventgpt(str(fixtures_dir / "eventgpt"), load)
    assert isinstance(d.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(d.model.model.visual_projector[0], bnb.nn.Linear4bit)  # vision path kept full precision
    p = [d.prompt_ids(QUESTIONS[0])]
    f = [d.event_features(_frames(0, 1))]
    ids, rows = d.generate(p, f, max_new_tokens=5)
    assert len(ids[0]) == 5 and torch.isfinite(rows[0]).all()
    v = load_videollava(str(fixtures_dir / "videollava"), load)
    pi, pv = v.prepare(QUESTIONS[0], _frames(1, 8))
    vids, vrows = v.generate([pi], [pv], max_new_tokens=5)
    assert len(vids[0]) == 5 and torch.isfinite(vrows[0]).all()


def test_videollava_batch_padding(target):
    """Left padding (generation) puts each sequence at the end, right padding (TF) at the start; the
    mask marks exactly its tokens and the starts say where each begins."""
    pad = target.tokenizer.pad_token_id
    seqs = [[5, 6, 7], [8], [9, 10]]
    videos = [torch.zeros(2, 3, 4, 4) + i for i in range(3)]
    ids, mask, pv, starts = target._batch(seqs, videos, left=True)
    assert ids.tolist() == [[5, 6, 7], [pad, pad, 8], [pad, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]] and starts == [0, 2, 1]
    assert pv.shape == (3, 2, 3, 4, 4) and pv[:, 0, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    ids, mask, _, starts = target._batch(seqs, videos, left=False)
    assert ids.tolist() == [[5, 6, 7], [8, pad, pad], [9, 10, pad]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]] and starts == [0, 0, 0]
    assert ids.dtype == mask.dtype == torch.long
