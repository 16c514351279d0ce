"""Concurrent extraction flow runs on one store (issue "Reliability", item 4).

Two (or three) processes each run the real `extract` flow against the same Prefect test server and
the same local-disk store (the commit lock is ``O_CREAT|O_EXCL``), held at a barrier until every one
has planned the whole dataset, so they all extract and commit the same pairs at the same time
(concurrent_runner.py). Afterwards: every planned pair is in exactly one committed shard (none lost,
none duplicated), the store verifies, no orphan/temporary file or lock is left, and the store equals
a single run's (same pair set, every column, bitwise rows per pair; with equal shard sizes also the
same shard files, sha256s and fingerprint).

With different shard sizes per run the shards overlap partially, which exercises the writer's
"some of these pairs were committed meanwhile: rewrite the shard" path. Figures are printed (-s).
(memory:// is per process, so it has no cross-process variant.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from store_checks import assert_same_rows, assert_same_store, leftovers, snapshot

from egpt_core.config import ExtractConfig
from egpt_core.store import StoreReader

RUNNER = Path(__file__).with_name("concurrent_runner.py")
REPO = Path(__file__).resolve().parents[2]
N_PAIRS = 12


def _cfg(fixtures_dir, store: str, **kw) -> ExtractConfig:
    from flows.demo import CPU_FP32

    base = dict(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                target=str(fixtures_dir / "videollava"), store=store, load=CPU_FP32, max_new_tokens=8,
                shard_size=3, batch_size=3)
    return ExtractConfig(**{**base, **kw})


def _single_run(cfg: ExtractConfig) -> dict:
    from flows.extract import extract

    state = extract(cfg, return_state=True)
    assert state.is_completed(), state.message
    return snapshot(cfg.store)


def _run_concurrently(prefect_api: dict, cfgs: list[ExtractConfig], work: Path, schedule: str) -> list[dict]:
    """Start one runner process per config at once (commit ``schedule``: see concurrent_runner.py);
    wait for all; return their RESULT records."""
    barrier = work / "barrier"
    barrier.mkdir(parents=True)
    env = {**os.environ, **prefect_api, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(work / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    procs = []
    for i, cfg in enumerate(cfgs):
        cfg_file = work / f"cfg-{i}.json"
        cfg_file.write_text(cfg.model_dump_json())
        procs.append(subprocess.Popen([sys.executable, str(RUNNER), str(cfg_file), str(barrier), str(i),
                                       str(len(cfgs)), schedule], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert p.returncode == 0 and lines, (p.returncode, out[-2000:], err[-4000:])
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def _check_no_loss_no_duplicate(url: str, planned: set[str]) -> tuple[int, int]:
    """Every planned pair in exactly one committed shard; returns (lost, duplicated)."""
    r = StoreReader(url)
    ids = [pid for sh in r.shards for pid in r._table(sh).column("pair_id").to_pylist()]
    lost = len(planned - set(ids))
    duplicated = len(ids) - len(set(ids))
    assert set(ids) <= planned
    return lost, duplicated


def _report(label: str, results: list[dict], url: str, lost: int, duplicated: int, seconds: float) -> None:
    m = StoreReader(url).manifest
    per_run = "; ".join(f"run {r['index']}: {r['state']}, {r['commits']} shards ({r['pairs_committed']} pairs) "
                        f"committed, {r['rewritten']} rewritten, {r['skipped']} skipped as already committed"
                        for r in results)
    print(f"\n[concurrent runs: {label}] {len(results)} flow runs, {len(m['shards'])} shards / "
          f"{m['totals']['pairs']} pairs in the store; {per_run}; pairs lost {lost}, duplicated {duplicated}; "
          f"{seconds:.1f}s")


def test_two_concurrent_flow_runs_with_the_same_config(prefect_api, fixtures_dir, tmp_path):
    """Both runs commit their k-th shard (the same pairs) at the same moment: one wins the lock, the
    other finds every pair committed and commits nothing, round after round."""
    want = _single_run(_cfg(fixtures_dir, str(tmp_path / "single" / "store")))
    url = str(tmp_path / "shared" / "store")
    t0 = time.perf_counter()
    results = _run_concurrently(prefect_api, [_cfg(fixtures_dir, url)] * 2, tmp_path / "work", "together")
    seconds = time.perf_counter() - t0
    assert all(r["state"] == "Completed" for r in results), results
    assert all(r["planned"] == 0 for r in results), "every run must have planned the whole dataset"
    lost, duplicated = _check_no_loss_no_duplicate(url, set(want["pair_ids"]))
    _report("2 x same config, k-th commits contending", results, url, lost, duplicated, seconds)
    assert (lost, duplicated) == (0, 0)
    assert sum(r["pairs_committed"] for r in results) == N_PAIRS  # each pair committed by exactly one run
    assert sum(r["commits"] for r in results) == sum(r["skipped"] for r in results) == 4  # 4 shards each
    assert_same_store(snapshot(url), want)  # also the same shard files, sha256s and fingerprint
    assert leftovers(url) == []


#: (schedule, expected (commits, rewritten, skipped) per run or None for a free race)
OVERLAP_CASES = [
    # ordered, shard sizes 2/3/5 over pairs p0..p11: round 0 {p0,p1} / {p2} of {p0-p2} / {p3,p4} of {p0-p4};
    # round 1 - / {p5} of {p3-p5} / {p6-p9} of {p5-p9}; round 2 - / - / {p10,p11}; later rounds: nothing new
    ("ordered", [(1, 0, 5), (2, 2, 2), (3, 2, 0)]),
    ("free", None),
]


@pytest.mark.parametrize(("schedule", "expected"), OVERLAP_CASES, ids=[c[0] for c in OVERLAP_CASES])
def test_three_concurrent_flow_runs_with_overlapping_shards(prefect_api, fixtures_dir, tmp_path, schedule, expected):
    """Shard sizes 2, 3 and 5 (batch size 1, so a pair's rows do not depend on its batch): shards of
    different runs overlap partially, and a run must rewrite a shard without the pairs another run
    committed meanwhile."""
    want = _single_run(_cfg(fixtures_dir, str(tmp_path / "single" / "store"), batch_size=1, shard_size=4))
    url = str(tmp_path / "shared" / "store")
    cfgs = [_cfg(fixtures_dir, url, batch_size=1, shard_size=s) for s in (2, 3, 5)]
    t0 = time.perf_counter()
    results = _run_concurrently(prefect_api, cfgs, tmp_path / "work", schedule)
    seconds = time.perf_counter() - t0
    assert all(r["state"] == "Completed" for r in results), results
    assert all(r["planned"] == 0 for r in results), "every run must have planned the whole dataset"
    lost, duplicated = _check_no_loss_no_duplicate(url, set(want["pair_ids"]))
    _report(f"3 x shard sizes 2/3/5, {schedule}", results, url, lost, duplicated, seconds)
    assert (lost, duplicated) == (0, 0)
    assert sum(r["pairs_committed"] for r in results) == N_PAIRS
    if expected is not None:
        assert [(r["commits"], r["rewritten"], r["skipped"]) for r in results] == expected
    got = snapshot(url)  # verifies; whole shards; no pair twice
    for key in ("pair_ids", "counts", "reasons", "lm_head", "features"):
        assert got[key] == want[key], key
    strip = ("row_offset", "shard")  # where a pair's rows sit depends on which run committed it
    assert [{k: v for k, v in p.items() if k not in strip} for p in got["pairs"]] == \
        [{k: v for k, v in p.items() if k not in strip} for p in want["pairs"]]
    assert_same_rows(got, want)
    assert leftovers(url) == []
