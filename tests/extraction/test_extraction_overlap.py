"""Extraction with its store writes in a background thread, scene inputs prepared ahead and a plain
greedy loop over the target: the store is bitwise the one the inline path (HF ``generate``, writes and
inputs in the extraction's thread) writes; commits keep their order and crash semantics; a failed
background write fails the run; no model forward ever runs outside the extraction's thread."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from torch.nn.modules import module as nn_module

import egpt_core.extraction.run as run_mod
from egpt_core.data import read_video_frames
from egpt_core.extraction import plan_pairs, run_extraction
from egpt_core.extraction.greedy import greedy_generate
from egpt_core.store import StoreReader
from egpt_core.store.writer import StoreWriter


def _inline(monkeypatch) -> None:
    """The extraction without its overlaps: HF generate, inline writes, inline scene inputs."""
    monkeypatch.setattr(run_mod, "greedy_generate", lambda target, *a: target.generate(*a))
    monkeypatch.setattr(run_mod, "BACKGROUND_WRITES", False)
    monkeypatch.setattr(run_mod, "VIDEO_WORKERS", 0)


def _files(url: str) -> dict[str, bytes]:
    """Every file of a store but the lock: relative path -> bytes."""
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".lock" not in p.name}


def _shards(url: str) -> list[tuple]:
    return [(s["name"], s["sha256"], s["rows"]) for s in StoreReader(url).manifest["shards"]]


def _target_inputs(target, pairs):
    prompts, videos = [], []
    for p in pairs:
        video = target.prepare_video(read_video_frames(p.scene.video_path, 8))
        ids, pv = target.prepare_question(p.question, video)
        prompts.append(ids)
        videos.append(pv)
    return prompts, videos


def _same_generation(a, b) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_greedy_loop_equals_hf_generate(models, extract_cfg, tmp_path):
    _, target = models
    pairs = plan_pairs(extract_cfg(str(tmp_path / "s")))
    prompts, videos = _target_inputs(target, pairs[:6])
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    for idx in ([0], [0, 1, 2, 3], [1, 3, 5], list(range(6))):
        for n in (1, 5, 12):
            p, v = [prompts[i] for i in idx], [videos[i] for i in idx]
            assert _same_generation(greedy_generate(target, p, v, n), target.generate(p, v, n)), (idx, n)

    # EOS part-way: one sequence stops early (its later steps are fed the pad token), the others go on
    ids, _ = target.generate(prompts, videos, 12)
    stop = next(t for t in ids[1][2:] if t != target.tokenizer.pad_token_id)
    eos = target.tokenizer.eos_token_id
    target.tokenizer.eos_token_id = stop  # (the session's models: restored below)
    try:
        assert target.tokenizer.eos_token_id == stop
        want = target.generate(prompts, videos, 12)
        got = greedy_generate(target, prompts, videos, 12)
        assert _same_generation(got, want)
        lengths = [len(x) for x in want[0]]
        assert min(lengths) < 12 and got[0][1][-1] == stop  # the EOS case happened
        # a batch whose every sequence reaches EOS: the loop stops there
        assert _same_generation(greedy_generate(target, [prompts[1]], [videos[1]], 12),
                                target.generate([prompts[1]], [videos[1]], 12))
    finally:
        target.tokenizer.eos_token_id = eos
    assert target.tokenizer.eos_token_id == eos


def test_greedy_loop_equals_hf_generate_in_bfloat16(extract_cfg, tmp_path):
    """bf16 logits: generate takes the argmax of their float32 copy, the loop of the logits themselves."""
    from egpt_core.config import ModelLoadConfig
    from egpt_core.extraction import load_models

    cfg = extract_cfg(str(tmp_path / "s"), load=ModelLoadConfig(dtype="bfloat16", device="cpu"))
    _, target = load_models(cfg)
    assert target.model.get_output_embeddings().weight.dtype == torch.bfloat16
    prompts, videos = _target_inputs(target, plan_pairs(cfg)[:5])
    for idx in ([0], [0, 2, 4], list(range(5))):
        p, v = [prompts[i] for i in idx], [videos[i] for i in idx]
        assert _same_generation(greedy_generate(target, p, v, 10), target.generate(p, v, 10)), idx


def test_store_bitwise_the_inline_paths(models, extract_cfg, tmp_path, monkeypatch):
    cfg_new = extract_cfg(str(tmp_path / "new"), shard_size=3, batch_size=2)
    encodes: list[str] = []
    orig = run_mod.encode_scene_features
    monkeypatch.setattr(run_mod, "encode_scene_features", lambda d, x: encodes.append(x.key) or orig(d, x))
    s = run_extraction(cfg_new, models=models)
    scenes = {p.scene.scene_id for p in plan_pairs(cfg_new)}
    assert s.shards_committed == len(_shards(cfg_new.store)) > 2
    assert len(encodes) == len(set(encodes)) == len(scenes)  # each scene's features once (scenes span shards)
    assert s.features == {"features_computed": len(scenes)}

    with monkeypatch.context() as m:
        _inline(m)
        run_extraction(extract_cfg(str(tmp_path / "old"), shard_size=3, batch_size=2), models=models)
    assert _shards(cfg_new.store) == _shards(str(tmp_path / "old"))  # byte-identical shard files
    new, old = _files(cfg_new.store), _files(str(tmp_path / "old"))
    assert new.keys() == old.keys()
    for rel in new:
        if rel != "manifest.json":  # (holds timestamps)
            assert new[rel] == old[rel], rel


def test_commits_run_in_the_writer_thread_in_shard_order_beside_the_next_shard(models, extract_cfg, tmp_path,
                                                                              monkeypatch):
    """Shard k is committed while shard k+1 runs through the models: the commit waits until the next
    shard's generation has started (an inline commit never sees that, and fails)."""
    cfg = extract_cfg(str(tmp_path / "s"), shard_size=4, batch_size=4)  # one generate call per shard
    shards = [p.pair_id for p in plan_pairs(cfg)]
    shards = [shards[i:i + 4] for i in range(0, len(shards), 4)]
    generated = {"n": 0}
    commits: list[tuple[str, list[str]]] = []
    gen, commit = run_mod.greedy_generate, StoreWriter.commit_shard

    def generate(*a, **k):
        generated["n"] += 1
        return gen(*a, **k)

    def commit_shard(self, records, d, t):
        k = len(commits)
        commits.append((threading.current_thread().name, [r["pair_id"] for r in records]))
        if k + 1 < len(shards):  # shard k+1's generation starts while shard k waits to be committed
            assert _wait_for(lambda: generated["n"] >= k + 2), "the commit did not overlap the next shard"
        return commit(self, records, d, t)

    monkeypatch.setattr(run_mod, "greedy_generate", generate)
    monkeypatch.setattr(StoreWriter, "commit_shard", commit_shard)
    s = run_extraction(cfg, models=models)
    assert s.shards_committed == len(shards) > 2
    assert [ids for _, ids in commits] == shards  # in extraction order
    assert {name for name, _ in commits} == {"store-writer_0"}
    assert [sh["pairs"] for sh in StoreReader(cfg.store).manifest["shards"]] == [len(x) for x in shards]


