"""Stage 3 as tasks: adapter training (3a), L6 LoRA training and the merged-drafter export (3b)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.runtime import task_run

from egpt_core import runfiles as rf
from egpt_core.adapters import train_adapter
from egpt_core.config import LoraTrainConfig, TrainAdapterConfig
from egpt_core.fingerprint import dir_fingerprint, file_fingerprint
from egpt_core.fsio import join
from egpt_core.lora import export_drafter, train_lora
from tasks.caching import (
    FingerprintPolicy,
    export_drafter_material,
    export_drafter_outputs,
    model_fingerprint,
    train_adapter_material,
    train_adapter_outputs,
    train_lora_material,
    train_lora_outputs,
)
from tasks.refs import AdapterRef, DrafterRef, LoraRef
from tasks.runtime import RETRY, ProgressArtifact, gpu_slot, url_name


@task(name="train-adapter", task_run_name=lambda: f"train-{url_name(task_run.parameters['cfg'].out)}",
      tags=["gpu"], cache_policy=FingerprintPolicy(stage="train-adapter", material=train_adapter_material,
                                                   outputs=train_adapter_outputs), result_serializer="json",
      **RETRY)
def train_adapter_task(cfg: TrainAdapterConfig) -> AdapterRef:
    """Train one adapter level into ``cfg.out`` (resumes a crashed run from its last checkpoint)."""
    progress = ProgressArtifact(f"train {cfg.adapter.level} -> {url_name(cfg.out)}")
    with gpu_slot():
        result = train_adapter(cfg, progress=progress)
    data_cache = (rf.read_json(join(result.run_url, "config.json"), cfg.storage_options) or {}).get("data_cache")
    if data_cache:  # where the data was held (RAM copy or byte-range reads) and why
        get_run_logger().info("training data: %s (%s)", data_cache["path"], data_cache["reason"])
    return AdapterRef(run_url=result.run_url, level=str(cfg.adapter.level),
                      checkpoint_fingerprint=file_fingerprint(join(result.run_url, "best.safetensors"),
                                                              cfg.storage_options),
                      best_val_loss=result.best_val_loss, epochs_run=result.epochs_run,
                      param_count=result.param_count, n_train_pairs=result.n_train_pairs,
                      n_val_pairs=result.n_val_pairs)


@task(name="train-lora", task_run_name=lambda: f"train-{url_name(task_run.parameters['cfg'].out)}",
      tags=["gpu"], cache_policy=FingerprintPolicy(stage="train-lora", material=train_lora_material,
                                                   outputs=train_lora_outputs), result_serializer="json",
      **RETRY)
def train_lora_task(cfg: LoraTrainConfig) -> LoraRef:
    """Train the L6 LoRA on the drafter into ``cfg.out`` (resumes from its checkpoint/)."""
    progress = ProgressArtifact(f"train L6 LoRA r{cfg.rank} -> {url_name(cfg.out)}")
    with gpu_slot():
        result = train_lora(cfg, progress=progress)
    summary = {k: getattr(result, k) for k in ("best_epoch", "best_val_loss", "initial_val_loss", "epochs_run",
                                                "trainable_params", "n_train_pairs", "n_val_pairs")}
    return LoraRef(run_url=result.out, adapter_dir=result.best_dir,
                   fingerprint=dir_fingerprint(result.best_dir, cfg.storage_options), summary=summary)


@task(name="export-drafter", task_run_name="export-drafter",
      cache_policy=FingerprintPolicy(stage="export-drafter", material=export_drafter_material,
                                     outputs=export_drafter_outputs), result_serializer="json",
      **RETRY)
def export_drafter_task(lora_dir: str, out_dir: str, storage_options: dict | None = None) -> DrafterRef:
    """Merge the L6 LoRA into its base drafter (on the CPU, full precision) and write a plain
    EventGPT checkpoint to ``out_dir``."""
    path = export_drafter(lora_dir, out_dir, storage_options=storage_options)
    return DrafterRef(path=path, fingerprint=model_fingerprint(path, storage_options))
