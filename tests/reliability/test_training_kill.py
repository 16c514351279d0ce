"""kill -9 of adapter training and of L6 LoRA training, then resume: bitwise equal to an uninterrupted run.

Kill points (see train_kill_runner.py): after a committed epoch, mid-epoch, mid-write of an epoch's
weights file (a torn temp file is left behind), and between the weight files and the commit record
(a torn ``checkpoint/commit.json``). Torn or uncommitted files are never used, and no crash loses a
finished epoch (egpt_core/training/checkpoint.py: immutable per-epoch files, the commit record
written last): resume continues after the last committed epoch, and the final weights, optimizer
state and history are bitwise those of an uninterrupted run.
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
import torch
from safetensors.torch import load_file

from egpt_core.config import (
    AdapterConfig,
    ExtractConfig,
    LoraTrainConfig,
    ModelLoadConfig,
    TrainAdapterConfig,
)

RUNNER = Path(__file__).with_name("train_kill_runner.py")
TORN = ".tmp-killed00"
FP32 = ModelLoadConfig(dtype="float32", quant="none", device="cpu")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _report(request, text: str) -> None:
    """Write to the terminal even under output capture (the figures are for the README)."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None:
        print(text)
        return
    with capman.global_and_fixture_disabled():
        tr.write_line(text)


@pytest.fixture(scope="module")
def figures(request):
    rows: list[str] = []
    yield rows
    _report(request, "\n".join(["", "training kill -9 figures:", *[f"  {r}" for r in rows]]))


def _kill(kind: str, cfg, point: str, tmp_path: Path) -> float:
    cfg_file = tmp_path / f"{kind}-{point}.json"
    cfg_file.write_text(cfg.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(RUNNER), kind, str(cfg_file), point], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    return time.perf_counter() - t0


def _assert_same_tensors(a_file: Path, b_file: Path) -> int:
    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert a.keys() == b.keys(), (a_file, b_file)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (a_file.name, k)
    return len(a)


def _history(path: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads(path.read_text())]


# --------------------------------------------------------------------------------------------------
# adapters (train_adapter on a synthetic store)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_store(tmp_path_factory) -> str:
    from egpt_core.adapters.synthetic import write_synthetic_pair_store

    url = str(tmp_path_factory.mktemp("kill_adapter") / "store")
    write_synthetic_pair_store(url, hidden_size=16, n_scenes=8, pairs_per_scene=4, shard_size=10, n_failed=1)
    return url


def _adapter_cfg(store: str, out: Path) -> TrainAdapterConfig:
    return TrainAdapterConfig(
        adapter=AdapterConfig(level="L4", dropout=0.1, num_heads=4, ffn_dim=32),  # dropout: RNG state matters
        train=[store], out=str(out), epochs=4, batch_size=8, lr=3e-3, warmup_steps=2, early_stopping=50, seed=0,
        device="cpu")


@pytest.fixture(scope="module")
def adapter_full(adapter_store, tmp_path_factory):
    from egpt_core.adapters import train_adapter

    out = tmp_path_factory.mktemp("kill_adapter_full") / "run"
    t0 = time.perf_counter()
    res = train_adapter(_adapter_cfg(adapter_store, out))
    assert res.epochs_run == 4
    return out, time.perf_counter() - t0


def _commit(out: Path) -> dict:
    return json.loads((out / "checkpoint" / "commit.json").read_text())


def _assert_same_checkpoint(full: Path, out: Path) -> int:
    """Both commit records name the same files (named by content) and their tensors are bitwise equal."""
    a, b = _commit(full), _commit(out)
    assert a["files"] == b["files"] and a["sha256"].keys() == b["sha256"].keys()
    return sum(_assert_same_tensors(full / "checkpoint" / n, out / "checkpoint" / n) for n in a["sha256"])


# point -> epoch the resume continues after (a crash before the commit record keeps the finished ones)
ADAPTER_POINTS = {"after-epoch": 2, "torn-weights": 2, "torn-commit": 2}


@pytest.mark.parametrize("point", list(ADAPTER_POINTS))
def test_adapter_kill9_then_resume_is_bitwise_identical(point, adapter_store, adapter_full, tmp_path, caplog, figures):
    from egpt_core.adapters import train_adapter

    full, full_s = adapter_full
    out = tmp_path / "run"
    cfg = _adapter_cfg(adapter_store, out)
    killed_s = _kill("adapter", cfg, point, tmp_path)

    # what the kill left behind
    ckdir = out / "checkpoint"
    assert _commit(out)["epoch"] == 2
    if point == "after-epoch":
        assert not list(out.rglob(f"*{TORN}"))
    elif point == "torn-weights":  # epoch 3's weights never reached their name: epoch 2 is complete
        assert list(ckdir.glob(f"epoch-0003-*.weights.safetensors{TORN}"))
    else:  # epoch 3's files are in place, the commit record still names epoch 2's (which are intact)
        assert (ckdir / f"commit.json{TORN}").exists()
        assert list(ckdir.glob("epoch-0003-*.weights.safetensors")) and list(ckdir.glob("epoch-0003-*.train.safetensors"))
        assert all((ckdir / name).exists() for name in _commit(out)["sha256"])

    msgs: list[str] = []
    t0 = time.perf_counter()
    res = train_adapter(cfg, progress=lambda f, m: msgs.append(m))
    resume_s = time.perf_counter() - t0
    first = int(msgs[0].split()[1].split("/")[0])
    assert first == ADAPTER_POINTS[point] + 1, msgs  # continued after the last committed epoch

    n = _assert_same_checkpoint(full, out)
    for name in ("last.safetensors", "best.safetensors"):
        n += _assert_same_tensors(full / name, out / name)
    assert _history(full / "history.json") == _history(out / "history.json")
    assert res.epochs_run == 4
    figures.append(f"adapter L4 kill -9 at {point:13s}: killed run {killed_s:5.1f}s, resumed after epoch "
                   f"{ADAPTER_POINTS[point]} in {resume_s:4.1f}s (uninterrupted {full_s:4.1f}s); "
                   f"{n} tensors of last/best/optimizer bitwise equal")


