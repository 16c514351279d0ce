"""`run_speculative` end to end on the tiny fixtures: measured = simulated acceptance on an fp32
shared_prefix store, the outputs, target-only runs, per-pair failures, config errors, L6 merged in
memory, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from egpt_core.config import ExtractConfig, SpeculateConfig, TrainAdapterConfig
from egpt_core.errors import ConfigError

N = 16


@pytest.fixture(scope="module")
def fp32_store(fixtures_dir, fp32, tmp_path_factory):
    """A shared_prefix store of all 12 fixture pairs with float32 rows and LM head."""
    from egpt_core.extraction import run_extraction

    store = str(tmp_path_factory.mktemp("sd") / "store")
    run_extraction(ExtractConfig(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                                 target=str(fixtures_dir / "videollava"), store=store, load=fp32, batch_size=12,
                                 max_new_tokens=N, store_dtype="float32"))
    return store


@pytest.fixture(scope="module")
def l1_run(fp32_store, tmp_path_factory):
    """An L1 adapter trained on the store (enough to accept some drafts: the check is not trivial)."""
    from egpt_core.adapters import train_adapter
    from egpt_core.config import AdapterConfig

    out = str(tmp_path_factory.mktemp("sd") / "L1")
    train_adapter(TrainAdapterConfig(adapter=AdapterConfig(level="L1"), train=[fp32_store], val_fraction=0.25,
                                     out=out, epochs=20, batch_size=4, lr=3e-3, device="cpu"))
    return out


def _cfg(fixtures_dir, fp32, out, **kw) -> SpeculateConfig:
    base = dict(target=str(fixtures_dir / "videollava"), drafter=str(fixtures_dir / "eventgpt"), gammas=[1, 3, 5],
                max_new_tokens=N, load=fp32, out=str(out), warmup_pairs=0)
    return SpeculateConfig(**(base | kw))


@pytest.fixture(scope="module")
def l1_result(fixtures_dir, fp32, fp32_store, l1_run, tmp_path_factory):
    from egpt_core.speculative import run_speculative

    out = tmp_path_factory.mktemp("sd") / "run-L1"
    return out, run_speculative(_cfg(fixtures_dir, fp32, out, store=fp32_store, adapter_run=l1_run, name="L1"))


def test_measured_acceptance_equals_the_simulated_rounds_on_an_fp32_store(l1_result):
    out, res = l1_result
    m = json.loads((out / "sd_metrics.json").read_text())
    cross = m["cross_check"]
    assert cross["pairs"] == 12 and res.n_pairs == 12
    assert res.summary["acceptance_length_gamma5"] > 0.5  # the adapter accepts drafts: the comparison means something
    for g in ("1", "3", "5"):
        pg = cross["per_gamma"][g]
        assert pg["rounds"] > 20 and pg["round_agreement"] >= 0.99, pg
        assert pg["relative_difference"] <= 0.02, pg
    for d in cross["disagreements"]:  # only numerical near-ties may disagree, and each is reported
        assert min(abs(d["online_min_margin"]), abs(d["offline_draft_margin"])) < cross["near_tie_threshold"], d
    assert cross["store_vs_baseline_token_mismatches"] == []
    for g in ("1", "3", "5"):
        assert m["per_gamma"][g]["lossless_mismatches"] == 0


def test_outputs_of_a_run(l1_result):
    out, res = l1_result
    files = {p.name for p in out.iterdir()}
    assert {"sd_pairs.parquet", "sd_metrics.json", "report.md", "sd_run.json", "sd_speedup.png",
            "sd_timing_breakdown.png", "sd_acceptance.png", "sd_prefill_timeline.png"} <= files
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = pq.read_table(out / "sd_pairs.parquet").to_pylist()
    assert len(rows) == 12 * 3 and {r["gamma"] for r in rows} == {1, 3, 5}
    for r in rows:
        assert r["status"] == "ok" and r["lossless"] and r["output_ids"] == r["baseline_ids"]
        assert sum(r["round_accepted"]) == r["accepted"] and len(r["round_start"]) == r["rounds"]
        assert r["sim_round_accepted"] is not None
        for k in ("drafter_vision_ms", "drafter_prefill_ms", "target_vision_ms", "target_prefill_ms", "drafting_ms",
                  "verify_ms", "total_ms", "baseline_total_ms", "baseline_decode_ms"):
            assert r[k] >= 0.0
        assert r["total_ms"] >= r["prefill_phase_ms"]
    m = json.loads((out / "sd_metrics.json").read_text())
    assert m["schema"] == "egpt-sd-metrics/1" and json.loads((out / "sd_run.json").read_text())["status"] == "complete"
    assert set(m["per_gamma"]) == {"1", "3", "5"} and set(m["speedup_model"]) == {"1", "3", "5"}
    for g, mc in m["speedup_model"].items():
        assert mc["measured_e2e"] == pytest.approx(m["per_gamma"][g]["speedup_e2e"])
        assert mc["relative_error"] == pytest.approx(abs(mc["predicted_e2e"] - mc["measured_e2e"]) / mc["measured_e2e"])
    assert m["timeline"]["sd"] and {s["lane"] for s in m["timeline"]["sd"]} == {"drafter", "target"}
    report = (out / "report.md").read_text()
    for section in ("## Measured per γ", "## Wall-clock breakdown", "## Lossless check",
                    "## Cross-check: measured vs simulated rounds"):
        assert section in report


def test_target_only_and_held_out_split(fixtures_dir, fp32, fp32_store, tmp_path):
    from egpt_core.speculative import run_speculative

    res = run_speculative(_cfg(fixtures_dir, fp32, tmp_path / "t", store=fp32_store, target_only=True, drafter=None,
                               split="val", val_fraction=0.25))
    rows = pq.read_table(tmp_path / "t" / "sd_pairs.parquet").to_pylist()
    assert res.n_pairs == 3 and len(rows) == 3 and {r["gamma"] for r in rows} == {0}  # one held-out scene x 3
    assert all(r["baseline_total_ms"] > 0 and r["output_ids"] for r in rows)


def test_a_pair_with_a_missing_video_is_recorded_and_the_run_goes_on(fixtures_dir, fp32, tmp_path):
    from egpt_core.data import load_scenes
    from egpt_core.speculative import run_speculative

    data = tmp_path / "dataset"
    shutil.copytree(fixtures_dir / "dataset", data)
    broken = load_scenes(str(data))[1]
    Path(broken.video_path).unlink() if Path(broken.video_path).is_file() else shutil.rmtree(broken.video_path)
    res = run_speculative(_cfg(fixtures_dir, fp32, tmp_path / "o", dataset=str(data), identity=True, gammas=[2],
                               max_questions=1))
    rows = pq.read_table(tmp_path / "o" / "sd_pairs.parquet").to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    assert res.n_failed == 1 and len(failed) == 1 and res.n_pairs == 3
    assert failed[0]["scene_id"] == broken.scene_id and broken.video_path.split("/")[-1] in failed[0]["reason"]


@pytest.mark.parametrize("kw, match", [
    ({}, "exactly one drafter configuration"),
    ({"identity": True, "adapter_run": "x"}, "exactly one drafter configuration"),
    ({"identity": True, "drafter": None}, "needs the drafter"),
    ({"identity": True, "gammas": [3, 3]}, "distinct positive"),
    ({"lora": "x", "load": {"dtype": "float32", "quant": "nf4", "device": "cpu"}}, "full-precision"),
    ({"identity": True, "dataset": None, "store": None}, "give the pairs"),
])
def test_bad_settings_fail_before_any_model_is_loaded(fixtures_dir, fp32, tmp_path, kw, match, monkeypatch):
    import egpt_core.models.loading as loading
    from egpt_core.speculative import run_speculative

    monkeypatch.setattr(loading, "load_videollava", lambda *a, **k: pytest.fail("loaded a model"))
    base = {"dataset": str(fixtures_dir / "dataset")} | kw
    with pytest.raises(ConfigError, match=match):
        run_speculative(_cfg(fixtures_dir, fp32, tmp_path / "o", **base))


def test_a_store_that_is_not_a_store_is_a_config_error(fixtures_dir, fp32, tmp_path):
    from egpt_core.speculative import run_speculative

    (tmp_path / "nostore").mkdir()
    with pytest.raises(ConfigError, match="not a readable committed store"):
        run_speculative(_cfg(fixtures_dir, fp32, tmp_path / "o", store=str(tmp_path / "nostore"), identity=True))


def test_lora_merged_in_memory_drafts_like_the_exported_merged_drafter(fixtures_dir, fp32, fp32_store, tmp_path):
    """--lora DIR merges the peft adapter in memory: the same drafts and acceptance as `--drafter`
    pointing at `egpt export-drafter`'s merged checkpoint of the same LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model

    from egpt_core.lora.merge import export_drafter
    from egpt_core.models import load_eventgpt
    from egpt_core.speculative import run_speculative

    base = load_eventgpt(str(fixtures_dir / "eventgpt"), fp32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*layers.*\.(q_proj|v_proj)"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    lora_dir = tmp_path / "lora"
    peft_model.save_pretrained(str(lora_dir))
    (lora_dir / "egpt_lora.json").write_text(json.dumps({"drafter": str(fixtures_dir / "eventgpt")}))
    merged = export_drafter(str(lora_dir), str(tmp_path / "merged"))
    kw = dict(store=fp32_store, gammas=[3], max_pairs=4)
    a = run_speculative(_cfg(fixtures_dir, fp32, tmp_path / "a", lora=str(lora_dir), **kw))
    b = run_speculative(_cfg(fixtures_dir, fp32, tmp_path / "b", drafter=merged, identity=True, **kw))
    ra = pq.read_table(tmp_path / "a" / "sd_pairs.parquet").to_pylist()
    rb = pq.read_table(tmp_path / "b" / "sd_pairs.parquet").to_pylist()
    assert [r["round_accepted"] for r in ra] == [r["round_accepted"] for r in rb]
    assert a.summary["acceptance_length_gamma3"] == b.summary["acceptance_length_gamma3"]
    assert json.loads((tmp_path / "a" / "sd_metrics.json").read_text())["inputs"]["fingerprints"]["lora"]


def test_cli_speculate(fixtures_dir, fp32_store, tmp_path, capsys):
    from egpt_core.cli import main

    out = tmp_path / "cli"
    rc = main(["speculate", "--store", fp32_store, "--drafter", str(fixtures_dir / "eventgpt"), "--target",
               str(fixtures_dir / "videollava"), "--identity", "--gammas", "1,4", "--max-new-tokens", str(N),
               "--max-pairs", "2", "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "identity (resync): 2 pairs measured" in text and (out / "sd_pairs.parquet").is_file()
    assert [line.split()[0] for line in text.splitlines() if line.strip()[:1].isdigit()][:2] == ["1", "4"]
    rc = main(["speculate", "--store", fp32_store, "--target", str(fixtures_dir / "videollava"), "--identity",
               "--out", str(tmp_path / "x")])
    assert rc == 2 and "needs the drafter checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["speculate", "--gammas", "1,x", "--out", "o", "--target", "t", "--identity"])
    assert exc.value.code == 2 and "--gammas" in capsys.readouterr().err


def test_an_out_dir_with_files_no_run_wrote_is_refused_and_left_alone(fixtures_dir, fp32, fp32_store, tmp_path):
    from egpt_core.speculative import run_speculative

    out = tmp_path / "theirs"
    out.mkdir()
    (out / "report.md").write_text("somebody else's report")
    with pytest.raises(ConfigError, match="not written by egpt|no egpt output marker|holds"):
        run_speculative(_cfg(fixtures_dir, fp32, out, store=fp32_store, identity=True, max_pairs=1, gammas=[1]))
    assert [p.name for p in out.iterdir()] == ["report.md"] and (out / "report.md").read_text() == "somebody else's report"


def test_a_second_run_into_a_claimed_out_dir_fails_naming_the_holder(fixtures_dir, fp32, fp32_store, tmp_path):
    """One run owns a speculative run directory (egpt_core.outdir): a concurrent second run fails at
    once, before any model is loaded, and leaves the first run's claim alone."""
    import os

    from egpt_core import outdir
    from egpt_core.speculative import run_speculative
    from egpt_core.speculative.outputs import OUTPUT_KIND
    from egpt_core.speculative.run import output_identity

    cfg = _cfg(fixtures_dir, fp32, tmp_path / "sd", store=fp32_store, identity=True, max_pairs=1, gammas=[1])
    with outdir.claim_output(cfg.out, OUTPUT_KIND, output_identity(cfg)):  # the first run, still running
        with pytest.raises(outdir.OutputDirError, match=str(os.getpid())):
            run_speculative(cfg)
        assert (tmp_path / "sd" / outdir.LOCK).exists()


def test_a_missing_checkpoint_fails_before_the_out_dir_is_claimed(fixtures_dir, fp32, fp32_store, tmp_path):
    from egpt_core.speculative import run_speculative

    with pytest.raises(ConfigError, match="target=.*is not a directory"):
        run_speculative(_cfg(fixtures_dir, fp32, tmp_path / "o", store=fp32_store, identity=True,
                             target=str(tmp_path / "no-such-target")))
    assert not (tmp_path / "o").exists()
