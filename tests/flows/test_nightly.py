"""The nightly flow: only new pairs are extracted; a changed drafter re-extracts in retf mode into a
store named by its fingerprint; unchanged inputs do no extraction at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def nightly_cfg(fixture_paths, tmp_path_factory):
    from egpt_core.config import ExtractConfig, PipelineConfig
    from flows.demo import CPU_FP32

    root = tmp_path_factory.mktemp("nightly")
    extract = ExtractConfig(dataset=str(fixture_paths["dataset"]), drafter=str(fixture_paths["eventgpt"]),
                            target=str(fixture_paths["videollava"]), store=str(root / "store"), load=CPU_FP32,
                            max_scenes=2, max_new_tokens=8, shard_size=4, batch_size=4)
    return PipelineConfig(extract=extract, out=str(root / "runs"))


@pytest.fixture
def extraction_calls(monkeypatch):
    import tasks.extract

    calls: list[dict] = []
    real = tasks.extract.run_extraction

    def spy(cfg, progress=None, only_pairs=None):
        calls.append({"mode": cfg.mode, "store": cfg.store, "only_pairs": only_pairs})
        return real(cfg, progress=progress, only_pairs=only_pairs)

    monkeypatch.setattr(tasks.extract, "run_extraction", spy)
    return calls


def test_nightly_extracts_only_what_is_new(nightly_cfg, fixture_paths, tmp_path, extraction_calls, states_by_name):
    from flows.nightly import nightly_reextract

    first = nightly_reextract(nightly_cfg, return_state=True)  # empty store: everything is new
    assert first.is_completed(), first.message
    assert first.result().stores[0].counts["ok"] == 6 and len(extraction_calls[0]["only_pairs"]) == 6

    unchanged = nightly_reextract(nightly_cfg, return_state=True)
    assert len(extraction_calls) == 1
    assert not [n for n in states_by_name(unchanged) if n.startswith(("features-", "extract-"))]
    assert unchanged.result().runs[0].name == "identity"

    questions = json.loads((fixture_paths["dataset"] / "questions.json").read_text())
    more = tmp_path / "questions.json"
    more.write_text(json.dumps([*questions, {"question": "Is anything moving fast?", "count": 1}]))
    grown = nightly_cfg.model_copy(update={"extract": nightly_cfg.extract.model_copy(update={"questions": str(more)})})
    state = nightly_reextract(grown, return_state=True)
    assert state.is_completed(), state.message
    assert len(extraction_calls) == 2 and len(extraction_calls[1]["only_pairs"]) == 2  # 2 scenes x 1 new question
    assert state.result().stores[0].counts["ok"] == 8


def test_changed_drafter_is_reextracted_in_retf_mode(nightly_cfg, tmp_path, extraction_calls):
    from egpt_core.models.tiny import build_tokenizer, write_tiny_eventgpt
    from egpt_core.store import StoreReader
    from flows.nightly import nightly_reextract
    from tasks.extract import drafter_fingerprint

    cfg = nightly_cfg.model_copy(update={"extract": nightly_cfg.extract.model_copy(
        update={"store": str(tmp_path / "store")})})
    nightly_reextract(cfg)  # the base store, made by the original drafter
    new_drafter = write_tiny_eventgpt(tmp_path / "eventgpt-v2", build_tokenizer(), seed=1)
    extract = cfg.extract.model_copy(update={"drafter": str(new_drafter)})
    fingerprint = drafter_fingerprint(extract)

    state = nightly_reextract(cfg.model_copy(update={"extract": extract}), return_state=True)
    assert state.is_completed(), state.message
    [store] = state.result().stores
    assert store.url == f"{cfg.extract.store}-retf-{fingerprint[:12]}" and store.mode == "retf"
    assert store.drafter_fingerprint == fingerprint
    assert store.counts["ok"] == StoreReader(cfg.extract.store).counts["ok"] == 6
    assert extraction_calls[-1]["mode"] == "retf" and Path(store.url, "manifest.json").is_file()
