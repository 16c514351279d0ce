"""Every stage's settings as pydantic models. They are also the Prefect flows' parameters, so the
UI renders them as forms and validates them. Only this module and the CLI read the environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["float32", "bfloat16", "float16"]
Quant = Literal["none", "nf4"]
ExtractMode = Literal["shared_prefix", "independent", "retf"]
AdapterLevel = Literal["L1", "L2", "L3", "L4", "L5", "B1", "L5F"]


class _Model(BaseModel):
    # no inf/nan in any float setting (`lr: inf` would pass `gt=0` and train to NaN)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------
# models / extraction (stages 1-2)
# --------------------------------------------------------------------------------------------------
class ModelLoadConfig(_Model):
    """How a checkpoint directory is loaded."""

    dtype: Dtype = Field("bfloat16", description="compute dtype (float32 on CPU for exactness)")
    quant: Quant = Field("none", description="'nf4' = bitsandbytes 4-bit NF4, double quant")
    device: str = Field("auto", description="'auto' = cuda if available else cpu")


class EventRenderConfig(_Model):
    """How event streams become event frames (DESIGN.md §4.1)."""

    n_frames: int = Field(1, ge=1, le=16, description="event frames per scene (equal event-count splits)")
    sensor_size: tuple[int, int] | None = Field(None, description="(height, width); None = data-dependent canvas")
    source: Literal["events", "images"] = Field("events", description="render from event .npy/.h5, or read pre-rendered PNGs")
    double_feature_adaptor: bool = Field(False, description="research compatibility: apply the feature adaptor twice (bug B1)")


class ExtractConfig(_Model):
    """Stage 1-2 settings: `egpt extract`."""

    dataset: str = Field(..., description="dataset root (URL or path) holding EventGPT_Instruction_Subset.json")
    questions: str | None = Field(None, description="questions file; default: the dataset's questions.json")
    drafter: str = Field(..., description="EventGPT checkpoint directory (URL or path)")
    target: str = Field(..., description="Video-LLaVA checkpoint directory (URL or path)")
    store: str = Field(..., description="store URL (path, file://, memory://, s3://)")
    mode: ExtractMode = "shared_prefix"
    retf_side: Literal["drafter", "target"] = Field("drafter", description="retf mode: which side to re-extract")
    source_store: str | None = Field(None, description="retf mode: store whose token ids are re-used (default: --store)")
    batch_size: int = Field(8, ge=1, le=512)
    max_new_tokens: int = Field(50, ge=1, le=2048)
    min_tokens: int = Field(5, ge=1)
    shard_size: int = Field(64, ge=1, description="pairs per committed shard")
    max_scenes: int | None = Field(None, ge=1)
    max_questions: int | None = Field(None, ge=1)
    load: ModelLoadConfig = ModelLoadConfig()
    store_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    events: EventRenderConfig = EventRenderConfig()
    n_video_frames: int = Field(8, ge=1, le=64)
    shard_groups: int = Field(1, ge=1, description="fan-out: split pairs into this many groups (flow runs)")
    group_index: int | None = Field(None, ge=0, description="only extract this shard group")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (credentials never logged)")


# --------------------------------------------------------------------------------------------------
# adapters (stage 3a)
# --------------------------------------------------------------------------------------------------
class AdapterConfig(_Model):
    """Architecture of one alignment adapter (research defaults)."""

    level: AdapterLevel = "L4"
    hidden_size: int | None = Field(None, gt=0, description="None = the store's hidden size")
    bottleneck_dim: int | None = Field(None, gt=0, description="None = 1024 for L3, else 256")
    num_blocks: int = Field(3, ge=1, description="L2 blocks / L3 blocks")
    num_heads: int = Field(8, ge=1)
    num_layers: int = Field(1, ge=1)
    ffn_dim: int = Field(2048, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_seq_len: int = Field(512, ge=1, description="positional table size (L5, B1, L5F)")
    prediction_weight: float = Field(0.5, ge=0.0, le=1.0, description="L5/B1/L5F next-position term weight")
    separate_prediction_head: bool = Field(True, description="False = research objective: one output for y[t] and y[t+1]")


class TrainAdapterConfig(_Model):
    """Stage 3a settings: `egpt train-adapter`."""

    adapter: AdapterConfig = AdapterConfig()
    train: list[str] = Field(default_factory=list, description="train store URLs")
    val: str | None = Field(None, description="val store URL; None = seeded split by scene")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    out: str = Field("egpt_runs/adapter", description="run directory URL")
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    early_stopping: int = Field(10, ge=1, description="patience in epochs")
    seed: int = 0
    device: str = "auto"
    data_cache_gb: float = Field(
        32.0, ge=0,
        description="keep the stores' tensor shards in RAM (per process) when they total at most this many GB; "
        "larger data is read per pair with byte-range reads (global shuffle either way)",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# L6 LoRA (stage 3b)
# --------------------------------------------------------------------------------------------------
class LoraTrainConfig(_Model):
    """Stage 3b settings: `egpt train-lora`."""

    store: str = Field(..., description="store with token ids + target rows + LM head")
    val_store: str | None = None
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    drafter: str = Field(..., description="EventGPT checkpoint directory")
    dataset: str | None = Field(None, description="dataset root (needed when features are not cached)")
    out: str = Field("egpt_runs/lora", description="output directory")
    load: ModelLoadConfig = ModelLoadConfig(quant="nf4")
    rank: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    mse_weight: float = Field(1.0, ge=0)
    cos_weight: float = Field(0.5, ge=0)
    ce_weight: float = Field(0.1, ge=0)
    epochs: int = Field(20, ge=1)
    micro_batch: int = Field(1, ge=1)
    grad_accum: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    early_stopping: int = Field(5, ge=1)
    gradient_checkpointing: bool = True
    seed: int = 0
    storage_options: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# evaluation (stage 4)
# --------------------------------------------------------------------------------------------------
class TimingConfig(_Model):
    """Per-token costs (ms) for the speedup model; measure them, don't guess."""

    drafter_prefill_ms: float = Field(..., gt=0)
    drafter_step_ms: float = Field(..., gt=0)
    target_prefill_ms: float = Field(..., gt=0)
    target_step_ms: float = Field(..., gt=0)
    verify_ms_per_token: float = Field(0.0, ge=0, description="extra cost per verified draft token")
    adapter_ms: float = Field(0.0, ge=0)
    output_tokens: int = Field(50, ge=1)


