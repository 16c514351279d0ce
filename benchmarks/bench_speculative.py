"""Stage 5 goals, measured on the demo (tiny fixtures) in the real draft -> verify loop:

- ``sd_measured_vs_simulated``: |measured - simulated| / simulated acceptance length at γ=5 (the best
  trained drafter whose offline rows are exactly what the loop sees: L1 or L6; L4 is bidirectional
  offline), goal <= 0.02;
- ``sd_speedup_model_error``: |predicted - measured| / measured e2e speedup at γ=5 for that drafter,
  the speedup model fed this run's own timings, goal <= 0.15;
- ``sd_resync_vs_research``: measured acceptance length resync / research, same adapter, same pairs,
  goal >= 1.2;
- ``sd_demo_acceptance``: the best trained drafter's measured acceptance length at γ=5 on the demo's
  held-out scenes, goal >= 2.0 (and at least twice identity's, reported beside it).

It runs the demo's `pipeline` flow (40 scenes x 8 questions, 240 training pairs) against a throwaway
Prefect test server. ``python -m benchmarks --device cuda`` runs the models on the GPU in bf16 (stores
stay float32, adapters fp32): the GPU figures for the README.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

GAMMA = 5
EXACT = ("L1", "L6")  # offline rows == what the loop sees (position-wise adapter, merged drafter)


def _config(root: Path, fixtures: dict, device: str):
    from egpt_core.config import ModelLoadConfig
    from flows.demo import demo_config

    cfg = demo_config(root, fixtures)
    if device == "cpu":
        return cfg
    load = ModelLoadConfig(dtype="bfloat16", quant="none", device=device)
    extract = cfg.extract.model_copy(update={"load": load})
    adapters = [a.model_copy(update={"device": device}) for a in cfg.adapters]
    lora = cfg.lora.model_copy(update={"load": load})
    sd = cfg.speculative.model_copy(update={"load": load})
    return cfg.model_copy(update={"extract": extract, "adapters": adapters, "lora": lora, "speculative": sd})


def run(device: str = "cpu") -> dict:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import torch
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from egpt_core.speculative import run_speculative
    from flows.demo import ensure_fixtures
    from flows.pipeline import pipeline

    if device == "cpu":
        torch.set_num_threads(1)  # as `egpt demo`: tiny models, two threads of prefill hiding on 2 cores
    with tempfile.TemporaryDirectory(prefix="egpt-bench-sd-") as tmp:
        root = Path(tmp)
        fixtures, _ = ensure_fixtures(root / "fixtures")
        cfg = _config(root, fixtures, device)
        with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(root / "prefect-results")}):
            with prefect_test_harness(server_startup_timeout=90):
                state = pipeline(cfg, return_state=True)
                if not state.is_completed():
                    raise AssertionError(f"pipeline ended {state.name}: {state.message}")
        runs = {r.name: r for r in state.result().benchmark.runs}
        key = f"acceptance_length_gamma{GAMMA}"
        trained = {n: r.summary[key] for n, r in runs.items() if n not in ("target_only", "identity")}
        best = max(trained, key=trained.get)
        exact = max((n for n in EXACT if n in runs), key=lambda n: runs[n].summary[key])
        s = runs[exact].summary
        research_cfg = _research_config(runs[exact], cfg)
        research = run_speculative(research_cfg)
    measured, simulated = s[key], s[f"simulated_acceptance_length_gamma{GAMMA}"]
    identity = runs["identity"].summary[key]
    where = "GPU bf16" if device != "cpu" else "CPU fp32"
    pairs = runs[exact].n_pairs
    return {
        "sd_measured_vs_simulated": {
            "ratio": abs(measured - simulated) / simulated, "goal": "<= 0.02",
            "unit": f"|measured - simulated| / simulated acceptance length, γ={GAMMA}, {exact}, {pairs} held-out pairs "
                    f"({where})",
            "measured": round(measured, 4), "simulated": round(simulated, 4),
            "round_agreement": s.get(f"round_agreement_gamma{GAMMA}"),
        },
        "sd_speedup_model_error": {
            "ratio": s[f"speedup_model_error_gamma{GAMMA}"], "goal": "<= 0.15",
            "unit": f"|predicted - measured| / measured e2e speedup, γ={GAMMA}, {exact} ({where}, tiny models: drafter "
                    "as large as the target)",
            "measured_e2e": round(s[f"speedup_e2e_gamma{GAMMA}"], 4),
            "predicted_e2e": round(s[f"predicted_speedup_e2e_gamma{GAMMA}"], 4),
        },
        "sd_resync_vs_research": {
            "ratio": measured / max(research.summary[key] or 0.0, 1e-9), "goal": ">= 1.2",
            "unit": f"measured acceptance length resync / research, γ={GAMMA}, {exact}, same pairs ({where})",
            "resync": round(measured, 4), "research": round(research.summary[key] or 0.0, 4),
        },
        "sd_demo_acceptance": {
            "ratio": trained[best], "goal": ">= 2.0",
            "unit": f"best trained drafter ({best}) measured acceptance length, γ={GAMMA}, demo held-out scenes ({where})",
            "identity": round(identity, 4), "x_identity": round(trained[best] / max(identity, 1e-9), 1),
            "per_drafter": {n: round(v, 4) for n, v in trained.items()},
            "lossless_mismatches": {n: r.summary.get(f"lossless_mismatches_gamma{GAMMA}") for n, r in runs.items()
                                    if n != "target_only"},
        },
    }


def _research_config(ref, pipeline_cfg):
    """The same configuration as ``ref``'s run (its sd_metrics.json config), in research mode."""
    import json

    from egpt_core.config import SpeculateConfig
    from egpt_core.fsio import join

    with open(join(ref.out_url, "sd_metrics.json")) as f:
        dump = json.load(f)["inputs"]["config"]
    dump["storage_options"] = pipeline_cfg.extract.storage_options
    return SpeculateConfig.model_validate(dump | {"mode": "research", "out": ref.out_url.rstrip("/") + "-research"})


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu"), indent=2))
