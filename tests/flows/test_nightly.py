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


def _report(flow_state) -> str:
    """The markdown of the run's `pipeline-report` artifact (what the UI shows)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_state.state_details.flow_run_id]),
                         key=ArtifactFilterKey(any_=["pipeline-report"]))
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=flt)
    return artifact.data


def _evaluated_stores(result) -> list[str]:
    inputs = [json.loads(Path(r.out_url, "metrics.json").read_text())["inputs"] for r in result.runs]
    return [u for i in inputs for u in [i["store"], *(e["store"] for e in i.get("extra_stores", []))]]


def test_pairs_added_after_a_drafter_change_are_evaluated_and_counted_once(nightly_cfg, fixture_paths, tmp_path,
                                                                           extraction_calls):
    """After a drafter change new pairs go to `<store>-drafter-<fp>`: they are evaluated (not only the
    retf store), and the next night finds them committed (0 new, nothing extracted)."""
    from egpt_core.models.tiny import build_tokenizer, write_tiny_eventgpt
    from flows.nightly import nightly_reextract
    from tasks.extract import drafter_fingerprint

    cfg = nightly_cfg.model_copy(update={"extract": nightly_cfg.extract.model_copy(
        update={"store": str(tmp_path / "store")})})
    nightly_reextract(cfg)  # the base store: 2 scenes x 3 questions by the original drafter
    questions = json.loads((fixture_paths["dataset"] / "questions.json").read_text())
    more = tmp_path / "questions.json"
    more.write_text(json.dumps([*questions, {"question": "Is anything moving fast?", "count": 1}]))
    new_drafter = write_tiny_eventgpt(tmp_path / "eventgpt-v2", build_tokenizer(), seed=1)
    extract = cfg.extract.model_copy(update={"drafter": str(new_drafter), "questions": str(more)})
    drafter_store = f"{cfg.extract.store}-drafter-{drafter_fingerprint(extract)[:12]}"
    changed = cfg.model_copy(update={"extract": extract})

    night = nightly_reextract(changed, return_state=True)
    assert night.is_completed(), night.message
    result = night.result()
    assert [s.url for s in result.stores][1:] == [drafter_store] and result.stores[1].counts["ok"] == 2
    assert drafter_store in _evaluated_stores(result)  # what was added is evaluated
    from egpt_core.data.split import split_scenes
    from egpt_core.store import StoreReader

    scenes = [x for s in result.stores for x in StoreReader(s.url).pairs("ok", ["scene_id"]).column(0).to_pylist()]
    _, held_out = split_scenes(scenes, changed.val_fraction, changed.split_seed)  # as the adapters split them
    assert {r.n_pairs for r in result.runs} == {sum(x in held_out for x in scenes)} == {4}  # 3 re-extracted + 1 new
    assert "2 pairs new to the dataset (6 already committed)" in _report(night)
    calls = len(extraction_calls)

    later = nightly_reextract(changed, return_state=True)
    assert later.is_completed(), later.message
    assert len(extraction_calls) == calls  # nothing new: no extraction
    assert "0 pairs new to the dataset (8 already committed)" in _report(later)
    result = later.result()
    assert [s.url for s in result.stores][1:] == [drafter_store]  # still trained on and evaluated
    assert drafter_store in _evaluated_stores(result)


def test_drafter_change_after_extracting_with_a_relative_dataset(nightly_cfg, fixture_paths, tmp_path, monkeypatch):
    """A store written with a relative `--dataset`; the nightly after a drafter change runs in a worker
    started from another directory (where that relative path means nothing) and still re-extracts."""
    import os

    from egpt_core.models.tiny import build_tokenizer, write_tiny_eventgpt
    from egpt_core.store import StoreReader
    from flows.nightly import nightly_reextract

    dataset = fixture_paths["dataset"]
    monkeypatch.chdir(dataset.parent)
    cfg = nightly_cfg.model_copy(update={"extract": nightly_cfg.extract.model_copy(
        update={"store": str(tmp_path / "store"), "dataset": dataset.name})})
    assert nightly_reextract(cfg, return_state=True).is_completed()

    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    monkeypatch.chdir(worker_dir)
    new_drafter = write_tiny_eventgpt(tmp_path / "eventgpt-v2", build_tokenizer(), seed=1)
    extract = cfg.extract.model_copy(update={"drafter": str(new_drafter),
                                             "dataset": os.path.relpath(dataset, worker_dir)})
    state = nightly_reextract(cfg.model_copy(update={"extract": extract}), return_state=True)
    assert state.is_completed(), state.message
    [retf] = state.result().stores
    assert retf.mode == "retf" and retf.counts["ok"] == 6
    assert StoreReader(cfg.extract.store).meta["dataset"] == str(dataset.resolve())  # recorded absolute
