"""How a pipeline derives each stage's config from its PipelineConfig (plain functions, no Prefect).

Every output location is content-addressed: an adapter run lives in
``<out>/adapters/<level>-<hash of its settings + its stores' fingerprints>``, an evaluation in
``<out>/eval/<name>-<hash of store fingerprint + prediction>``, an L6 run in ``<out>/lora/L6-<hash>``,
a re-extracted store at ``<source store>-retf-<drafter fingerprint>``. So changed inputs never
overwrite or resume an older run, and a cache hit always points at files made from those inputs.
"""

from __future__ import annotations

from egpt_core.config import (
    BenchmarkE2EConfig,
    EvalConfig,
    ExtractConfig,
    LoraTrainConfig,
    PipelineConfig,
    SDConfigSpec,
    SpeculateConfig,
    TrainAdapterConfig,
)
from egpt_core.extraction.nightly import derived_store_url
from egpt_core.fingerprint import hash_json
from egpt_core.fsio import canonical_url, is_relative_path, join
from tasks.refs import StoreRef

__all__ = ["adapter_configs", "derived_store_url", "eval_config", "group_configs", "lora_config", "retf_config"]

def _run_id(settings, fingerprints: dict[str, str]) -> str:
    """A run directory's name: what the run computes (its config's ``NON_SEMANTIC`` fields left out:
    a run extended to more epochs stays in its directory) and the fingerprints of its inputs."""
    return hash_json({"settings": settings.semantic_settings(), "inputs": fingerprints})[:10]


def adapter_configs(cfg: PipelineConfig, stores: list[StoreRef]) -> list[tuple[str, TrainAdapterConfig]]:
    """(display name, config) per configured adapter: its own settings, plus what the pipeline
    assigns: the stores to train on, the split by scene held out for evaluation, the storage
    options and a content-addressed run directory."""
    out, seen = [], {}
    for entry in cfg.adapters:
        level = str(entry.adapter.level)
        seen[level] = seen.get(level, 0) + 1
        name = level if seen[level] == 1 else f"{level}-{seen[level]}"
        a = TrainAdapterConfig(**entry.model_dump(), train=[s.url for s in stores], val_fraction=cfg.val_fraction,
                               seed=cfg.split_seed, storage_options=cfg.extract.storage_options)
        fps = {s.url: s.fingerprint for s in stores}
        out.append((name, a.model_copy(update={"out": join(cfg.out, "adapters", f"{level}-{_run_id(a, fps)}")})))
    return out


def lora_store_url(cfg: PipelineConfig) -> str:
    """The store L6 trains on (default: the extraction store)."""
    return cfg.lora.store or cfg.extract.store


def lora_config(cfg: PipelineConfig, store_fingerprints: dict[str, str]) -> LoraTrainConfig:
    """The L6 stage config: the entry's settings, store/drafter/dataset defaulting to the extraction's,
    the pipeline's split, seed and storage options, a content-addressed run directory."""
    entry = cfg.lora.model_dump(exclude={"store", "drafter", "dataset"})
    lora = LoraTrainConfig(**entry, store=lora_store_url(cfg), drafter=cfg.lora.drafter or cfg.extract.drafter,
                           dataset=cfg.lora.dataset or cfg.extract.dataset, val_fraction=cfg.val_fraction,
                           seed=cfg.split_seed, storage_options=cfg.extract.storage_options)
    return lora.model_copy(update={"out": join(cfg.out, "lora", f"L6-{_run_id(lora, store_fingerprints)}")})


def eval_config(cfg: PipelineConfig, store: StoreRef, name: str, extra: list[StoreRef] | None = None,
                **prediction) -> EvalConfig:
    """EvalConfig for one prediction source (identity=True | adapter_run=URL | lora=DIR) on ``store``
    (and ``extra`` stores, evaluated together with it: one held-out split over all their scenes)."""
    split = {} if cfg.test_store else {"split": "val", "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}
    key = {"store": store.fingerprint, "prediction": prediction, "split": split}
    if extra:
        key["extra_stores"] = [s.fingerprint for s in extra]
    return EvalConfig(store=store.url, extra_stores=[s.url for s in extra or []],
                      out=join(cfg.out, "eval", f"{name}-{hash_json(key)[:10]}"), name=name, timing=cfg.timing,
                      storage_options=cfg.extract.storage_options, **split, **prediction)


def retf_config(cfg: ExtractConfig, source: StoreRef, drafter: str, drafter_fingerprint: str) -> ExtractConfig:
    """Re-extract ``source``'s drafter rows teacher-forced with ``drafter`` into a new store.

    The source's dataset is used when it differs from ``cfg.dataset`` (compared as canonical URLs,
    which stores record since extraction writes them). A legacy store that recorded a relative
    path says nothing about where it pointed from here, so ``cfg.dataset`` is used for it (only the
    source's committed pairs are re-extracted either way)."""
    stored = source.dataset
    same_dataset = stored is None or is_relative_path(stored) or canonical_url(stored) == canonical_url(cfg.dataset)
    return cfg.model_copy(update={
        "mode": "retf", "retf_side": "drafter", "drafter": drafter, "source_store": source.url,
        "store": derived_store_url(source.url, "retf", drafter_fingerprint), "group_index": None,
        "dataset": cfg.dataset if same_dataset else source.dataset,
        "questions": cfg.questions if same_dataset else None,
        "max_scenes": cfg.max_scenes if same_dataset else None,
        "max_questions": cfg.max_questions if same_dataset else None,
    })


def group_configs(cfg: ExtractConfig) -> list[ExtractConfig]:
    """One config per shard group (just cfg when it names one group or has a single group)."""
    if cfg.group_index is not None or cfg.shard_groups == 1:
        return [cfg]
    return [cfg.model_copy(update={"group_index": g}) for g in range(cfg.shard_groups)]


def benchmark_config(cfg: PipelineConfig, test: StoreRef, adapters: list[tuple[str, str]],
                     l6: tuple[str, str] | None) -> BenchmarkE2EConfig | None:
    """Stage 5 of a pipeline: target_only, identity, each adapter ``(name, run_url)`` and L6
    ``(merged drafter path, its retf store)`` measured on the evaluated pairs (the held-out scenes
    of the test store), cross-checked against that store's rows. None when nothing is selected."""
    sd = cfg.speculative
    x = cfg.extract
    split = {} if cfg.test_store else {"split": "val", "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}
    base = SpeculateConfig(target=x.target, drafter=x.drafter, store=test.url, dataset=test.dataset or x.dataset,
                           gammas=sd.gammas, mode=sd.mode, max_new_tokens=x.max_new_tokens, max_pairs=sd.max_pairs,
                           load=sd.load or x.load, events=x.events, n_video_frames=x.n_video_frames,
                           prefill_hiding=sd.prefill_hiding, warmup_pairs=sd.warmup_pairs, out="unused",
                           storage_options=x.storage_options, **split)
    specs = [SDConfigSpec(kind="target_only"), SDConfigSpec(kind="identity")]
    specs += [SDConfigSpec(kind="adapter", name=name, adapter_run=url) for name, url in adapters]
    if l6 is not None:
        specs.append(SDConfigSpec(kind="identity", name="L6", drafter=l6[0], store=l6[1]))
    wanted = set(sd.configs) if sd.configs is not None else None
    specs = [s for s in specs if wanted is None or (s.name or s.kind) in wanted]
    if not specs:
        return None
    run_id = hash_json({"store": test.fingerprint, "settings": sd.model_dump(mode="json")})[:10]
    return BenchmarkE2EConfig(base=base, configs=specs, out=join(cfg.out, "speculative", f"bench-{run_id}"))
