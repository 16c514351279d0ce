"""evaluate() over real stores: streaming == in-memory, identity, outputs, config errors, adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_helpers import D, assert_close, build_store
from pydantic import ValidationError

from egpt_core.config import AdapterConfig, EvalConfig, TimingConfig
from egpt_core.errors import ConfigError
from egpt_core.evaluation import EvalResult, MetricAccumulator, evaluate
from egpt_core.evaluation.report import fmt

TIMING = TimingConfig(drafter_prefill_ms=90, drafter_step_ms=10, target_prefill_ms=300, target_step_ms=15,
                      verify_ms_per_token=0.5, adapter_ms=1, output_tokens=50)


def _in_memory(pairs, W, predict=lambda d, t, m: d, **kw):
    S = max(d.shape[0] for d, _, _ in pairs)
    B = len(pairs)
    drafter, target = torch.zeros(B, S, D), torch.zeros(B, S, D)
    mask = torch.zeros(B, S, dtype=torch.bool)
    tokens = torch.full((B, S), -1)
    for i, (d, t, ids) in enumerate(pairs):
        n = d.shape[0]
        drafter[i, :n], target[i, :n], mask[i, :n] = d, t, True
        tokens[i, :n] = torch.tensor(ids)
    acc = MetricAccumulator(lm_head=W, **kw)
    acc.update(predict(drafter, target, mask), target, mask, tokens)
    return acc.result()


def test_streaming_over_store_equals_in_memory(store, tmp_path):
    url, W, pairs = store
    res = evaluate(EvalConfig(store=url, out=str(tmp_path / "ev"), identity=True, batch_size=2))
    assert isinstance(res, EvalResult) and res.name == "identity"
    assert res.n_pairs == len(pairs) == 12  # the failed pair is skipped
    assert res.n_positions == sum(d.shape[0] for d, _, _ in pairs)
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    ref = _in_memory(pairs, W)
    for key in ("counts", "cos", "accept", "consecutive", "acceptance_length", "token", "per_position", "summary"):
        assert_close(ref[key], doc[key], key)
    assert doc["token"]["reference"] == "target_response_ids"
    assert doc["token"]["target_lm_head_self_match"] == pytest.approx(1 - 4 / res.n_positions)
    assert doc["inputs"]["n_pairs_not_ok"] == 1 and doc["inputs"]["store_mode"] == "shared_prefix"
    assert res.metrics["cos_pooled"] == doc["summary"]["cos_pooled"]


def test_identity_store_is_perfect_and_outputs_written(tmp_path):
    url = str(tmp_path / "ident")
    build_store(url, identical=True, n_shards=3, min_len=8, max_len=10)
    out = tmp_path / "out"
    res = evaluate(EvalConfig(store=url, out=str(out), identity=True, timing=TIMING, name="ident"))
    s = res.metrics
    assert s["cos_pooled"] == pytest.approx(1.0, abs=1e-6) and s["cos_pair_mean"] == pytest.approx(1.0, abs=1e-6)
    assert all(s[f"accept@{t}"] == 1.0 for t in ("0.80", "0.85", "0.90", "0.95"))
    assert s["token_top1"] == 1.0 and s["argmax_agreement"] == 1.0 and s["acc_len_basis"] == "token"
    for g in range(1, 9):
        for kind in ("sim", "empirical", "rounds"):
            assert s[f"acc_len_{kind}_gamma{g}"] == pytest.approx(g)
    assert s["speedup_e2e_gamma5"] > 1
    for f in ("metrics.json", "report.md", "metrics_summary.png", "per_position.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "metrics_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "# Evaluation: ident" in md and "100.00 %" in md
    assert fmt(s["cos_pooled"]) in md and fmt(s["speedup_e2e_gamma5"], digits=3) in md
    assert res.n_pairs == 9 and f"{res.n_pairs} / {res.n_positions}" in md


def test_no_timing_and_no_lm_head(tmp_path):
    url = str(tmp_path / "nohead")
    build_store(url, n_shards=3, lm_head=False)
    out = tmp_path / "o"
    res = evaluate(EvalConfig(store=url, out=str(out), identity=True))
    assert "token_top1" not in res.metrics and res.metrics["acc_len_basis"] == "cos@0.90"
    assert not any(k.startswith("speedup") for k in res.metrics)
    md = (out / "report.md").read_text()
    assert "speedup omitted: no timing given" in md and "no target LM head" in md


def test_config_errors(store, tmp_path):
    url, _, _ = store
    with pytest.raises(ValidationError, match="exactly one"):  # refused by EvalConfig itself
        EvalConfig(store=url, out=str(tmp_path / "a"))
    with pytest.raises(ValidationError, match="exactly one"):
        EvalConfig(store=url, out=str(tmp_path / "a"), identity=True, lora=str(tmp_path))
    with pytest.raises(ConfigError, match="retf"):  # L6 needs a store re-extracted with the merged drafter
        evaluate(EvalConfig(store=url, out=str(tmp_path / "a"), lora=str(tmp_path)))
    with pytest.raises(ConfigError, match="not a committed store"):
        evaluate(EvalConfig(store=str(tmp_path / "nowhere"), out=str(tmp_path / "a"), identity=True))
    with pytest.raises(ConfigError, match="timing_file"):
        evaluate(EvalConfig(store=url, out=str(tmp_path / "a"), identity=True, timing_file=str(tmp_path / "t.json")))
    assert not (tmp_path / "a").exists()


def test_lora_mode_on_retf_store(tmp_path):
    url = str(tmp_path / "retf")
    build_store(url, n_shards=3, mode="retf")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    res = evaluate(EvalConfig(store=url, out=str(tmp_path / "o"), lora=str(lora)))
    assert res.name == "L6:lora"
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["inputs"]["prediction"] == "lora" and doc["inputs"]["lora_fingerprint"]
    assert str(lora) in (tmp_path / "o" / "report.md").read_text()


def test_adapter_mode_matches_manual_application(store, tmp_path):
    from egpt_core.adapters import apply_adapter, create_adapter
    from egpt_core.adapters.checkpoint import save_adapter_weights

    url, W, pairs = store
    acfg = AdapterConfig(level="L1", bottleneck_dim=8)
    torch.manual_seed(0)
    module = create_adapter(acfg, D).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_adapter_weights(str(run / "best.safetensors"), module, acfg, D, epoch=1)
    res = evaluate(EvalConfig(store=url, out=str(tmp_path / "o"), adapter_run=str(run), batch_size=5,
                              device="cpu"))
    assert res.name == "L1:run"
    with torch.no_grad():
        ref = _in_memory(pairs, W, predict=lambda d, t, m: apply_adapter(module, acfg, d, t, m))
    assert_close(ref["summary"], res.metrics)
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["inputs"]["adapter_level"] == "L1" and doc["inputs"]["adapter_fingerprint"]

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_adapter_weights(str(wrong / "best.safetensors"), create_adapter(acfg, 8), acfg, 8, epoch=1)
    with pytest.raises(ConfigError, match="hidden size"):
        evaluate(EvalConfig(store=url, out=str(tmp_path / "x"), adapter_run=str(wrong)))


def test_output_to_memory_url(store):
    url, _, _ = store
    import fsspec

    res = evaluate(EvalConfig(store=url, out="memory://evaltest/run1", identity=True))
    fs = fsspec.filesystem("memory")
    assert {Path(p).name for p in fs.ls("/evaltest/run1", detail=False)} >= {
        "metrics.json", "report.md", "metrics_summary.png", "per_position.png"}
    assert res.out_url == "memory://evaltest/run1"


def _copy_scenes(src: str, dst: str, scenes: set[str]) -> None:
    """A store holding ``src``'s pairs (any status) of ``scenes``, shard by shard as in ``src``."""
    from egpt_core.store import StoreReader, StoreWriter

    r = StoreReader(src)
    w = StoreWriter(dst, {"hidden_size": r.hidden_size, "dtype": "float32", "mode": r.meta["mode"]})
    for sh in r.shards:
        recs, ds, ts = [], [], []
        for p in r._table(sh).to_pylist():
            if p["scene_id"] not in scenes:
                continue
            rows = r.get(p["pair_id"]) if p["status"] == "ok" else None
            recs.append({k: p[k] for k in ("pair_id", "scene_id", "question_idx", "status", "reason", "length",
                                           "target_response_ids", "drafter_response_ids")})
            ds.append(rows.drafter if rows else None)
            ts.append(rows.target if rows else None)
        if recs:
            w.commit_shard(recs, ds, ts)
    w.write_lm_head(r.lm_head(), fingerprint="test-head")


