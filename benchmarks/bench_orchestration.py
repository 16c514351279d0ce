"""Orchestration: a `pipeline` rerun with unchanged inputs (served from the task cache) vs the cold run.

Runs the demo pipeline (identity + L1 + L4 + L6 on tiny fixtures, CPU float32) twice against a
throwaway Prefect test server, with task results in a temporary directory. Both figures are the
wall time of the flow call only (server start-up and fixture building are not counted).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def run() -> dict:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.demo import demo_config, ensure_fixtures, task_states
    from flows.pipeline import pipeline

    with tempfile.TemporaryDirectory(prefix="egpt-bench-orch-") as tmp:
        root = Path(tmp)
        fixtures, _ = ensure_fixtures(root / "fixtures")
        cfg = demo_config(root, fixtures, lora=True)
        with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(root / "prefect-results")}):
            with prefect_test_harness(server_startup_timeout=90):
                t0 = time.perf_counter()
                cold = pipeline(cfg, return_state=True)
                cold_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                warm = pipeline(cfg, return_state=True)
                warm_s = time.perf_counter() - t0
                if not (cold.is_completed() and warm.is_completed()):
                    raise AssertionError(f"pipeline runs ended {cold.name} / {warm.name}")
                states = task_states(warm.state_details.flow_run_id)
    cached = sum(1 for _, s in states if s == "Cached")
    return {
        "cached_rerun_vs_cold": {
            "ratio": warm_s / cold_s,
            "goal": "<= 0.15",
            "unit": "rerun / cold wall time (pipeline: identity+L1+L4+L6 + stage 5, tiny fixtures, CPU)",
            "cold_s": round(cold_s, 2),
            "rerun_s": round(warm_s, 2),
            "rerun_tasks_cached": f"{cached} of {len(states)}",
        }
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
