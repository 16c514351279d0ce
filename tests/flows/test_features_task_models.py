"""The features task of a new store does not load the target: its manifest names the target by the
fingerprint and hidden size read from the checkpoint's files, exactly what the extraction records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egpt_core.extraction import run_extraction
from egpt_core.models.loading import videollava_identity


def test_identity_matches_the_loaded_target(target, fixtures_dir):
    ident = videollava_identity(str(fixtures_dir / "videollava"))
    assert (ident.fingerprint, ident.hidden_size) == (target.fingerprint, target.hidden_size)


def test_features_task_creates_the_store_without_loading_the_target(fixtures_dir, tmp_path, monkeypatch, drafter,
                                                                   target):
    import egpt_core.models.loading as loading
    from egpt_core.config import ExtractConfig, ModelLoadConfig
    from egpt_core.data import load_scenes
    from tasks.extract import compute_features

    cfg = ExtractConfig(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                        target=str(fixtures_dir / "videollava"), store=str(tmp_path / "store"), max_new_tokens=8,
                        min_tokens=2, batch_size=4, shard_size=4, load=ModelLoadConfig(dtype="float32", device="cpu"))

    def no_target(*a, **k):
        raise AssertionError("the features task loaded the target")

    from prefect import flow

    @flow(name="features-only")
    def features_only():
        return compute_features(cfg, [s.scene_id for s in load_scenes(cfg.dataset)[:2]])

    monkeypatch.setattr(loading, "load_videollava", no_target)
    ref = features_only()
    assert ref.computed == 2
    meta = json.loads((Path(cfg.store) / "manifest.json").read_text())["meta"]
    assert meta["models"]["target"]["fingerprint"] == target.fingerprint
    assert meta["hidden_size"] == target.hidden_size
    monkeypatch.undo()
    # the extraction (with both models) accepts the store the features task created
    summary = run_extraction(cfg, models=(drafter, target))
    assert summary.counts.get("ok", 0) > 0


def test_identity_refuses_a_non_videollava_checkpoint(fixtures_dir):
    from egpt_core.errors import ConfigError

    with pytest.raises(ConfigError, match="video_llava"):
        videollava_identity(str(fixtures_dir / "eventgpt"))
