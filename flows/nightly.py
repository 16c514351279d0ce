"""The `nightly-reextract` flow: only the new or invalidated work, then retrain and re-evaluate."""

from __future__ import annotations

import datetime as dt

from prefect import flow
from prefect.runtime import flow_run

from egpt_core.config import PipelineConfig
from egpt_core.form_schema import OptionalText
from flows.extract import extract_stage
from flows.pipeline import train_and_evaluate
from flows.plan import retf_config
from flows.preflight import pipeline_inputs, require_inputs
from tasks.extract import plan_nightly, summarize_store
from tasks.refs import PipelineResult
from tasks.runtime import url_name


def _run_name() -> str:
    cfg = flow_run.parameters["cfg"]
    return f"nightly-{url_name(cfg.extract.store)}-{dt.date.today().isoformat()}"


@flow(name="nightly-reextract", flow_run_name=_run_name, log_prints=True)
def nightly_reextract(cfg: PipelineConfig, extract_deployment: OptionalText = None) -> PipelineResult:
    """Extract only the pairs new to the dataset. When the drafter's fingerprint differs from the
    store's, re-extract the store's drafter rows teacher-forced (retf) into a store named by the new
    fingerprint, and put new pairs in a store of that drafter too. Then retrain and re-evaluate what
    ``cfg`` names (served from the cache where nothing changed).

    Args:
        cfg: the pipeline to keep up to date (its extraction store receives the new pairs).
        extract_deployment: the deployment shard groups fan out to (e.g. "extract/gpu"); empty =
            the groups run one after another in this flow run.
    """
    require_inputs("nightly-reextract", pipeline_inputs(cfg), cfg.extract.storage_options)
    plan = plan_nightly(cfg.extract)
    base, stores = cfg.extract, []
    if plan.drafter_changed:
        source = summarize_store(base.store, base.storage_options)
        stores.append(extract_stage(retf_config(base, source, base.drafter, plan.drafter_fingerprint)))
        base = base.model_copy(update={"store": plan.drafter_store})
    if plan.new_pairs:
        stores.append(extract_stage(base, extract_deployment, only_pairs=plan.new_pairs))
    elif not stores or plan.drafter_store_exists:  # pairs added on earlier nights stay in
        stores.append(summarize_store(base.store, base.storage_options))
    notes = [f"{len(plan.new_pairs)} pairs new to the dataset ({plan.committed} already committed)",
             f"drafter {'CHANGED: re-extracted in retf mode' if plan.drafter_changed else 'unchanged'} "
             f"(fingerprint `{plan.drafter_fingerprint}`)"]
    if plan.drafter_changed and len(stores) > 1:
        notes.append(f"pairs added since the drafter changed are in `{base.store}`: trained on and evaluated "
                     "together with the re-extracted store")
    return train_and_evaluate(cfg, stores, notes, eval_stores=stores)
