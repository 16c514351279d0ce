"""`train-adapter` with no `ok` pairs printed its clean error, then sometimes aborted at exit with
"terminate called without an active exception", exit 134 (issue 13, item 18).

Cause (core dumps of the abort): `pq.read_table` on a Python file object decodes on Arrow's thread
pool, and the last reference to the file's Python buffer can be dropped by an Arrow worker after
the call returned. When the interpreter is already finalising, that worker blocks on the GIL,
`pthread_exit` unwinds through a noexcept destructor and libstdc++ calls std::terminate. The store
now decodes its (small) pairs tables on the calling thread from bytes it fetched, so no Arrow worker
thread ever holds a Python object.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import os, sys
from egpt_core.store import StoreReader

def threads():
    return {t: open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")}

reader = StoreReader(sys.argv[1])
before = threads()
reader.pairs(status="ok")               # what train-adapter reads before its clean error
StoreReader(sys.argv[1]).pair_ids(status=None)
new = {t: n for t, n in threads().items() if t not in before and n != "jemalloc_bg_thd"}
print(len(new), sorted(new.values()))
"""


@pytest.fixture(scope="module")
def failed_store(tmp_path_factory) -> str:
    from egpt_core.adapters.synthetic import write_synthetic_pair_store

    url = str(tmp_path_factory.mktemp("exit") / "failed")
    write_synthetic_pair_store(url, hidden_size=8, n_scenes=0, pairs_per_scene=0, n_failed=6)
    return url


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to list threads")
def test_reading_pairs_leaves_no_arrow_worker_thread(failed_store):
    """Deterministic: no native thread is started by reading pairs tables (0ff812c started Arrow's
    CPU and I/O pools, which outlive the call)."""
    out = subprocess.run([sys.executable, "-c", _PROBE, failed_store], capture_output=True, text=True, env=_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n, names = out.stdout.split(" ", 1)
    assert int(n) == 0, f"threads started by reading pairs: {names}"


@pytest.mark.slow
def test_train_adapter_without_ok_pairs_exits_2_every_time(failed_store, tmp_path):
    """The reproduction, looped: 2 of 6 runs aborted on 0ff812c; now 20 of 20 exit 2 with the one line."""
    codes = []
    for i in range(20):
        out = subprocess.run([sys.executable, "-m", "egpt_core.cli", "train-adapter", "--train", failed_store,
                              "--out", str(tmp_path / f"r{i}"), "--epochs", "1"], capture_output=True, text=True,
                             env=_env(), timeout=300)
        codes.append(out.returncode)
        assert "terminate called" not in out.stderr, out.stderr[-2000:]
        assert "no 'ok' pairs" in out.stderr
    assert codes == [2] * 20, codes
