"""The scaling group: its memory probe measures the stage (not what came before), every stage's work
function runs the real stage, and the parent/child protocol produces the table."""

import json
import subprocess
import sys
import textwrap

import pytest

from benchmarks import bench_scaling as bs

PROBE = textwrap.dedent("""
    import json, numpy as np
    from benchmarks.bench_scaling import measure
    big = np.ones(400 * 2**20 // 8)  # 400 MB touched before the stage: must not count
    del big

    def work():
        a = np.ones(150 * 2**20 // 8)  # 150 MB touched inside the stage, freed before it ends
        del a
        return 3

    print(json.dumps(measure(work)))
""")


def test_peak_rss_is_the_stage_peak_not_the_process_peak():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=bs._env(),
                          cwd=str(bs.REPO), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if not res["peak_reset"]:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    growth_mb = (res["peak_rss"] - res["rss_before"]) / 2**20
    assert 140 <= growth_mb <= 260, res  # the stage's 150 MB, not the 400 MB allocated before it
    assert res["pairs"] == 3


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    """Models + per-scale data at micro sizes (the real writers, small numbers)."""
    root = tmp_path_factory.mktemp("scaling")
    mp = pytest.MonkeyPatch()
    for name, value in dict(D=32, SYNTH_SCENES=3, SYNTH_PER_SCENE=4, DATASET_SCENES=2, RESEARCH_CHUNK=5).items():
        mp.setattr(bs, name, value)
    try:
        yield root, bs.prepare_data(root, (1, 2))
    finally:
        mp.undo()


@pytest.mark.parametrize("stage,expected", [
    ("extraction", 6), ("adapter", 12), ("adapter_streaming", 12), ("lora", 6), ("evaluation", 12),
    ("research_import", 12), ("verify", 12),
])
def test_each_stage_work_function_runs_the_real_stage(micro_data, stage, expected):
    root, data = micro_data
    if stage == "lora" and not (root / "extracted-1x" / "manifest.json").exists():
        bs.STAGES["extraction"](bs._stage_args("extraction", data, 1, root))()
    work = bs.STAGES[stage.removesuffix("_streaming")](bs._stage_args(stage, data, 1, root))
    assert work() == expected


def test_parent_and_children_produce_rss_and_time_rows(micro_data):
    root, data = micro_data
    got = {k: bs.run_child("verify", bs._stage_args("verify", data, k, root)) for k in (1, 2)}
    assert [got[k]["pairs"] for k in (1, 2)] == [12, 24]
    row = bs._row("verify", got[1], got[2], 2, [1.0, 2.0])
    rss, t = row["scaling_verify_rss"], row["scaling_verify_time_per_pair"]
    assert rss["goal"] == "<= 1.15" and t["goal"] == "<= 1.1"
    assert rss["ratio"] == round(got[2]["peak_rss"] / got[1]["peak_rss"], 3)
    assert t["ratio"] == round((got[2]["seconds"] / 24) / (got[1]["seconds"] / 12), 3)
    assert rss["input_store_mb"] == [1.0, 2.0] and len(rss["peak_mb"]) == 2


@pytest.mark.slow
def test_whole_group_at_micro_size_including_ddp(micro_data, monkeypatch):
    """Every row, the 2-process gloo adapter run included (fresh processes: slow)."""
    root, data = micro_data
    monkeypatch.setattr(bs, "prepare_data", lambda r, scales: data)
    res = bs.run(scale=2)
    assert set(res) == {f"scaling_{s}_{m}" for s in bs.ROWS for m in ("rss", "time_per_pair")}
    assert res["scaling_adapter_ddp2_rss"]["unit"].endswith("summed over 2 ranks")
    assert all(r["ratio"] > 0 for r in res.values())


def test_bad_arguments_are_refused_before_any_data_is_written():
    with pytest.raises(ValueError, match="at least 2"):
        bs.run(scale=1)
    with pytest.raises(ValueError, match="unknown scaling stages"):
        bs.run(stages=["extract"])
