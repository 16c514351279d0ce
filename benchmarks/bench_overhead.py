"""Extraction overhead: the share of a demo-sized extraction's wall time spent outside model forwards.

The demo's extraction (`flows.demo.demo_config`: tiny fixtures, 40 scenes x 8 questions = 320 pairs,
batch 16, shards of 64, 20 new tokens, CPU fp32) is measured twice, side by side in one run:

- ``extraction_outside_forward_fraction`` (goal <= 0.10): one `run_extraction` call with the models
  already loaded, forward time taken with torch's global module hooks (outermost forward only), its
  wall time broken down by timed sections (each net of the forwards inside it): the greedy loop over
  the target (``generate``: batching, argmax, cache and mask bookkeeping, the video encoder's glue),
  the drafter's TF batch preparation, the feature encoder's glue (``event_features``), building each
  question's prompt, tokenisation and decoding, waiting for a scene's video or event input, handing
  feature files and shards to the store writer and waiting for its last commit, and the rest
  (planning, input fingerprints, LM head, manifest read). Video decode + processing, event rendering +
  CLIP preprocessing + feature-cache lookups (scene-input threads) and shard commits + feature-file
  writes (the store-writer thread) run in background threads; their time is reported apart
  (``background_s_by_section``) and counts only where the main thread waits for them;
- ``extraction_flow_outside_forward_fraction`` (a figure): the Prefect ``extract`` flow (features
  task, extraction task, store summary; model loading inside the tasks) on a throwaway local test
  server warmed by a small run (a real server runs for weeks: its first requests after a start are
  not the pipeline's cost), the demo-sized run twice, broken down into model loading, the tasks' own
  work net of loading and forwards, cache keys, the Prefect client's waits before retrying a request
  the test server refused (503 while its SQLite database is locked by its own services: the client
  waits 2 s) and the rest (Prefect's orchestration: flow and task runs, states, results, artifacts,
  its heartbeat thread's join, the local server sharing the CPU);
- ``extraction_flow_per_pair_outside_fraction`` (goal <= 0.10): the same flow on 4x the pairs, twice,
  alternating with the demo-sized runs; outside time net of retry waits = fixed + per_pair x pairs,
  and the reported share is per_pair / (per_pair + forward time per pair): what the pipeline costs
  as the work grows, with the fixed seconds per flow run (Prefect set-up and teardown, model
  loading) reported beside it.

Forward time includes the hooks' own cost (two Python calls per submodule forward under the global
hooks), so the outside share is if anything understated; background threads share the CPU with the
forwards, so read the fraction together with the wall time it reports.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.forward_timer import ForwardTimer, SectionTimer

#: library runs measured (the median is reported: one run's fraction moves by +-0.01 with the machine)
LIBRARY_RUNS = 3


def _library_breakdown(cfg) -> dict:
    """One run_extraction call with preloaded models -> wall, forward and per-section seconds."""
    import egpt_core.extraction.run as run_mod
    from egpt_core.extraction.run import load_models, run_extraction
    from egpt_core.store import StoreWriter

    drafter, target = load_models(cfg)
    fwd = ForwardTimer(None)  # every module: HF runs the vision towers outside the top-level forward
    sections = SectionTimer(fwd)
    targets = [
        (run_mod, "greedy_generate", "generate"), (drafter, "teacher_forced", "teacher_forced"),
        (run_mod, "encode_scene_features", "event_features"),
        (run_mod._ScenePrefetch, "get_events", "event_input_wait"),
        (target, "prepare_question", "prompt_build"), (run_mod._ScenePrefetch, "get", "video_wait"),
        (target, "prepare_video", "video_processor_bg"), (run_mod, "read_video_frames", "video_decode_bg"),
        (drafter, "prompt_ids", "tokenise"), (target, "decode", "detokenise"), (drafter, "decode", "detokenise"),
        (StoreWriter, "commit_shard", "store_commit_bg"), (StoreWriter, "put_features", "feature_cache_write_bg"),
        (run_mod.StoreWrites, "commit_shard", "store_commit_wait"), (run_mod.StoreWrites, "finish", "store_commit_wait"),
        (run_mod.StoreWrites, "put_features", "feature_cache_write"),
        (run_mod, "scene_feature_inputs", "event_render_and_clip_preprocessing_bg"),
    ]
    with sections.patched(targets) as missing, fwd:
        t0 = time.perf_counter()
        summary = run_extraction(cfg, models=(drafter, target))
        wall = time.perf_counter() - t0
    background = {k.removesuffix("_bg"): round(sections.wall.pop(k), 3) for k in list(sections.wall) if k.endswith("_bg")}
    net = {k: sections.wall[k] - sections.forward[k] for k in sections.wall}
    if "video_wait" in net and "prompt_build" in net:  # the first question of a video shape calls the processor
        net["video_wait"] = max(0.0, net["video_wait"])
    parts = {k: round(v, 3) for k, v in sorted(net.items(), key=lambda kv: -kv[1])}
    parts["other"] = round(wall - fwd.seconds - sum(net.values()), 3)
    return {"wall_s": round(wall, 3), "forward_s": round(fwd.seconds, 3), "pairs": summary.pairs_processed,
            "outside_s_by_section": parts, "background_s_by_section": background, "sections_not_found": missing}


class PrefectRetryWait:
    """Seconds the Prefect client spent backing off before retrying an API request the server refused
    (the local test server answers 503 while its SQLite database is locked by its own background
    services; the client waits 2 s and retries). Log shipping (``/logs/``) runs in a background
    thread and is not counted; every other request blocks the flow run while it waits."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.retried: list[str] = []
        self._saved: list = []

    def _timed(self, original, is_async: bool):
        meter = self

        def account(request, t0: float, raw: list[float]) -> None:
            if len(raw) > 1 and "/logs/" not in request.url.path:
                meter.seconds += max(0.0, time.perf_counter() - t0 - sum(raw))
                meter.retried.append(f"{request.method} {request.url.path}")

        if is_async:
            async def send_with_retry(client, request, send, *args, **kwargs):
                raw: list[float] = []

                async def timed_send(*a, **k):
                    s0 = time.perf_counter()
                    try:
                        return await send(*a, **k)
                    finally:
                        raw.append(time.perf_counter() - s0)

                t0 = time.perf_counter()
                try:
                    return await original(client, request, timed_send, *args, **kwargs)
                finally:
                    account(request, t0, raw)
        else:
            def send_with_retry(client, request, send, *args, **kwargs):
                raw: list[float] = []

                def timed_send(*a, **k):
                    s0 = time.perf_counter()
                    try:
                        return send(*a, **k)
                    finally:
                        raw.append(time.perf_counter() - s0)

                t0 = time.perf_counter()
                try:
                    return original(client, request, timed_send, *args, **kwargs)
                finally:
                    account(request, t0, raw)
        return send_with_retry

    def __enter__(self) -> PrefectRetryWait:
        from prefect.client import base

        for cls, is_async in ((base.PrefectHttpxAsyncClient, True), (base.PrefectHttpxSyncClient, False)):
            original = cls.__dict__["_send_with_retry"]
            self._saved.append((cls, original))
            cls._send_with_retry = self._timed(original, is_async)
        return self

    def __exit__(self, *exc) -> None:
        for cls, original in self._saved:
            cls._send_with_retry = original
        self._saved.clear()


