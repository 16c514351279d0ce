"""Evaluation outputs are written atomically: a run killed half-way through writing metrics.json,
report.md or a plot leaves the previous file (or none), never a truncated one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from egpt_core.fsio import Location

HERE = Path(__file__).parent


def _evaluate_killed_on(prefix: str, store: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(HERE / "kill_on_write.py"), prefix, "--store", store, "--identity",
                           "--out", str(out), "--batch-size", "4"], env=env, capture_output=True, text=True,
                          timeout=300)


def _evaluate(store: str, out: Path) -> None:
    import argparse

    from egpt_core.evaluation.commands import register

    parser = argparse.ArgumentParser(prog="egpt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", "--store", store, "--identity", "--out", str(out), "--batch-size", "4"])
    assert args.func(args) == 0


def test_evaluation_killed_mid_write_keeps_the_previous_file(store, tmp_path):
    url, _, _ = store
    out = tmp_path / "eval"
    _evaluate(url, out)
    previous = (out / "metrics.json").read_bytes() + b"\n"  # a distinguishable, complete "previous run"
    (out / "metrics.json").write_bytes(previous)

    proc = _evaluate_killed_on("metrics.json", url, out)
    assert proc.returncode == 9, proc.stderr[-2000:]  # it really died while writing that file
    assert (out / "metrics.json").read_bytes() == previous  # the old content, whole: not a truncated new one


def test_evaluation_killed_mid_write_of_a_new_file_leaves_none(store, tmp_path):
    url, _, _ = store
    out = tmp_path / "fresh"
    proc = _evaluate_killed_on("report.md", url, out)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not (out / "report.md").exists()  # never a truncated report
    assert json.loads((out / "metrics.json").read_bytes())["summary"]  # written before it: whole


def test_location_open_for_writing_is_all_or_nothing(tmp_path):
    dest = Location(str(tmp_path / "d" / "f.txt"))
    dest.write_atomic("old")
    with pytest.raises(RuntimeError):
        with dest.open("w") as f:
            f.write("new, half")
            raise RuntimeError("the renderer failed")
    assert dest.read() == b"old"
    with dest.open("w") as f:
        f.write("new")
    assert dest.read() == b"new"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f.txt"]  # no temp files left behind
