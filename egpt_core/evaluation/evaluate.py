"""Stage 4: evaluate one prediction source (identity | adapter | L6 LoRA) on a store.

Streams the store shard by shard (memory bounded by one shard + one batch), feeds padded batches to
:class:`~egpt_core.evaluation.metrics.MetricAccumulator` and writes ``metrics.json``, ``report.md``,
``metrics_summary.png`` and ``per_position.png`` under ``cfg.out``.
"""

from __future__ import annotations

import datetime as _dt
import posixpath
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel

from egpt_core import outdir
from egpt_core.adapters.checkpoint import configured_weights
from egpt_core.config import EvalConfig, TimingConfig
from egpt_core.data.split import split_scenes
from egpt_core.errors import ConfigError, StoreError
from egpt_core.evaluation.metrics import MetricAccumulator, primary_basis
from egpt_core.evaluation.plots import write_plots
from egpt_core.evaluation.report import write_report
from egpt_core.evaluation.speedup import resolve_timing, speedup_table
from egpt_core.fingerprint import dir_fingerprint, file_fingerprint, hash_json
from egpt_core.fsio import Location, url_to_fs
from egpt_core.runfiles import config_record, dumps_json
from egpt_core.store import StoreReader

#: Bumped whenever a metric definition changes (part of the evaluation fingerprint).
EVAL_VERSION = "eval-1"
OUTPUT_KIND = "evaluation"
METRICS_SCHEMA = "egpt-eval-metrics/1"
#: Below this target self-match rate the report warns that stored rows may not be LM-head inputs.
SELF_MATCH_WARN = 0.99


class EvalResult(BaseModel):
    """What a stage-4 run returns: where its outputs are and the headline scalars."""

    out_url: str
    name: str
    metrics: dict[str, Any]
    n_pairs: int
    n_positions: int


def prediction_mode(cfg: EvalConfig) -> str:
    """'identity' | 'adapter' | 'lora' (EvalConfig's validator guarantees exactly one is set)."""
    return "adapter" if cfg.adapter_run else "lora" if cfg.lora else "identity"


def default_name(cfg: EvalConfig, mode: str, level: str | None = None) -> str:
    if cfg.name:
        return cfg.name
    if mode == "identity":
        return "identity"
    base = posixpath.basename(str(cfg.adapter_run if mode == "adapter" else cfg.lora).rstrip("/")) or mode
    return f"{level}:{base}" if level else (f"L6:{base}" if mode == "lora" else base)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _batches(shard, batch_size: int, scenes: set[str] | None = None):
    """Padded batches of one shard's ok pairs (only ``scenes`` when given): (drafter, target, mask,
    tokens) as [B, S, D] / [B, S]."""
    table = shard.table
    cols = table.column_names
    status = table.column("status").to_pylist() if "status" in cols else ["ok"] * table.num_rows
    if scenes is not None:
        status = [st if sc in scenes else "excluded" for st, sc in zip(status, table.column("scene_id").to_pylist())]
    lengths = table.column("length").to_pylist()
    offsets = table.column("row_offset").to_pylist()
    ids = table.column("target_response_ids").to_pylist() if "target_response_ids" in cols else [None] * len(lengths)
    rows = [i for i, (st, n) in enumerate(zip(status, lengths)) if st == "ok" and n and n > 0]
    D = shard.drafter.shape[1]
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        S = max(lengths[i] for i in idx)
        B = len(idx)
        drafter = torch.zeros(B, S, D, dtype=torch.float32)
        target = torch.zeros(B, S, D, dtype=torch.float32)
        mask = torch.zeros(B, S, dtype=torch.bool)
        tokens = torch.full((B, S), -1, dtype=torch.long)
        for j, i in enumerate(idx):
            o, n = int(offsets[i]), int(lengths[i])
            drafter[j, :n] = shard.drafter[o:o + n].float()
            target[j, :n] = shard.target[o:o + n].float()
            mask[j, :n] = True
            tid = ids[i]
            if tid:
                k = min(n, len(tid))
                tokens[j, :k] = torch.as_tensor(tid[:k], dtype=torch.long)
        yield drafter, target, mask, tokens


def _speedup_section(metrics: dict[str, Any], timing: TimingConfig | None, note: str) -> dict[str, Any]:
    basis = metrics.get("acc_len_basis")
    if timing is None or basis is None:
        return {"note": note if timing is None else "speedup omitted: no acceptance basis", "by_gamma": None}
    al = metrics["acceptance_length"][basis]
    return {
        "note": note,
        "basis": f"rounds/{basis}",
        "timing": timing.model_dump(),
        "by_gamma": speedup_table(al["rounds"], timing),
        "by_gamma_sim": speedup_table(al["sim"], timing),
    }


