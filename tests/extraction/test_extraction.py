"""Stages 1-2 on tiny real-format models: modes, batching, resume, idempotence, bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pydantic import ValidationError

from egpt_core.errors import ConfigError
from egpt_core.extraction import plan_pairs, run_extraction
from egpt_core.extraction.run import check_vocab_compat
from egpt_core.store import StoreReader


class Crash(RuntimeError):
    pass


def _store_snapshot(url: str) -> dict:
    """Everything a consumer sees: pairs (all columns but row offsets), tensors bitwise, LM head."""
    r = StoreReader(url)
    table = r.pairs().sort_by("pair_id").drop_columns(["row_offset", "shard"]).to_pylist()
    rows = {p.pair_id: (p.drafter, p.target) for p in r.iter_pairs()}
    return {"pairs": table, "rows": rows, "counts": r.manifest["counts"], "lm_head": r.lm_head()}


def _assert_same_store(a: dict, b: dict) -> None:
    assert a["pairs"] == b["pairs"]
    assert a["counts"] == b["counts"]
    assert a["rows"].keys() == b["rows"].keys()
    for k in a["rows"]:
        assert torch.equal(a["rows"][k][0], b["rows"][k][0]), k
        assert torch.equal(a["rows"][k][1], b["rows"][k][1]), k
    assert torch.equal(a["lm_head"], b["lm_head"])


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, extract_cfg, models):
    url = str(tmp_path_factory.mktemp("stores") / "full")
    summary = run_extraction(extract_cfg(url), models=models)
    return url, summary


def test_shared_prefix_store_contents(full_store, extract_cfg, models):
    url, summary = full_store
    drafter, target = models
    assert summary.pairs_total == 12 and summary.counts["ok"] + summary.counts.get("skipped", 0) == 12
    r = StoreReader(url)
    assert r.manifest["meta"]["mode"] == "shared_prefix"
    assert r.hidden_size == 64
    head = r.lm_head()
    assert head.shape == tuple(r.manifest["lm_head"]["shape"]) == (len(target.tokenizer), 64)
    pairs = plan_pairs(extract_cfg(url))
    by_id = {p.pair_id: p for p in pairs}
    agree = total = 0
    for rows in r.iter_pairs():
        p = by_id[rows.pair_id]
        t = len(rows.target_response_ids)
        assert rows.drafter.shape == rows.target.shape == (t, 64)  # row count == token count
        assert rows.drafter_response_ids == rows.target_response_ids  # the ids the drafter TF pass was fed
        # drafter rows == a direct TF pass of the drafter over the target's tokens
        feats = drafter.event_features(_frames_for(p, extract_cfg(url)))
        direct = drafter.teacher_forced([drafter.prompt_ids(p.question)], [rows.target_response_ids], [feats])[0]
        torch.testing.assert_close(rows.drafter.float(), direct.to(torch.bfloat16).float(), atol=0.05, rtol=0.02)
        # target rows are the LM-head inputs: they predict the target's own tokens (up to bf16 storage
        # rounding, which can only swap near-ties)
        logits = rows.target.float() @ head.float().T
        ids = torch.tensor(rows.target_response_ids)
        gap = logits.max(-1).values - logits.gather(1, ids[:, None])[:, 0]
        assert (gap <= 0.02 * logits.abs().max()).all()
        agree += int((logits.argmax(-1) == ids).sum())
        total += len(ids)
    assert agree / total > 0.9


def _frames_for(pair, cfg):
    from egpt_core.extraction.features import scene_event_frames

    return scene_event_frames(pair.scene, cfg.events)


def test_rerun_on_complete_store_does_no_model_work(full_store, extract_cfg, models, monkeypatch):
    url, _ = full_store
    drafter, target = models
    before = StoreReader(url).manifest

    def boom(*a, **k):
        raise AssertionError("model work on a complete store")

    monkeypatch.setattr(target, "generate", boom)
    monkeypatch.setattr(drafter, "teacher_forced", boom)
    monkeypatch.setattr(drafter, "event_features", boom)
    s = run_extraction(extract_cfg(url), models=models)
    assert s.pairs_pending == 0 and s.shards_committed == 0
    after = StoreReader(url).manifest
    assert after["shards"] == before["shards"] and after["counts"] == before["counts"]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, full_store, extract_cfg, models):
    url = str(tmp_path / "resumed")
    calls = {"n": 0}

    def crash_after_two(frac, msg):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash("killed after 2 committed shards")

    with pytest.raises(Crash):
        run_extraction(extract_cfg(url), progress=crash_after_two, models=models)
    assert len(StoreReader(url).manifest["shards"]) == 2
    s = run_extraction(extract_cfg(url), models=models)
    assert s.pairs_pending == 4
    _assert_same_store(_store_snapshot(url), _store_snapshot(full_store[0]))


def test_memory_and_local_stores_identical(full_store, extract_cfg, models):
    import uuid

    url = f"memory://egpt-test-{uuid.uuid4().hex}/store"
    run_extraction(extract_cfg(url), models=models)
    _assert_same_store(_store_snapshot(url), _store_snapshot(full_store[0]))
    def files(u):
        return [(sh["name"], sh["sha256"], sh["rows"]) for sh in StoreReader(u).manifest["shards"]]

    assert files(url) == files(full_store[0])  # byte-identical shard files


def test_batch_8_equals_batch_1(tmp_path, extract_cfg, models):
    a = str(tmp_path / "b1")
    b = str(tmp_path / "b8")
    run_extraction(extract_cfg(a, batch_size=1, shard_size=8, max_scenes=3), models=models)
    run_extraction(extract_cfg(b, batch_size=8, shard_size=8, max_scenes=3), models=models)
    sa, sb = _store_snapshot(a), _store_snapshot(b)
    assert sa["pairs"] == sb["pairs"]  # same token ids and texts
    for k in sa["rows"]:
        for x, y in zip(sa["rows"][k], sb["rows"][k]):
            torch.testing.assert_close(x.float(), y.float(), atol=0.02, rtol=0.02)


def test_independent_mode_pairs_by_position(tmp_path, extract_cfg, models):
    url = str(tmp_path / "indep")
    s = run_extraction(extract_cfg(url, mode="independent", max_scenes=2, min_tokens=3), models=models)
    assert s.mode == "independent"
    r = StoreReader(url)
    for rows in r.iter_pairs():
        n = rows.drafter.shape[0]
        assert n == min(len(rows.drafter_response_ids), len(rows.target_response_ids)) >= 3
        drafter_head = models[0].model.get_output_embeddings().weight.detach()
        assert (rows.drafter.float() @ drafter_head.T).argmax(-1).tolist() == rows.drafter_response_ids[:n]


def test_retf_recomputes_one_side_and_copies_the_other(tmp_path, full_store, extract_cfg, models):
    src = full_store[0]
    url = str(tmp_path / "retf")
    s = run_extraction(extract_cfg(url, mode="retf", source_store=src), models=models)
    assert s.counts["ok"] == StoreReader(src).manifest["counts"]["ok"]
    a, b = _store_snapshot(src), _store_snapshot(url)
    for k in b["rows"]:
        assert torch.equal(a["rows"][k][1], b["rows"][k][1])  # target rows copied bitwise
        torch.testing.assert_close(a["rows"][k][0].float(), b["rows"][k][0].float(), atol=0.02, rtol=0.02)
    with pytest.raises(ValidationError, match="source_store"):  # refused by ExtractConfig, before any work
        extract_cfg(src, mode="retf", source_store=src)


def test_retf_keeps_the_decoded_texts(tmp_path, full_store, extract_cfg, models):
    """retf keeps the source's token ids, so it keeps their decoded texts too (they were left empty)."""
    src = full_store[0]
    url = str(tmp_path / "retf-texts")
    run_extraction(extract_cfg(url, mode="retf", source_store=src), models=models)
    cols = ["pair_id", "drafter_text", "target_text", "drafter_response_ids", "target_response_ids"]
    want = {r["pair_id"]: r for r in StoreReader(src).pairs(status="ok", columns=cols).to_pylist()}
    got = StoreReader(url).pairs(status="ok", columns=cols).to_pylist()
    assert len(got) == len(want) > 0
    for row in got:
        assert row == want[row["pair_id"]]
        assert row["drafter_text"] and row["target_text"]
        assert row["target_text"] == models[1].decode(row["target_response_ids"])


