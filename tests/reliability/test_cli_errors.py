"""Bad settings and damaged inputs through the `egpt` CLI (issue 13, item 17): one clear line on
stderr naming the problem, exit status 2, no traceback. On 0ff812c each of these printed a Python
traceback (or, for `--dataset FILE.json`, failed although the README documents it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from egpt_core.cli import main
from egpt_core.config import ExtractConfig, ModelLoadConfig

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

FP32 = ModelLoadConfig(dtype="float32", quant="none", device="cpu")


def _fails_clearly(argv: list[str], capsys, *needles: str) -> str:
    """Run `egpt argv`: exit 2 and exactly one stderr line `egpt <cmd>: error: ...` holding every needle."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err and lines, err
    last = lines[-1]
    assert last.startswith(f"egpt {argv[0]}: error: "), err
    for needle in needles:
        assert needle in last, (needle, err)
    return last


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from egpt_core.adapters.synthetic import write_synthetic_pair_store

    root = tmp_path_factory.mktemp("cli_errors")
    write_synthetic_pair_store(str(root / "s16"), hidden_size=16, n_scenes=4, pairs_per_scene=3, shard_size=6)
    write_synthetic_pair_store(str(root / "s8"), hidden_size=8, n_scenes=4, pairs_per_scene=3, shard_size=12)
    write_synthetic_pair_store(str(root / "failed"), hidden_size=16, n_scenes=0, pairs_per_scene=0, n_failed=4)
    assert main(["train-adapter", "--level", "L1", "--train", str(root / "s16"), "--out", str(root / "a16"),
                 "--epochs", "1"]) == 0
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_store(tmp_path, capsys):
    _fails_clearly(["evaluate", "--store", str(tmp_path / "nope"), "--identity", "--out", str(tmp_path / "e")], capsys,
                   str(tmp_path / "nope"))
    _fails_clearly(["train-adapter", "--train", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], capsys,
                   str(tmp_path / "nope"))


def test_hidden_size_mismatch_adapter_vs_store(synth, tmp_path, capsys):
    _fails_clearly(["evaluate", "--store", str(synth / "s8"), "--adapter", str(synth / "a16"), "--out",
                    str(tmp_path / "e")], capsys, "16", "8")


def test_store_with_only_failed_pairs(synth, tmp_path, capsys):
    _fails_clearly(["evaluate", "--store", str(synth / "failed"), "--identity", "--out", str(tmp_path / "e")], capsys,
                   "no pairs with status 'ok'")
    _fails_clearly(["train-adapter", "--train", str(synth / "failed"), "--out", str(tmp_path / "r")], capsys,
                   str(synth / "failed"))


def test_compare_given_a_history_json_or_an_empty_document(synth, tmp_path, capsys):
    _fails_clearly(["compare", str(synth / "a16" / "history.json"), "--out", str(tmp_path / "c")], capsys,
                   "history.json", "not an evaluation's metrics.json")
    (tmp_path / "empty.json").write_text("{}")
    _fails_clearly(["compare", str(tmp_path / "empty.json"), "--out", str(tmp_path / "c")], capsys, "empty.json")
    _fails_clearly(["compare", "{}", "--out", str(tmp_path / "c")], capsys, "{}", "no such file")
    assert not (tmp_path / "c").exists()  # no row of dashes written anywhere


def test_extract_negative_batch_size(fixtures_dir, tmp_path, capsys):
    _fails_clearly(["extract", "--dataset", str(fixtures_dir / "dataset"), "--drafter", str(fixtures_dir / "eventgpt"),
                    "--target", str(fixtures_dir / "videollava"), "--store", str(tmp_path / "s"), "--batch-size", "-1"],
                   capsys, "batch_size", "-1")


def test_extract_dataset_given_as_the_manifest_file(fixtures_dir, drafter, target, tmp_path, capsys):
    """Documented as supported: the questions file is then looked up beside the manifest."""
    from egpt_core.extraction import run_extraction
    from egpt_core.store import StoreReader

    manifest = fixtures_dir / "dataset" / "EventGPT_Instruction_Subset.json"
    common = dict(drafter=str(fixtures_dir / "eventgpt"), target=str(fixtures_dir / "videollava"), load=FP32,
                  max_new_tokens=8, max_scenes=1, max_questions=2)
    summary = run_extraction(ExtractConfig(dataset=str(manifest), store=str(tmp_path / "file"), **common),
                             models=(drafter, target))
    assert summary.counts["ok"] == 2
    root = run_extraction(ExtractConfig(dataset=str(fixtures_dir / "dataset"), store=str(tmp_path / "root"), **common),
                          models=(drafter, target))
    ids = StoreReader(str(tmp_path / "file")).pair_ids()
    assert ids == StoreReader(str(tmp_path / "root")).pair_ids() and root.counts == summary.counts
    from tasks.caching import dataset_fingerprint

    assert dataset_fingerprint(ExtractConfig(dataset=str(manifest), store="x", **common)) == dataset_fingerprint(
        ExtractConfig(dataset=str(fixtures_dir / "dataset"), store="x", **common))