# --------------------------------------------------------------------------------------------------
# L6 LoRA (train_lora on a store extracted from the fixtures)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_store(fixtures_dir, drafter, target, tmp_path_factory) -> str:
    from egpt_core.extraction import run_extraction

    url = str(tmp_path_factory.mktemp("kill_lora_store") / "S")
    cfg = ExtractConfig(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                        target=str(fixtures_dir / "videollava"), store=url, load=FP32, max_new_tokens=6,
                        max_scenes=3, max_questions=2)
    assert run_extraction(cfg, models=(drafter, target)).counts["ok"] == 6
    return url


def _lora_cfg(store: str, fixtures_dir: Path, out: Path) -> LoraTrainConfig:
    return LoraTrainConfig(store=store, drafter=str(fixtures_dir / "eventgpt"), out=str(out), load=FP32, rank=2,
                           alpha=4, epochs=3, grad_accum=2, lr=5e-3, val_fraction=0.34, early_stopping=10)


@pytest.fixture(scope="module")
def lora_full(lora_store, fixtures_dir, tmp_path_factory):
    from egpt_core.lora import train_lora

    out = tmp_path_factory.mktemp("kill_lora_full") / "run"
    t0 = time.perf_counter()
    res = train_lora(_lora_cfg(lora_store, fixtures_dir, out))
    assert res.epochs_run == 3 and res.resumed_from_epoch is None
    return out, time.perf_counter() - t0


LORA_POINTS = {"mid-epoch": 1, "torn-weights": 1, "torn-commit": 1}


@pytest.mark.parametrize("point", list(LORA_POINTS))
def test_lora_kill9_then_resume_is_bitwise_identical(point, lora_store, lora_full, fixtures_dir, tmp_path, figures):
    from egpt_core.lora import train_lora

    full, full_s = lora_full
    out = tmp_path / "run"
    cfg = _lora_cfg(lora_store, fixtures_dir, out)
    killed_s = _kill("lora", cfg, point, tmp_path)

    ckdir = out / "checkpoint"
    assert _commit(out)["epoch"] == 1
    assert not (out / "adapter").exists()  # the final adapter is written only at the end
    if point == "torn-weights":
        assert list(ckdir.glob(f"epoch-0002-*.weights.safetensors{TORN}"))
    if point == "torn-commit":
        assert (ckdir / f"commit.json{TORN}").exists() and list(ckdir.glob("epoch-0002-*.weights.safetensors"))

    t0 = time.perf_counter()
    res = train_lora(cfg)
    resume_s = time.perf_counter() - t0
    assert res.resumed_from_epoch == LORA_POINTS[point] and res.epochs_run == 3

    n = _assert_same_tensors(full / "adapter" / "adapter_model.safetensors", out / "adapter" / "adapter_model.safetensors")
    _assert_same_tensors(full / "best" / "adapter_model.safetensors", out / "best" / "adapter_model.safetensors")
    _assert_same_checkpoint(full, out)
    assert _history(full / "history.json") == _history(out / "history.json")
    figures.append(f"L6 LoRA kill -9 at {point:13s}: killed run {killed_s:5.1f}s, resumed after epoch "
                   f"{LORA_POINTS[point]} in {resume_s:4.1f}s (uninterrupted {full_s:4.1f}s); "
                   f"{n} LoRA tensors + optimizer state bitwise equal")


def test_raising_epochs_continues_a_finished_lora_run(lora_store, lora_full, fixtures_dir, tmp_path):
    """`epochs` is outside the L6 config fingerprint ("epochs may be raised"): a finished run asked for
    more epochs continues from its last checkpoint instead of silently returning the old result."""
    import shutil

    from egpt_core.lora import train_lora

    full, _ = lora_full
    out = tmp_path / "run"
    shutil.copytree(full, out)
    res = train_lora(_lora_cfg(lora_store, fixtures_dir, out).model_copy(update={"epochs": 4}))
    assert res.resumed_from_epoch == 3 and res.epochs_run == 4
    assert _history(full / "history.json") == _history(out / "history.json")[:3]