def _flow_run(extract, cfg) -> dict:
    """One `extract` flow run (on the current Prefect API) under global forward hooks -> wall, forward,
    server retry waits and per-section seconds."""
    import egpt_core.models.loading as loading
    import tasks.extract as task_mod
    from tasks.caching import FingerprintPolicy

    fwd = ForwardTimer(None)
    sections = SectionTimer(fwd)
    targets = [(loading, "videollava_identity", "model_load"), (loading, "load_eventgpt", "model_load"),
               (loading, "load_videollava", "model_load"), (task_mod, "run_extraction", "tasks"),
               (task_mod, "compute_scene_features", "tasks"), (FingerprintPolicy, "compute_key", "cache_keys")]
    with sections.patched(targets) as missing, PrefectRetryWait() as retry, fwd:
        t0 = time.perf_counter()
        state = extract(cfg, return_state=True)
        wall = time.perf_counter() - t0
    if not state.is_completed():
        raise AssertionError(f"extract flow ended {state.name}: {state.message}")
    pairs = state.result().counts.get("ok", 0)
    net = {k: sections.wall[k] - sections.forward[k] for k in sections.wall}
    if "tasks" in net:  # every model load happens inside the features or extraction task
        net["features_and_extraction_tasks"] = net.pop("tasks") - net.get("model_load", 0.0)
    net["prefect_server_retry_waits"] = retry.seconds
    parts = {k: round(v, 3) for k, v in sorted(net.items(), key=lambda kv: -kv[1])}
    parts["prefect_and_other"] = round(wall - fwd.seconds - sum(net.values()), 3)
    return {"pairs": pairs, "wall_s": round(wall, 3), "forward_s": round(fwd.seconds, 3),
            "outside_s": round(wall - fwd.seconds, 3), "retry_wait_s": round(retry.seconds, 3),
            "retried_requests": retry.retried, "outside_s_by_section": parts, "sections_not_found": missing}


