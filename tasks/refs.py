"""What tasks return: small JSON-able references to outputs on storage (URL + fingerprint + counts).

They are persisted as Prefect results and read back on a cache hit, so they never hold tensors,
and never storage options (credentials).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class FeaturesRef(BaseModel):
    """Event features cached under a store's `features/` for a shard of scenes."""

    store_url: str
    scenes: int
    computed: int = 0
    cached: int = 0
    failed: dict[str, str] = Field(default_factory=dict, description="scene_id -> reason")


class GroupRef(BaseModel):
    """One extraction group's work (in-process task or dispatched flow run)."""

    store_url: str
    group: int | None
    pairs_total: int = 0
    pairs_processed: int = 0
    shards_committed: int = 0
    flow_run: str | None = Field(None, description="name of the dispatched flow run (fan-out)")


class StoreRef(BaseModel):
    """A committed hidden-state store (its manifest, summarised)."""

    url: str
    fingerprint: str
    mode: str | None = None
    hidden_size: int
    counts: dict[str, int]
    shards: int
    lm_head: bool
    drafter_fingerprint: str | None = None
    dataset: str | None = Field(None, description="the dataset the store was extracted from")


class AdapterRef(BaseModel):
    """A trained adapter run directory."""

    run_url: str
    level: str
    checkpoint_fingerprint: str | None
    best_val_loss: float
    epochs_run: int
    param_count: int
    n_train_pairs: int
    n_val_pairs: int


class DrafterRef(BaseModel):
    """A drafter checkpoint directory (e.g. the LoRA-merged export) and its fingerprint."""

    path: str
    fingerprint: str


class LoraRef(BaseModel):
    """A trained L6 run, its best peft adapter directory and (once exported) the merged drafter."""

    run_url: str
    adapter_dir: str
    fingerprint: str
    summary: dict[str, Any] = Field(default_factory=dict)
    merged_drafter: DrafterRef | None = None


class EvalRef(BaseModel):
    """An evaluation output directory (metrics.json, report.md, plots) and its headline metrics."""

    out_url: str
    name: str
    n_pairs: int
    metrics_fingerprint: str
    summary: dict[str, Any] = Field(default_factory=dict)
    stores: list[str] = Field(default_factory=list, description="the store(s) evaluated")


class ComparisonRef(BaseModel):
    """The comparison table of several evaluations."""

    out_url: str
    markdown: str
    rows: list[dict[str, Any]] = Field(default_factory=list)


class SpeculateRef(BaseModel):
    """A speculative-decoding run directory (sd_pairs.parquet, sd_metrics.json, report, plots) and its
    headline numbers per γ (measured acceptance, speedups, lossless mismatches, cross-checks)."""

    out_url: str
    name: str
    mode: str
    n_pairs: int
    n_failed: int = 0
    metrics_fingerprint: str
    summary: dict[str, Any] = Field(default_factory=dict)


class BenchmarkRef(BaseModel):
    """The end-to-end benchmark of several configurations: their runs and the comparison."""

    out_url: str
    runs: list[SpeculateRef]
    markdown: str


class NightlyPlan(BaseModel):
    """What the nightly run has to do: new pairs and whether the drafter changed."""

    new_pairs: list[str]
    committed: int = Field(description="pairs of the dataset already committed (store + drafter store)")
    drafter_fingerprint: str
    store_drafter_fingerprint: str | None
    drafter_store: str | None = Field(None, description="after a drafter change: the store new pairs go to")
    drafter_store_exists: bool = False

    @property
    def drafter_changed(self) -> bool:
        return self.store_drafter_fingerprint is not None and self.store_drafter_fingerprint != self.drafter_fingerprint


class PipelineResult(BaseModel):
    """Everything a pipeline/nightly run produced."""

    stores: list[StoreRef]
    runs: list[EvalRef]
    comparison: ComparisonRef | None = None
    adapters: list[AdapterRef] = Field(default_factory=list)
    lora: LoraRef | None = None
    notes: list[str] = Field(default_factory=list, description="what the run found (nightly: new pairs, drafter)")
    benchmark: BenchmarkRef | None = None