def _wait_for(cond, timeout_s: float = 30.0) -> bool:
    """Poll ``cond`` (a deadlock guard, not a timing check: an inline commit can never satisfy it)."""
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return True
        ev.wait(0.01)
    return cond()


def _named_files_exist(url: str) -> None:
    m = StoreReader(url).manifest
    for sh in m["shards"]:
        for rel in sh["files"].values():
            assert (Path(url) / rel).is_file(), rel


def test_a_failed_background_commit_fails_the_run_and_keeps_the_shards_before_it(
        models, extract_cfg, tmp_path, monkeypatch):
    cfg = extract_cfg(str(tmp_path / "s"), shard_size=3, batch_size=3)
    calls = {"n": 0}

    def refuse_second(self, name):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device (injected)")

    with monkeypatch.context() as m:
        m.setattr(StoreWriter, "_before_manifest", refuse_second)
        with pytest.raises(OSError, match="injected"):
            run_extraction(cfg, models=models)
    assert calls["n"] == 2  # the run stopped at the failed commit, committing nothing after it
    assert len(StoreReader(cfg.store).manifest["shards"]) == 1
    _named_files_exist(cfg.store)
    s = run_extraction(cfg, models=models)  # the rerun resumes and ends equal to an uninterrupted run
    assert s.pairs_pending == len(plan_pairs(cfg)) - 3
    with monkeypatch.context() as m:
        _inline(m)
        run_extraction(extract_cfg(str(tmp_path / "ref"), shard_size=3, batch_size=3), models=models)
    assert sorted(_shards(cfg.store)) == sorted(_shards(str(tmp_path / "ref")))


