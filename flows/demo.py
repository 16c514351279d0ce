"""`egpt demo`: the pipeline on tiny fixtures (CPU, float32, local store) - extraction, L1 / L4 / L6
training, evaluation and the real draft -> verify loop on the held-out scenes - and how much of a run
the task cache served."""

from __future__ import annotations

import json
import time
from pathlib import Path

from egpt_core.config import (
    AdapterConfig,
    ExtractConfig,
    ModelLoadConfig,
    PipelineAdapterConfig,
    PipelineConfig,
    PipelineLoraConfig,
    PipelineSpeculativeConfig,
    TimingConfig,
)
from egpt_core.fsio import Location

CPU_FP32 = ModelLoadConfig(dtype="float32", quant="none", device="cpu")
#: the demo's dataset: 40 scenes x 8 questions = 320 pairs (240 to train on, 80 held out)
DEMO_SCENES, DEMO_QUESTIONS = 40, 8
DEMO_MARKER = "DEMO_FIXTURES.json"


def ensure_fixtures(out: Path, scenes: int = DEMO_SCENES, questions: int = DEMO_QUESTIONS) -> tuple[dict[str, Path], bool]:
    """Tiny checkpoints + a synthetic dataset under ``out`` (built once per size); returns (paths, built)."""
    paths = {"eventgpt": out / "eventgpt", "videollava": out / "videollava", "dataset": out / "dataset"}
    wanted = {"scenes": scenes, "questions": questions, "seed": 0}
    marker = out / DEMO_MARKER
    if (out / "FIXTURES.json").is_file() and all(p.is_dir() for p in paths.values()) and marker.is_file() \
            and json.loads(marker.read_text()) == wanted:
        return paths, False
    from egpt_core.models.commands import write_fixtures

    paths = write_fixtures(out, scenes=scenes, questions=questions, seed=0)
    Location(str(marker)).write_atomic(json.dumps(wanted))
    return paths, True


def demo_config(root: Path, fixtures: dict[str, Path], lora: bool = True, epochs: int = 30,
                speculative: bool = True) -> PipelineConfig:
    """Identity + L1 + L4 (+ L6) on the fixtures: float32 on the CPU, a local float32 store under
    ``root`` (exact for the measured-vs-simulated check), then (``speculative``) the real loop."""
    store = str(root / "store")
    extract = ExtractConfig(dataset=str(fixtures["dataset"]), drafter=str(fixtures["eventgpt"]),
                            target=str(fixtures["videollava"]), store=store, load=CPU_FP32, batch_size=16,
                            max_new_tokens=20, shard_size=64, store_dtype="float32")
    adapters = [PipelineAdapterConfig(adapter=AdapterConfig(level="L1"), epochs=epochs, batch_size=16, lr=3e-3,
                                      device="cpu"),
                PipelineAdapterConfig(adapter=AdapterConfig(level="L4", num_heads=4, ffn_dim=256), epochs=epochs,
                                      batch_size=16, lr=3e-3, device="cpu")]
    l6 = PipelineLoraConfig(load=CPU_FP32, rank=4, alpha=8, epochs=3, grad_accum=8, lr=1e-3,
                            gradient_checkpointing=False)
    # per-token costs for the speedup model: the research pipeline's measured RTX 4090 / 4-bit figures
    # (reference §9.1: T_ep ~ 90, t_e ~ 10, T_vp ~ 316, t_v ~ 14.6 ms); real runs pass their own timing file
    timing = TimingConfig(drafter_prefill_ms=90.0, drafter_step_ms=10.0, target_prefill_ms=316.0,
                          target_step_ms=14.6)
    sd = PipelineSpeculativeConfig(gammas=[1, 3, 5], max_pairs=40, load=CPU_FP32) if speculative else None
    return PipelineConfig(extract=extract, adapters=adapters, lora=l6 if lora else None, out=str(root / "runs"),
                          val_fraction=0.25, timing=timing, speculative=sd)


def task_states(flow_run_id, timeout_s: float = 60.0, settle_s: float = 2.0) -> list[tuple[str, str]]:
    """(task run name, final state name) of a flow run's tasks, read back from the API.

    Task runs reach the API through events, after the flow itself has finished: wait until every one
    seen is final and no new one has appeared for ``settle_s`` (or ``timeout_s`` passed)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    seen, stable_since = -1, time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            now = time.monotonic()
            if len(runs) != seen:
                seen, stable_since = len(runs), now
            settled = runs and all(r.state and r.state.is_final() for r in runs) and now - stable_since >= settle_s
            if settled or now > deadline:
                return sorted((r.name, r.state.name if r.state else "unknown") for r in runs)
            time.sleep(0.25)


def cache_line(states: list[tuple[str, str]]) -> str:
    """'N of M tasks served from cache (ran: ...)' for a run's task states."""
    cached = sum(1 for _, state in states if state == "Cached")
    ran = [name for name, state in states if state != "Cached"]
    line = f"{cached} of {len(states)} tasks served from cache"
    return line + (f"; ran: {', '.join(ran)}" if cached and ran else "")


def describe(result) -> str:
    """Where a pipeline run's outputs went, and its comparison table."""
    lines = []
    for s in result.stores:
        c = s.counts
        lines.append(f"store        {s.url}  ok {c.get('ok', 0)} failed {c.get('failed', 0)} skipped "
                     f"{c.get('skipped', 0)}  ({s.shards} shards, fingerprint {s.fingerprint})")
    lines += [f"adapter      {a.level:3s} {a.run_url}" for a in result.adapters]
    if result.lora:
        lines.append(f"L6 LoRA      {result.lora.adapter_dir}")
        lines.append(f"  merged     {result.lora.merged_drafter.path if result.lora.merged_drafter else '-'}")
    lines += [f"evaluation   {r.name:8s} {r.out_url}" for r in result.runs]
    if result.benchmark:
        lines += [f"speculative  {r.name:11s} {r.out_url}" for r in result.benchmark.runs]
    if result.comparison:
        lines += [f"comparison   {result.comparison.out_url}/comparison.md", "", result.comparison.markdown]
    if result.benchmark:
        lines += [f"benchmark    {result.benchmark.out_url}/benchmark.md", "", result.benchmark.markdown]
    return "\n".join(lines)


def run_demo(root: Path, lora: bool = True, scenes: int = DEMO_SCENES, questions: int = DEMO_QUESTIONS) -> int:
    """Build fixtures if missing, run the pipeline flow, print where everything went."""
    import torch

    from flows.pipeline import pipeline

    # tiny models: per-op work is microseconds, so one intra-op thread per Python thread is fastest and
    # never spins against the second thread of prefill hiding (or other processes) on a 2-core host
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    fixtures, built = ensure_fixtures(root / "fixtures", scenes, questions)
    state = pipeline(demo_config(root, fixtures, lora=lora), return_state=True)
    if not state.is_completed():
        print(f"egpt demo: the pipeline flow run ended {state.name}: {state.message}")
        return 1
    print(f"\nfixtures     {root / 'fixtures'} ({'built' if built else 'reused'})")
    print(describe(state.result()))
    print(cache_line(task_states(state.state_details.flow_run_id)))
    print(f"pipeline took {time.perf_counter() - t0:.1f}s (including Prefect's start-up)")
    return 0
