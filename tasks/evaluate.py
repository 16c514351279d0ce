"""Stage 4 as tasks: evaluate one prediction source on a store; compare several evaluations."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from egpt_core.config import EvalConfig
from egpt_core.evaluation import compare_runs, evaluate
from egpt_core.evaluation.report import COMPARE_COLUMNS, comparison_rows
from egpt_core.fingerprint import file_fingerprint
from egpt_core.fsio import Location, join
from tasks.caching import FingerprintPolicy, evaluate_material, evaluate_outputs
from tasks.refs import ComparisonRef, EvalRef
from tasks.runtime import RETRY, ProgressArtifact, artifact_key, gpu_slot, url_name


@task(name="evaluate", task_run_name=lambda: f"evaluate-{url_name(task_run.parameters['cfg'].out)}",
      tags=["gpu"], cache_policy=FingerprintPolicy(stage="evaluate", material=evaluate_material,
                                                   outputs=evaluate_outputs), result_serializer="json",
      **RETRY)
def evaluate_task(cfg: EvalConfig) -> EvalRef:
    """Evaluate cfg's prediction source (identity | adapter | L6) on cfg.store; writes metrics.json,
    report.md and plots under cfg.out and publishes the headline metrics as a table."""
    progress = ProgressArtifact(f"evaluate {cfg.name or ''} -> {url_name(cfg.out)}")
    with gpu_slot():
        result = evaluate(cfg, progress=progress)
    rows = [{"metric": key, "value": result.metrics.get(key)} for key, _, _ in COMPARE_COLUMNS]
    create_table_artifact(table=[{"metric": "pairs", "value": result.n_pairs}, *rows],
                          key=artifact_key("eval", result.name),
                          description=f"evaluation `{result.name}` on `{cfg.store}` -> `{cfg.out}`")
    return EvalRef(out_url=result.out_url, name=result.name, n_pairs=result.n_pairs,
                   metrics_fingerprint=file_fingerprint(join(result.out_url, "metrics.json"), cfg.storage_options),
                   summary=result.metrics, stores=[cfg.store, *cfg.extra_stores])


@task(name="compare-runs", task_run_name="compare-runs", cache_policy=NO_CACHE, **RETRY)
def compare_task(runs: list[EvalRef], out_url: str, storage_options: dict | None = None,
                 measured: dict[str, dict] | None = None) -> ComparisonRef:
    """Write comparison.md/.json of the evaluations under ``out_url`` (rewritten every run, so it
    always shows this run's evaluations; it reads small JSON files) and publish it as a table.
    ``measured`` (run name -> stage-5 summary) adds the real-loop columns."""
    docs = []
    for run in runs:
        docs.append(Location(join(run.out_url, "metrics.json"), storage_options).read_json())
    markdown = compare_runs(docs, out_url, storage_options, measured=measured)
    rows = comparison_rows(docs, measured)
    create_table_artifact(table=rows, key="comparison", description=f"evaluations compared -> `{out_url}`")
    return ComparisonRef(out_url=out_url, markdown=markdown, rows=rows)