def test_train_adapter_with_a_missing_shard(synth, tmp_path, capsys):
    store = _copy(synth / "s16", tmp_path / "s")
    shard = sorted((store / "tensors").glob("*.safetensors"))[0]
    shard.unlink()
    _fails_clearly(["train-adapter", "--train", str(store), "--out", str(tmp_path / "r"), "--epochs", "1"], capsys,
                   shard.name, "missing")


def test_missing_config_file(synth, tmp_path, capsys):
    for argv in (["train-adapter", "--train", str(synth / "s16"), "--out", str(tmp_path / "r")],
                 ["train-lora", "--store", str(synth / "s16"), "--drafter", "x", "--out", str(tmp_path / "l")],
                 ["extract", "--store", str(tmp_path / "s")]):
        _fails_clearly(argv + ["--config", str(tmp_path / "nope.yaml")], capsys, "nope.yaml", "not found")
    (tmp_path / "bad.yaml").write_text("adapter: [unclosed\n")
    _fails_clearly(["train-adapter", "--config", str(tmp_path / "bad.yaml")], capsys, "bad.yaml", "YAML")


def test_negative_bottleneck_dim(synth, tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text("adapter:\n  level: L3\n  bottleneck_dim: -5\n")
    _fails_clearly(["train-adapter", "--config", str(tmp_path / "cfg.yaml"), "--train", str(synth / "s16"), "--out",
                    str(tmp_path / "r")], capsys, "bottleneck_dim", "-5")
    assert not (tmp_path / "r").exists()


def test_corrupt_parquet_is_named(synth, tmp_path, capsys):
    store = _copy(synth / "s16", tmp_path / "s")
    pairs = sorted((store / "pairs").glob("*.parquet"))[0]
    pairs.write_bytes(b"PAR1 this is not parquet PAR1")
    _fails_clearly(["train-adapter", "--train", str(store), "--out", str(tmp_path / "r"), "--epochs", "1"], capsys,
                   pairs.name, "not readable as committed", "inspect --verify")
    _fails_clearly(["evaluate", "--store", str(store), "--identity", "--out", str(tmp_path / "e")], capsys, pairs.name)


def test_manifest_without_counts(synth, tmp_path, capsys):
    store = _copy(synth / "s16", tmp_path / "s")
    m = json.loads((store / "manifest.json").read_text())
    del m["counts"]
    (store / "manifest.json").write_text(json.dumps(m))
    for argv in (["inspect", str(store)], ["evaluate", "--store", str(store), "--identity", "--out", str(tmp_path / "e")],
                 ["train-adapter", "--train", str(store), "--out", str(tmp_path / "r"), "--epochs", "1"]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and "counts" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_unreachable_s3_endpoint(tmp_path, capsys):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = {"storage_options": {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k" * 10, "secret": "s" * 10,
                               "config_kwargs": {"retries": {"max_attempts": 1}}}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    line = _fails_clearly(["train-adapter", "--config", str(tmp_path / "cfg.json"), "--train", "s3://bucket/store",
                           "--out", str(tmp_path / "r")], capsys, "endpoint")
    assert "s" * 10 not in line


def test_resuming_l6_with_a_different_config(fixtures_dir, drafter, target, tmp_path, capsys):
    from egpt_core.extraction import run_extraction

    store = str(tmp_path / "store")
    run_extraction(ExtractConfig(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                                 target=str(fixtures_dir / "videollava"), store=store, load=FP32, max_new_tokens=8,
                                 max_scenes=2, max_questions=2), models=(drafter, target))
    args = ["train-lora", "--store", store, "--drafter", str(fixtures_dir / "eventgpt"), "--out", str(tmp_path / "l6"),
            "--quant", "none", "--dtype", "float32", "--device", "cpu", "--epochs", "1", "--grad-accum", "1"]
    assert main(args) == 0
    capsys.readouterr()
    _fails_clearly(args + ["--lr", "0.01"], capsys, str(tmp_path / "l6"), "--no-resume")
