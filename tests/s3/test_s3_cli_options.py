"""`egpt export-drafter` and `egpt compare` reach S3 through the shared ``--storage-option`` (moto server).

Before issue 15's last round neither command took ``--storage-option``: an S3 endpoint could not be
given, so both failed with a usage error (exit 2) on an s3:// URL of a non-AWS store.
"""

from __future__ import annotations

import json

from egpt_core.cli import main
from egpt_core.config import LoraTrainConfig, ModelLoadConfig
from egpt_core.fsio import Location

FP32 = ModelLoadConfig(dtype="float32", device="cpu", quant="none")


def _metrics(name: str, cos: float) -> dict:
    summary = {"cos_pooled": cos, "accept@0.90": 0.25, "token_top1": 0.2, "n_pairs": 4, "acc_len_basis": "token"}
    return {"name": name, "summary": summary, "inputs": {"store_fingerprint": "fp"}}


def test_compare_reads_and_writes_s3_with_storage_option(s3_server, s3_bucket, capsys):
    opts = ["--storage-option", f"endpoint_url={s3_server['endpoint_url']}"]
    for name, cos in (("a", 0.7), ("b", 0.8)):
        Location(f"{s3_bucket}/evals/{name}/metrics.json", s3_server).write_json(_metrics(name, cos))
    out = f"{s3_bucket}/cmp"
    assert main(["compare", f"{s3_bucket}/evals/a/metrics.json", f"{s3_bucket}/evals/b/metrics.json",
                 "--out", out, *opts]) == 0
    md = capsys.readouterr().out
    assert "| a |" in md and "| b |" in md
    assert Location(f"{out}/comparison.md", s3_server).read().decode() == md.removesuffix("\n")
    assert [r["name"] for r in Location(f"{out}/comparison.json", s3_server).read_json()["runs"]] == ["a", "b"]


def test_export_drafter_reads_and_writes_s3_with_storage_option(s3_server, s3_bucket, fixtures_dir, tmp_path):
    from egpt_core.fsio import url_to_fs
    from egpt_core.lora.train import apply_lora, save_adapter
    from egpt_core.models import load_eventgpt

    drafter = load_eventgpt(str(fixtures_dir / "eventgpt"), FP32)
    cfg = LoraTrainConfig(store="unused", drafter=str(fixtures_dir / "eventgpt"), out=str(tmp_path), load=FP32,
                          gradient_checkpointing=False)
    save_adapter(apply_lora(drafter, cfg), str(tmp_path / "best"), {"drafter": str(fixtures_dir / "eventgpt")})
    fs, root = url_to_fs(f"{s3_bucket}/lora", s3_server)
    for f in (tmp_path / "best").iterdir():
        fs.put_file(str(f), f"{root}/{f.name}")

    out = f"{s3_bucket}/merged"
    assert main(["export-drafter", "--lora", f"{s3_bucket}/lora", "--out", out,
                 "--storage-option", f"endpoint_url={s3_server['endpoint_url']}"]) == 0
    export = Location(f"{out}/egpt_export.json", s3_server).read_json()
    assert export["lora"] == f"{s3_bucket}/lora" and export["dtype"] == "float32"
    assert json.loads(Location(f"{out}/config.json", s3_server).read())["model_type"] == "EventChat_llama"
    assert Location(f"{out}/model.safetensors", s3_server).exists()


def test_import_adapter_and_render_events_reach_s3_with_storage_option(s3_server, s3_bucket, tmp_path, capsys):
    """`egpt import-adapter` and `egpt render-events` write to S3 given --storage-option (they took none)."""
    import io

    import numpy as np

    from tests.adapters.research_arch import build, save_like_research

    opts = ["--storage-option", f"endpoint_url={s3_server['endpoint_url']}"]
    save_like_research(build("L1", 32), tmp_path / "best_model.pt")
    run = f"{s3_bucket}/imported"
    assert main(["import-adapter", str(tmp_path / "best_model.pt"), run, "--level", "L1", *opts]) == 0
    assert Location(f"{run}/config.json", s3_server).read_json()["task"] == "import_adapter"
    assert Location(f"{run}/best.safetensors", s3_server).exists()

    rng = np.random.default_rng(0)
    events = np.zeros(200, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "u1")])
    events["x"], events["y"] = rng.integers(0, 64, 200), rng.integers(0, 48, 200)
    events["t"], events["p"] = np.sort(rng.integers(0, 10**6, 200)), rng.integers(0, 2, 200)
    buf = io.BytesIO()
    np.save(buf, events, allow_pickle=False)
    src = Location(f"{s3_bucket}/rec/events.npy", s3_server)
    src.write_atomic(buf.getvalue())
    capsys.readouterr()
    assert main(["render-events", src.url, "--frames", "2", "--out", f"{s3_bucket}/frames", *opts]) == 0
    written = capsys.readouterr().out.split()
    assert written == [f"{s3_bucket}/frames/events_0.png", f"{s3_bucket}/frames/events_1.png"]
    assert all(Location(u, s3_server).read()[:4] == b"\x89PNG" for u in written)
