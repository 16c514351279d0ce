"""Extraction without per-question video work: each scene's video is decoded and processed once, in a
background thread, and the store is bitwise the one the per-question processor path writes; an fp8
store from the same run is the float32 one within the fp8 bound."""

from __future__ import annotations

import threading

import torch

from egpt_core.data import read_video_frames
from egpt_core.extraction import plan_pairs, run_extraction
from egpt_core.models.videollava import VideoLlavaTarget
from egpt_core.store import StoreReader
from egpt_core.store.fp8 import ROW_REL_ERROR


def _snapshot(url: str) -> dict:
    r = StoreReader(url)
    table = r.pairs().sort_by("pair_id").drop_columns(["row_offset", "shard"]).to_pylist()
    return {"pairs": table, "rows": {p.pair_id: (p.drafter, p.target) for p in r.iter_pairs()}}


def test_prepare_question_equals_the_processor(models, extract_cfg, tmp_path):
    _, target = models
    pairs = plan_pairs(extract_cfg(str(tmp_path / "s")))
    target._token_runs.clear()
    for scene in {p.scene.scene_id: p.scene for p in pairs}.values():
        frames = read_video_frames(scene.video_path, 8)
        video = target.prepare_video(frames)
        for q in ["What is in the scene?", "Describe it, briefly.", "x" * 300, "émoji 🚗 and\nnew lines"]:
            ids, pv = target.prepare(q, frames)
            got_ids, got_pv = target.prepare_question(q, video)
            assert got_ids == ids and torch.equal(got_pv, pv)
    assert all(v not in (False, None) for v in target._token_runs.values())  # the tokenizer path was used


def test_each_video_processed_once_in_a_thread_and_store_unchanged(models, extract_cfg, tmp_path, monkeypatch):
    cfg = extract_cfg(str(tmp_path / "new"), shard_size=3, batch_size=2)
    calls: list[tuple[str, str]] = []
    orig_prepare, orig_video = VideoLlavaTarget.prepare, VideoLlavaTarget.prepare_video

    def count_prepare(self, question, frames):
        calls.append(("prepare", threading.current_thread().name))
        return orig_prepare(self, question, frames)

    def count_video(self, frames):
        calls.append(("video", threading.current_thread().name))
        return orig_video(self, frames)

    monkeypatch.setattr(VideoLlavaTarget, "prepare", count_prepare)
    monkeypatch.setattr(VideoLlavaTarget, "prepare_video", count_video)
    models[1]._token_runs.clear()
    run_extraction(cfg, models=models)
    scenes = {p.scene.scene_id for p in plan_pairs(cfg)}
    video_calls = [t for k, t in calls if k == "video"]
    assert len(video_calls) <= len(scenes) + 1  # once per scene (a scene split over two shards: twice)
    assert all(t.startswith("video-decode") for t in video_calls)
    assert len([1 for k, _ in calls if k == "prepare"]) == 1  # the processor's full path: once per video shape
    n_pairs = len(plan_pairs(cfg))
    assert n_pairs > len(scenes)

    # the old path: processor per question, decode inline
    monkeypatch.setattr(VideoLlavaTarget, "prepare_question", lambda self, q, v: orig_prepare(self, q, v.frames))
    monkeypatch.setattr("egpt_core.extraction.run.VIDEO_WORKERS", 0)
    run_extraction(extract_cfg(str(tmp_path / "old"), shard_size=3, batch_size=2), models=models)
    a, b = _snapshot(str(tmp_path / "new")), _snapshot(str(tmp_path / "old"))
    assert a["pairs"] == b["pairs"] and a["rows"].keys() == b["rows"].keys()
    for k in a["rows"]:
        assert torch.equal(a["rows"][k][0], b["rows"][k][0]) and torch.equal(a["rows"][k][1], b["rows"][k][1]), k


def test_fp8_extraction_is_the_float32_one_within_the_bound(models, extract_cfg, tmp_path):
    run_extraction(extract_cfg(str(tmp_path / "f32"), store_dtype="float32"), models=models)
    run_extraction(extract_cfg(str(tmp_path / "fp8"), store_dtype="float8_e4m3fn"), models=models)
    ref, got = _snapshot(str(tmp_path / "f32")), _snapshot(str(tmp_path / "fp8"))
    assert ref["pairs"] == got["pairs"] and ref["rows"].keys() == got["rows"].keys() and ref["rows"]
    for k, (d, t) in ref["rows"].items():
        for want, have in ((d, got["rows"][k][0]), (t, got["rows"][k][1])):
            bound = (ROW_REL_ERROR + 2.0 ** -8) * want.abs().amax(dim=1, keepdim=True)
            assert bool(((have.float() - want).abs() <= bound).all()), k
    assert StoreReader(str(tmp_path / "fp8")).meta["dtype"] == "float8_e4m3fn"
