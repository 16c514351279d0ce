"""The `extract` flow (stages 1-2): event features -> sharded extraction (+ the target LM head,
written by the extraction task) -> store summary."""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from prefect.runtime import flow_run

from egpt_core.config import ExtractConfig
from egpt_core.extraction.run import needs_drafter
from egpt_core.form_schema import OptionalText
from egpt_core.models.loading import shared_models
from flows.plan import group_configs
from flows.preflight import extract_inputs, require_inputs
from tasks.extract import (
    compute_features,
    dispatch_group,
    extract_group,
    feature_scene_ids,
    group_label,
    store_exists,
    summarize_store,
)
from tasks.refs import StoreRef
from tasks.runtime import url_name

#: scenes per event-feature task (each task loads the drafter once)
FEATURE_SCENES_PER_TASK = 512


def extract_stage(cfg: ExtractConfig, deployment: str | None = None, only_pairs: list[str] | None = None) -> StoreRef:
    """Features for the scenes to extract, then every shard group (here, or one flow run per group
    of ``deployment``), then the store's summary. A store that does not exist yet bypasses the task
    cache, so deleting a store really recomputes it. The tasks that run here share loaded models
    (`shared_models`: the drafter is read once); they are released before groups are dispatched."""
    refresh = {} if store_exists(cfg.store, cfg.storage_options) else {"refresh_cache": True}
    if refresh:
        get_run_logger().info("store %s does not exist yet: computing it (task cache bypassed)", url_name(cfg.store))
    groups = group_configs(cfg)
    dispatched = len(groups) > 1 and bool(deployment)
    with shared_models():  # the features and extraction tasks of this run load each model once
        if cfg.group_index is None and needs_drafter(cfg):
            scenes = feature_scene_ids(cfg, only_pairs)
            for start in range(0, len(scenes), FEATURE_SCENES_PER_TASK):
                compute_features.with_options(**refresh)(cfg, scenes[start : start + FEATURE_SCENES_PER_TASK])
        if not dispatched:
            for group in groups:
                extract_group.with_options(**refresh)(group, only_pairs)
    if dispatched:  # a dispatched group resumes its whole plan: same as only_pairs (models released here first)
        dispatch_group.map(unmapped(deployment), groups).result()
    return summarize_store(cfg.store, cfg.storage_options)


def extract_run_name() -> str:
    cfg = flow_run.parameters["cfg"]
    return f"extract-{cfg.mode}-{url_name(cfg.store)}-{group_label(cfg)}"


@flow(name="extract", flow_run_name=extract_run_name, log_prints=True)
def extract(cfg: ExtractConfig, deployment: OptionalText = None) -> StoreRef:
    """Stages 1-2 into ``cfg.store``. With ``cfg.shard_groups`` > 1 and a ``deployment`` (e.g.
    "extract/gpu") every shard group runs as its own flow run of it, on any worker of its pool;
    otherwise the groups run here, one after another.

    Args:
        cfg: dataset, models, store and how to extract.
        deployment: the deployment each shard group runs as (e.g. "extract/gpu"); empty = the
            groups run one after another in this flow run.
    """
    require_inputs("extract", extract_inputs(cfg), cfg.storage_options)
    return extract_stage(cfg, deployment)
