"""Every stage's settings as pydantic models. They are also the Prefect flows' parameters, so the
UI renders them as forms (every field has a title and a description; the common path first,
settings rarely changed last, titled "Advanced: ...") and the server validates them. Only this module
and the CLI read the environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from egpt_core import credentials
from egpt_core.form_schema import compact_optional_fields

if TYPE_CHECKING:
    from egpt_core.fsio import Location

Dtype = Literal["float32", "bfloat16", "float16"]
Quant = Literal["none", "nf4"]
ExtractMode = Literal["shared_prefix", "independent", "retf"]
AdapterLevel = Literal["L1", "L2", "L3", "L4", "L5", "B1", "L5F"]

#: the key Prefect's UI puts in values it has not resolved ({"__prefect_kind": "json", "value": "<text>"})
UI_MARKER = "__prefect_kind"
#: a placeholder without a value: the field is left unset (its default applies)
_UNSET = object()


def _resolve_ui_markers(value: Any) -> Any:
    """Parameters as Prefect's UI builds them, with its placeholders resolved the way its server would.

    In "Use JSON Input" mode the UI sends a section as ``{"__prefect_kind": "json", "value": "<JSON
    text>"}``; the server parses that text but not the placeholders *inside* it, so e.g. an untouched
    ``storage_options`` arrives as ``{"__prefect_kind": "json"}`` (no value: the field is unset) and a
    filled one as ``{"__prefect_kind": "json", "value": "{...}"}``. Unresolvable kinds (jinja,
    workspace variables) are refused by name.
    """
    if isinstance(value, list):
        return [v for v in (_resolve_ui_markers(v) for v in value) if v is not _UNSET]
    if not isinstance(value, dict):
        return value
    if UI_MARKER in value:
        kind = value[UI_MARKER]
        if kind in ("json", "none") and "value" not in value:
            return _UNSET
        if kind == "json":
            text = value["value"]
            try:
                return _resolve_ui_markers(json.loads(text) if isinstance(text, str) else text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"a field in JSON input mode holds invalid JSON: {exc}") from None
        if kind == "none":
            return _resolve_ui_markers(value["value"])
        raise ValueError(f"unresolved Prefect UI placeholder {UI_MARKER}={kind!r}: enter the value itself")
    return {k: r for k, v in value.items() if (r := _resolve_ui_markers(v)) is not _UNSET}


def _form_order(schema: dict[str, Any], model: type) -> None:
    """The form's field order: the model's ``form_first`` fields, then the rest, "Advanced: ..." last;
    optional fields without the UI's 'Property is type "None"' lines (egpt_core.form_schema)."""
    first = getattr(model, "form_first", ())
    props = schema.get("properties") or {}
    compact_optional_fields(props)

    def rank(name: str) -> tuple[int, int]:
        if name in first:
            return 0, first.index(name)
        return (2 if str(props[name].get("title", "")).startswith("Advanced:") else 1), 0

    schema["properties"] = {name: props[name] for name in sorted(props, key=rank)}


class _Model(BaseModel):
    # errors name the field and the rule, never echo the value (a credential pasted into the wrong field)
    # no inf/nan in any float setting (`lr: inf` would pass `gt=0` and train to NaN)
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False,
                              json_schema_extra=_form_order)
    #: fields shown first in the Prefect form (then the others in class order, "Advanced: ..." last)
    form_first: ClassVar[tuple[str, ...]] = ()
    #: fields that do not change what a run computes: left out of run fingerprints (resume checks), the
    #: pipeline's content-addressed run directories and task cache keys (docs/CONTRACTS.md "Config rules")
    NON_SEMANTIC: ClassVar[frozenset[str]] = frozenset({"storage_options"})

    def semantic_settings(self) -> dict[str, Any]:
        """The settings that decide what a run computes (JSON-able; ``NON_SEMANTIC`` fields left out)."""
        return self.model_dump(mode="json", exclude=set(self.NON_SEMANTIC))

    def location(self, url: str) -> Location:
        """``url`` (one of this config's URL settings) as a Location reached with the config's storage options."""
        from egpt_core.fsio import Location

        return Location(url, getattr(self, "storage_options", None) or None)

    @model_validator(mode="before")
    @classmethod
    def _ui_markers(cls, data: Any) -> Any:
        return _resolve_ui_markers(data) if isinstance(data, dict) else data


def same_url(a: str, b: str) -> bool:
    """Two settings naming one location (a trailing slash aside)."""
    return str(a).rstrip("/") == str(b).rstrip("/")


