"""Stage 5: measure one drafter configuration in the real draft -> verify loop.

For every pair (from a dataset, or the ok pairs of a store) the target-only greedy baseline runs
first, then the speculative loop once per γ; outputs are compared token for token (lossless check),
acceptance and wall-clock time are measured, and - when the pairs come from a ``shared_prefix`` /
``retf`` store - the measured acceptance is checked round by round against `egpt evaluate`'s
simulation on the same pairs. Everything lands in ``cfg.out`` through `outputs.write_sd_outputs`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import posixpath
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from egpt_core import outdir
from egpt_core import runfiles as rf
from egpt_core.adapters.checkpoint import configured_weights, weights_file_name
from egpt_core.adapters.modules import level_spec
from egpt_core.config import ModelLoadConfig, SpeculateConfig
from egpt_core.data import Pair, build_pairs, load_questions, load_scenes, read_video_frames
from egpt_core.data.dataset import questions_url
from egpt_core.data.split import split_scenes
from egpt_core.errors import BadInputError, ConfigError, StoreError
from egpt_core.extraction.inputs import once_per_scene
from egpt_core.fingerprint import dir_fingerprint, file_fingerprint, hash_json
from egpt_core.fsio import Location
from egpt_core.speculative import measure
from egpt_core.speculative.drafting import DraftHead
from egpt_core.speculative.loop import PairInputs, speculative_generate, target_greedy
from egpt_core.speculative.outputs import OUTPUT_KIND, build_outputs, write_sd_outputs
from egpt_core.speculative.sessions import DrafterSession, Lane, TargetSession

log = logging.getLogger(__name__)

#: bumped when what a run measures or writes changes (part of its fingerprint and cache key)
SPECULATE_VERSION = "speculate-1"
METRICS_SCHEMA = "egpt-sd-metrics/1"

Progress = Callable[[float, str], None]


class SpeculateResult(BaseModel):
    """What a stage-5 run returns: where its outputs are and the headline numbers per γ."""

    out_url: str
    name: str
    source: str
    mode: str
    n_pairs: int
    n_failed: int
    summary: dict[str, Any]


def prediction_source(cfg: SpeculateConfig) -> str:
    """'target_only' | 'identity' | 'adapter' | 'lora'; exactly one must be set."""
    chosen = [m for m, on in (("target_only", cfg.target_only), ("identity", cfg.identity),
                              ("adapter", bool(cfg.adapter_run)), ("lora", bool(cfg.lora))) if on]
    if len(chosen) != 1:
        raise ConfigError("set exactly one drafter configuration: target_only (--target-only), identity "
                          f"(--identity), adapter_run (--adapter RUN) or lora (--lora DIR); got {chosen or 'none'}")
    return chosen[0]


def default_name(cfg: SpeculateConfig, source: str, level: str | None) -> str:
    if cfg.name:
        return cfg.name
    if source in ("target_only", "identity"):
        return source
    base = posixpath.basename(str(cfg.adapter_run if source == "adapter" else cfg.lora).rstrip("/")) or source
    return f"{level}:{base}" if source == "adapter" else f"L6:{base}"


def check_config(cfg: SpeculateConfig) -> str:
    """Fail fast on settings that cannot work, before any model is loaded; returns the source."""
    source = prediction_source(cfg)
    if not cfg.gammas or any(g < 1 for g in cfg.gammas) or len(set(cfg.gammas)) != len(cfg.gammas):
        raise ConfigError(f"gammas must be distinct positive integers, got {cfg.gammas}")
    if source != "target_only" and not cfg.drafter:
        raise ConfigError(f"{source} needs the drafter checkpoint (drafter / --drafter)")
    if not cfg.dataset and not cfg.store:
        raise ConfigError("give the pairs: a dataset (--dataset) or a store (--store)")
    if source == "lora" and cfg.load.quant == "nf4":
        raise ConfigError("--lora merges the LoRA into the drafter in memory, which needs full-precision weights "
                          "(load.quant='none'); or export it first (egpt export-drafter) and pass --drafter")
    return source


# ------------------------------------------------------------------------------------------------
# pairs
# ------------------------------------------------------------------------------------------------
@dataclass
class PairPlan:
    pairs: list[Pair]
    reader: Any | None
    dataset: str
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def plan_pairs(cfg: SpeculateConfig) -> PairPlan:
    """The pairs to measure: a store's ok pairs (same order) or all dataset pairs; the held-out split."""
    so = cfg.storage_options
    reader = None
    notes: list[str] = []
    if cfg.store:
        from egpt_core.store import StoreReader

        try:
            reader = StoreReader(cfg.store, so)
        except StoreError as exc:
            raise ConfigError(f"store={cfg.store!r} is not a readable committed store ({exc})") from exc
        dataset = cfg.dataset or reader.info.meta.dataset
        if not dataset:
            raise ConfigError(f"store {cfg.store!r} does not name its dataset; pass --dataset")
        scenes = {s.scene_id: s for s in load_scenes(dataset, so)}
        table = reader.pairs(status="ok", columns=["pair_id", "scene_id", "question_idx", "question"]).to_pylist()
        pairs, missing = [], {}
        for row in table:
            scene = scenes.get(row["scene_id"])
            if scene is None:
                missing[row["pair_id"]] = f"scene {row['scene_id']} is not in dataset {dataset}"
                continue
            pairs.append(Pair(pair_id=row["pair_id"], scene=scene, question_idx=row["question_idx"],
                              question=row["question"]))
        scene_ids = [r["scene_id"] for r in table]
        notes.append(f"pairs: the {len(table)} ok pairs of store {cfg.store}")
    else:
        dataset = cfg.dataset
        scene_list = load_scenes(dataset, so, cfg.max_scenes)
        questions = load_questions(questions_url(dataset, cfg.questions), so, cfg.max_questions)
        pairs = build_pairs(scene_list, questions)
        missing = {}
        scene_ids = [s.scene_id for s in scene_list]
    if cfg.split == "val":
        _, val = split_scenes(scene_ids, cfg.val_fraction, cfg.split_seed)
        pairs = [p for p in pairs if p.scene.scene_id in val]
        notes.append(f"held-out scenes only: {len(val)} validation scenes of the seeded split by scene "
                     f"(fraction {cfg.val_fraction}, seed {cfg.split_seed}), as training and evaluation use")
    if cfg.store and (cfg.max_scenes or cfg.max_questions):
        keep_scenes = list(dict.fromkeys(p.scene.scene_id for p in pairs))[: cfg.max_scenes or None]
        pairs = [p for p in pairs if p.scene.scene_id in set(keep_scenes)
                 and (cfg.max_questions is None or p.question_idx < cfg.max_questions)]
    if cfg.max_pairs is not None and cfg.max_pairs < len(pairs):
        pairs = spread_over_scenes(pairs)[: cfg.max_pairs]
        notes.append(f"{cfg.max_pairs} pairs measured, spread over the scenes (each scene's first question, then "
                     "each scene's second, ...)")
    if not pairs:
        raise ConfigError("no pairs to measure (check the dataset/store, split and max_* settings)")
    return PairPlan(pairs, reader, dataset, notes, missing)


