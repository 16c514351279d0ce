"""What a nightly re-extraction has to do: the dataset's pairs not committed yet, and whether the
drafter changed since the store was written (new pairs then go to a store of their own)."""

from __future__ import annotations

from dataclasses import dataclass

from egpt_core.config import ExtractConfig
from egpt_core.extraction.run import plan_pairs, store_exists
from egpt_core.models.loading import drafter_fingerprint as checkpoint_drafter_fingerprint
from egpt_core.store import StoreReader


def derived_store_url(base: str, tag: str, fingerprint: str) -> str:
    """A new store beside ``base`` named by what made it different (e.g. a drafter fingerprint)."""
    return f"{str(base).rstrip('/')}-{tag}-{fingerprint[:12]}"


def drafter_fingerprint(cfg: ExtractConfig) -> str:
    """The drafter fingerprint a store manifest records (= `load_eventgpt(...).fingerprint`),
    computed from the checkpoint files without loading the model."""
    return checkpoint_drafter_fingerprint(cfg.drafter, cfg.load.clip_path, cfg.events.double_feature_adaptor,
                                          cfg.storage_options)


@dataclass
class NewPairs:
    """The dataset's uncommitted pairs and the drafter's fingerprint now vs the store's."""

    new_pairs: list[str]
    committed: int
    drafter_fingerprint: str
    store_drafter_fingerprint: str | None
    drafter_store: str | None
    drafter_store_exists: bool


def plan_new_pairs(cfg: ExtractConfig) -> NewPairs:
    """Pairs of cfg's dataset not committed yet. After a drafter change new pairs go to
    ``<store>-drafter-<fingerprint>``: what that store has committed counts as committed too."""
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
    return NewPairs(new_pairs=new, committed=len(committed), drafter_fingerprint=fingerprint,
                    store_drafter_fingerprint=store_drafter, drafter_store=drafter_store,
                    drafter_store_exists=drafter_store_exists)