def _open_store(store: Location) -> StoreReader:
    try:
        return StoreReader(store)
    except StoreError as exc:
        if "no manifest" in str(exc):
            raise ConfigError(f"store={store.url!r} is not a committed store ({exc}); check the URL") from exc
        raise


def _check_same_models(readers: list[StoreReader]) -> None:
    """Stores evaluated together must hold rows of one hidden size, from one target model."""
    first = readers[0]
    target = first.info.meta.model_fingerprint("target")
    for r in readers[1:]:
        if int(r.hidden_size) != int(first.hidden_size):
            raise ConfigError(f"stores {first.url!r} and {r.url!r} have hidden sizes {first.hidden_size} and "
                              f"{r.hidden_size}; evaluate stores of one model pair together")
        other = r.info.meta.model_fingerprint("target")
        if target and other and target != other:
            raise ConfigError(f"stores {first.url!r} and {r.url!r} were extracted with different targets; "
                              "evaluate stores of one model pair together")


def output_identity(cfg: EvalConfig, store_fingerprint: str, extra_fingerprints: list[str] | None = None) -> str:
    """What an evaluation directory holds: the store content (and any extra stores') and prediction
    source it evaluated, and the split (a rerun with other metric settings, e.g. taus or timing,
    replaces it)."""
    key = {"store": store_fingerprint, **cfg.model_dump(mode="json", include={
        "adapter_run", "lora", "identity", "adapter_which", "split", "val_fraction", "split_seed"})}
    if extra_fingerprints:
        key["extra_stores"] = list(extra_fingerprints)
    return hash_json(key)


def evaluate(cfg: EvalConfig, progress: Callable[[float, str], None] | None = None,
             overwrite: bool = False) -> EvalResult:
    """Evaluate ``cfg``'s prediction source on ``cfg.store`` (and ``cfg.extra_stores``) and write the
    outputs under ``cfg.out``.

    ``cfg.out`` must be new, empty or an earlier evaluation of the same stores and prediction source
    (``overwrite=True``: any earlier evaluation); see :mod:`egpt_core.outdir`."""
    mode = prediction_mode(cfg)
    timing, timing_note = resolve_timing(cfg)  # fail fast on a bad timing file, before any work
    so = cfg.storage_options
    readers = [_open_store(Location(u, so)) for u in [cfg.store, *cfg.extra_stores]]
    identity = output_identity(cfg, readers[0].fingerprint, [r.fingerprint for r in readers[1:]])
    with outdir.claim_output(cfg.out, OUTPUT_KIND, identity, so or None, replace=overwrite):
        return _evaluate(cfg, readers, mode, timing, timing_note, progress)


def _evaluate(cfg: EvalConfig, readers: list[StoreReader], mode: str, timing: TimingConfig | None,
              timing_note: str, progress: Callable[[float, str], None] | None) -> EvalResult:
    """The evaluation itself, top-down: inputs, prediction source, LM head, split, metrics, outputs."""
    device = resolve_device(cfg.device)
    reader = readers[0]
    _check_same_models(readers)
    notes: list[str] = []
    inputs = _describe_inputs(cfg, readers, mode)
    module, acfg = _prediction_source(cfg, readers, mode, device, inputs, notes)
    lm_head = _store_lm_head(reader, inputs, notes)
    name = default_name(cfg, mode, str(acfg.level) if acfg is not None else None)
    scenes = _eval_scenes(cfg, readers, inputs, notes)
    acc = MetricAccumulator(cfg.taus, cfg.gammas, cfg.max_positions, lm_head, device=device,
                            lm_head_dtype=reader.info.lm_head.dtype if reader.info.lm_head is not None else None)
    _accumulate(acc, cfg, readers, module, acfg, scenes, device, progress)
    inputs["n_pairs_not_ok"] = sum(v for r in readers for k, v in r.counts.items() if k != "ok")

    metrics = acc.result()
    if metrics["counts"]["n_pairs"] == 0:
        raise ConfigError(f"store {cfg.store!r} has no pairs with status 'ok' to evaluate")
    _finish_metrics(metrics, timing, timing_note, notes)
    inputs["config"] = config_record(cfg)
    inputs["eval_version"] = EVAL_VERSION
    inputs["eval_fingerprint"] = _eval_fingerprint(cfg, mode, readers, inputs, metrics["speedup"])
    doc = {"schema": METRICS_SCHEMA, "name": name,
           "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
           "inputs": inputs, "notes": notes, **metrics}
    _write_outputs(doc, cfg)
    if progress is not None:
        progress(1.0, f"wrote {cfg.out}")
    return EvalResult(out_url=cfg.out, name=name, metrics=doc["summary"],
                      n_pairs=doc["counts"]["n_pairs"], n_positions=doc["counts"]["n_positions"])