def _no_credentials(options: dict[str, Any]) -> dict[str, Any]:
    if paths := credentials.credential_paths(options):
        raise ValueError(credentials.refusal_message(paths))
    return options


#: fsspec options of a config: non-secret settings only (egpt_core.credentials); the server refuses
#: credentials in them too (the JSON schema below), so a form never stores one
StorageOptions = Annotated[dict[str, Any], AfterValidator(_no_credentials)]


def _storage_options_field() -> Any:
    return Field(default_factory=dict, title="Storage options",
                 description="fsspec options of every URL, non-secret settings only, e.g. {\"endpoint_url\": "
                 "\"https://minio.internal\"} or {\"profile\": \"egpt\"}. Credentials come from the machine (AWS "
                 f"chain) or, in Prefect runs, from the Secret block named by \"{credentials.SECRET_BLOCK_OPTION}\"; "
                 "a credential here is refused.",
                 json_schema_extra=credentials.storage_options_json_schema())


# --------------------------------------------------------------------------------------------------
# models / extraction (stages 1-2)
# --------------------------------------------------------------------------------------------------
class ModelLoadConfig(_Model):
    """How a checkpoint directory is loaded."""

    model_config = ConfigDict(title="Checkpoint loading")

    dtype: Dtype = Field("bfloat16", title="Compute dtype", description="float32 on CPU for exactness")
    quant: Quant = Field("none", title="Quantisation", description="'nf4' = bitsandbytes 4-bit NF4, double quant")
    device: str = Field("auto", title="Device", description="'auto' = cuda if available else cpu")
    clip_path: str | None = Field(None, title="Advanced: CLIP tower directory",
                                  description="EventGPT only: local CLIP vision tower directory (config + "
                                  "preprocessing; its weights only when the checkpoint has none), overriding "
                                  "config.json's mm_visual_tower")


class EventRenderConfig(_Model):
    """How event streams become event frames (DESIGN.md §4.1)."""

    model_config = ConfigDict(title="Event rendering")

    n_frames: int = Field(1, ge=1, le=16, title="Event frames per scene",
                          description="event frames per scene (equal event-count splits)")
    sensor_size: tuple[int, int] | None = Field(None, title="Sensor size",
                                                description="(height, width); empty = data-dependent canvas")
    source: Literal["events", "images"] = Field("events", title="Source",
                                                description="render from event .npy/.h5, or read pre-rendered PNGs")
    double_feature_adaptor: bool = Field(False, title="Research: double feature adaptor",
                                         description="research compatibility: apply the feature adaptor twice (bug B1)")


def _events_field() -> Any:
    """The ``events`` setting of the stages that run the drafter on event frames."""
    return Field(EventRenderConfig(), title="Advanced: event rendering",
                 description="how event streams become the drafter's frames")


def _video_frames_field() -> Any:
    """The ``n_video_frames`` setting of the stages that run the target on videos."""
    return Field(8, ge=1, le=64, title="Advanced: video frames",
                 description="frames sampled uniformly from each video for the target")


