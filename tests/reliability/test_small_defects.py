"""Issue 13, item 19: the smaller defects. A compat_key mismatch names the setting that differs; a
failed retf leaves nothing that blocks the corrected rerun; messages name the `--no-resume` flag;
`render-events --frames N` is capped by the events in the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from egpt_core.cli import main
from egpt_core.config import ExtractConfig, ModelLoadConfig
from egpt_core.errors import ConfigError

FP32 = ModelLoadConfig(dtype="float32", quant="none", device="cpu")


def _cfg(fixtures_dir: Path, store: Path, **kw) -> ExtractConfig:
    base = dict(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                target=str(fixtures_dir / "videollava"), store=str(store), load=FP32, max_new_tokens=8,
                max_scenes=2, max_questions=2)
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def source_store(fixtures_dir, drafter, target, tmp_path_factory) -> Path:
    from egpt_core.extraction import run_extraction

    store = tmp_path_factory.mktemp("small") / "source"
    assert run_extraction(_cfg(fixtures_dir, store), models=(drafter, target)).counts["ok"] == 4
    return store


def test_compat_key_mismatch_names_the_setting(fixtures_dir, drafter, target, source_store):
    from egpt_core.extraction import run_extraction

    with pytest.raises(ConfigError) as exc:
        run_extraction(_cfg(fixtures_dir, source_store, max_new_tokens=6), models=(drafter, target))
    msg = str(exc.value)
    assert "compat_key" in msg and "generation.max_new_tokens: 8 in the store, 6 now" in msg


def test_a_failed_retf_does_not_block_the_corrected_rerun(fixtures_dir, drafter, source_store, tmp_path):
    """A retf with the wrong drafter (another hidden size) fails; the rerun with the right one works."""
    from transformers import AutoTokenizer

    from egpt_core.extraction import run_extraction
    from egpt_core.models.tiny import write_tiny_eventgpt
    from egpt_core.store import StoreReader

    wrong = write_tiny_eventgpt(tmp_path / "wrong-drafter", AutoTokenizer.from_pretrained(fixtures_dir / "eventgpt"),
                                hidden=32)
    out = tmp_path / "retf"
    retf = dict(mode="retf", source_store=str(source_store))
    with pytest.raises(ConfigError, match="hidden size"):
        run_extraction(_cfg(fixtures_dir, out, drafter=str(wrong), **retf))
    summary = run_extraction(_cfg(fixtures_dir, out, **retf), models=(drafter, None))
    assert summary.counts["ok"] == 4 and StoreReader(str(out)).hidden_size == 64


def test_a_run_failing_before_its_first_commit_leaves_no_store(fixtures_dir, drafter, target, source_store, tmp_path,
                                                               monkeypatch):
    """Any failure between creating the store and its first commit (here: an error in the first batch)
    removes the empty store it created, so a rerun with other settings is not refused."""
    import egpt_core.extraction.run as run_mod

    out = tmp_path / "retf"
    retf = dict(mode="retf", source_store=str(source_store))
    real = run_mod._extract_batch

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in the first batch")

    monkeypatch.setattr(run_mod, "_extract_batch", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        run_mod.run_extraction(_cfg(fixtures_dir, out, max_new_tokens=7, **retf), models=(drafter, None))
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(run_mod, "_extract_batch", real)
    summary = run_mod.run_extraction(_cfg(fixtures_dir, out, **retf), models=(drafter, None))
    assert summary.counts["ok"] == 4


def test_messages_name_the_no_resume_flag(tmp_path, capsys):
    from egpt_core.adapters.synthetic import write_synthetic_pair_store

    store = str(tmp_path / "store")
    write_synthetic_pair_store(store, hidden_size=8, n_scenes=4, pairs_per_scene=2, shard_size=8)
    args = ["train-adapter", "--level", "L1", "--train", store, "--out", str(tmp_path / "r"), "--epochs", "1"]
    assert main(args) == 0
    assert main(args + ["--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "--no-resume" in err and "resume=False" not in err


def test_render_events_frames_capped_by_event_count(tmp_path, capsys):
    events = {"x": np.array([3], dtype=np.uint16), "y": np.array([2], dtype=np.uint16),
              "t": np.array([10], dtype=np.int64), "p": np.array([1], dtype=np.uint8)}
    np.save(tmp_path / "one.npy", events, allow_pickle=True)
    rc = main(["render-events", str(tmp_path / "one.npy"), "--frames", "100000", "--out", str(tmp_path / "frames")])
    assert rc == 0
    assert len(list((tmp_path / "frames").glob("*.png"))) == 1
    assert "capped to 1" in capsys.readouterr().err
