"""Stage 5 as tasks: measure one drafter configuration in the real draft -> verify loop; compare
several configurations (the end-to-end benchmark)."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from egpt_core import runfiles as rf
from egpt_core.config import SpeculateConfig
from egpt_core.fingerprint import file_fingerprint
from egpt_core.fsio import join
from egpt_core.speculative import run_speculative
from egpt_core.speculative.outputs import METRICS_FILE
from egpt_core.speculative.plots import speedup_per_configuration
from egpt_core.speculative.report import measured_table
from tasks.caching import FingerprintPolicy, speculate_material
from tasks.refs import BenchmarkRef, SpeculateRef
from tasks.runtime import RETRY, ProgressArtifact, artifact_key, gpu_slot, url_name

#: per-γ columns of the table artifact
ARTIFACT_KEYS = ("acceptance_length", "simulated_acceptance_length", "round_agreement", "accept_rate",
                 "tokens_per_round", "speedup_e2e", "speedup_decode", "predicted_speedup_e2e", "lossless_mismatches")


@task(name="speculate", task_run_name=lambda: f"speculate-{url_name(task_run.parameters['cfg'].out)}",
      tags=["gpu"], cache_policy=FingerprintPolicy(stage="speculate", material=speculate_material),
      result_serializer="json", **RETRY)
def speculate_task(cfg: SpeculateConfig) -> SpeculateRef:
    """Run cfg's configuration and the target-only baseline on the same pairs; writes sd_pairs.parquet,
    sd_metrics.json, report.md and plots under cfg.out and publishes the per-γ numbers as a table."""
    progress = ProgressArtifact(f"speculate {cfg.name or ''} -> {url_name(cfg.out)}")
    with gpu_slot():
        res = run_speculative(cfg, progress=progress)
    gammas = sorted({int(k.rsplit("gamma", 1)[1]) for k in res.summary if "_gamma" in k})
    table = [{"γ": g, **{k: res.summary.get(f"{k}_gamma{g}") for k in ARTIFACT_KEYS}} for g in gammas]
    create_table_artifact(table=table, key=artifact_key("sd", res.name),
                          description=f"speculative decoding `{res.name}` ({res.mode}, {res.n_pairs} pairs) -> `{cfg.out}`")
    return SpeculateRef(out_url=res.out_url, name=res.name, mode=res.mode, n_pairs=res.n_pairs, n_failed=res.n_failed,
                        metrics_fingerprint=file_fingerprint(join(res.out_url, METRICS_FILE), cfg.storage_options),
                        summary=res.summary)


@task(name="compare-sd", task_run_name="compare-sd", cache_policy=NO_CACHE, **RETRY)
def compare_sd_task(runs: list[SpeculateRef], out_url: str, gamma: int = 5,
                    storage_options: dict | None = None) -> BenchmarkRef:
    """Write benchmark.md / benchmark.json / speedup_per_configuration.png of the runs under ``out_url``."""
    summaries = [r.summary | {"name": r.name, "mode": r.mode if r.name != "target_only" else "target_only",
                              "n_pairs": r.n_pairs} for r in runs]
    table = measured_table(summaries, gamma)
    markdown = "\n".join(["# End-to-end speculative decoding", "", table, "",
                          "Measured in the real draft -> verify loop against the target-only greedy baseline of the "
                          "same run; *simulated* = `egpt evaluate`'s rounds acceptance on the same pairs.", "",
                          "![speedup per configuration](speedup_per_configuration.png)", ""])
    rf.write_bytes(join(out_url, "benchmark.md"), markdown.encode(), storage_options)
    rf.write_bytes(join(out_url, "benchmark.json"),
                   json.dumps({"runs": [r.model_dump() for r in runs]}, indent=2).encode(), storage_options)
    rf.write_bytes(join(out_url, "speedup_per_configuration.png"), speedup_per_configuration(summaries, gamma),
                   storage_options)
    create_table_artifact(table=[{"configuration": s["name"], **{k: s.get(f"{k}_gamma{gamma}") for k in ARTIFACT_KEYS}}
                                 for s in summaries], key="sd-benchmark",
                          description=f"end-to-end speculative decoding, γ={gamma} -> `{out_url}`")
    create_markdown_artifact(key="sd-benchmark-report", markdown=markdown, description=f"-> `{out_url}`")
    return BenchmarkRef(out_url=out_url, runs=runs, markdown=markdown)