class ExtractConfig(_Model):
    """Stage 1-2 settings: `egpt extract`."""

    model_config = ConfigDict(title="Extraction (stages 1-2)")

    dataset: str = Field(..., title="Dataset", description="dataset root (URL or path) holding "
                         "EventGPT_Instruction_Subset.json, or that JSON file")
    drafter: str = Field(..., title="Drafter checkpoint", description="EventGPT checkpoint directory (URL or path)")
    target: str = Field(..., title="Target checkpoint", description="Video-LLaVA checkpoint directory (URL or path)")
    store: str = Field(..., title="Store", description="hidden-state store URL (path, file://, memory://, s3://)")
    storage_options: StorageOptions = _storage_options_field()
    mode: ExtractMode = Field("shared_prefix", title="Mode", description="shared_prefix: the target is teacher-forced "
                              "on the drafter's response; independent: each model generates (research pairing); "
                              "retf: re-extract one side of an existing store teacher-forced")
    batch_size: int = Field(8, ge=1, le=512, title="Batch size", description="pairs per forward pass")
    max_new_tokens: int = Field(50, ge=1, le=2048, title="Max new tokens", description="generated tokens per pair")
    max_scenes: int | None = Field(None, ge=1, title="Max scenes", description="only the first N scenes; empty = all")
    max_questions: int | None = Field(None, ge=1, title="Max questions",
                                      description="only the first N questions per scene; empty = all")
    shard_groups: int = Field(1, ge=1, title="Shard groups (fan-out)",
                              description="split the pairs into this many groups, each its own flow run on any worker")
    load: ModelLoadConfig = Field(ModelLoadConfig(), title="Model loading",
                                  description="dtype, quantisation and device of both models")
    questions: str | None = Field(None, title="Advanced: questions file",
                                  description="empty = the dataset's questions.json")
    retf_side: Literal["drafter", "target"] = Field("drafter", title="Advanced: retf side",
                                                    description="retf mode: which side to re-extract")
    source_store: str | None = Field(None, title="Advanced: retf source store",
                                     description="retf mode: store whose token ids are re-used; empty = the store")
    min_tokens: int = Field(5, ge=1, title="Advanced: min tokens",
                            description="pairs with fewer generated tokens are recorded as skipped")
    shard_size: int = Field(64, ge=1, title="Advanced: shard size", description="pairs per committed shard")
    store_dtype: Literal["bfloat16", "float16", "float32", "float8_e4m3fn"] = Field(
        "bfloat16", title="Advanced: store dtype",
        description="dtype of the hidden states in the store; float32 for exact checks (e.g. measured vs "
        "simulated acceptance); float8_e4m3fn halves the bytes of bf16 (one float32 scale per row, "
        "decoded to bf16 on read)")
    lm_head_dtype: Literal["model", "float32"] = Field(
        "model", title="Advanced: LM head dtype",
        description="target LM head in the store: as loaded ('model'), or the checkpoint's own values "
        "in float32 (exact token metrics: near-tie argmaxes over the vocabulary can flip in bf16)")
    events: EventRenderConfig = _events_field()
    n_video_frames: int = _video_frames_field()
    frame_sampling: Literal["linspace", "model_card"] = Field(
        "linspace", title="Advanced: video frame sampling",
        description="target video frames: 'linspace' = floor(linspace(0, n-1, k)) (research default); "
        "'model_card' = arange(0, n, n/k) as in the Video-LLaVA-7B-hf model card")
    group_index: int | None = Field(None, ge=0, title="Advanced: only this shard group",
                                    description="set by the fan-out for each group's flow run; empty = all groups")

    @model_validator(mode="after")
    def _group_and_retf_rules(self) -> ExtractConfig:
        """A group inside the fan-out; retf writes a new store from another one (stores never change after commit)."""
        if self.group_index is not None and self.group_index >= self.shard_groups:
            raise ValueError(f"group_index: {self.group_index} must be < shard_groups ({self.shard_groups})")
        if self.mode == "retf" and (not self.source_store or same_url(self.source_store, self.store)):
            raise ValueError("source_store: retf mode writes a NEW store: set source_store to the store whose token "
                             "ids are re-used and store to a different URL (stores are never modified after commit)")
        return self


# --------------------------------------------------------------------------------------------------
# adapters (stage 3a)
# --------------------------------------------------------------------------------------------------
class AdapterConfig(_Model):
    """Architecture of one alignment adapter (research defaults)."""

    model_config = ConfigDict(title="Adapter architecture")

    level: AdapterLevel = Field("L4", title="Level", description="L1..L5, B1, L5F (README: adapter levels)")
    hidden_size: int | None = Field(None, gt=0, title="Advanced: hidden size", description="empty = the store's hidden size")
    bottleneck_dim: int | None = Field(None, gt=0, title="Advanced: bottleneck size",
                                       description="empty = 1024 for L3, else 256")
    num_blocks: int = Field(3, ge=1, title="Advanced: blocks", description="L2 blocks / L3 blocks")
    num_heads: int = Field(8, ge=1, title="Advanced: attention heads", description="L4/L5/B1/L5F attention heads")
    num_layers: int = Field(1, ge=1, title="Advanced: layers", description="L4/L5/B1/L5F transformer layers")
    ffn_dim: int = Field(2048, ge=1, title="Advanced: FFN size", description="feed-forward width of the attention levels")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, title="Advanced: dropout", description="dropout probability")
    max_seq_len: int = Field(512, ge=1, title="Advanced: max sequence length",
                             description="positional table size (L5, B1, L5F)")
    prediction_weight: float = Field(0.5, ge=0.0, le=1.0, title="Advanced: prediction weight",
                                     description="L5/B1/L5F next-position term weight")
    separate_prediction_head: bool = Field(True, title="Advanced: separate prediction head",
                                           description="off = research objective: one output for y[t] and y[t+1]")


