"""`egpt demo` twice, as a user runs it: the second run is served from the cache and says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _demo(out: Path) -> str:
    """A small demo (8 scenes x 3 questions): this test is about the cache; the full-size demo's learning
    is tests/flows/test_demo_learning.py (slow)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    proc = subprocess.run([sys.executable, "-m", "egpt_core.cli", "demo", "--out", str(out), "--scenes", "8",
                           "--questions", "3"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_demo_twice_second_run_is_served_from_cache(tmp_path):
    first = _demo(tmp_path / "demo")
    assert "(built)" in first and re.search(r"^0 of (\d+) tasks served from cache", first, re.M)
    for row in ("| identity |", "| L1 |", "| L4 |", "| L6 |", "| target_only |"):
        assert row in first
    assert "measured acc len γ=5" in first and "lossless mismatches" in first
    assert (tmp_path / "demo" / ".prefect").is_dir()  # Prefect's database + cache live with the demo

    second = _demo(tmp_path / "demo")
    match = re.search(r"^(\d+) of (\d+) tasks served from cache", second, re.M)
    assert "(reused)" in second and match
    cached, total = map(int, match.groups())
    assert cached == 17 and total == 21, second[-2000:]  # + 5 speculate (cached) and compare-sd
