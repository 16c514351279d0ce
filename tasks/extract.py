"""Stages 1-2 as tasks: event features per shard of scenes, extraction per shard group (which also
writes the target's LM head into the store: `run_extraction` does it whenever it loads the target),
fan-out dispatch of groups as flow runs, and the store summary."""

from __future__ import annotations

from dataclasses import asdict

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.deployments import run_deployment
from prefect.runtime import flow_run, task_run

from egpt_core.config import ExtractConfig
from egpt_core.extraction import run_extraction
from egpt_core.extraction.nightly import drafter_fingerprint, plan_new_pairs
from egpt_core.extraction.run import compute_scene_features, feature_scene_ids, store_exists
from egpt_core.store import StoreReader
from tasks.caching import FingerprintPolicy, extract_material, features_material
from tasks.refs import FeaturesRef, GroupRef, NightlyPlan, StoreRef
from tasks.runtime import RETRY, ProgressArtifact, artifact_key, gpu_slot, url_name, wait_for_live_run

__all__ = ["compute_features", "dispatch_group", "drafter_fingerprint", "extract_group", "feature_scene_ids",
           "plan_nightly", "store_exists", "summarize_store"]


def group_label(cfg: ExtractConfig) -> str:
    return "all" if cfg.group_index is None else f"g{cfg.group_index}of{cfg.shard_groups}"


def _features_run_name() -> str:
    p = task_run.parameters
    return f"features-{len(p['scene_ids'])}-scenes-{url_name(p['cfg'].store)}"


def _extract_run_name() -> str:
    cfg = task_run.parameters["cfg"]
    return f"extract-{cfg.mode}-{group_label(cfg)}-{url_name(cfg.store)}"


@task(name="features", task_run_name=_features_run_name, tags=["gpu"],
      cache_policy=FingerprintPolicy(stage="features", material=features_material), result_serializer="json",
      **RETRY)
def compute_features(cfg: ExtractConfig, scene_ids: list[str]) -> FeaturesRef:
    """Stage 1: pooled event features for a shard of scenes, cached under the store's `features/`."""
    progress = ProgressArtifact(f"event features, {len(scene_ids)} scenes -> {url_name(cfg.store)}")
    with gpu_slot():
        done = compute_scene_features(cfg, scene_ids, progress)
    return FeaturesRef(store_url=cfg.store, scenes=done.scenes, computed=done.computed, cached=done.cached,
                       failed=done.failed)


@task(name="extract", task_run_name=_extract_run_name, tags=["gpu"],
      cache_policy=FingerprintPolicy(stage="extract", material=extract_material), result_serializer="json",
      **RETRY)
def extract_group(cfg: ExtractConfig, only_pairs: list[str] | None = None) -> GroupRef:
    """Stage 2 for one shard group (every pair when ``cfg.group_index`` is None), resuming after the
    last committed shard; writes the target LM head too. ``only_pairs`` restricts it (nightly)."""
    progress = ProgressArtifact(f"extract {cfg.mode} {group_label(cfg)} -> {url_name(cfg.store)}")
    with gpu_slot():
        summary = run_extraction(cfg, progress=progress, only_pairs=None if only_pairs is None else set(only_pairs))
    return GroupRef(store_url=cfg.store, group=cfg.group_index, pairs_total=summary.pairs_total,
                    pairs_processed=summary.pairs_processed, shards_committed=summary.shards_committed)


@task(name="dispatch-group", task_run_name="dispatch-{cfg.group_index}")
def dispatch_group(deployment: str, cfg: ExtractConfig) -> GroupRef:
    """Run one shard group as its own flow run of ``deployment`` (on any worker of its pool) and
    wait for it; fails when that run does not complete."""
    key = f"{flow_run.id}-{flow_run.run_count}-group-{cfg.group_index}"
    run = run_deployment(deployment, parameters={"cfg": cfg.model_dump(mode="json")}, idempotency_key=key,
                         timeout=0, as_subflow=True)
    run = wait_for_live_run(run.id)  # a run whose node died is marked Crashed, not waited for forever
    if run.state is None or not run.state.is_completed():
        raise RuntimeError(f"extraction group {cfg.group_index} ({deployment}, flow run {run.name}) ended "
                           f"{run.state.name if run.state else 'without a state'}"
                           f"{': ' + run.state.message if run.state and run.state.message else ''}")
    return GroupRef(store_url=cfg.store, group=cfg.group_index, flow_run=run.name)


@task(name="summarize-store", task_run_name=lambda: f"summarize-{url_name(task_run.parameters['url'])}", **RETRY)
def summarize_store(url: str, storage_options: dict | None = None) -> StoreRef:
    """Read a store's manifest into a StoreRef and publish its counts (by status and reason)."""
    reader = StoreReader(url, storage_options)
    meta, counts = reader.info.meta, reader.counts
    table = reader.pairs(columns=["status", "reason"])
    by_reason: dict[tuple[str, str], int] = {}
    for status, reason in zip(table.column("status").to_pylist(), table.column("reason").to_pylist()):
        by_reason[(status, reason or "")] = by_reason.get((status, reason or ""), 0) + 1
    rows = [{"status": s, "reason": r, "pairs": n} for (s, r), n in sorted(by_reason.items())]
    create_table_artifact(table=rows, key=artifact_key("store", url_name(url)),
                          description=f"store `{url}` (fingerprint `{reader.fingerprint}`, mode {meta.mode}, "
                                      f"{len(reader.shards)} shards): pairs by status")
    return StoreRef(url=url, fingerprint=reader.fingerprint, mode=meta.mode, hidden_size=reader.hidden_size,
                    counts=counts, shards=len(reader.shards), lm_head=reader.info.lm_head is not None,
                    drafter_fingerprint=meta.model_fingerprint("drafter"), dataset=meta.dataset)


@task(name="plan-nightly", task_run_name="plan-nightly")
def plan_nightly(cfg: ExtractConfig) -> NightlyPlan:
    """Pairs of the dataset not committed yet, and the drafter's fingerprint now vs the store's
    (:func:`egpt_core.extraction.nightly.plan_new_pairs`)."""
    plan = NightlyPlan(**asdict(plan_new_pairs(cfg)))
    committed = plan.committed
    new = plan.new_pairs
    get_run_logger().info("%d new pairs (%d committed); drafter %s", len(new), committed,
                          "CHANGED" if plan.drafter_changed else "unchanged")
    return plan
