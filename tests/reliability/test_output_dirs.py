"""Every `--out` (issue 13, items 1-3): egpt never deletes or overwrites what it did not write, and
one run owns an output directory at a time.

On 0ff812c `egpt export-drafter --out X` deleted X (a user's folder, the base drafter it read, a
whole bucket), `train-adapter --out` overwrote a user's config.json/result.json, and two runs into
one --out both "succeeded" with mixed files. Local disk and moto S3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egpt_core.cli import main
from egpt_core.config import EvalConfig, LoraTrainConfig, ModelLoadConfig, TrainAdapterConfig
from egpt_core.fingerprint import dir_fingerprint
from egpt_core.fsio import url_to_fs

# egpt_core.outdir is imported inside the tests that need it: the CLI-level tests also run (and fail
# on their assertions) against 0ff812c, which has no such module.
LOCK, MARKER = ".egpt-lock", ".egpt-output"

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

FP32 = ModelLoadConfig(dtype="float32", quant="none", device="cpu")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lora_dir(fixtures_dir, tmp_path_factory) -> Path:
    """A peft LoRA on the tiny drafter, saved the way L6 saves it (provenance names the base drafter)."""
    from egpt_core.lora.train import apply_lora, save_adapter
    from egpt_core.models import load_eventgpt

    drafter = load_eventgpt(str(fixtures_dir / "eventgpt"), FP32)
    out = tmp_path_factory.mktemp("lora")
    cfg = LoraTrainConfig(store="unused", drafter=str(fixtures_dir / "eventgpt"), out=str(out), load=FP32,
                          gradient_checkpointing=False)
    peft_model = apply_lora(drafter, cfg)
    save_adapter(peft_model, str(out / "best"), {"drafter": str(fixtures_dir / "eventgpt")})
    return out / "best"


@pytest.fixture(scope="module")
def adapter_store(tmp_path_factory) -> str:
    from egpt_core.adapters.synthetic import write_synthetic_pair_store

    url = str(tmp_path_factory.mktemp("outdir_store") / "store")
    write_synthetic_pair_store(url, hidden_size=16, n_scenes=6, pairs_per_scene=4, shard_size=24)
    return url


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_dir(path: Path) -> dict[str, bytes]:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("years of notes")
    (path / "config.json").write_text('{"mine": true}')
    (path / "result.json").write_text('{"also": "mine"}')
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
    return _tree(path)


def _egpt(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# item 1: export-drafter
# --------------------------------------------------------------------------------------------------
def test_export_refuses_a_users_folder_and_the_base_drafter(lora_dir, fixtures_dir, tmp_path, capsys):
    user = tmp_path / "user"
    before = _user_dir(user)
    rc, err = _egpt(["export-drafter", "--lora", str(lora_dir), "--out", str(user)], capsys)
    assert rc == 2 and str(user) in err and "not written by egpt" in err and "notes.txt" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _tree(user) == before  # nothing deleted, nothing added

    base = fixtures_dir / "eventgpt"
    base_fp = dir_fingerprint(str(base))
    rc, err = _egpt(["export-drafter", "--lora", str(lora_dir), "--out", str(base)], capsys)
    assert rc == 2 and "base drafter" in err
    rc, err = _egpt(["export-drafter", "--lora", str(lora_dir), "--out", str(base.parent)], capsys)
    assert rc == 2 and "base drafter" in err
    assert dir_fingerprint(str(base)) == base_fp
    assert not list(base.parent.glob(".*tmp-*"))  # no staging left beside it


def test_export_reruns_replace_only_their_own_files(lora_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export-drafter", "--lora", str(lora_dir), "--out", str(out)]) == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "drafter-export" and "model.safetensors" in marker["files"]
    (out / "my-notes.txt").write_text("keep me")  # a user's file inside an export
    first = _tree(out)
    assert main(["export-drafter", "--lora", str(lora_dir), "--out", str(out)]) == 0  # same inputs: fine
    assert _tree(out) == first
    rc, err = _egpt(["export-drafter", "--lora", str(lora_dir), "--out", str(out), "--dtype", "bfloat16"], capsys)
    assert rc == 2 and "--overwrite" in err and "drafter-export" in err
    assert _tree(out) == first
    assert main(["export-drafter", "--lora", str(lora_dir), "--out", str(out), "--dtype", "bfloat16",
                 "--overwrite"]) == 0
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert json.loads((out / "egpt_export.json").read_text())["dtype"] == "bfloat16"
    # an evaluation or adapter run never lands in an export
    rc, err = _egpt(["compare", str(out / "egpt_export.json"), "--out", str(out)], capsys)
    assert rc == 2


def test_put_dir_deletes_only_files_its_marker_lists(tmp_path):
    from egpt_core import runfiles as rf
    from egpt_core.errors import ConfigError  # OutputDirError is a ConfigError

    out = tmp_path / "out"
    stage = tmp_path / "stage1"
    (stage / "d").mkdir(parents=True)
    (stage / "a.txt").write_text("a1")
    (stage / "d" / "b.txt").write_text("b1")
    rf.put_dir(stage, str(out))
    (out / "user.txt").write_text("user")
    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    (stage2 / "a.txt").write_text("a2")
    (stage2 / "c.txt").write_text("c2")
    rf.put_dir(stage2, str(out))
    assert sorted(_tree(out)) == sorted([MARKER, "a.txt", "c.txt", "user.txt"])
    assert (out / "a.txt").read_text() == "a2" and (out / "user.txt").read_text() == "user"
    assert not stage.exists() and not stage2.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    stage3 = tmp_path / "stage3"
    stage3.mkdir()
    (stage3 / "a.txt").write_text("a3")
    with pytest.raises(ConfigError, match="not written by egpt"):
        rf.put_dir(stage3, str(foreign))
    assert _tree(foreign) == {"x": b"x"}


# --------------------------------------------------------------------------------------------------
# item 2: every --out (adapter, L6, evaluation, comparison)
# --------------------------------------------------------------------------------------------------
def test_every_out_refuses_a_non_empty_folder_egpt_did_not_write(adapter_store, fixtures_dir, tmp_path, capsys):
    user = tmp_path / "user"
    before = _user_dir(user)
    commands = {
        "train-adapter": ["train-adapter", "--level", "L1", "--train", adapter_store, "--out", str(user), "--epochs", "1"],
        "train-lora": ["train-lora", "--store", adapter_store, "--drafter", str(fixtures_dir / "eventgpt"),
                       "--out", str(user), "--quant", "none", "--dtype", "float32", "--device", "cpu"],
        "evaluate": ["evaluate", "--store", adapter_store, "--identity", "--out", str(user)],
        "compare": ["compare", str(tmp_path / "eval" / "metrics.json"), "--out", str(user)],
    }
    assert main(["evaluate", "--store", adapter_store, "--identity", "--out", str(tmp_path / "eval")]) == 0
    for name, argv in commands.items():
        rc, err = _egpt(argv, capsys)
        assert rc == 2, (name, err)
        assert str(user) in err and "not written by egpt" in err, (name, err)
        assert _tree(user) == before, name


def test_outputs_of_another_kind_or_other_inputs_are_refused(adapter_store, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train-adapter", "--level", "L1", "--train", adapter_store, "--out", str(run), "--epochs", "1"]
    assert main(args) == 0
    first = _tree(run)
    rc, err = _egpt(args[:-1] + ["2", "--lr", "0.01"], capsys)  # other settings: resume refused
    assert rc == 2 and "--no-resume" in err and "resume=False" not in err
    assert _tree(run) == first
    rc, err = _egpt(["evaluate", "--store", adapter_store, "--identity", "--out", str(run)], capsys)
    assert rc == 2 and "adapter-run" in err and "evaluation" in err
    assert _tree(run) == first
    assert main(args[:-1] + ["2", "--lr", "0.01", "--no-resume"]) == 0  # replacing egpt's own run is allowed
    assert json.loads((run / "config.json").read_text())["config"]["lr"] == 0.01


def test_bucket_root_and_prefixes_on_s3(adapter_store, lora_dir, s3_server, s3_bucket):
    """s3://bucket as --out: never a recursive delete; refused while it holds anything not egpt's."""
    from egpt_core.adapters import train_adapter
    from egpt_core.errors import ConfigError as OutputDirError  # OutputDirError is a ConfigError
    from egpt_core.evaluation import evaluate
    from egpt_core.lora import export_drafter

    fs, _ = url_to_fs(s3_bucket, s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    fs.pipe_file(f"{bucket}/someone/else.bin", b"their data")
    fs.pipe_file(f"{bucket}/top.txt", b"top")
    with pytest.raises(OutputDirError, match="not written by egpt"):
        export_drafter(str(lora_dir), s3_bucket, storage_options=s3_server)
    with pytest.raises(OutputDirError, match="not written by egpt"):
        train_adapter(TrainAdapterConfig(train=[adapter_store], out=s3_bucket, epochs=1, storage_options=s3_server))
    with pytest.raises(OutputDirError, match="not written by egpt"):
        evaluate(EvalConfig(store=adapter_store, out=f"{s3_bucket}/someone", identity=True, storage_options=s3_server))
    fs.invalidate_cache()
    assert sorted(fs.find(bucket)) == sorted([f"{bucket}/someone/else.bin", f"{bucket}/top.txt"])
    assert fs.cat_file(f"{bucket}/someone/else.bin") == b"their data"

    out = f"{s3_bucket}/exports/m1"
    export_drafter(str(lora_dir), out, storage_options=s3_server)
    fs.pipe_file(f"{bucket}/exports/m1/user.txt", b"mine")
    with pytest.raises(OutputDirError, match="overwrite"):
        export_drafter(str(lora_dir), out, dtype="bfloat16", storage_options=s3_server)
    export_drafter(str(lora_dir), out, dtype="bfloat16", storage_options=s3_server, overwrite=True)
    fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/exports/m1/user.txt") == b"mine"
    assert json.loads(fs.cat_file(f"{bucket}/exports/m1/egpt_export.json"))["dtype"] == "bfloat16"
    assert not fs.exists(f"{bucket}/exports/m1/{LOCK}")  # released

    # an empty bucket is a fine --out; a rerun of the same run resumes (finished: returned as is)
    fs.rm(f"{bucket}/someone/else.bin")
    fs.rm(f"{bucket}/top.txt")
    fs.rm(f"{bucket}/exports", recursive=True)
    cfg = TrainAdapterConfig(train=[adapter_store], out=s3_bucket, epochs=1, storage_options=s3_server)
    first = train_adapter(cfg)
    again = train_adapter(cfg)
    assert again.best_val_loss == first.best_val_loss
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/best.safetensors")
    assert json.loads(fs.cat_file(f"{bucket}/{MARKER}"))["kind"] == "adapter-run"


# --------------------------------------------------------------------------------------------------
# item 3: one run per output directory
# --------------------------------------------------------------------------------------------------
def test_second_claim_is_refused_while_the_first_holds_it(tmp_path, s3_server, s3_bucket):
    from egpt_core.outdir import OutputDirError, claim_output

    for url, so in ((str(tmp_path / "run"), None), (f"{s3_bucket}/run", s3_server)):
        first = claim_output(url, "adapter-run", "id-1", so)
        with pytest.raises(OutputDirError, match=r"in use by another egpt run \(pid \d+"):
            claim_output(url, "adapter-run", "id-1", so)
        first.release()
        claim_output(url, "adapter-run", "id-1", so).release()


def _spawn_train(store: str, out: Path, lr: str, epochs: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cfg = out.parent / "no-early-stop.json"
    cfg.write_text(json.dumps({"early_stopping": 100000}))
    return subprocess.Popen([sys.executable, "-m", "egpt_core.cli", "train-adapter", "--level", "L2", "--train", store,
                             "--out", str(out), "--epochs", epochs, "--lr", lr, "--device", "cpu", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_runs_into_one_out_the_second_fails_clearly(adapter_store, tmp_path, capsys):
    out = tmp_path / "run"
    a = _spawn_train(adapter_store, out, "0.001", "400")
    deadline = time.time() + 120
    while not (out / LOCK).exists():
        assert a.poll() is None and time.time() < deadline, a.communicate()
        time.sleep(0.05)
    rc, err = _egpt(["train-adapter", "--level", "L2", "--train", adapter_store, "--out", str(out), "--epochs", "1",
                     "--lr", "0.01", "--no-resume"], capsys)
    assert rc == 2 and "in use by another egpt run" in err and f"pid {a.pid}" in err
    # the holder dies (kill -9): its lock is broken at once by the next run on this host
    a.send_signal(signal.SIGKILL)
    a.communicate()
    rc, err = _egpt(["train-adapter", "--level", "L2", "--train", adapter_store, "--out", str(out), "--epochs", "1",
                     "--lr", "0.01", "--no-resume"], capsys)
    assert rc == 0, err
    conf = json.loads((out / "config.json").read_text())
    result = json.loads((out / "result.json").read_text())
    assert conf["config"]["lr"] == 0.01 and result["epochs_run"] == 1
    assert not (out / LOCK).exists()