def spread_over_scenes(pairs: list[Pair]) -> list[Pair]:
    """Pairs reordered round-robin over scenes (stable): a prefix of it covers as many scenes as it can."""
    rank: dict[str, int] = {}
    order = []
    for i, p in enumerate(pairs):
        k = rank.get(p.scene.scene_id, 0)
        rank[p.scene.scene_id] = k + 1
        order.append((k, i))
    return [pairs[i] for _, i in sorted(order)]


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
@dataclass
class Models:
    target: Any
    drafter: Any | None
    head: DraftHead | None
    fingerprints: dict[str, str | None]
    level: str | None = None


def _merge_lora(drafter, lora: Location) -> str:
    """Merge an L6 peft adapter into the loaded drafter (in memory); returns the adapter's fingerprint."""
    from peft import PeftModel

    from egpt_core.lora.merge import resolve_adapter_dir

    adapter = resolve_adapter_dir(lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        merged = PeftModel.from_pretrained(drafter.model, str(adapter), is_trainable=False).merge_and_unload()
    drafter.model = merged.eval()
    return dir_fingerprint(str(adapter))


def load_models(cfg: SpeculateConfig, source: str, lm_head: torch.Tensor | None) -> Models:
    """Target, drafter (+ merged LoRA), adapter and the draft head; fails fast on incompatibilities."""
    from egpt_core.models.loading import load_eventgpt, load_videollava
    from egpt_core.models.vocab import check_vocab_compat

    target = load_videollava(cfg.location(cfg.target), cfg.load)
    fps: dict[str, str | None] = {"target": target.fingerprint, "drafter": None, "adapter": None, "lora": None}
    if source == "target_only":
        return Models(target, None, None, fps)
    adapter = acfg = None
    if source == "adapter":
        from egpt_core.adapters import load_adapter

        adapter, acfg = load_adapter(cfg.location(cfg.adapter_run), cfg.adapter_which)
        if acfg.hidden_size is not None and int(acfg.hidden_size) != target.hidden_size:
            raise ConfigError(f"adapter {cfg.adapter_run!r} was trained for hidden size {acfg.hidden_size} but the "
                              f"target's is {target.hidden_size}")
        fps["adapter"] = file_fingerprint(configured_weights(cfg))
    needs_drafter = acfg is None or level_spec(acfg.level).inputs != "target"
    drafter = None
    if needs_drafter:
        drafter = load_eventgpt(cfg.location(cfg.drafter), drafter_load(cfg),
                                double_adaptor=cfg.events.double_feature_adaptor)
        check_vocab_compat(drafter.tokenizer, target.tokenizer, f"drafter {cfg.drafter}", f"target {cfg.target}")
        if drafter.hidden_size != target.hidden_size:
            raise ConfigError(f"drafter hidden size {drafter.hidden_size} != target hidden size {target.hidden_size}")
        fps["drafter"] = drafter.fingerprint
        if source == "lora":
            fps["lora"] = _merge_lora(drafter, cfg.location(cfg.lora))
    head_weight = lm_head if lm_head is not None else target.lm_head_weight()
    vocab = target.model.get_output_embeddings().weight.shape
    if tuple(head_weight.shape) != tuple(vocab):
        raise ConfigError(f"the store's target LM head is {tuple(head_weight.shape)} but the target's is "
                          f"{tuple(vocab)}: the store was not extracted from this target")
    device = drafter.device if drafter is not None else target.device
    head = DraftHead(head_weight, device, adapter, acfg)
    if head.max_context is not None and cfg.max_new_tokens > head.max_context:
        raise ConfigError(f"{head.level} accepts at most {head.max_context} rows (max_seq_len) but max_new_tokens is "
                          f"{cfg.max_new_tokens}; lower max_new_tokens")
    return Models(target, drafter, head, fps, str(acfg.level) if acfg is not None else None)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
class _InputCache:
    """Per-scene event frames and video frames (read once), per-pair model inputs."""

    def __init__(self, cfg: SpeculateConfig, models: Models):
        self.cfg, self.models = cfg, models
        self._events: dict[str, Any] = {}
        self._video: dict[str, Any] = {}

    _memo = staticmethod(once_per_scene)

    def inputs(self, pair: Pair) -> PairInputs:
        from egpt_core.extraction.features import scene_event_frames

        cfg, so = self.cfg, self.cfg.storage_options
        scene = pair.scene

        def video():
            if not scene.video_path:
                raise BadInputError(scene.scene_id, "scene has no video (video_data)")
            return read_video_frames(scene.video_path, cfg.n_video_frames, so)

        frames = self._memo(self._video, scene.scene_id, video)
        t_ids, pv = self.models.target.prepare(pair.question, frames)
        d_ids, ev_pv = [], None
        drafter = self.models.drafter
        if drafter is not None:
            ev = self._memo(self._events, scene.scene_id, lambda: scene_event_frames(scene, cfg.events, so))
            ev_pv = drafter.preprocess_frames(ev)
            d_ids = drafter.prompt_ids(pair.question)
        return PairInputs(d_ids, ev_pv, t_ids, pv)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def _sessions(models: Models) -> tuple[TargetSession, DrafterSession | None]:
    target = TargetSession(models.target, Lane("target", models.target.device))
    drafter = None
    if models.drafter is not None:
        drafter = DrafterSession(models.drafter, Lane("drafter", models.drafter.device))
    return target, drafter


def output_identity(cfg: SpeculateConfig) -> str:
    """What a speculative run directory holds: every setting but where it goes and how to reach it."""
    return hash_json({k: v for k, v in rf.config_record(cfg).items() if k != "out"} | {"version": SPECULATE_VERSION})


def run_speculative(cfg: SpeculateConfig, progress: Progress | None = None, overwrite: bool = False) -> SpeculateResult:
    """Measure cfg's drafter configuration on cfg's pairs and write the outputs under cfg.out.

    ``cfg.out`` must be new, empty or an earlier run of the same settings (``overwrite=True``: any
    earlier speculative run); one run owns it at a time (:mod:`egpt_core.outdir`)."""
    t_start = time.perf_counter()
    source = check_config(cfg)
    plan = plan_pairs(cfg)
    _check_checkpoints(cfg, source)
    with outdir.claim_output(cfg.out, OUTPUT_KIND, output_identity(cfg), cfg.storage_options or None,
                             replace=overwrite):
        write_sd_outputs(Location(cfg.out, cfg.storage_options), {"sd_run.json": _run_marker(cfg, "running")})
        return _measure(cfg, source, plan, progress, t_start)


def _measure(cfg: SpeculateConfig, source: str, plan: PairPlan, progress: Progress | None,
             t_start: float) -> SpeculateResult:
    """Load the models, run the loop over the pairs (warm-up untimed), aggregate, write the outputs."""
    so = cfg.storage_options
    gammas = sorted(cfg.gammas)
    reader = plan.reader
    store_mode = reader.info.meta.mode if reader is not None else None
    lm_head = None
    if reader is not None and reader.info.lm_head is not None:
        lm_head = reader.lm_head().float()
    models = load_models(cfg, source, lm_head)
    name = default_name(cfg, source, models.level)
    notes = list(plan.notes)
    cross = None
    if reader is not None and source != "target_only" and models.head is not None:
        cross, note = _cross_check_setup(cfg, reader, store_mode, models, lm_head, gammas)
        notes.append(note)
    records, timeline, failed = _measure_pairs(cfg, source, plan, models, gammas, name, progress)
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        raise ConfigError(f"no pair could be measured ({len(failed)} failed: {next(iter(failed.values()), '')})")
    aggregates = measure.aggregate(ok, gammas if source != "target_only" else [0])
    cross_result = None
    if cross is not None:
        cross_result = _cross_check_run(cross, reader, models, ok, gammas).result(aggregates)
    model_check = measure.speedup_model_check(aggregates, ok) if source != "target_only" else {}
    notes += _result_notes(cfg, source, models)
    doc = _metrics_doc(cfg, name, source, models, plan, store_mode, gammas, aggregates, cross_result, model_check,
                       failed, notes, time.perf_counter() - t_start)
    files = build_outputs(doc, records, timeline)
    files["sd_run.json"] = _run_marker(cfg, "complete")
    write_sd_outputs(Location(cfg.out, so), files)
    if progress is not None:
        progress(1.0, f"wrote {cfg.out}")
    return SpeculateResult(out_url=cfg.out, name=name, source=source, mode=cfg.mode, n_pairs=len({r["pair_id"] for r in ok}),
                           n_failed=len(failed), summary=doc["summary"])


def _measure_pairs(cfg: SpeculateConfig, source: str, plan: PairPlan, models: Models, gammas: list[int], name: str,
                   progress: Progress | None) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, str]]:
    """Run the loop over the plan's pairs (the first ``warmup_pairs`` once untimed): (per-pair and
    per-γ records, one pair's prefill-hiding timeline, {pair_id: why it failed})."""
    tsess, dsess = _sessions(models)
    eos = models.target.tokenizer.eos_token_id
    inputs = _InputCache(cfg, models)
    records: list[dict[str, Any]] = []
    timeline: dict[str, Any] = {}
    failed: dict[str, str] = dict(plan.skipped)

    def measure_pair(pair: Pair, keep: bool) -> None:
        try:
            inp = inputs.inputs(pair)
        except BadInputError as exc:
            if keep:
                failed[pair.pair_id] = str(exc)
                records.append(_ids(pair) | {"status": "failed", "reason": str(exc), "gamma": None})
            return
        baseline = target_greedy(tsess, inp, cfg.max_new_tokens, eos)
        if source == "target_only":
            if keep:
                records.append(_ids(pair) | {"status": "ok", "reason": None} | measure.baseline_record(baseline))
            return
        for g in gammas if keep else gammas[:1]:
            gen = speculative_generate(tsess, dsess, models.head, inp, g, cfg.max_new_tokens, eos, mode=cfg.mode,
                                       hide_prefill=cfg.prefill_hiding)
            if keep:
                rec = _ids(pair) | {"status": "ok", "reason": None} | measure.pair_record(gen, baseline, g)
                records.append(rec)
                if not timeline and g == gammas[-1]:  # one pair's prefill-hiding timeline for the plot
                    timeline.update(pair_id=pair.pair_id, gamma=g, sd=gen.timeline.as_records(),
                                    baseline=baseline.timeline.as_records())

    pairs = plan.pairs
    for pair in pairs[: cfg.warmup_pairs]:  # untimed: first calls allocate and compile kernels
        measure_pair(pair, keep=False)
    bar = tqdm(total=len(pairs), desc=f"speculate[{name}]", unit="pair", disable=None)
    for i, pair in enumerate(pairs):
        measure_pair(pair, keep=True)
        bar.update(1)
        if progress is not None:
            progress((i + 1) / len(pairs), f"{i + 1}/{len(pairs)} pairs measured")
    bar.close()

    return records, timeline, failed


