"""A store holds one dataset's pairs: another dataset with the same scene ids is refused, never mixed
in or reported as "0 pending" (issue 13, item 6).

``ds1``/``ds2`` are `egpt fixtures`-style datasets of seeds 1 and 2: the same scene ids and questions,
different event and video content. Every pair carries a content fingerprint of its inputs (event
file, video, question); the manifest records dataset/model/config fingerprints and `egpt inspect`
shows them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from egpt_core.cli import main as egpt_main
from egpt_core.config import ExtractConfig, ModelLoadConfig
from egpt_core.data.synthetic import write_synthetic_dataset
from egpt_core.errors import ConfigError
from egpt_core.extraction import run_extraction
from egpt_core.store import StoreReader

FP32 = ModelLoadConfig(dtype="float32", device="cpu")


def _cfg(fx: Path, dataset: Path, store: Path, **kw) -> ExtractConfig:
    base = dict(dataset=str(dataset), drafter=str(fx / "eventgpt"), target=str(fx / "videollava"), store=str(store),
                max_new_tokens=4, min_tokens=1, batch_size=2, shard_size=2, load=FP32)
    base.update(kw)
    return ExtractConfig(**base)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("datasets")
    out = {name: write_synthetic_dataset(root / name, scenes=n, questions=2, seed=seed)
           for name, n, seed in (("ds1", 2, 1), ("ds2", 2, 2), ("ds1_grown", 3, 1))}
    m1 = json.loads((out["ds1"] / "EventGPT_Instruction_Subset.json").read_text())
    m2 = json.loads((out["ds2"] / "EventGPT_Instruction_Subset.json").read_text())
    assert [r["video_data"] for r in m1] == [r["video_data"] for r in m2]  # same scene ids
    assert _files(out["ds1"] / "event_npy") != _files(out["ds2"] / "event_npy")  # other content
    return out


@pytest.fixture(scope="module")
def store1(fixtures_dir, drafter, target, datasets, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("identity") / "store"
    s = run_extraction(_cfg(fixtures_dir, datasets["ds1"], store), models=(drafter, target))
    assert s.counts == {"ok": 4, "failed": 0, "skipped": 0}, s
    return store


@pytest.fixture
def no_models(monkeypatch):
    import egpt_core.extraction.run as run_mod

    def refuse(cfg):
        raise AssertionError("models were loaded for a run that should have been refused")

    monkeypatch.setattr(run_mod, "load_models", refuse)


def _copy(store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(store, dst)
    return dst


def test_another_dataset_with_the_same_scene_ids_is_refused(fixtures_dir, datasets, store1, tmp_path, no_models):
    store = _copy(store1, tmp_path)
    before = _files(store)
    with pytest.raises(ConfigError) as exc:
        run_extraction(_cfg(fixtures_dir, datasets["ds2"], store))
    msg = str(exc.value)
    assert "4 pair(s)" in msg and str(datasets["ds2"]) in msg and "extracted from different inputs" in msg, msg
    assert str(datasets["ds2"] / "event_npy") in msg and "new store" in msg, msg
    assert _files(store) == before  # nothing written


def test_one_changed_file_is_named(fixtures_dir, datasets, store1, tmp_path, no_models):
    store = _copy(store1, tmp_path)
    ds = tmp_path / "ds"
    shutil.copytree(datasets["ds1"], ds)
    rec = json.loads((ds / "EventGPT_Instruction_Subset.json").read_text())[1]
    video = ds / "mp4" / (rec["video_data"] + ".mp4")
    shutil.copyfile(datasets["ds2"] / "mp4" / (rec["video_data"] + ".mp4"), video)
    with pytest.raises(ConfigError) as exc:
        run_extraction(_cfg(fixtures_dir, ds, store))
    msg = str(exc.value)
    assert "2 pair(s)" in msg and f"its video ({video}) changed" in msg, msg


def test_the_same_dataset_moved_or_grown_is_accepted(fixtures_dir, drafter, target, datasets, store1, tmp_path):
    store = _copy(store1, tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(datasets["ds1"], moved)  # another path, same content: its pairs are the store's
    again = run_extraction(_cfg(fixtures_dir, moved, store), models=(drafter, target))
    assert again.pairs_pending == 0 and again.counts["ok"] == 4
    grown = run_extraction(_cfg(fixtures_dir, datasets["ds1_grown"], store), models=(drafter, target))
    assert grown.pairs_pending == 2 and grown.counts == {"ok": 6, "failed": 0, "skipped": 0}
    r = StoreReader(str(store))
    fps = r.pairs(columns=["pair_id", "input_fingerprint"]).to_pylist()
    assert len(fps) == 6 and all(row["input_fingerprint"].startswith("event=") for row in fps)


def test_inspect_shows_the_fingerprints(store1, capsys):
    assert egpt_main(["inspect", "--json", str(store1)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["dataset_fingerprint"] and s["config_fingerprint"]
    assert set(s["model_fingerprints"]) == {"drafter", "target"} and all(s["model_fingerprints"].values())
    assert egpt_main(["inspect", str(store1)]) == 0
    text = capsys.readouterr().out
    assert f"dataset {s['dataset_fingerprint']}" in text and "None" not in text.split("fingerprints", 1)[1].split("\n")[0]


def test_dataset_fingerprint_depends_on_content_not_on_sharding(fixtures_dir, drafter, target, datasets, store1,
                                                                tmp_path):
    other = tmp_path / "other"
    run_extraction(_cfg(fixtures_dir, datasets["ds1"], other, shard_size=4), models=(drafter, target))
    a, b = StoreReader(str(store1)), StoreReader(str(other))
    assert len(a.shards) != len(b.shards)
    assert a.manifest["dataset_fingerprint"] == b.manifest["dataset_fingerprint"]
    ds2 = tmp_path / "ds2store"
    run_extraction(_cfg(fixtures_dir, datasets["ds2"], ds2), models=(drafter, target))
    assert StoreReader(str(ds2)).manifest["dataset_fingerprint"] != a.manifest["dataset_fingerprint"]


def test_retf_from_a_store_of_another_dataset_is_refused(fixtures_dir, datasets, store1, tmp_path, no_models):
    cfg = _cfg(fixtures_dir, datasets["ds2"], tmp_path / "retf", mode="retf", source_store=str(store1))
    with pytest.raises(ConfigError) as exc:
        run_extraction(cfg)
    msg = str(exc.value)
    assert f"retf source store {store1}" in msg and "its event input" in msg, msg
    assert not (tmp_path / "retf").exists()


def test_a_store_without_input_fingerprints_still_resumes(fixtures_dir, drafter, target, datasets, store1, tmp_path,
                                                          caplog):
    """Pairs committed before input fingerprints existed cannot be checked: a warning, not a refusal."""
    import pyarrow.parquet as pq

    from egpt_core.store.manifest import sha256_hex

    store = _copy(store1, tmp_path)
    m = json.loads((store / "manifest.json").read_text())
    for sh in m["shards"]:  # rewrite each pairs file as an older version wrote it
        path = store / sh["files"]["pairs"]
        pq.write_table(pq.read_table(path).drop_columns(["input_fingerprint"]), path, compression="zstd")
        data = path.read_bytes()
        sh["sha256"]["pairs"], sh["file_bytes"]["pairs"] = sha256_hex(data), len(data)
        sh["bytes"] = len(data) + sh["file_bytes"]["tensors"]
    (store / "manifest.json").write_text(json.dumps(m))
    os.sync()
    s = run_extraction(_cfg(fixtures_dir, datasets["ds1"], store), models=(drafter, target))
    assert s.pairs_pending == 0 and s.counts["ok"] == 4
    assert "written before input fingerprints" in caplog.text