def test_a_failed_feature_cache_write_fails_the_run(models, extract_cfg, tmp_path, monkeypatch):
    cfg = extract_cfg(str(tmp_path / "s"), shard_size=3, batch_size=3)

    def broken(self, key, tensors, metadata=None):
        raise PermissionError(13, "Permission denied (injected)", key)

    monkeypatch.setattr(StoreWriter, "put_features", broken)
    with pytest.raises(PermissionError, match="injected"):
        run_extraction(cfg, models=models)
    if (Path(cfg.store) / "manifest.json").exists():
        _named_files_exist(cfg.store)


def test_shard_handed_over_before_an_extraction_error_is_committed(models, extract_cfg, tmp_path, monkeypatch):
    """The model fails in shard 2 while shard 1's commit may still be in the writer thread: shard 1 is
    committed before the error propagates (and the store is not discarded as empty)."""
    cfg = extract_cfg(str(tmp_path / "s"), shard_size=4, batch_size=4)
    gate = threading.Event()
    commit, gen = StoreWriter.commit_shard, run_mod.greedy_generate
    calls = {"n": 0}

    def slow_commit(self, *a):
        assert gate.wait(60)  # held until the extraction has failed
        return commit(self, *a)

    def generate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            gate.set()
            raise RuntimeError("CUDA error: device-side assert (injected)")
        return gen(*a, **k)

    monkeypatch.setattr(StoreWriter, "commit_shard", slow_commit)
    monkeypatch.setattr(run_mod, "greedy_generate", generate)
    with pytest.raises(RuntimeError, match="injected"):
        run_extraction(cfg, models=models)
    m = StoreReader(cfg.store).manifest
    assert [sh["pairs"] for sh in m["shards"]] == [4]
    _named_files_exist(cfg.store)


def test_model_forwards_run_only_in_the_extraction_thread(models, extract_cfg, tmp_path):
    threads: set[str] = set()
    handle = nn_module.register_module_forward_pre_hook(
        lambda mod, args: threads.add(threading.current_thread().name))
    try:
        run_extraction(extract_cfg(str(tmp_path / "s"), shard_size=3, batch_size=2), models=models)
    finally:
        handle.remove()
    assert threads == {threading.current_thread().name}


def test_progress_reports_committed_shards(models, extract_cfg, tmp_path):
    lines: list[tuple[float, str]] = []
    s = run_extraction(extract_cfg(str(tmp_path / "s"), shard_size=4), progress=lambda f, m: lines.append((f, m)),
                       models=models)
    assert lines[-1] == (1.0, f"{s.pairs_processed}/{s.pairs_pending} pairs, {s.shards_committed} shards committed")
    assert json.loads(json.dumps(lines))  # plain values (a Prefect artifact carries them)


def test_features_task_caches_what_event_features_computes_and_fails_on_a_failed_write(
        models, extract_cfg, tmp_path, monkeypatch):
    from egpt_core.extraction.features import feature_key, scene_event_frames
    from egpt_core.extraction.run import compute_scene_features

    drafter, _ = models
    cfg = extract_cfg(str(tmp_path / "s"))
    monkeypatch.setattr("egpt_core.models.loading.load_eventgpt", lambda *a, **k: drafter)
    scenes = list(dict.fromkeys(p.scene for p in plan_pairs(cfg)))
    done = compute_scene_features(cfg, [s.scene_id for s in scenes])
    assert (done.computed, done.cached, done.failed) == (len(scenes), 0, {})
    reader_writer = StoreWriter(cfg.store, {})
    for scene in scenes:  # bitwise what the drafter computes from the rendered frames
        want = drafter.event_features(scene_event_frames(scene, cfg.events))
        got = reader_writer.get_features(feature_key(scene, drafter, cfg.events))["features"]
        assert torch.equal(got, want), scene.scene_id
    assert compute_scene_features(cfg, [s.scene_id for s in scenes]).cached == len(scenes)

    def broken(self, key, tensors, metadata=None):
        raise PermissionError(13, "Permission denied (injected)", key)

    monkeypatch.setattr(StoreWriter, "put_features", broken)
    with pytest.raises(PermissionError, match="injected"):
        compute_scene_features(extract_cfg(str(tmp_path / "t")), [s.scene_id for s in scenes])
