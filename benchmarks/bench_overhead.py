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
- ``extraction_flow_outside_forward_fraction`` (a figure): the Prefect ``extract`` flow on a
  throwaway test server (features task, extraction task, store summary; model loading inside the
  tasks), broken down into model loading, the two tasks' own work net of loading and forwards,
  cache-key computation and the rest (Prefect's orchestration: task runs, states, results, artifacts,
  the local test server sharing the CPU).

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


def _flow_fraction(cfg, root: Path) -> dict:
    """The Prefect extract flow under global forward hooks -> wall, forward and per-section seconds."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    import egpt_core.models.loading as loading
    import tasks.extract as task_mod
    from flows.extract import extract
    from tasks.caching import FingerprintPolicy

    fwd = ForwardTimer(None)
    sections = SectionTimer(fwd)
    targets = [(loading, "videollava_identity", "model_load"), (loading, "load_eventgpt", "model_load"),
               (loading, "load_videollava", "model_load"), (task_mod, "run_extraction", "tasks"),
               (task_mod, "compute_scene_features", "tasks"), (FingerprintPolicy, "compute_key", "cache_keys")]
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(root / "prefect-results")}):
        with prefect_test_harness(server_startup_timeout=120):
            with sections.patched(targets) as missing, fwd:
                t0 = time.perf_counter()
                state = extract(cfg, return_state=True)
                wall = time.perf_counter() - t0
            if not state.is_completed():
                raise AssertionError(f"extract flow ended {state.name}")
    net = {k: sections.wall[k] - sections.forward[k] for k in sections.wall}
    if "tasks" in net:  # every model load happens inside the features or extraction task
        net["features_and_extraction_tasks"] = net.pop("tasks") - net.get("model_load", 0.0)
    parts = {k: round(v, 3) for k, v in sorted(net.items(), key=lambda kv: -kv[1])}
    parts["prefect_and_other"] = round(wall - fwd.seconds - sum(net.values()), 3)
    return {"wall_s": round(wall, 3), "forward_s": round(fwd.seconds, 3), "outside_s_by_section": parts,
            "sections_not_found": missing}


def run() -> dict:
    from flows.demo import demo_config, ensure_fixtures

    with tempfile.TemporaryDirectory(prefix="egpt-bench-overhead-") as tmp:
        root = Path(tmp)
        fixtures, _ = ensure_fixtures(root / "fixtures")
        lib_cfg = demo_config(root / "lib", fixtures).extract
        flow_cfg = demo_config(root / "flow", fixtures).extract
        lib = _library_breakdown(lib_cfg)
        flow = _flow_fraction(flow_cfg, root)
    flow_out = 1.0 - flow["forward_s"] / flow["wall_s"]
    lib_out = 1.0 - lib["forward_s"] / lib["wall_s"]
    return {
        "extraction_outside_forward_fraction": {
            "ratio": round(lib_out, 4), "goal": "<= 0.1",
            "unit": f"share of wall time outside model forwards, demo-sized extraction ({lib['pairs']} pairs, tiny "
                    f"models, CPU), `run_extraction` with loaded models: {lib['wall_s']:.2f} s wall, "
                    f"{lib['forward_s']:.2f} s in forwards",
            "library": lib,
        },
        "extraction_flow_outside_forward_fraction": {
            "ratio": round(flow_out, 4), "goal": None,
            "unit": f"the same through the Prefect `extract` flow (features task, extraction task, model loading, "
                    f"orchestration): {flow['wall_s']:.2f} s wall, {flow['forward_s']:.2f} s in forwards",
            "flow": flow,
        },
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