class _AdapterTraining(_Model):
    """The optimisation settings of adapter training (shared by the stage and the pipeline entry)."""

    #: a run extended to more epochs is the same run (its checkpoint continues), so epochs is not identity
    NON_SEMANTIC = frozenset({"storage_options", "device", "out", "data_cache_gb", "epochs"})

    adapter: AdapterConfig = Field(AdapterConfig(), title="Adapter", description="level and architecture")
    epochs: int = Field(50, ge=1, title="Epochs", description="maximum epochs (early stopping may end sooner)")
    batch_size: int = Field(64, ge=1, title="Batch size", description="pairs per step")
    lr: float = Field(1e-3, gt=0, title="Learning rate", description="peak learning rate (AdamW, cosine decay)")
    device: str = Field("auto", title="Device", description="'auto' = cuda if available else cpu")
    weight_decay: float = Field(0.01, ge=0, title="Advanced: weight decay", description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, title="Advanced: warmup steps", description="linear warmup steps")
    min_lr: float = Field(1e-6, ge=0, title="Advanced: min learning rate", description="floor of the cosine decay")
    grad_clip: float = Field(1.0, gt=0, title="Advanced: gradient clip", description="max gradient norm")
    early_stopping: int = Field(10, ge=1, title="Advanced: early-stopping patience",
                                description="epochs without a better validation loss before stopping")
    data_cache_gb: float | None = Field(
        None, ge=0, title="Advanced: data in RAM up to (GB)",
        description="keep the stores' tensor shards in RAM (per process) when they total at most this many GB; "
        "larger data is read per pair with byte-range reads (global shuffle either way). None: half the memory "
        "available on the node, divided by its local ranks (the run's log and config.json say which path and why)",
    )


class TrainAdapterConfig(_AdapterTraining):
    """Stage 3a settings: `egpt train-adapter`."""

    model_config = ConfigDict(title="Adapter training (stage 3a)")
    form_first = ("adapter", "train", "val", "val_fraction", "out")

    train: list[str] = Field(..., min_length=1, title="Train stores", description="train store URLs (at least one)")
    val: str | None = Field(None, title="Validation store",
                            description="empty = a seeded split by scene of the train stores")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, title="Validation fraction",
                                description="share of scenes held out when there is no validation store")
    out: str = Field("egpt_runs/adapter", title="Run directory", description="run directory URL")
    storage_options: StorageOptions = _storage_options_field()
    seed: int = Field(0, title="Advanced: seed", description="split, initialisation and shuffling seed")
    allow_mixed_models: bool = Field(False, title="Advanced: allow mixed model pairs",
                                     description="train on stores of different drafter/target models (refused by default)")


class _PipelineEntry(_Model):
    """A stage's settings minus the fields the pipeline assigns itself (flows/plan.py), so that what
    a form shows is what runs."""

    @model_validator(mode="before")
    @classmethod
    def _from_stage_config(cls, data: Any) -> Any:
        """A stage config is taken by the fields set in it; one the pipeline assigns is refused."""
        return data.model_dump(exclude_unset=True) if isinstance(data, BaseModel) and not isinstance(data, cls) else data


class PipelineAdapterConfig(_AdapterTraining, _PipelineEntry):
    """One adapter the pipeline trains: what to train and how. Its data (the pipeline's stores), its
    validation split (the pipeline's `val_fraction`/`split_seed`), storage options and run directory
    come from the pipeline."""

    model_config = ConfigDict(title="Adapter to train")