def _flow_runs(root: Path, fixtures: dict, big_fixtures: dict) -> dict:
    """The Prefect extract flow on one throwaway test server, warmed by a small run first (a real
    server runs for weeks; its first requests after start are not the pipeline's cost): the demo-sized
    run and one 4x its size, each twice, alternating."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.demo import demo_config
    from flows.extract import extract

    runs: dict[str, list[dict]] = {"1x": [], "4x": []}
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(root / "prefect-results")}):
        with prefect_test_harness(server_startup_timeout=120):
            warm = demo_config(root / "flow-warmup", fixtures).extract.model_copy(update={"max_scenes": 2})
            _flow_run(extract, warm)
            for i, size in enumerate(["1x", "4x", "1x", "4x"]):
                cfg = demo_config(root / f"flow-{size}-{i}", fixtures if size == "1x" else big_fixtures).extract
                runs[size].append(_flow_run(extract, cfg))
    return runs


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _flow_summary(runs: dict) -> dict:
    """Demo-sized flow fraction (mean of its runs), and the per-pair / per-run split from the two sizes:
    outside time net of the test server's retry waits = fixed + per_pair * pairs."""
    small, big = runs["1x"], runs["4x"]
    p1, p4 = _mean(r["pairs"] for r in small), _mean(r["pairs"] for r in big)
    out1 = _mean(r["outside_s"] - r["retry_wait_s"] for r in small)
    out4 = _mean(r["outside_s"] - r["retry_wait_s"] for r in big)
    f1, f4 = _mean(r["forward_s"] for r in small), _mean(r["forward_s"] for r in big)
    per_pair_out = (out4 - out1) / (p4 - p1)
    per_pair_fwd = (f4 - f1) / (p4 - p1)
    return {
        "demo_fraction": 1.0 - f1 / _mean(r["wall_s"] for r in small),
        "demo_fraction_net_of_retry_waits": out1 / (out1 + f1),
        "per_pair_fraction": per_pair_out / (per_pair_out + per_pair_fwd),
        "fixed_s": out1 - per_pair_out * p1,
        "per_pair_outside_ms": 1000 * per_pair_out, "per_pair_forward_ms": 1000 * per_pair_fwd,
        "pairs": {"1x": p1, "4x": p4},
    }


def run() -> dict:
    from flows.demo import DEMO_SCENES, demo_config, ensure_fixtures

    with tempfile.TemporaryDirectory(prefix="egpt-bench-overhead-") as tmp:
        root = Path(tmp)
        fixtures, _ = ensure_fixtures(root / "fixtures")
        big, _ = ensure_fixtures(root / "fixtures-4x", scenes=4 * DEMO_SCENES)
        libs = [_library_breakdown(demo_config(root / f"lib{i}", fixtures).extract) for i in range(LIBRARY_RUNS)]
        flow_runs = _flow_runs(root, fixtures, big)
    fractions = [1.0 - lib["forward_s"] / lib["wall_s"] for lib in libs]
    lib = sorted(zip(fractions, range(len(libs))))[len(libs) // 2]  # the median run
    lib_out, lib = lib[0], libs[lib[1]]
    flow = _flow_summary(flow_runs)
    demo_runs = flow_runs["1x"]
    sections = {k: round(_mean(r["outside_s_by_section"][k] for r in demo_runs), 3)
                for k in demo_runs[0]["outside_s_by_section"]}
    return {
        "extraction_outside_forward_fraction": {
            "ratio": round(lib_out, 4), "goal": "<= 0.1",
            "unit": f"share of wall time outside model forwards, demo-sized extraction ({lib['pairs']} pairs, tiny "
                    f"models, CPU), `run_extraction` with loaded models, the median of {LIBRARY_RUNS} runs "
                    f"({', '.join(f'{f:.3f}' for f in fractions)}): {lib['wall_s']:.2f} s wall, "
                    f"{lib['forward_s']:.2f} s in forwards",
            "library": lib,
        },
        "extraction_flow_outside_forward_fraction": {
            "ratio": round(flow["demo_fraction"], 4), "goal": None,
            "unit": f"the same through the Prefect `extract` flow on a warm local test server (features task, "
                    f"extraction task, model loading, orchestration; mean of 2 runs): "
                    f"{_mean(r['wall_s'] for r in demo_runs):.2f} s wall, "
                    f"{_mean(r['forward_s'] for r in demo_runs):.2f} s in forwards; "
                    f"{flow['demo_fraction_net_of_retry_waits']:.3f} net of the test server's SQLite retry waits",
            "outside_s_by_section": sections,
            "runs": flow_runs,
        },
        "extraction_flow_per_pair_outside_fraction": {
            "ratio": round(flow["per_pair_fraction"], 4), "goal": "<= 0.1",
            "unit": f"what each extra pair costs outside forwards through the Prefect flow: the demo-sized run vs "
                    f"4x its pairs ({flow['pairs']['1x']:.0f} vs {flow['pairs']['4x']:.0f}), net of the test "
                    f"server's retry waits: {flow['per_pair_outside_ms']:.2f} ms outside per pair vs "
                    f"{flow['per_pair_forward_ms']:.2f} ms in forwards; plus {flow['fixed_s']:.2f} s per flow run "
                    f"(Prefect's run set-up and teardown, model loading), which a 7B run amortises over hours",
            "fixed_s_per_flow_run": round(flow["fixed_s"], 3),
        },
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