def _describe_inputs(cfg: EvalConfig, readers: list[StoreReader], mode: str) -> dict[str, Any]:
    """metrics.json's ``inputs``: the stores (fingerprints, counts, modes) and the prediction source."""
    reader = readers[0]
    inputs: dict[str, Any] = {
        "store": cfg.store,
        "store_fingerprint": reader.fingerprint,
        "store_counts": reader.counts,
        "store_mode": (reader.meta or {}).get("mode"),
        "hidden_size": int(reader.hidden_size),
        "prediction": mode,
    }
    if cfg.extra_stores:
        inputs["extra_stores"] = [{"store": r.url, "store_fingerprint": r.fingerprint, "store_counts": r.counts,
                                   "store_mode": r.info.meta.mode} for r in readers[1:]]
    return inputs


def _prediction_source(cfg: EvalConfig, readers: list[StoreReader], mode: str, device: torch.device,
                       inputs: dict[str, Any], notes: list[str]) -> tuple[Any, Any]:
    """(adapter module, its AdapterConfig) for mode 'adapter', else (None, None); checks the source
    fits the stores and records it in ``inputs`` / ``notes``."""
    so = cfg.storage_options
    hidden = inputs["hidden_size"]
    store_mode = inputs["store_mode"]
    module = acfg = None
    if mode == "adapter":
        from egpt_core.adapters import load_adapter
        from egpt_core.adapters.modules import level_spec

        module, acfg = load_adapter(cfg.adapter_run, cfg.adapter_which, storage_options=so, device=device)
        a_hidden = acfg.hidden_size
        if a_hidden is not None and int(a_hidden) != hidden:
            raise ConfigError(
                f"adapter {cfg.adapter_run!r} was trained for hidden size {a_hidden} but store {cfg.store!r} has "
                f"{hidden}; evaluate it on a store extracted from the same models")
        inputs.update(adapter_run=cfg.adapter_run, adapter_which=cfg.adapter_which, adapter_level=str(acfg.level),
                      adapter_config=acfg.model_dump(), adapter_fingerprint=_adapter_fingerprint(cfg))
        if level_spec(acfg.level).leaks_target:
            notes.append(f"{acfg.level} takes the target's own hidden states as input: its same-position metrics "
                         "leak the target and are not a cross-modal alignment result (reference §12.2 P1.3).")
    elif mode == "lora":
        fs, path = url_to_fs(cfg.lora, so)
        if not fs.exists(path):
            raise ConfigError(f"lora={cfg.lora!r} does not exist: pass the L6 peft adapter directory")
        if any(r.info.meta.mode not in (None, "retf") for r in readers):
            raise ConfigError(
                f"--lora needs a store whose drafter rows were re-extracted teacher-forced with the merged L6 "
                f"drafter (mode 'retf'); {cfg.store!r} has mode {store_mode!r}. Run `egpt extract --mode retf` "
                "with the merged drafter first")
        inputs.update(lora=cfg.lora, lora_fingerprint=dir_fingerprint(cfg.lora, so))
        notes.append(f"L6: predictions are the store's drafter rows, re-extracted with the LoRA-merged drafter "
                     f"({cfg.lora}).")
    else:
        notes.append("identity: predictions are the raw drafter rows (no adapter).")
    if store_mode == "independent":
        notes.append("store mode 'independent': drafter and target rows come from two free-running generations; "
                     "after the first divergent token they condition on different prefixes, so acceptance "
                     "(especially the rounds simulation) is not SD acceptance (reference §12.2 P1.1).")
    return module, acfg


def _store_lm_head(reader: StoreReader, inputs: dict[str, Any], notes: list[str]) -> torch.Tensor | None:
    """The store's target LM head [V, D] in float32, or None (token metrics omitted)."""
    info = reader.info.lm_head
    if info is None:
        inputs["lm_head"] = "absent (token metrics omitted)"
        notes.append("the store has no target LM head: token metrics omitted; acceptance lengths use the "
                     "hidden-state proxy cos > τ.")
        return None
    lm_head = reader.lm_head().float()
    hidden = inputs["hidden_size"]
    if lm_head.shape[1] != hidden:
        raise ConfigError(f"store LM head is {tuple(lm_head.shape)} but the store's hidden size is {hidden}")
    inputs["lm_head"] = f"present {list(lm_head.shape)} {info.dtype}"
    return lm_head