# --------------------------------------------------------------------------------------------------
# L6 LoRA (stage 3b)
# --------------------------------------------------------------------------------------------------
class _LoraTraining(_Model):
    """The settings of L6 training shared by the stage and the pipeline entry."""

    #: as for adapters: more epochs continue the same run
    NON_SEMANTIC = frozenset({"storage_options", "out", "epochs"})

    val_store: str | None = Field(None, title="Validation store",
                                  description="empty = a seeded split by scene of the train store")
    load: ModelLoadConfig = Field(ModelLoadConfig(quant="nf4"), title="Drafter loading",
                                  description="dtype, quantisation (QLoRA: nf4) and device of the drafter")
    rank: int = Field(16, ge=1, title="LoRA rank", description="rank of the LoRA matrices")
    alpha: int = Field(32, ge=1, title="LoRA alpha", description="LoRA scaling numerator (scale = alpha / rank)")
    epochs: int = Field(20, ge=1, title="Epochs", description="maximum epochs (early stopping may end sooner)")
    lr: float = Field(1e-4, gt=0, title="Learning rate", description="peak learning rate")
    dropout: float = Field(0.05, ge=0, lt=1, title="Advanced: LoRA dropout", description="dropout on the LoRA input")
    mse_weight: float = Field(1.0, ge=0, title="Advanced: MSE weight", description="weight of the hidden-state MSE term")
    cos_weight: float = Field(0.5, ge=0, title="Advanced: cosine weight", description="weight of the (1 - cosine) term")
    ce_weight: float = Field(0.1, ge=0, title="Advanced: CE weight",
                             description="weight of the cross-entropy against the target's tokens")
    micro_batch: int = Field(1, ge=1, title="Advanced: micro batch", description="pairs per forward pass")
    grad_accum: int = Field(16, ge=1, title="Advanced: gradient accumulation", description="micro batches per step")
    weight_decay: float = Field(0.01, ge=0, title="Advanced: weight decay", description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, title="Advanced: warmup steps", description="linear warmup steps")
    min_lr: float = Field(1e-6, ge=0, title="Advanced: min learning rate", description="floor of the cosine decay")
    grad_clip: float = Field(1.0, gt=0, title="Advanced: gradient clip", description="max gradient norm")
    early_stopping: int = Field(5, ge=1, title="Advanced: early-stopping patience",
                                description="epochs without a better validation loss before stopping")
    gradient_checkpointing: bool = Field(True, title="Advanced: gradient checkpointing",
                                         description="trade compute for activation memory")


class LoraTrainConfig(_LoraTraining):
    """Stage 3b settings: `egpt train-lora`."""

    model_config = ConfigDict(title="L6 LoRA training (stage 3b)")
    form_first = ("store", "drafter", "dataset", "out", "val_store", "val_fraction")

    store: str = Field(..., title="Train store", description="store with token ids + target rows + LM head")
    drafter: str = Field(..., title="Drafter checkpoint", description="EventGPT checkpoint directory")
    dataset: str | None = Field(None, title="Dataset",
                                description="dataset root (needed when the store has no cached event features)")
    out: str = Field("egpt_runs/lora", title="Run directory", description="output directory URL")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, title="Validation fraction",
                                description="share of scenes held out when there is no validation store")
    storage_options: StorageOptions = _storage_options_field()
    seed: int = Field(0, title="Advanced: seed", description="split, initialisation and shuffling seed")


class PipelineLoraConfig(_LoraTraining, _PipelineEntry):
    """The L6 branch of the pipeline. Store, drafter and dataset default to the extraction's; the
    run directory, split, seed and storage options come from the pipeline."""

    model_config = ConfigDict(title="L6 LoRA settings")
    form_first = ("store", "drafter", "dataset")

    store: str | None = Field(None, title="Train store", description="empty = the extraction store")
    drafter: str | None = Field(None, title="Drafter checkpoint", description="empty = the extraction's drafter")
    dataset: str | None = Field(None, title="Dataset", description="empty = the extraction's dataset")


# --------------------------------------------------------------------------------------------------
# evaluation (stage 4)
# --------------------------------------------------------------------------------------------------
class TimingConfig(_Model):
    """Per-token costs (ms) for the speedup model; measure them, don't guess."""

    model_config = ConfigDict(title="Per-token timing (speedup model)")

    drafter_prefill_ms: float = Field(..., gt=0, title="Drafter prefill (ms)", description="drafter prompt prefill")
    drafter_step_ms: float = Field(..., gt=0, title="Drafter step (ms)", description="drafter decode step per token")
    target_prefill_ms: float = Field(..., gt=0, title="Target prefill (ms)", description="target prompt prefill")
    target_step_ms: float = Field(..., gt=0, title="Target step (ms)", description="target decode step per token")
    verify_ms_per_token: float = Field(0.0, ge=0, title="Verify per draft token (ms)",
                                       description="extra cost per verified draft token")
    adapter_ms: float = Field(0.0, ge=0, title="Adapter (ms)", description="adapter cost per drafted token")
    output_tokens: int = Field(50, ge=1, title="Output tokens", description="response length the speedup assumes")


