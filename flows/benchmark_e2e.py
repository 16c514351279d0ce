"""The `benchmark_e2e` flow (stage 5): several drafter configurations measured in the real
draft -> verify loop on the same pairs, like the research benchmark's ``--configs``
(``target_only``, ``identity``, each adapter run, L6), then one comparison."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from egpt_core.config import BenchmarkE2EConfig, SDConfigSpec, SpeculateConfig
from egpt_core.errors import ConfigError
from egpt_core.fingerprint import hash_json
from egpt_core.fsio import join
from flows.preflight import benchmark_e2e_inputs, require_inputs
from tasks.refs import BenchmarkRef
from tasks.speculate import compare_sd_task, speculate_task


def spec_name(spec: SDConfigSpec) -> str:
    if spec.name:
        return spec.name
    if spec.kind in ("target_only", "identity"):
        return spec.kind
    path = spec.adapter_run if spec.kind == "adapter" else spec.lora
    return f"{spec.kind}-{str(path).rstrip('/').rsplit('/', 1)[-1]}"


def speculate_configs(cfg: BenchmarkE2EConfig) -> list[SpeculateConfig]:
    """One SpeculateConfig per spec: the base with the spec's source, name and a content-addressed out."""
    base = cfg.base
    if any(getattr(base, f) for f in ("target_only", "identity", "adapter_run", "lora")):
        raise ConfigError("benchmark_e2e: leave the base's drafter configuration empty (target_only / identity / "
                          "adapter_run / lora); each entry of configs sets its own")
    names = [spec_name(s) for s in cfg.configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"benchmark_e2e: configuration names must be distinct, got {names}")
    out = []
    for spec, name in zip(cfg.configs, names):
        if spec.kind == "adapter" and not spec.adapter_run:
            raise ConfigError(f"benchmark_e2e: configuration {name!r} (adapter) needs adapter_run")
        if spec.kind == "lora" and not spec.lora:
            raise ConfigError(f"benchmark_e2e: configuration {name!r} (lora) needs lora")
        update = {"name": name, "target_only": spec.kind == "target_only", "identity": spec.kind == "identity",
                  "adapter_run": spec.adapter_run if spec.kind == "adapter" else None,
                  "lora": spec.lora if spec.kind == "lora" else None}
        if spec.drafter:
            update["drafter"] = spec.drafter
        if spec.store:
            update["store"] = spec.store
        if spec.mode:
            update["mode"] = spec.mode
        c = base.model_copy(update=update)
        run_id = hash_json(c.model_dump(mode="json", exclude={"out", "storage_options"}))[:10]
        out.append(c.model_copy(update={"out": join(cfg.out, "sd", f"{name}-{run_id}")}))
    return out


def _run_name() -> str:
    cfg = flow_run.parameters["cfg"]
    return f"benchmark-e2e-{'+'.join(spec_name(s) for s in cfg.configs)}"


def benchmark_e2e_stage(cfg: BenchmarkE2EConfig, gamma: int = 5) -> BenchmarkRef:
    """One speculate task per configuration (sequential: they share the GPU), then the comparison."""
    runs = [speculate_task(c) for c in speculate_configs(cfg)]
    return compare_sd_task(runs, cfg.out, gamma, cfg.base.storage_options)


@flow(name="benchmark-e2e", flow_run_name=_run_name, log_prints=True)
def benchmark_e2e(cfg: BenchmarkE2EConfig, gamma: int = 5) -> BenchmarkRef:
    """Measure every configuration of ``cfg.configs`` on the same pairs, then compare them at ``gamma``.

    Args:
        cfg: the target, drafter and pairs shared by every configuration, the configurations
            (target_only, identity, adapter runs, L6) and where their runs and the comparison go.
        gamma: the draft length the comparison table reports.
    """
    require_inputs("benchmark-e2e", benchmark_e2e_inputs(cfg), cfg.base.storage_options)
    return benchmark_e2e_stage(cfg, gamma)
