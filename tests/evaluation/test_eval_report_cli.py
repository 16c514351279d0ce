"""compare_runs table and the `egpt evaluate` / `egpt compare` commands."""

from __future__ import annotations

import argparse
import json

from egpt_core.evaluation import compare_runs
from egpt_core.evaluation.commands import register


def _run(name, cos, top1, acc5, speed=None, store="fp1"):
    s = {"cos_pooled": cos, "cos_pair_mean": cos - 0.01, "accept@0.90": 0.25, "token_top1": top1, "token_top5": 0.5,
         "acc_len_sim_gamma5": acc5, "acc_len_rounds_gamma5": acc5 + 0.1, "acc_len_basis": "token", "n_pairs": 10}
    if speed is not None:
        s["speedup_e2e_gamma5"] = speed
    return {"name": name, "summary": s, "inputs": {"store_fingerprint": store}}


def test_compare_runs_table(tmp_path):
    md = compare_runs([_run("L1:a", 0.7612, 0.17, 1.234, 1.031), _run("L4:b", 0.7885, 0.265, 2.5)], str(tmp_path))
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| run"))
    assert "cos_pooled" in header and "cos_pair_mean" in header and "accept@0.90" in header
    assert "top-1" in header and "top-5" in header and "acc_len sim γ=5" in header and "e2e speedup γ=5" in header
    row1 = next(line for line in lines if line.startswith("| L1:a"))
    assert "0.761" in row1 and "17.00 %" in row1 and "25.00 %" in row1 and "1.234" in row1 and "1.031" in row1
    row2 = next(line for line in lines if line.startswith("| L4:b"))
    assert "26.50 %" in row2 and "—" in row2  # no timing -> no speedup
    assert (tmp_path / "comparison.md").read_text() == md
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["L1:a", "L4:b"] and data["runs"][1]["speedup_e2e_gamma5"] is None
    assert "different stores" not in md
    md2 = compare_runs([_run("a", 0.7, 0.1, 1.0), _run("b", 0.7, 0.1, 1.0, store="fp2")], str(tmp_path / "x"))
    assert "different stores" in md2


def _parser():
    p = argparse.ArgumentParser(prog="egpt")
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_evaluate_and_compare(store, tmp_path, capsys):
    url, _, _ = store
    p = _parser()
    args = p.parse_args(["evaluate", "--store", url, "--identity", "--out", str(tmp_path / "e1"), "--batch-size", "4"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "cos_pooled" in out and "token_top1" in out and "acc_len_sim_gamma5" in out
    timing = tmp_path / "t.json"
    timing.write_text(json.dumps({"drafter_prefill_ms": 90, "drafter_step_ms": 10, "target_prefill_ms": 316,
                                  "target_step_ms": 14.6, "output_tokens": 50}))
    args = p.parse_args(["evaluate", "--store", url, "--identity", "--out", str(tmp_path / "e2"), "--timing",
                         str(timing), "--name", "timed"])
    assert args.func(args) == 0
    assert "speedup_e2e_gamma5" in capsys.readouterr().out
    args = p.parse_args(["compare", str(tmp_path / "e1" / "metrics.json"), str(tmp_path / "e2" / "metrics.json"),
                         "--out", str(tmp_path / "cmp")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| identity |" in out and "| timed |" in out
    assert (tmp_path / "cmp" / "comparison.md").exists()


def test_cli_requires_one_source(tmp_path, capsys):
    """No source (it may come from --config) is EvalConfig's rule: one line, exit 2; two flags are a usage error."""
    import pytest

    from egpt_core.cli import run_command

    p = _parser()
    assert run_command(p.parse_args(["evaluate", "--store", "s", "--out", str(tmp_path / "o")])) == 2
    err = capsys.readouterr().err
    assert "adapter_run, lora, identity: set exactly one prediction source" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        p.parse_args(["evaluate", "--store", "s", "--out", "o", "--identity", "--lora", "x"])