class EvalConfig(_Model):
    """Stage 4 settings: `egpt evaluate`."""

    store: str
    out: str
    adapter_run: str | None = Field(None, description="adapter run directory")
    lora: str | None = Field(None, description="L6 peft adapter directory (evaluated on retf rows)")
    identity: bool = Field(False, description="evaluate raw drafter rows")
    adapter_which: str = Field("best", description="adapter checkpoint in the run: 'best', 'last' or a .safetensors name")
    name: str | None = Field(None, description="run name in reports/comparisons; None = derived from the prediction source")
    split: Literal["all", "val"] = Field("all", description="'val' = only the validation scenes of the seeded split "
                                                            "by scene (when there is no separate test store)")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = 0
    taus: list[float] = Field(default_factory=lambda: [0.80, 0.85, 0.90, 0.95])
    gammas: list[int] = Field(default_factory=lambda: list(range(1, 9)))
    max_positions: int = Field(50, ge=1, description="per-position statistics up to this position")
    timing: TimingConfig | None = None
    timing_file: str | None = Field(None, description="JSON file with TimingConfig fields")
    batch_size: int = Field(64, ge=1)
    device: str = "auto"
    storage_options: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# pipeline (flows)
# --------------------------------------------------------------------------------------------------
class PipelineConfig(_Model):
    """End-to-end: extract, train the configured adapters and/or L6, evaluate each, compare."""

    extract: ExtractConfig
    test_store: str | None = Field(None, description="evaluation store; None = the val split of the extraction store")
    adapters: list[TrainAdapterConfig] = Field(default_factory=list)
    lora: LoraTrainConfig | None = None
    evaluate_identity: bool = True
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="without test_store: share of scenes held out "
                                "from training (adapters, L6) and evaluated")
    split_seed: int = 0
    out: str = Field("egpt_runs", description="where runs, evaluations and the report go")
    timing: TimingConfig | None = None


# --------------------------------------------------------------------------------------------------
# process environment (the only place outside the CLI that reads it)
# --------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Local cache for fetched checkpoints: $EGPT_CACHE_DIR, default ~/.cache/egpt."""
    return Path(os.environ.get("EGPT_CACHE_DIR") or Path.home() / ".cache" / "egpt")


def worker_gpu_limit() -> str | None:
    """$EGPT_GPU_LIMIT: the Prefect concurrency limit a worker's GPU sections occupy (e.g. gpu:<node>)."""
    return os.environ.get("EGPT_GPU_LIMIT") or None


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
