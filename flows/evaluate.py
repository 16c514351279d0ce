"""The `evaluate` flow (stage 4)."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from egpt_core.config import EvalConfig
from flows.preflight import evaluate_inputs, require_inputs
from tasks.evaluate import evaluate_task
from tasks.refs import EvalRef
from tasks.runtime import url_name


def _run_name() -> str:
    cfg = flow_run.parameters["cfg"]
    source = "identity" if cfg.identity else url_name(cfg.adapter_run or cfg.lora or "")
    return f"evaluate-{cfg.name or source}-on-{url_name(cfg.store)}"


@flow(name="evaluate", flow_run_name=_run_name, log_prints=True)
def evaluate(cfg: EvalConfig) -> EvalRef:
    """Evaluate one prediction source (identity | adapter run | L6 LoRA) on ``cfg.store``.

    Args:
        cfg: the store, the prediction source and where the metrics, report and plots go.
    """
    require_inputs("evaluate", evaluate_inputs(cfg), cfg.storage_options)
    return evaluate_task(cfg)
