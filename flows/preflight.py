"""Refuse a run whose inputs do not exist, before any task starts (so before any GPU slot is taken).

A deployment's defaults are the team's paths; a "Quick run" from the UI on a machine where they do
not exist then fails in seconds with the fields to fill, instead of after loading models or
holding a GPU. Plain functions over the config models (no Prefect): each flow calls one first.
"""

from __future__ import annotations

from egpt_core.config import (
    BenchmarkE2EConfig,
    EvalConfig,
    ExtractConfig,
    LoraTrainConfig,
    PipelineConfig,
    TrainAdapterConfig,
)
from egpt_core.errors import ConfigError, EgptError
from egpt_core.fsio import Location, join

#: (form field, URL, kind): kind "store" must hold a committed manifest, "path" must exist
Input = tuple[str, str | None, str]


def extract_inputs(cfg: ExtractConfig, prefix: str = "") -> list[Input]:
    retf = cfg.mode == "retf"
    inputs = [(f"{prefix}dataset", cfg.dataset, "path"), (f"{prefix}questions", cfg.questions, "path")]
    if not retf or cfg.retf_side == "drafter":
        inputs.append((f"{prefix}drafter", cfg.drafter, "path"))
    if not retf or cfg.retf_side == "target":
        inputs.append((f"{prefix}target", cfg.target, "path"))
    if retf:
        inputs.append((f"{prefix}source_store" if cfg.source_store else f"{prefix}store",
                       cfg.source_store or cfg.store, "store"))
    return inputs


def pipeline_inputs(cfg: PipelineConfig) -> list[Input]:
    inputs = extract_inputs(cfg.extract, "extract.") + [("test_store", cfg.test_store, "store")]
    if cfg.lora is not None:
        if cfg.lora.store not in (None, cfg.extract.store):
            inputs.append(("lora.store", cfg.lora.store, "store"))
        inputs += [("lora.drafter", cfg.lora.drafter, "path"), ("lora.dataset", cfg.lora.dataset, "path"),
                   ("lora.val_store", cfg.lora.val_store, "store")]
    return inputs


def train_adapter_inputs(cfg: TrainAdapterConfig) -> list[Input]:
    return [(f"train[{i}]", url, "store") for i, url in enumerate(cfg.train)] + [("val", cfg.val, "store")]


def train_lora_inputs(cfg: LoraTrainConfig) -> list[Input]:
    return [("store", cfg.store, "store"), ("drafter", cfg.drafter, "path"), ("dataset", cfg.dataset, "path"),
            ("val_store", cfg.val_store, "store")]


def evaluate_inputs(cfg: EvalConfig) -> list[Input]:
    return [("store", cfg.store, "store"), ("adapter_run", cfg.adapter_run, "path"), ("lora", cfg.lora, "path"),
            ("timing_file", cfg.timing_file, "path")]


def benchmark_e2e_inputs(cfg: BenchmarkE2EConfig) -> list[Input]:
    b = cfg.base
    inputs = [("base.target", b.target, "path"), ("base.drafter", b.drafter, "path"), ("base.store", b.store, "store"),
              ("base.dataset", b.dataset, "path"), ("base.questions", b.questions, "path")]
    for i, spec in enumerate(cfg.configs):
        inputs += [(f"configs[{i}].adapter_run", spec.adapter_run, "path"), (f"configs[{i}].lora", spec.lora, "path"),
                   (f"configs[{i}].drafter", spec.drafter, "path"), (f"configs[{i}].store", spec.store, "store")]
    return inputs


def _problem(where: Location, kind: str) -> str | None:
    try:
        fs, path = where.fs, where.path
        if kind == "store":
            return None if fs.exists(join(path, "manifest.json")) else "no store there (no manifest.json)"
        return None if fs.exists(path) else "does not exist"
    except (OSError, ValueError, EgptError) as exc:
        return f"cannot be checked: {exc}"


def require_inputs(flow_name: str, inputs: list[Input], storage_options: dict | None = None) -> None:
    """Raise ConfigError naming every input field whose URL does not exist (as this worker sees it)."""
    problems = [f"{field} = {url!r}: {problem}" for field, url, kind in inputs
                if url and (problem := _problem(Location(url, storage_options or None), kind))]
    if problems:
        raise ConfigError(
            f"{flow_name}: nothing was started; fill in these fields with inputs that exist on the workers "
            f"(UI: Run -> Custom run): " + "; ".join(problems) + ". The deployment's defaults are the team's "
            "paths (deployments/prefect.yaml).")