class EvalConfig(_Model):
    """Stage 4 settings: `egpt evaluate`."""

    model_config = ConfigDict(title="Evaluation (stage 4)")
    NON_SEMANTIC = frozenset({"storage_options", "device"})

    store: str = Field(..., title="Store", description="store URL to evaluate on")
    extra_stores: list[str] = Field(default_factory=list, title="Advanced: extra stores",
                                    description="more stores of the same models evaluated together with the store "
                                    "(e.g. pairs added after a drafter change); split 'val' splits all their scenes at once")
    out: str = Field(..., title="Output directory", description="where metrics.json, report.md and plots go")
    identity: bool = Field(False, title="Identity", description="evaluate raw drafter rows")
    adapter_run: str | None = Field(None, title="Adapter run", description="adapter run directory")
    lora: str | None = Field(None, title="L6 LoRA", description="L6 peft adapter directory (evaluated on retf rows)")
    name: str | None = Field(None, title="Name",
                             description="run name in reports/comparisons; empty = derived from the prediction source")
    split: Literal["all", "val"] = Field("all", title="Pairs", description="'val' = only the validation scenes of the "
                                         "seeded split by scene (when there is no separate test store)")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, title="Validation fraction",
                                description="split 'val': share of scenes held out")
    split_seed: int = Field(0, title="Split seed", description="split 'val': seed of the split by scene")
    timing: TimingConfig | None = Field(None, title="Timing", description="per-token costs for the speedup estimate")
    timing_file: str | None = Field(None, title="Timing file", description="JSON file with the timing fields")
    storage_options: StorageOptions = _storage_options_field()
    device: str = Field("auto", title="Device", description="'auto' = cuda if available else cpu")
    adapter_which: str = Field("best", title="Advanced: adapter checkpoint",
                               description="checkpoint in the adapter run: 'best', 'last' or a .safetensors name")
    taus: list[float] = Field(default_factory=lambda: [0.80, 0.85, 0.90, 0.95], title="Advanced: cosine thresholds",
                              description="acceptance thresholds tau of the cosine metrics")
    gammas: list[int] = Field(default_factory=lambda: list(range(1, 9)), title="Advanced: draft lengths",
                              description="draft lengths gamma of the speedup estimate")
    max_positions: int = Field(50, ge=1, title="Advanced: max positions",
                               description="per-position statistics up to this position")
    batch_size: int = Field(64, ge=1, title="Advanced: batch size", description="pairs per forward pass")

    @model_validator(mode="after")
    def _one_prediction_source(self) -> EvalConfig:
        """Exactly one of adapter_run, lora and identity says what is evaluated."""
        chosen = [name for name, on in (("adapter_run", bool(self.adapter_run)), ("lora", bool(self.lora)),
                                        ("identity", self.identity)) if on]
        if len(chosen) != 1:
            raise ValueError("adapter_run, lora, identity: set exactly one prediction source (adapter_run = --adapter "
                             f"RUN, lora = --lora DIR, identity = --identity); got {', '.join(chosen) or 'none'}")
        return self


# --------------------------------------------------------------------------------------------------
# speculative decoding (stage 5)
# --------------------------------------------------------------------------------------------------
SpeculativeMode = Literal["resync", "research"]


