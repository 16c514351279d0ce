"""The extract flow: shard groups in-process, the cache, and a deleted store being recomputed."""

from __future__ import annotations

import shutil
from pathlib import Path


def _cfg(fixture_paths, store, **update):
    from egpt_core.config import ExtractConfig
    from flows.demo import CPU_FP32

    return ExtractConfig(dataset=str(fixture_paths["dataset"]), drafter=str(fixture_paths["eventgpt"]),
                         target=str(fixture_paths["videollava"]), store=str(store), load=CPU_FP32, max_scenes=2,
                         max_new_tokens=8, shard_size=2, batch_size=2, **update)


def test_shard_groups_run_in_process_without_a_deployment(fixture_paths, tmp_path, states_by_name):
    from flows.extract import extract

    state = extract(_cfg(fixture_paths, tmp_path / "store", shard_groups=2), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().counts == {"ok": 6, "failed": 0, "skipped": 0}
    groups = sorted(n for n in states_by_name(state) if n.startswith("extract-"))
    assert groups == ["extract-shared_prefix-g0of2-store", "extract-shared_prefix-g1of2-store"]


def test_cached_until_the_store_is_deleted(fixture_paths, tmp_path, states_by_name):
    from flows.extract import extract

    cfg = _cfg(fixture_paths, tmp_path / "store")
    first = extract(cfg, return_state=True)
    second = extract(cfg, return_state=True)
    expensive = ("features-", "extract-")
    assert {s for n, s in states_by_name(second).items() if n.startswith(expensive)} == {"Cached"}
    assert second.result().fingerprint == first.result().fingerprint

    shutil.rmtree(cfg.store)
    third = extract(cfg, return_state=True)
    assert {s for n, s in states_by_name(third).items() if n.startswith(expensive)} == {"Completed"}
    assert (Path(cfg.store) / "manifest.json").is_file() and third.result().counts["ok"] == 6


def test_the_drafter_is_read_once_per_flow_run(fixture_paths, tmp_path, monkeypatch):
    """The features task and the extraction task share one loaded drafter (at 7B, 14 GB read once)."""
    from egpt_core.models.eventgpt import EventChatLlamaForCausalLM
    from flows.extract import extract

    reads = []
    original = EventChatLlamaForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        reads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(EventChatLlamaForCausalLM, "from_pretrained", classmethod(counted))
    state = extract(_cfg(fixture_paths, tmp_path / "store"), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().counts == {"ok": 6, "failed": 0, "skipped": 0}
    assert reads == [str(fixture_paths["eventgpt"])]