def _result_notes(cfg: SpeculateConfig, source: str, models: Models) -> list[str]:
    """Caveats on reading this run's numbers (L4 context, target-fed levels, research mode)."""
    notes: list[str] = []
    if source == "identity" or source == "adapter":
        if models.head is not None and models.head.kind == "sequence" and models.level == "L4":
            notes.append("L4 is bidirectional: offline it attends to rows after t, which a real loop does not have "
                         "(here it sees rows 0..t); measured and simulated acceptance differ by that context.")
        if models.level is not None and level_spec(models.level).leaks_target:
            notes.append(f"{models.level} drafts from the target's verified rows (next-position head, rolled out "
                         "within a round); its offline same-position metrics leak the target and are not comparable.")
    if cfg.mode == "research":
        notes.append("research mode: drafts are windows of the drafter's own once-decoded answer (never "
                     "re-synchronised to the accepted prefix); the window starts at the first unverified position "
                     "(research bug B5 fixed).")
    return notes


def _check_checkpoints(cfg: SpeculateConfig, source: str) -> None:
    """Local checkpoint directories must exist (a cheap check before the output directory is claimed)."""
    from egpt_core.fsio import is_local

    named = {"target": cfg.target, "drafter": cfg.drafter if source != "target_only" else None,
             "adapter_run": cfg.adapter_run, "lora": cfg.lora}
    for what, url in named.items():
        if url and is_local(url) and not Path(str(url).removeprefix("file://")).is_dir():
            raise ConfigError(f"{what}={url!r} is not a directory (give the checkpoint / run directory)")
    if cfg.adapter_run and is_local(cfg.adapter_run):
        which = weights_file_name(cfg.adapter_which)
        if not (Path(str(cfg.adapter_run).removeprefix("file://")) / which).is_file():
            raise ConfigError(f"adapter_run={cfg.adapter_run!r} has no {which} (is it an adapter run directory?)")


