"""The `pipeline` flow: extract, train each configured adapter and/or L6, evaluate each (and the
raw drafter), compare. `train_and_evaluate` is shared with the nightly flow."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from egpt_core.config import PipelineConfig
from egpt_core.form_schema import OptionalText
from egpt_core.fsio import join
from flows.benchmark_e2e import benchmark_e2e_stage
from flows.extract import extract_stage
from flows.plan import (
    adapter_configs,
    benchmark_config,
    eval_config,
    lora_config,
    lora_store_url,
    retf_config,
)
from flows.preflight import pipeline_inputs, require_inputs
from tasks.evaluate import compare_task, evaluate_task
from tasks.extract import summarize_store
from tasks.refs import EvalRef, LoraRef, PipelineResult, StoreRef
from tasks.runtime import url_name
from tasks.train import export_drafter_task, train_adapter_task, train_lora_task


def l6_stage(cfg: PipelineConfig, stores: list[StoreRef], tests: list[StoreRef]) -> tuple[LoraRef, EvalRef, StoreRef]:
    """L6: train the LoRA, merge it into the drafter, re-extract the test stores' drafter rows with
    the merged drafter (retf, into new stores), evaluate those rows; returns the first retf store too."""
    so = cfg.extract.storage_options
    url = lora_store_url(cfg)
    train_store = next((s for s in stores if s.url == url), None) or summarize_store(url, so)
    lora = train_lora_task(lora_config(cfg, {train_store.url: train_store.fingerprint}))
    drafter = export_drafter_task(lora.adapter_dir, join(lora.run_url, "merged-drafter"), so)
    test, *extra = [extract_stage(retf_config(cfg.extract, t, drafter.path, drafter.fingerprint)) for t in tests]
    run = evaluate_task(eval_config(cfg, test, "L6", extra, lora=lora.adapter_dir))
    return lora.model_copy(update={"merged_drafter": drafter}), run, test


def train_and_evaluate(cfg: PipelineConfig, stores: list[StoreRef], notes: list[str] | None = None,
                       eval_stores: list[StoreRef] | None = None) -> PipelineResult:
    """Identity, every adapter and L6 evaluated on the test store (default: the first store; or
    ``eval_stores`` together, e.g. the nightly's stores after a drafter change), then (with
    ``cfg.speculative``) measured in the real draft -> verify loop on the first test store's pairs,
    compared."""
    so = cfg.extract.storage_options
    tests = [summarize_store(cfg.test_store, so)] if cfg.test_store else (eval_stores or stores[:1])
    test, *extra = tests
    result = PipelineResult(stores=stores, runs=[], notes=list(notes or []))
    if cfg.evaluate_identity:
        result.runs.append(evaluate_task(eval_config(cfg, test, "identity", extra, identity=True)))
    trained: list[tuple[str, str]] = []
    for name, adapter_cfg in adapter_configs(cfg, stores):
        adapter = train_adapter_task(adapter_cfg)
        result.adapters.append(adapter)
        trained.append((name, adapter.run_url))
        result.runs.append(evaluate_task(eval_config(cfg, test, name, extra, adapter_run=adapter.run_url)))
    l6 = None
    if cfg.lora is not None:
        result.lora, l6_run, retf_store = l6_stage(cfg, stores, tests)
        result.runs.append(l6_run)
        l6 = (result.lora.merged_drafter.path, retf_store.url)
    bench = benchmark_config(cfg, test, trained, l6) if cfg.speculative is not None else None
    if bench is not None:
        result.benchmark = benchmark_e2e_stage(bench)
    if result.runs:
        measured = {r.name: r.summary for r in result.benchmark.runs} if result.benchmark else None
        result.comparison = compare_task(result.runs, join(cfg.out, "comparison"), so, measured=measured)
    create_markdown_artifact(key="pipeline-report", markdown=report_markdown(result, result.notes),
                             description=f"outputs under {cfg.out}")
    return result


def report_markdown(result: PipelineResult, notes: list[str]) -> str:
    """The run's report: stores, output locations, the comparison table (no credentials)."""
    lines = ["# Pipeline report", "", *[f"- {n}" for n in notes], "", "## Stores", "",
             "| store | fingerprint | mode | ok | failed | skipped | shards | LM head |", "|---|---|---|---|---|---|---|---|"]
    for s in result.stores:
        c = s.counts
        lines.append(f"| `{s.url}` | `{s.fingerprint}` | {s.mode} | {c.get('ok', 0)} | {c.get('failed', 0)} | "
                     f"{c.get('skipped', 0)} | {s.shards} | {'yes' if s.lm_head else 'no'} |")
    lines += ["", "## Outputs", ""]
    lines += [f"- adapter {a.level}: `{a.run_url}` (best val loss {a.best_val_loss:.4f})" for a in result.adapters]
    if result.lora:
        lines.append(f"- L6 LoRA: `{result.lora.adapter_dir}`; merged drafter: "
                     f"`{result.lora.merged_drafter.path if result.lora.merged_drafter else '-'}`")
    lines += [f"- evaluation {r.name}: `{r.out_url}` ({r.n_pairs} pairs of {', '.join(f'`{u}`' for u in r.stores)})"
              for r in result.runs]
    if result.benchmark:
        lines += [f"- speculative decoding (measured): `{result.benchmark.out_url}`"]
    if result.comparison:
        lines += [f"- comparison: `{result.comparison.out_url}`", "", result.comparison.markdown]
    if result.benchmark:
        lines += ["", result.benchmark.markdown]
    return "\n".join(lines)


def _run_name() -> str:
    cfg = flow_run.parameters["cfg"]
    stages = [str(a.adapter.level) for a in cfg.adapters] + (["L6"] if cfg.lora else [])
    return f"pipeline-{url_name(cfg.extract.store)}-{'+'.join(stages) or 'identity'}"


@flow(name="pipeline", flow_run_name=_run_name, log_prints=True)
def pipeline(cfg: PipelineConfig, extract_deployment: OptionalText = None) -> PipelineResult:
    """Extract ``cfg.extract`` (fanned out over ``extract_deployment`` when it has shard groups),
    train each configured adapter and/or L6, evaluate each and the raw drafter, compare.

    Args:
        cfg: what to extract, which adapters and whether L6 to train, where outputs go.
        extract_deployment: the deployment shard groups fan out to (e.g. "extract/gpu"); empty =
            the groups run one after another in this flow run.
    """
    require_inputs("pipeline", pipeline_inputs(cfg), cfg.extract.storage_options)
    store = extract_stage(cfg.extract, extract_deployment)
    return train_and_evaluate(cfg, [store])