class SpeculateConfig(_Model):
    """Stage 5 settings: `egpt speculate` (one drafter configuration; the target-only baseline runs
    in the same run on the same pairs)."""

    model_config = ConfigDict(title="Speculative decoding (stage 5)")

    target: str = Field(..., title="Target checkpoint", description="Video-LLaVA checkpoint directory (URL or path)")
    drafter: str | None = Field(None, title="Drafter checkpoint",
                                description="EventGPT checkpoint directory (base, or an L6-merged export)")
    store: str | None = Field(None, title="Store", description="take the pairs (its ok pairs) and the target LM head "
                              "from this store; a shared_prefix / retf store of the same pairs also cross-checks "
                              "measured against simulated acceptance")
    dataset: str | None = Field(None, title="Dataset",
                                description="dataset root; empty = the dataset the store was extracted from")
    adapter_run: str | None = Field(None, title="Adapter run", description="adapter run directory (L1..L5, B1, L5F)")
    lora: str | None = Field(None, title="L6 LoRA", description="L6 peft adapter directory, merged into the drafter "
                             "in memory")
    identity: bool = Field(False, title="Identity", description="raw drafter rows through the target's LM head "
                           "(no adapter)")
    target_only: bool = Field(False, title="Target only", description="no drafter: only the target-only greedy baseline")
    gammas: list[int] = Field(default_factory=lambda: [1, 3, 5], title="Draft lengths",
                              description="draft windows gamma to measure")
    mode: SpeculativeMode = Field("resync", title="Mode", description="'resync': draft from the accepted prefix (KV "
                                  "rollback); 'research': windows of the drafter's own answer (the research benchmark)")
    out: str = Field(..., title="Output directory",
                     description="output directory URL (sd_pairs.parquet, sd_metrics.json, report.md, plots)")
    storage_options: StorageOptions = _storage_options_field()
    name: str | None = Field(None, title="Name", description="configuration name in reports; empty = derived from "
                             "the source")
    load: ModelLoadConfig = Field(ModelLoadConfig(), title="Model loading",
                                  description="dtype, quantisation and device of both models")
    max_new_tokens: int = Field(50, ge=1, le=2048, title="Max new tokens", description="generated tokens per pair")
    max_pairs: int | None = Field(None, ge=1, title="Max pairs", description="at most this many pairs (in order); "
                                  "empty = all")
    questions: str | None = Field(None, title="Advanced: questions file",
                                  description="empty = the dataset's questions.json")
    adapter_which: str = Field("best", title="Advanced: adapter checkpoint",
                               description="checkpoint in the adapter run: 'best', 'last' or a file name")
    max_scenes: int | None = Field(None, ge=1, title="Advanced: max scenes",
                                   description="only the first N scenes; empty = all")
    max_questions: int | None = Field(None, ge=1, title="Advanced: max questions",
                                      description="only the first N questions per scene; empty = all")
    split: Literal["all", "val"] = Field("all", title="Advanced: pairs",
                                         description="'val' = only the held-out scenes of the seeded split by scene")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, title="Advanced: validation fraction",
                                description="split 'val': share of scenes held out")
    split_seed: int = Field(0, title="Advanced: split seed", description="split 'val': seed of the split by scene")
    drafter_device: str | None = Field(None, title="Advanced: drafter device",
                                       description="put the drafter on another device (e.g. cuda:1); "
                                       "empty = the load device")
    events: EventRenderConfig = _events_field()
    n_video_frames: int = _video_frames_field()
    prefill_hiding: bool = Field(True, title="Advanced: prefill hiding",
                                 description="run the drafter's vision + prefill + first drafts concurrently "
                                 "with the target's prefill (threads on CPU; CUDA streams or a second device)")
    warmup_pairs: int = Field(1, ge=0, title="Advanced: warm-up pairs",
                              description="pairs run once untimed before measuring")


class SDConfigSpec(_Model):
    """One configuration of an end-to-end benchmark (the research `--configs` entries)."""

    model_config = ConfigDict(title="Benchmark configuration")

    kind: Literal["target_only", "identity", "adapter", "lora"] = Field(
        ..., title="Kind", description="target_only (baseline), identity (raw drafter), adapter run, or L6 LoRA")
    name: str | None = Field(None, title="Name", description="row name; empty = derived")
    adapter_run: str | None = Field(None, title="Adapter run", description="adapter run directory (kind 'adapter')")
    lora: str | None = Field(None, title="L6 LoRA", description="L6 peft adapter directory, merged in memory "
                             "(kind 'lora')")
    drafter: str | None = Field(None, title="Drafter checkpoint",
                                description="drafter checkpoint for this configuration (e.g. an L6-merged "
                                "export); empty = the benchmark's drafter")
    store: str | None = Field(None, title="Cross-check store",
                              description="cross-check store for this configuration (e.g. L6's retf store)")
    mode: SpeculativeMode | None = Field(None, title="Mode", description="empty = the benchmark's mode")


class BenchmarkE2EConfig(_Model):
    """Flow `benchmark_e2e`: several configurations measured on the same pairs."""

    model_config = ConfigDict(title="End-to-end speculative benchmark")

    base: SpeculateConfig = Field(..., title="Shared settings",
                                  description="target, drafter, pairs and loop settings shared by every "
                                  "configuration (its own source, name and output directory are ignored)")
    configs: list[SDConfigSpec] = Field(default_factory=lambda: [SDConfigSpec(kind="target_only"),
                                                                 SDConfigSpec(kind="identity")],
                                        title="Configurations", description="what to measure, like the research "
                                        "benchmark's --configs")
    out: str = Field(..., title="Output directory",
                     description="where each configuration's run and the comparison go")