def _ids(pair: Pair) -> dict[str, Any]:
    return {"pair_id": pair.pair_id, "scene_id": pair.scene.scene_id, "question_idx": pair.question_idx,
            "question": pair.question}


def _run_marker(cfg: SpeculateConfig, status: str) -> bytes:
    import json

    return json.dumps({"kind": "egpt-speculate-run", "status": status, "version": SPECULATE_VERSION,
                       "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}, indent=2).encode()


# ------------------------------------------------------------------------------------------------
# cross-check (a)
# ------------------------------------------------------------------------------------------------
def _cross_check_setup(cfg, reader, store_mode, models: Models, lm_head, gammas):
    if cfg.mode != "resync":
        return None, "cross-check skipped: measured acceptance equals the simulated rounds only in resync mode"
    if store_mode not in ("shared_prefix", "retf"):
        return None, (f"cross-check skipped: store mode {store_mode!r}; the offline rounds equal SD rounds only on "
                      "shared_prefix / retf stores (drafter row t conditions on the target's tokens < t)")
    if models.head.uses_target_rows:
        return None, f"cross-check skipped: {models.level} drafts from verified target rows, which the store cannot replay"
    if lm_head is None:
        return None, "cross-check skipped: the store has no target LM head"
    gen = reader.info.meta.generation or {}
    if gen.get("max_new_tokens") not in (None, cfg.max_new_tokens):
        return None, (f"cross-check skipped: the store's answers were generated with max_new_tokens "
                      f"{gen.get('max_new_tokens')}, this run uses {cfg.max_new_tokens}")
    note = "cross-check: measured acceptance vs `egpt evaluate`'s simulated rounds on the store's rows of the same pairs"
    dtypes = (reader.info.meta.dtype, reader.info.lm_head.dtype if reader.info.lm_head is not None else None)
    if dtypes != ("float32", "float32"):
        note += (f" (store rows / LM head in {dtypes[0]} / {dtypes[1]}: rounding of the stored rows can flip near-ties; "
                 "extract with store_dtype float32 for an exact check)")
    return measure.CrossCheck(lm_head, gammas, cfg.max_new_tokens, models.head.device), note


def _cross_check_run(cross: measure.CrossCheck, reader, models: Models, ok: list[dict], gammas) -> measure.CrossCheck:
    head = models.head
    by_pair: dict[str, dict[int, dict]] = {}
    for r in ok:
        by_pair.setdefault(r["pair_id"], {})[r["gamma"]] = r
    for pair_id, recs in by_pair.items():
        rows = reader.get(pair_id)
        drafter = rows.drafter.float().to(head.device)
        target = rows.target.float().to(head.device)
        with torch.no_grad():
            if head.adapter is None:
                pred = drafter
            else:
                from egpt_core.adapters import apply_adapter

                mask = torch.ones(1, drafter.shape[0], dtype=torch.bool, device=head.device)
                pred = apply_adapter(head.adapter, head.adapter_cfg, drafter[None], target[None], mask)[0]
            top = (pred @ head.weight.T).topk(2, dim=-1)
            margins = (top.values[:, 0] - top.values[:, 1]).tolist()
        sim = cross.add(pair_id, pred.cpu(), target.cpu(), list(rows.target_response_ids), margins, recs)
        for g, accepted in sim.items():
            recs[g]["sim_round_accepted"] = accepted
    return cross


# ------------------------------------------------------------------------------------------------
# the metrics document
# ------------------------------------------------------------------------------------------------
def _metrics_doc(cfg, name, source, models: Models, plan: PairPlan, store_mode, gammas, aggregates, cross,
                 model_check, failed, notes, seconds) -> dict[str, Any]:
    dump = rf.config_record(cfg)
    pair_ids = sorted({p.pair_id for p in plan.pairs})
    inputs = {
        "config": dump, "source": source, "adapter_level": models.level, "fingerprints": models.fingerprints,
        "store": cfg.store, "store_fingerprint": plan.reader.fingerprint if plan.reader is not None else None,
        "store_mode": store_mode, "dataset": plan.dataset, "pairs": len(plan.pairs),
        "pairs_fingerprint": hash_json(pair_ids), "device": str(models.target.device),
        "drafter_device": str(models.drafter.device) if models.drafter is not None else None,
        "dtype": cfg.load.dtype, "quant": cfg.load.quant, "version": SPECULATE_VERSION,
    }
    inputs["run_fingerprint"] = hash_json({k: inputs[k] for k in ("fingerprints", "store_fingerprint",
                                                                  "pairs_fingerprint", "version")}
                                          | {"gammas": gammas, "mode": cfg.mode, "max_new_tokens": cfg.max_new_tokens})
    summary: dict[str, Any] = {"name": name, "mode": cfg.mode, "n_pairs": len(set(pair_ids) - set(failed)),
                               "n_failed": len(failed)}
    for g, a in aggregates.items():
        for key in ("acceptance_length", "accept_rate", "tokens_per_round", "speedup_e2e", "speedup_decode",
                    "lossless_mismatches"):
            summary[f"{key}_gamma{g}"] = a.get(key)
        if cross and cross["per_gamma"].get(g):
            summary[f"simulated_acceptance_length_gamma{g}"] = cross["per_gamma"][g]["simulated"]
            summary[f"round_agreement_gamma{g}"] = cross["per_gamma"][g]["round_agreement"]
        mc = model_check.get(g) if model_check else None
        if mc:
            summary[f"predicted_speedup_e2e_gamma{g}"] = mc["predicted_e2e"]
            summary[f"speedup_model_error_gamma{g}"] = mc["relative_error"]
    return {
        "schema": METRICS_SCHEMA, "name": name,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "inputs": inputs, "notes": notes, "gammas": gammas, "per_gamma": aggregates, "cross_check": cross,
        "speedup_model": model_check, "failed": failed, "summary": summary, "seconds": round(seconds, 2),
    }


def drafter_load(cfg: SpeculateConfig) -> ModelLoadConfig:
    return cfg.load if not cfg.drafter_device else cfg.load.model_copy(update={"device": cfg.drafter_device})


__all__ = ["SpeculateResult", "run_speculative", "plan_pairs", "prediction_source", "check_config"]
