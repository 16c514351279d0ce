"""Cache keys: fingerprints + stage version, never credentials, never shared between stages."""

from __future__ import annotations

import json
import shutil

import pytest


@pytest.fixture
def extract_cfg(fixture_paths, tmp_path):
    from egpt_core.config import ExtractConfig

    return ExtractConfig(dataset=str(fixture_paths["dataset"]), drafter=str(fixture_paths["eventgpt"]),
                         target=str(fixture_paths["videollava"]), store=str(tmp_path / "store"))


def _key(stage: str, material, inputs) -> str | None:
    from tasks.caching import FingerprintPolicy

    return FingerprintPolicy(stage=stage, material=material).compute_key(None, inputs, {})


def test_key_ignores_storage_options_and_never_contains_them(extract_cfg, secret):
    from tasks.caching import extract_material

    with_secret = extract_cfg.model_copy(update={"storage_options": {"key": secret, "endpoint_url": "http://minio"}})
    assert _key("extract", extract_material, {"cfg": extract_cfg}) == _key("extract", extract_material,
                                                                           {"cfg": with_secret})
    assert secret not in json.dumps(extract_material({"cfg": with_secret}))


def test_equal_inputs_in_two_stages_do_not_share_a_key(extract_cfg):
    """The INPUTS-only pitfall: here the stage name and version are part of every key."""
    from tasks.caching import extract_material

    assert _key("extract", extract_material, {"cfg": extract_cfg}) != _key("features", extract_material,
                                                                           {"cfg": extract_cfg})


def test_key_follows_settings_and_version(extract_cfg, monkeypatch):
    import tasks.caching
    from tasks.caching import extract_material

    base = _key("extract", extract_material, {"cfg": extract_cfg})
    assert base.startswith("extract-")
    assert _key("extract", extract_material, {"cfg": extract_cfg.model_copy(update={"max_new_tokens": 7})}) != base
    assert _key("extract", extract_material, {"cfg": extract_cfg, "only_pairs": ["a|q1"]}) != base

    monkeypatch.setitem(tasks.caching.STAGE_VERSIONS, "extract", "tasks-2/bumped")
    assert _key("extract", extract_material, {"cfg": extract_cfg}) != base


def test_dataset_change_changes_the_key(extract_cfg, fixture_paths, tmp_path):
    from tasks.caching import extract_material

    dataset = shutil.copytree(fixture_paths["dataset"], tmp_path / "dataset")
    cfg = extract_cfg.model_copy(update={"dataset": str(dataset)})
    before = _key("extract", extract_material, {"cfg": cfg})
    questions = json.loads((dataset / "questions.json").read_text())
    (dataset / "questions.json").write_text(json.dumps([*questions, {"question": "Is it raining?", "count": 1}]))
    assert _key("extract", extract_material, {"cfg": cfg}) != before


def test_unfingerprintable_inputs_are_not_cached(extract_cfg, tmp_path):
    from egpt_core.config import TrainAdapterConfig
    from tasks.caching import extract_material, train_adapter_material

    assert _key("extract", extract_material, {"cfg": extract_cfg.model_copy(update={"dataset": str(tmp_path)})}) is None
    assert _key("train-adapter", train_adapter_material, {"cfg": TrainAdapterConfig(train=[str(tmp_path / "no")])}) is None


def test_drafter_fingerprint_matches_the_loader(drafter, fixture_paths, extract_cfg):
    """plan_nightly compares this with the store manifest's drafter fingerprint (written by the loader)."""
    from tasks.extract import drafter_fingerprint

    assert drafter_fingerprint(extract_cfg) == drafter.fingerprint