def _eval_scenes(cfg: EvalConfig, readers: list[StoreReader], inputs: dict[str, Any],
                 notes: list[str]) -> set[str] | None:
    """Split 'val': the held-out scenes of the seeded split over every store's scenes; else None (all)."""
    if cfg.split != "val":
        return None
    all_scenes = [s for r in readers for s in r.pairs(status="ok", columns=["scene_id"]).column("scene_id").to_pylist()]
    _, scenes = split_scenes(all_scenes, cfg.val_fraction, cfg.split_seed)
    inputs["split"] = {"val_fraction": cfg.val_fraction, "seed": cfg.split_seed, "val_scenes": len(scenes)}
    notes.append(f"evaluated on the {len(scenes)} validation scenes of the seeded split by scene "
                 f"(fraction {cfg.val_fraction}, seed {cfg.split_seed}); training never saw them.")
    return scenes


def _accumulate(acc: MetricAccumulator, cfg: EvalConfig, readers: list[StoreReader], module, acfg,
                scenes: set[str] | None, device: torch.device, progress: Callable[[float, str], None] | None) -> None:
    """Stream every store shard by shard, predict (adapter, or the drafter rows) and accumulate."""
    n_shards = sum(len(r.shards) for r in readers) or None
    for k, shard in enumerate(shard for r in readers for shard in r.iter_shards()):
        for drafter, target, mask, tokens in _batches(shard, cfg.batch_size, scenes):
            if module is not None:
                from egpt_core.adapters import apply_adapter

                with torch.no_grad():
                    pred = apply_adapter(module, acfg, drafter.to(device), target.to(device), mask.to(device))
            else:
                pred = drafter
            acc.update(pred, target, mask, tokens)
        if progress is not None:
            progress((k + 1) / n_shards if n_shards else 0.0, f"evaluated shard {shard.name}")


def _finish_metrics(metrics: dict[str, Any], timing: TimingConfig | None, timing_note: str, notes: list[str]) -> None:
    """Add the acceptance basis, the self-match warning and the speedup section to ``metrics``."""
    metrics["acc_len_basis"] = primary_basis(metrics)
    tok = metrics.get("token")
    if tok and tok.get("target_lm_head_self_match") is not None and tok["target_lm_head_self_match"] < SELF_MATCH_WARN:
        notes.append(f"only {100 * tok['target_lm_head_self_match']:.1f} % of the target rows re-project (LM head "
                     "argmax) to the stored target token: the rows may not be LM-head inputs, or the position "
                     "convention is off (DESIGN.md §3.2).")
    metrics["speedup"] = sp = _speedup_section(metrics, timing, timing_note)
    if sp.get("by_gamma"):
        metrics["summary"]["speedup_basis"] = sp["basis"]
        for g, d in sp["by_gamma"].items():
            metrics["summary"][f"speedup_e2e_gamma{g}"] = None if d is None else d["e2e_speedup"]
            metrics["summary"][f"speedup_decode_gamma{g}"] = None if d is None else d["decode_speedup"]


def _eval_fingerprint(cfg: EvalConfig, mode: str, readers: list[StoreReader], inputs: dict[str, Any],
                      speedup: dict[str, Any]) -> str:
    """What the metrics were computed from: version, stores, prediction source, metric settings."""
    return hash_json({
        "version": EVAL_VERSION, "store": inputs["store_fingerprint"], "mode": mode,
        **({"extra_stores": [r.fingerprint for r in readers[1:]]} if cfg.extra_stores else {}),
        "adapter": inputs.get("adapter_fingerprint"), "lora": inputs.get("lora_fingerprint"),
        "taus": cfg.taus, "gammas": cfg.gammas, "max_positions": cfg.max_positions,
        "split": [cfg.split, cfg.val_fraction, cfg.split_seed],
        "timing": speedup.get("timing"),
    })


def _write_outputs(doc: dict[str, Any], cfg: EvalConfig) -> None:
    """metrics.json, report.md and the plots under ``cfg.out``."""
    out = Location(cfg.out, cfg.storage_options)
    out.makedirs()
    out.child("metrics.json").write_atomic(dumps_json(doc, indent=2))
    write_report(doc, out)
    write_plots(doc, out)


def _adapter_fingerprint(cfg: EvalConfig) -> str | None:
    try:
        return file_fingerprint(configured_weights(cfg))
    except (OSError, ValueError):
        return None

