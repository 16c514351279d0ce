"""The `train_adapter` (stage 3a) and `train_lora` (stage 3b, L6) flows."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from egpt_core.config import LoraTrainConfig, TrainAdapterConfig
from egpt_core.fsio import join
from flows.preflight import require_inputs, train_adapter_inputs, train_lora_inputs
from tasks.refs import AdapterRef, LoraRef
from tasks.runtime import url_name
from tasks.train import export_drafter_task, train_adapter_task, train_lora_task


def _adapter_run_name() -> str:
    cfg = flow_run.parameters["cfg"]
    return f"train-adapter-{cfg.adapter.level}-{url_name(cfg.out)}"


@flow(name="train-adapter", flow_run_name=_adapter_run_name, log_prints=True)
def train_adapter(cfg: TrainAdapterConfig) -> AdapterRef:
    """Train one alignment adapter (L1..L5, B1, L5F) on ``cfg.train`` into ``cfg.out``.

    Args:
        cfg: adapter level and architecture, train/validation stores, run directory, optimisation.
    """
    require_inputs("train-adapter", train_adapter_inputs(cfg), cfg.storage_options)
    return train_adapter_task(cfg)


def _lora_run_name() -> str:
    cfg = flow_run.parameters["cfg"]
    return f"train-lora-r{cfg.rank}-{url_name(cfg.out)}"


@flow(name="train-lora", flow_run_name=_lora_run_name, log_prints=True)
def train_lora(cfg: LoraTrainConfig, export: bool = True) -> LoraRef:
    """Train the L6 LoRA on ``cfg.store`` into ``cfg.out``; with ``export`` also write the merged
    drafter checkpoint to ``<out>/merged-drafter`` (what `extract --mode retf` re-extracts with).

    Args:
        cfg: train store, drafter, run directory and LoRA settings.
        export: also write the merged drafter checkpoint (<out>/merged-drafter).
    """
    require_inputs("train-lora", train_lora_inputs(cfg), cfg.storage_options)
    lora = train_lora_task(cfg)
    if export:
        merged = export_drafter_task(lora.adapter_dir, join(lora.run_url, "merged-drafter"), cfg.storage_options)
        lora = lora.model_copy(update={"merged_drafter": merged})
    return lora
