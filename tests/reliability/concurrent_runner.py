"""Run the `extract` flow in this process, in step with other runners (used by test_concurrent_runs.py).

usage: python concurrent_runner.py CONFIG_JSON BARRIER_DIR INDEX N_RUNNERS [SCHEDULE]

Every runner opens its StoreWriter and reads which pairs are committed, then waits at a file barrier
until all N runners have done so: every runner plans the whole pending set and they all extract and
commit the same pairs at the same time. SCHEDULE orders the commits:

* ``free`` (default): no order; each commit waits a seeded 0-250 ms first, so runs interleave;
* ``together``: in rounds; every runner's k-th commit starts when all runners finished commit k-1,
  so the k-th commits of all runners contend for the commit lock at the same moment;
* ``ordered``: in rounds, and inside a round by runner index (runner i's k-th commit follows runner
  i-1's): deterministic, e.g. partially overlapping shards are always rewritten.

Prints one JSON line: the flow run's final state and what this runner's commits did.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from egpt_core.config import ExtractConfig
from egpt_core.store.writer import StoreWriter

BARRIER_TIMEOUT_S = 180


def _wait(what: str, ready) -> None:
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() - t0 > BARRIER_TIMEOUT_S:
            raise RuntimeError(f"gave up waiting for {what}")
        time.sleep(0.01)


def main() -> None:
    cfg = ExtractConfig.model_validate_json(Path(sys.argv[1]).read_text())
    barrier, index, n = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    schedule = sys.argv[5] if len(sys.argv) > 5 else "free"
    stats = {"index": index, "planned": None, "commits": 0, "pairs_committed": 0, "rewritten": 0, "skipped": 0,
             "barrier_wait_s": None}
    rng = random.Random(index)

    real_committed = StoreWriter.committed_pair_ids

    def committed_pair_ids(self, status=None):
        ids = real_committed(self, status)
        if stats["planned"] is None:  # run_extraction's plan: wait for the other runners here
            from egpt_core.extraction import plan_pairs

            stats["planned"] = len(ids)
            pending = len([p for p in plan_pairs(cfg) if p.pair_id not in ids])
            (barrier / f"total-{index}").write_text(str(-(-pending // cfg.shard_size)))  # its commits
            (barrier / f"ready-{index}").touch()
            t0 = time.monotonic()
            _wait("the other runners at the barrier", lambda: len(list(barrier.glob("ready-*"))) >= n)
            stats["barrier_wait_s"] = round(time.monotonic() - t0, 2)
        return ids

    def done(j: int) -> int:
        return len(list(barrier.glob(f"commit-{j}-*")))

    def total(j: int) -> int:
        return int((barrier / f"total-{j}").read_text())

    def my_turn(k: int) -> bool:
        """Before this runner's k-th commit: every runner j finished its commits before this one."""
        need = {j: k + (1 if schedule == "ordered" and j < index else 0) for j in range(n) if j != index}
        return all(done(j) >= min(want, total(j)) for j, want in need.items())

    real_commit = StoreWriter.commit_shard

    def commit_shard(self, records, drafter, target):
        k = stats["commits"] + stats["skipped"]
        if schedule == "free":
            time.sleep(rng.uniform(0.0, 0.25))
        else:
            _wait(f"round {k} of the other runners", lambda: my_turn(k))
        try:
            info = real_commit(self, records, drafter, target)
        finally:
            (barrier / f"commit-{index}-{k}").touch()
        if info is None:
            stats["skipped"] += 1  # every pair of it was committed by another runner meanwhile
        else:
            stats["commits"] += 1
            stats["pairs_committed"] += info.pairs
            stats["rewritten"] += int(info.pairs != len(records))  # some of its pairs were taken
        return info

    StoreWriter.committed_pair_ids = committed_pair_ids
    StoreWriter.commit_shard = commit_shard

    from flows.extract import extract

    state = extract(cfg, return_state=True)
    print("RESULT " + json.dumps({"state": state.name, "message": state.message,
                                  "flow_run_id": str(state.state_details.flow_run_id), **stats}), flush=True)


if __name__ == "__main__":
    main()
