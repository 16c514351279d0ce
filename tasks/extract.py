"""Stages 1-2 as tasks: event features per shard of scenes, extraction per shard group (which also
writes the target's LM head into the store: `run_extraction` does it whenever it loads the target),
fan-out dispatch of groups as flow runs, and the store summary."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.deployments import run_deployment
from prefect.runtime import flow_run, task_run

from egpt_core.config import ExtractConfig
from egpt_core.data import load_scenes
from egpt_core.errors import BadInputError
from egpt_core.extraction import load_models, plan_pairs, run_extraction
from egpt_core.extraction.features import scene_features
from egpt_core.extraction.run import store_meta
from egpt_core.fsio import join, url_to_fs
from egpt_core.models.loading import drafter_fingerprint as _drafter_fingerprint
from egpt_core.models.loading import load_eventgpt
from egpt_core.store import StoreReader, StoreWriter
from egpt_core.store.retrying import with_retries
from tasks.caching import FingerprintPolicy, extract_material, features_material
from tasks.refs import FeaturesRef, GroupRef, NightlyPlan, StoreRef, derived_store_url
from tasks.runtime import RETRY, ProgressArtifact, artifact_key, gpu_slot, url_name, wait_for_live_run


def store_exists(url: str, storage_options: dict | None = None) -> bool:
    """True when a store has committed its manifest at ``url``."""
    fs, path = url_to_fs(url, storage_options)
    return with_retries(fs).exists(join(path, "manifest.json"))


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
    wanted = set(scene_ids)
    scenes = [s for s in load_scenes(cfg.dataset, cfg.storage_options, cfg.max_scenes) if s.scene_id in wanted]
    progress = ProgressArtifact(f"event features, {len(scenes)} scenes -> {url_name(cfg.store)}")
    stats: dict[str, int] = {}
    failed: dict[str, str] = {}
    with gpu_slot():
        if store_exists(cfg.store, cfg.storage_options):  # features need the drafter only
            drafter = load_eventgpt(cfg.drafter, cfg.load, double_adaptor=cfg.events.double_feature_adaptor,
                                    storage_options=cfg.storage_options)
            writer = StoreWriter(cfg.store, {}, cfg.storage_options)
        else:  # a new store is created with the full metadata, which names both models
            drafter, target = load_models(cfg)
            writer = StoreWriter(cfg.store, store_meta(cfg, drafter, target), cfg.storage_options)
            del target
        for i, scene in enumerate(scenes):
            try:
                scene_features(scene, drafter, cfg.events, writer, cfg.storage_options, stats)
            except BadInputError as exc:  # recorded per pair again by the extraction
                failed[scene.scene_id] = str(exc)
            progress((i + 1) / len(scenes), f"{i + 1}/{len(scenes)} scenes")
    return FeaturesRef(store_url=cfg.store, scenes=len(scenes), computed=stats.get("features_computed", 0),
                       cached=stats.get("features_cached", 0), failed=failed)


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


def drafter_fingerprint(cfg: ExtractConfig) -> str:
    """The drafter fingerprint a store manifest records (= `load_eventgpt(...).fingerprint`),
    computed from the checkpoint files without loading the model."""
    return _drafter_fingerprint(cfg.drafter, cfg.load.clip_path, cfg.events.double_feature_adaptor,
                                cfg.storage_options)


@task(name="plan-nightly", task_run_name="plan-nightly")
def plan_nightly(cfg: ExtractConfig) -> NightlyPlan:
    """Pairs of the dataset not committed yet, and the drafter's fingerprint now vs the store's.
    After a drafter change new pairs go to ``<store>-drafter-<fingerprint>``: what that store has
    committed counts as committed too."""
    committed: set[str] = set()
    store_drafter = drafter_store = None
    fingerprint = drafter_fingerprint(cfg)
    if store_exists(cfg.store, cfg.storage_options):
        reader = StoreReader(cfg.store, cfg.storage_options)
        committed = set(reader.pair_ids(status=None))
        store_drafter = reader.info.meta.model_fingerprint("drafter")
    if store_drafter is not None and store_drafter != fingerprint:
        drafter_store = derived_store_url(cfg.store, "drafter", fingerprint)
    drafter_store_exists = drafter_store is not None and store_exists(drafter_store, cfg.storage_options)
    if drafter_store_exists:
        committed |= set(StoreReader(drafter_store, cfg.storage_options).pair_ids(status=None))
    new = [p.pair_id for p in plan_pairs(cfg) if p.pair_id not in committed]
    plan = NightlyPlan(new_pairs=new, committed=len(committed), drafter_fingerprint=fingerprint,
                       store_drafter_fingerprint=store_drafter, drafter_store=drafter_store,
                       drafter_store_exists=drafter_store_exists)
    get_run_logger().info("%d new pairs (%d committed); drafter %s", len(new), len(committed),
                          "CHANGED" if plan.drafter_changed else "unchanged")
    return plan


def feature_scene_ids(cfg: ExtractConfig, only_pairs: list[str] | None = None) -> list[str]:
    """Scenes whose event features the extraction of cfg (restricted to ``only_pairs``) will need."""
    pairs = plan_pairs(cfg)
    if only_pairs is not None:
        keep = set(only_pairs)
        pairs = [p for p in pairs if p.pair_id in keep]
    if cfg.mode == "retf":
        ok = set(StoreReader(cfg.source_store, cfg.storage_options).pair_ids(status="ok"))
        pairs = [p for p in pairs if p.pair_id in ok]
    return list(dict.fromkeys(p.scene.scene_id for p in pairs))
