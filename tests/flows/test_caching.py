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


def test_a_cached_result_whose_outputs_are_gone_is_recomputed(tmp_path, states_by_name):
    """Issue 13 item 11: deleting an evaluation's (or adapter run's) outputs and rerunning used to be
    served from the cache: a reference to files that no longer exist (then `compare` failed forever)."""
    from egpt_core.adapters.synthetic import write_synthetic_pair_store
    from egpt_core.config import EvalConfig, TrainAdapterConfig
    from flows.evaluate import evaluate
    from flows.train import train_adapter

    store = str(tmp_path / "store")
    write_synthetic_pair_store(store, hidden_size=16, n_scenes=6, pairs_per_scene=3, shard_size=18)
    run = tmp_path / "run"
    train_cfg = TrainAdapterConfig(train=[store], out=str(run), epochs=1)
    eval_cfg = EvalConfig(store=store, out=str(tmp_path / "eval"), adapter_run=str(run))

    def states(flow, cfg) -> list[str]:
        state = flow(cfg, return_state=True)
        assert state.is_completed(), state.message
        return list(states_by_name(state).values())

    assert states(train_adapter, train_cfg) == ["Completed"]
    assert states(evaluate, eval_cfg) == ["Completed"]
    assert states(train_adapter, train_cfg) == ["Cached"] and states(evaluate, eval_cfg) == ["Cached"]

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    shutil.rmtree(tmp_path / "eval")
    assert states(evaluate, eval_cfg) == ["Completed"]  # recomputed, not a reference to nothing
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"] == metrics["summary"]
    assert states(evaluate, eval_cfg) == ["Cached"]  # and the new result is what the next run finds

    (run / "best.safetensors").unlink()
    assert states(train_adapter, train_cfg) == ["Completed"]
    assert (run / "best.safetensors").is_file()
    assert states(train_adapter, train_cfg) == ["Cached"]