class PipelineSpeculativeConfig(_Model):
    """Stage 5 inside `pipeline`: measured on the evaluation's pairs (its held-out scenes)."""

    model_config = ConfigDict(title="Speculative decoding (measured)")

    gammas: list[int] = Field(default_factory=lambda: [1, 3, 5], title="Draft lengths",
                              description="draft windows gamma to measure")
    mode: SpeculativeMode = Field("resync", title="Mode", description="'resync' (draft from the accepted prefix) or "
                                  "'research' (windows of the drafter's own answer)")
    configs: list[str] | None = Field(None, title="Configurations", description="subset of 'target_only', "
                                      "'identity', adapter names (L1, L4, ...), 'L6'; empty = all")
    max_pairs: int | None = Field(None, ge=1, title="Max pairs", description="at most this many evaluated pairs; "
                                  "empty = all")
    load: ModelLoadConfig | None = Field(None, title="Advanced: model loading",
                                         description="empty = the extraction's load settings")
    prefill_hiding: bool = Field(True, title="Advanced: prefill hiding",
                                 description="overlap the drafter's prefill with the target's")
    warmup_pairs: int = Field(1, ge=0, title="Advanced: warm-up pairs",
                              description="pairs run once untimed before measuring")


# --------------------------------------------------------------------------------------------------
# pipeline (flows)
# --------------------------------------------------------------------------------------------------
class PipelineConfig(_Model):
    """End-to-end: extract, train the configured adapters and/or L6, evaluate each, compare."""

    model_config = ConfigDict(title="Pipeline")

    extract: ExtractConfig = Field(..., title="Extraction",
                                   description="dataset, models, store (and its storage options) of stages 1-2")
    adapters: list[PipelineAdapterConfig] = Field(
        default_factory=list, title="Adapters",
        description="adapters to train on the extracted store, each evaluated; empty = none")
    lora: PipelineLoraConfig | None = Field(None, title="L6 LoRA",
                                            description="train L6 on the drafter and evaluate it; empty = skip L6")
    out: str = Field("egpt_runs", title="Output directory",
                     description="where runs, evaluations and the report go (URL or path)")
    evaluate_identity: bool = Field(True, title="Evaluate the raw drafter",
                                    description="also evaluate the drafter rows without an adapter (the baseline)")
    test_store: str | None = Field(None, title="Advanced: test store",
                                   description="evaluation store; empty = the held-out scenes of the extraction store")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, title="Advanced: held-out fraction",
                                description="without a test store: share of scenes held out from training "
                                "(adapters, L6) and evaluated")
    split_seed: int = Field(0, title="Advanced: split seed", description="seed of the split by scene")
    timing: TimingConfig | None = Field(None, title="Advanced: timing",
                                        description="per-token costs for the speedup estimate; empty = none")
    speculative: PipelineSpeculativeConfig | None = Field(
        None, title="Speculative decoding (stage 5)",
        description="after evaluation: real draft->verify runs of target_only, identity, each adapter and L6 on "
        "the evaluated pairs, measured; empty = skip")


# --------------------------------------------------------------------------------------------------
# process environment (the only place outside the CLI that reads it)
# --------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Local cache for fetched checkpoints: $EGPT_CACHE_DIR, default ~/.cache/egpt."""
    return Path(os.environ.get("EGPT_CACHE_DIR") or Path.home() / ".cache" / "egpt")


def worker_gpu_limit() -> str | None:
    """$EGPT_GPU_LIMIT: the Prefect concurrency limit a worker's GPU sections occupy (e.g. gpu:<node>)."""
    return os.environ.get("EGPT_GPU_LIMIT") or None


#: environment variables that hold storage credentials (values are scrubbed from logs)
CREDENTIAL_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY",
                       "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING")


def credential_env_values() -> list[str]:
    """The storage credentials in this process's environment (to keep them out of log records)."""
    return [v for name in CREDENTIAL_ENV_VARS if (v := os.environ.get(name))]


def read_config_file(path: str | Path, model: type[BaseModel]) -> dict[str, Any]:
    """The mapping of ``model`` fields in a JSON or YAML file (may be partial); a missing,
    unreadable or malformed file -> ConfigError naming it."""
    from egpt_core.errors import ConfigError

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc})") from None
    is_yaml = str(path).endswith((".yaml", ".yml"))
    try:
        if is_yaml:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(str(exc)) from None
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--config {path}: not valid {'YAML' if is_yaml else 'JSON'} "
                          f"({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of {model.__name__} fields, found "
                          f"{type(data).__name__}")
    return data


def load_config(path: str | Path, model: type[BaseModel]) -> BaseModel:
    """Read a JSON or YAML config file into ``model`` (ConfigError / ValidationError when it is bad)."""
    return model.model_validate(read_config_file(path, model))