def test_extra_stores_are_evaluated_as_one_split(store, tmp_path):
    """A store plus `extra_stores` evaluates like one store holding all their pairs: the held-out
    scenes are chosen over all of them (the scenes training held out), every held-out pair counts."""
    url, _, _ = store
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    _copy_scenes(url, first, {"s0", "s1", ""})  # + the failed pair (no scene)
    _copy_scenes(url, second, {"s2", "s3"})
    split = dict(split="val", val_fraction=0.5, split_seed=3)
    whole = evaluate(EvalConfig(store=url, out=str(tmp_path / "whole"), identity=True, **split))
    both = evaluate(EvalConfig(store=first, extra_stores=[second], out=str(tmp_path / "both"), identity=True, **split))
    alone = evaluate(EvalConfig(store=first, out=str(tmp_path / "alone"), identity=True, **split))
    assert both.n_pairs == whole.n_pairs != alone.n_pairs
    a = json.loads((Path(whole.out_url) / "metrics.json").read_text())
    b = json.loads((Path(both.out_url) / "metrics.json").read_text())
    for key in ("counts", "summary", "token"):
        assert_close(a[key], b[key], key)
    assert [e["store"] for e in b["inputs"]["extra_stores"]] == [second]
    assert b["inputs"]["n_pairs_not_ok"] == a["inputs"]["n_pairs_not_ok"] == 1