def test_feature_cache_is_reused(tmp_path, extract_cfg, models):
    url = str(tmp_path / "feat")
    s1 = run_extraction(extract_cfg(url, max_scenes=2, max_questions=1), models=models)
    assert s1.features.get("features_computed") == 2
    s2 = run_extraction(extract_cfg(url, max_scenes=2, max_questions=2), models=models)
    assert s2.features.get("features_cached") == 2 and not s2.features.get("features_computed")


def test_bad_inputs_recorded_and_good_pairs_kept(tmp_path, fixtures_dir, extract_cfg, models):
    ds = tmp_path / "dataset"
    shutil.copytree(fixtures_dir / "dataset", ds)
    records = json.loads((ds / "EventGPT_Instruction_Subset.json").read_text())
    bad_npy = ds / "event_npy" / records[0]["event_data"]
    bad_npy.write_bytes(bad_npy.read_bytes()[:50])  # truncated
    (ds / "mp4" / records[1]["mp4_data"]).write_bytes(b"")  # 0-byte mp4
    url = str(tmp_path / "bad")
    s = run_extraction(extract_cfg(url, dataset=str(ds)), models=models)
    table = StoreReader(url).pairs().to_pylist()
    failed = [row for row in table if row["status"] == "failed"]
    assert len(failed) == 6
    assert all(str(bad_npy) in row["reason"] for row in failed if row["scene_id"] == records[0]["video_data"])
    assert any("mp4" in row["reason"] for row in failed)
    assert s.counts["failed"] == 6 and s.counts["ok"] + s.counts.get("skipped", 0) == 6
    assert sum(s.reasons.values()) == 6


def test_incompatible_tokenizers_refused(models):
    from tokenizers import Tokenizer
    from tokenizers import models as tkm
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tkm.WordLevel({"<unk>": 0, "hello": 1, "x": 2},
                                                                              unk_token="<unk>")))
    with pytest.raises(ConfigError, match="tokenizers differ"):
        check_vocab_compat(models[0].tokenizer, other)


def test_cli_extract_and_inspect(tmp_path, fixtures_dir, capsys):
    from egpt_core.cli import main

    url = str(tmp_path / "cli")
    rc = main(["extract", "--dataset", str(fixtures_dir / "dataset"), "--drafter", str(fixtures_dir / "eventgpt"),
               "--target", str(fixtures_dir / "videollava"), "--store", url, "--dtype", "float32",
               "--max-new-tokens", "4", "--max-scenes", "1", "--device", "cpu", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pairs_total"] == 3 and out["counts"]["ok"] + out["counts"].get("skipped", 0) == 3
    assert main(["inspect", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mode"] == "shared_prefix"
