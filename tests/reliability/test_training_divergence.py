"""Training that diverges (issue 13, item 10): `--lr inf` is refused with the config; a learning rate
that blows up, or a store holding non-finite rows, ends the run with one clear error (exit 2, never
retried) instead of exit 0 with `val_loss NaN`, no best checkpoint and NaN/Infinity tokens in JSON;
every JSON file egpt writes is valid JSON."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load as st_load

from egpt_core.cli import main
from egpt_core.config import ExtractConfig, ModelLoadConfig

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

FP32 = ModelLoadConfig(dtype="float32", quant="none", device="cpu")


def strict_json(text: str):
    """json.loads that refuses the NaN / Infinity tokens Python writes by default."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def _all_json_valid(root: Path) -> int:
    n = 0
    for p in root.rglob("*.json"):
        strict_json(p.read_text())
        n += 1
    return n


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from egpt_core.adapters.synthetic import write_synthetic_pair_store

    url = tmp_path_factory.mktemp("diverge") / "store"
    write_synthetic_pair_store(str(url), hidden_size=16, n_scenes=6, pairs_per_scene=4, shard_size=24)
    return url


def _nan_store(src: Path, dst: Path, pair_index: int = 3) -> str:
    """A copy of ``src`` whose tensor shard holds NaN drafter rows for one pair, with the manifest's
    digests and sizes updated (as another tool or an older version could have written it)."""
    from egpt_core.store import manifest as mf

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    sh = m["shards"][0]
    path = dst / sh["files"]["tensors"]
    tensors = st_load(path.read_bytes())
    off = tensors["offsets"]
    drafter = tensors["drafter"].clone()
    drafter[int(off[pair_index]):int(off[pair_index + 1])] = float("nan")
    data = mf.safetensors_bytes({**tensors, "drafter": drafter})
    path.write_bytes(data)
    sh["sha256"]["tensors"] = mf.sha256_hex(data)
    sh["file_bytes"]["tensors"] = len(data)
    sh["bytes"] = sh["file_bytes"]["tensors"] + sh["file_bytes"]["pairs"]
    (dst / "manifest.json").write_bytes(mf.dump_manifest(mf.refresh_manifest(m)))
    import pyarrow.parquet as pq

    return pq.read_table(dst / sh["files"]["pairs"]).column("pair_id")[pair_index].as_py()


def test_inf_and_nan_settings_are_refused(store, tmp_path, capsys):
    for lr in ("inf", "nan", "-inf"):
        rc = main(["train-adapter", "--train", str(store), "--out", str(tmp_path / "r"), f"--lr={lr}"])
        err = capsys.readouterr().err
        assert rc == 2 and "lr" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "cfg.yaml").write_text("lr: .inf\n")
    rc = main(["train-adapter", "--train", str(store), "--out", str(tmp_path / "r"), "--config", str(tmp_path / "cfg.yaml")])
    assert rc == 2 and "lr" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_diverging_learning_rate_fails_clearly(store, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train-adapter", "--level", "L2", "--train", str(store), "--out", str(out), "--epochs", "3",
               "--lr", "1e30"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "diverged" in err and "lr=1e+30" in err and "Traceback" not in err
    assert not (out / "result.json").exists() and not (out / "best.safetensors").exists()
    assert _all_json_valid(out) >= 1  # config.json at least; no NaN/Infinity token anywhere


def test_non_finite_rows_in_a_store_are_named(store, tmp_path, capsys):
    bad = tmp_path / "nan-store"
    pair_id = _nan_store(store, bad)
    rc = main(["train-adapter", "--level", "L1", "--train", str(bad), "--out", str(tmp_path / "run"), "--epochs", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "diverged" in err and pair_id in err and "non-finite drafter rows" in err, err
    assert _all_json_valid(tmp_path / "run") >= 1


def test_l6_divergence_fails_clearly(fixtures_dir, drafter, target, tmp_path, capsys):
    from egpt_core.extraction import run_extraction

    s = str(tmp_path / "store")
    run_extraction(ExtractConfig(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                                 target=str(fixtures_dir / "videollava"), store=s, load=FP32, max_new_tokens=8,
                                 max_scenes=2, max_questions=2), models=(drafter, target))
    rc = main(["train-lora", "--store", s, "--drafter", str(fixtures_dir / "eventgpt"), "--out", str(tmp_path / "l6"),
               "--quant", "none", "--dtype", "float32", "--device", "cpu", "--epochs", "2", "--grad-accum", "1",
               "--lr", "1e30"])
    err = capsys.readouterr().err
    assert rc == 2 and "L6 training diverged" in err and "Traceback" not in err, err
    assert not (tmp_path / "l6" / "metrics.json").exists()
    assert _all_json_valid(tmp_path / "l6") >= 1


def test_json_writers_never_write_nan_or_infinity(tmp_path):
    from egpt_core import runfiles as rf
    from egpt_core.evaluation import compare_runs

    rf.write_json(str(tmp_path / "h.json"), {"val_loss": float("nan"), "rows": [1.0, float("inf"), -float("inf")]})
    assert strict_json((tmp_path / "h.json").read_text()) == {"val_loss": None, "rows": [1.0, None, None]}
    run = {"name": "a", "summary": {"cos_pooled": float("nan"), "n_pairs": 3}, "inputs": {"store_fingerprint": "f"}}
    compare_runs([run], str(tmp_path / "cmp"))
    doc = strict_json((tmp_path / "cmp" / "comparison.json").read_text())
    assert doc["runs"][0]["cos_pooled"] is None and not math.isnan(doc["runs"][0]["n_pairs"])
