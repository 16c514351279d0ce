"""Stage 2: paired hidden-state extraction into a store (DESIGN.md §3.3).

Modes:
- ``shared_prefix`` (default): the target generates greedily (AR, batched, left padded) which gives
  its tokens and rows; the drafter then runs teacher-forced over the same tokens (one forward per
  batch). Drafter row t and target row t condition on the same prefix.
- ``independent``: both generate; rows are paired by position, cut to the shorter length; pairs
  under ``min_tokens`` are skipped (reproduces the research data).
- ``retf``: re-extract one side teacher-forced from the token ids of a source store (e.g. a drafter
  with an L6 LoRA merged), copying the other side's rows.

Work is planned as shards of ``shard_size`` pending pairs; each shard is committed to the store
atomically, so a rerun resumes after the last committed shard and a complete store does no model
work. Bad inputs are recorded per pair (status + reason) and the run goes on.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from egpt_core.config import ExtractConfig
from egpt_core.data import Pair, build_pairs, load_questions, load_scenes, read_video_frames
from egpt_core.data.dataset import questions_url
from egpt_core.errors import BadInputError, ConfigError, StoreError
from egpt_core.extraction import inputs as guards
from egpt_core.extraction.background import StoreWrites
from egpt_core.extraction.features import (
    SceneFeatureInputs,
    encode_scene_features,
    scene_feature_inputs,
)
from egpt_core.extraction.greedy import greedy_generate
from egpt_core.fingerprint import hash_json
from egpt_core.fsio import Location, canonical_url
from egpt_core.models.positions import POSITION_CONVENTION
from egpt_core.models.vocab import check_vocab_compat, vocab_tokens
from egpt_core.store import StoreReader, StoreWriter, committed_inputs
from egpt_core.store.retrying import with_retries
from egpt_core.store.schema import PairRecord

log = logging.getLogger(__name__)

EXTRACTION_VERSION = "extract-v1"

Progress = Callable[[float, str], None]


@dataclass
class ExtractSummary:
    """What an extraction run did (small: safe to return from a Prefect task)."""

    store_url: str
    store_fingerprint: str
    mode: str
    counts: dict[str, int]
    pairs_total: int
    pairs_pending: int
    shards_committed: int
    pairs_processed: int
    seconds: float
    reasons: dict[str, int] = field(default_factory=dict)
    lm_head_written: bool = False
    features: dict[str, int] = field(default_factory=dict)


def plan_pairs(cfg: ExtractConfig) -> list[Pair]:
    """All pairs of the dataset (scene order outer, questions inner), restricted to cfg's group."""
    scenes = load_scenes(cfg.dataset, cfg.storage_options, cfg.max_scenes)
    questions = load_questions(questions_url(cfg.dataset, cfg.questions), cfg.storage_options,
                               cfg.max_questions)
    pairs = build_pairs(scenes, questions)
    if cfg.group_index is not None:  # < shard_groups (ExtractConfig's validator)
        pairs = [p for p in pairs if pair_group(p.pair_id, cfg.shard_groups) == cfg.group_index]
    return pairs


def pair_group(pair_id: str, n_groups: int) -> int:
    """Stable shard group of a pair (independent of dataset order and of pairs added later)."""
    return int(hashlib.sha1(pair_id.encode()).hexdigest()[:8], 16) % n_groups


def store_meta(cfg: ExtractConfig, drafter, target) -> dict:
    """Manifest metadata; ``compat_key`` pins what every shard of a store must share."""
    models = {}
    if drafter is not None:
        models["drafter"] = {"path": cfg.drafter, "fingerprint": drafter.fingerprint}
    if target is not None:
        models["target"] = {"path": cfg.target, "fingerprint": target.fingerprint}
    hidden = (target or drafter).hidden_size
    generation = {"max_new_tokens": cfg.max_new_tokens, "min_tokens": cfg.min_tokens, "greedy": True}
    settings = {
        "version": EXTRACTION_VERSION, "mode": cfg.mode, "generation": generation,
        "events": cfg.events.model_dump(mode="json"), "n_video_frames": cfg.n_video_frames,
        "models": {k: v["fingerprint"] for k, v in models.items()}, "retf_side": cfg.retf_side if cfg.mode == "retf" else None,
        # the CLIP directory's content is in the drafter fingerprint; its local path is not store-defining
        "load": cfg.load.model_dump(mode="json", exclude={"clip_path"}),
    }
    if cfg.frame_sampling != "linspace":  # (absent at the default: stores written before keep their key)
        settings["frame_sampling"] = cfg.frame_sampling
    return {
        "model_fingerprints": settings["models"],  # defining: a store holds one model pair's rows
        "config_fingerprint": hash_json({k: v for k, v in settings.items() if k != "models"}),
        "mode": cfg.mode,
        "position_convention": POSITION_CONVENTION,
        "hidden_size": hidden,
        "dtype": cfg.store_dtype,
        "models": models,
        "generation": generation,
        "events": cfg.events.model_dump(mode="json"),
        "n_video_frames": cfg.n_video_frames,
        "frame_sampling": cfg.frame_sampling,
        "dataset": canonical_url(cfg.dataset),  # absolute: a worker in another cwd finds it again
        "source_store": cfg.source_store if cfg.mode == "retf" else None,
        "compat_key": hash_json(settings),
        "compat_settings": settings,  # what compat_key hashes: a mismatch names the setting that differs
    }


def _record(pair: Pair, status: str = "ok", reason: str | None = None, input_fingerprint: str | None = None) -> dict:
    """A fresh store record of ``pair`` (:class:`PairRecord`'s fields, as the dict the batch fills in)."""
    return PairRecord(pair_id=pair.pair_id, scene_id=pair.scene.scene_id, question_idx=pair.question_idx,
                      question=pair.question, status=status, reason=reason,
                      input_fingerprint=input_fingerprint).to_row()


VIDEO_WORKERS = 2  # threads decoding + processing scene inputs ahead of the model work (PyAV releases the GIL)
BACKGROUND_WRITES = True  # shard commits + feature-cache files in a writer thread (False: inline)
FEATURE_SCENES_AHEAD = 4  # scenes whose event input the features task prepares ahead (bounded memory)
_PROMPT_MEMO = 4096  # questions whose prompt ids are kept (a dataset asks the same questions of every scene)


class _ScenePrefetch:
    """Per-scene inputs prepared once, in background threads, for the shard being extracted and the
    next one (bounded: futures of other scenes are dropped): the video decoded and run through the
    target's video processor, and the drafter's event input (feature-cache lookup, else rendered and
    CLIP-preprocessed frames). No model forward runs here. An error surfaces, as itself, where a pair
    asks for the input."""

    def __init__(self, cfg: ExtractConfig, target, workers: int | None = None, drafter=None, writer=None):
        self.cfg, self.target, self.drafter, self.writer = cfg, target, drafter, writer
        workers = VIDEO_WORKERS if workers is None else workers  # read at run time (tests set it to 0)
        wanted = target is not None or (drafter is not None and writer is not None)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="video-decode") \
            if wanted and workers > 0 else None
        self.futures: dict[tuple[str, str], Future] = {}

    def _load(self, scene):
        if not scene.video_path:
            raise BadInputError(scene.scene_id, "scene has no video (video_data)")
        frames = read_video_frames(scene.video_path, self.cfg.n_video_frames, self.cfg.storage_options,
                                   strategy=self.cfg.frame_sampling)
        return self.target.prepare_video(frames)

    def _load_events(self, scene) -> SceneFeatureInputs:
        return scene_feature_inputs(scene, self.drafter, self.cfg.events, self.writer, self.cfg.storage_options)

    def _jobs(self):
        if self.target is not None:
            yield "video", self._load
        if self.drafter is not None and self.writer is not None:
            yield "events", self._load_events

    def schedule(self, pairs: Sequence[Pair]) -> None:
        """Start preparing the inputs of the scenes of ``pairs`` (in order); forget those of other scenes."""
        self.schedule_scenes([p.scene for p in pairs])

    def schedule_scenes(self, scenes: Sequence) -> None:
        """Start preparing the inputs of ``scenes`` (in order); forget those of other scenes."""
        if self.pool is None:
            return
        wanted = {s.scene_id: s for s in scenes}
        for key in [k for k in self.futures if k[1] not in wanted]:
            self.futures.pop(key).cancel()
        for sid, scene in wanted.items():
            for kind, load in self._jobs():
                if (kind, sid) not in self.futures:
                    self.futures[kind, sid] = self.pool.submit(load, scene)

    def _result(self, kind: str, scene, load: Callable):
        fut = self.futures.get((kind, scene.scene_id)) if self.pool is not None else None
        return fut.result() if fut is not None else load(scene)

    def get(self, pair: Pair):
        """The pair's video, processed (``VideoLlavaTarget.prepare_video``)."""
        return self._result("video", pair.scene, self._load)

    def get_events(self, pair: Pair) -> SceneFeatureInputs:
        """The pair's event input: cached features or preprocessed frames (:func:`scene_feature_inputs`)."""
        return self.scene_events(pair.scene)

    def scene_events(self, scene) -> SceneFeatureInputs:
        """A scene's event input: cached features or preprocessed frames (:func:`scene_feature_inputs`)."""
        return self._result("events", scene, self._load_events)

    def close(self) -> None:
        for f in self.futures.values():
            f.cancel()
        self.futures.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Inputs:
    """Model inputs of the run's pairs, each computed once: a scene's features and video (memo kept
    for the scenes of the current shard, so a scene that continues into the next shard is not looked
    up again) and a question's prompt ids; bad input becomes a recorded reason.

    ``fingerprints``: pair_id -> input fingerprint (recorded with each pair); ``reserved``: strings a
    question must not contain (the models' placeholders and control tokens); ``scenes``: the run's
    background scene-input preparation (None: inline); ``writes``: where new features are cached
    (None: the writer, inline)."""

    def __init__(self, cfg: ExtractConfig, drafter, target, writer, stats: dict,
                 fingerprints: dict[str, str] | None = None, reserved: list[str] | None = None,
                 scenes: _ScenePrefetch | None = None, writes: StoreWrites | None = None):
        self.cfg, self.drafter, self.target, self.writer, self.stats = cfg, drafter, target, writer, stats
        self.fingerprints = fingerprints or {}
        self.reserved = reserved if reserved is not None else guards.reserved_strings(drafter, target)
        self.scenes = scenes if scenes is not None else _ScenePrefetch(cfg, target, workers=0, drafter=drafter,
                                                                       writer=writer)
        self.writes = writes if writes is not None else StoreWrites(writer, threaded=False)
        self._features: dict[str, torch.Tensor | BadInputError] = {}
        self._video: dict[str, object] = {}
        self._d_prompts: dict[str, list[int]] = {}
        self._t_prompts: dict[tuple, list[int]] = {}

    def start_shard(self, shard: Sequence[Pair]) -> None:
        """Keep the per-scene memo of the scenes of ``shard`` only (memory stays bounded by a shard)."""
        keep = {p.scene.scene_id for p in shard}
        for memo in (self._features, self._video):
            for sid in [s for s in memo if s not in keep]:
                del memo[sid]

    _memo = staticmethod(guards.once_per_scene)

    def _scene_features(self, pair: Pair) -> torch.Tensor:
        got = self.scenes.get_events(pair)
        if got.cached is not None:
            self.stats["features_cached"] = self.stats.get("features_cached", 0) + 1
            return got.cached
        feats = encode_scene_features(self.drafter, got)
        self.writes.put_features(got.key, feats)
        self.stats["features_computed"] = self.stats.get("features_computed", 0) + 1
        return feats

    def features(self, pair: Pair) -> torch.Tensor:
        """The scene's pooled event features [F + S, D] (cache, else computed and cached)."""
        return self._memo(self._features, pair.scene.scene_id, lambda: self._scene_features(pair))

    def video(self, pair: Pair):
        """The scene's video, decoded and processed once (``VideoLlavaTarget.prepare_video``)."""
        return self._memo(self._video, pair.scene.scene_id, lambda: self.scenes.get(pair))

    def drafter_prompt(self, question: str) -> list[int]:
        """The drafter's prompt ids of ``question`` (tokenised once per question)."""
        ids = self._d_prompts.get(question)
        if ids is None:
            if len(self._d_prompts) >= _PROMPT_MEMO:
                self._d_prompts.clear()
            ids = self._d_prompts[question] = self.drafter.prompt_ids(question)
        return list(ids)

    def target_prompt(self, pair: Pair) -> tuple[list[int], torch.Tensor]:
        """(expanded prompt ids, pixel values [F, 3, H, W]) of the pair: ``target.prepare_question``, once
        per (question, video shape) where it reuses the prepared video's pixel values (its ids depend
        on nothing else then)."""
        video = self.video(pair)
        key = (pair.question, tuple(video.pixel_values.shape))
        ids = self._t_prompts.get(key)
        if ids is not None:
            return list(ids), video.pixel_values
        ids, pv = self.target.prepare_question(pair.question, video)
        if pv is video.pixel_values:
            if len(self._t_prompts) >= _PROMPT_MEMO:
                self._t_prompts.clear()
            self._t_prompts[key] = list(ids)
        return ids, pv


def _response_status(ids: list[int], eos: int | None, min_tokens: int) -> tuple[str, str | None]:
    if not ids or (len(ids) == 1 and ids[0] == eos):
        return "failed", "empty generation"
    if len(ids) < min_tokens:
        return "skipped", f"response shorter than min_tokens ({len(ids)} < {min_tokens})"
    return "ok", None


@dataclass
class _Batch:
    """One batch in flight: a record per pair, its rows (None unless ok) and, for the pairs still
    ``live`` (inputs built), the drafter's features/prompt and the target's prompt/video."""

    pairs: list[Pair]
    recs: list[dict]
    d_rows: list
    t_rows: list
    live: list[int] = field(default_factory=list)
    feats: dict = field(default_factory=dict)
    d_prompts: dict = field(default_factory=dict)
    t_prompts: dict = field(default_factory=dict)
    videos: dict = field(default_factory=dict)


def _extract_batch(batch: list[Pair], mode: str, cfg: ExtractConfig, drafter, target, inputs: _Inputs,
                   source_rows: dict | None) -> tuple[list[dict], list, list]:
    """Process one batch -> (records, drafter rows, target rows); rows are None for non-ok pairs."""
    b = _prepare_batch(batch, mode, cfg, drafter, target, inputs, source_rows)
    if b.live:
        if mode == "shared_prefix":
            _shared_prefix(b, cfg, drafter, target)
        elif mode == "independent":
            _independent(b, cfg, drafter, target)
        else:
            _retf(b, cfg.retf_side, drafter, target, source_rows)
    return b.recs, b.d_rows, b.t_rows


def _prepare_batch(batch: list[Pair], mode: str, cfg: ExtractConfig, drafter, target, inputs: _Inputs,
                   source_rows: dict | None) -> _Batch:
    """Records and model inputs of a batch; a pair whose question, inputs or context size is bad is
    recorded as failed (with the reason) and left out of ``live``."""
    b = _Batch(batch, [_record(p, input_fingerprint=inputs.fingerprints.get(p.pair_id)) for p in batch],
               [None] * len(batch), [None] * len(batch))
    recs = b.recs
    for i, p in enumerate(batch):
        problem = guards.question_problem(p.question, inputs.reserved)
        if problem:
            recs[i].update(status="failed", reason=problem)
            continue
        new_tokens = cfg.max_new_tokens if mode != "retf" else int(source_rows[p.pair_id]["length"])
        try:
            if drafter is not None:
                b.feats[i] = inputs.features(p)
                b.d_prompts[i] = inputs.drafter_prompt(p.question)
                recs[i]["drafter_prompt_ids"] = [int(x) for x in b.d_prompts[i]]
                problem = guards.context_problem("drafter", drafter.model.expanded_len(b.d_prompts[i],
                                                                                      b.feats[i].shape[0]),
                                                 new_tokens, guards.context_size(drafter))
            if target is not None and problem is None:
                b.t_prompts[i], b.videos[i] = inputs.target_prompt(p)
                recs[i]["target_prompt_ids"] = b.t_prompts[i]
                problem = guards.context_problem("target", len(b.t_prompts[i]), new_tokens, guards.context_size(target))
        except BadInputError as exc:
            problem = str(exc)
        except ValueError as exc:  # the processor refusing a prompt: this pair's problem, not the run's
            problem = f"the prompt could not be built: {exc}"
        if problem:
            recs[i].update(status="failed", reason=problem)
        else:
            b.live.append(i)
    return b


def _shared_prefix(b: _Batch, cfg: ExtractConfig, drafter, target) -> None:
    """The target generates; the drafter is teacher-forced on the target's response (ok pairs only)."""
    recs, live = b.recs, b.live
    ids, rows = greedy_generate(target, [b.t_prompts[i] for i in live], [b.videos[i] for i in live],
                                cfg.max_new_tokens)
    eos = target.tokenizer.eos_token_id
    tf_idx = []
    for j, i in enumerate(live):
        status, reason = _response_status(ids[j], eos, cfg.min_tokens)
        recs[i].update(target_response_ids=ids[j], target_text=target.decode(ids[j]), status=status, reason=reason)
        if status == "ok" and max(ids[j]) >= drafter.model.get_input_embeddings().num_embeddings:
            recs[i].update(status="failed", reason="target token outside the drafter vocabulary")
        if recs[i]["status"] == "ok":
            b.t_rows[i] = rows[j]
            tf_idx.append(i)
    if tf_idx:
        fed = [recs[i]["target_response_ids"] for i in tf_idx]
        drows = drafter.teacher_forced([b.d_prompts[i] for i in tf_idx], fed, [b.feats[i] for i in tf_idx])
        for i, r, f in zip(tf_idx, drows, fed):
            recs[i].update(drafter_response_ids=list(f), drafter_text=drafter.decode(f), length=len(f))
            b.d_rows[i] = r


def _independent(b: _Batch, cfg: ExtractConfig, drafter, target) -> None:
    """Both models generate freely; rows are paired up to the shorter response."""
    recs, live = b.recs, b.live
    t_ids, t_r = greedy_generate(target, [b.t_prompts[i] for i in live], [b.videos[i] for i in live],
                                 cfg.max_new_tokens)
    d_ids, d_r = drafter.generate([b.d_prompts[i] for i in live], [b.feats[i] for i in live], cfg.max_new_tokens)
    for j, i in enumerate(live):
        recs[i].update(target_response_ids=t_ids[j], target_text=target.decode(t_ids[j]),
                       drafter_response_ids=d_ids[j], drafter_text=drafter.decode(d_ids[j]))
        n = min(len(t_ids[j]), len(d_ids[j]))
        if n < cfg.min_tokens:
            recs[i].update(status="skipped",
                           reason=f"aligned length shorter than min_tokens ({n} < {cfg.min_tokens})")
            continue
        recs[i]["length"] = n
        b.d_rows[i], b.t_rows[i] = d_r[j][:n], t_r[j][:n]


def _retf(b: _Batch, side: str, drafter, target, source_rows: dict) -> None:
    """Re-extract ``side`` teacher-forced on the source store's token ids; the other side's rows are copied."""
    recs, live, batch = b.recs, b.live, b.pairs
    for i in live:
        src = source_rows[batch[i].pair_id]
        for k in ("target_response_ids", "drafter_response_ids", "target_text", "drafter_text",
                  "target_prompt_ids", "drafter_prompt_ids"):
            if src.get(k) is not None and (k not in ("drafter_prompt_ids", "target_prompt_ids") or not recs[i][k]):
                recs[i][k] = list(src[k]) if isinstance(src[k], list) else src[k]
        recs[i]["length"] = src["length"]
    if side == "drafter":
        fed = [source_rows[batch[i].pair_id]["drafter_response_ids"][: recs[i]["length"]] for i in live]
        new = drafter.teacher_forced([b.d_prompts[i] for i in live], fed, [b.feats[i] for i in live])
    else:
        fed = [source_rows[batch[i].pair_id]["target_response_ids"][: recs[i]["length"]] for i in live]
        new = target.teacher_forced([b.t_prompts[i] for i in live], fed, [b.videos[i] for i in live])
    for j, i in enumerate(live):
        src = source_rows[batch[i].pair_id]
        if side == "drafter":
            b.d_rows[i], b.t_rows[i] = new[j], src["target"]
        else:
            b.d_rows[i], b.t_rows[i] = src["drafter"], new[j]


def needs_drafter(cfg: ExtractConfig) -> bool:
    """The extraction runs the drafter (every mode but a retf of the target side)."""
    return cfg.mode != "retf" or cfg.retf_side == "drafter"


def needs_target(cfg: ExtractConfig) -> bool:
    """The extraction runs the target (every mode but a retf of the drafter side)."""
    return cfg.mode != "retf" or cfg.retf_side == "target"


def load_models(cfg: ExtractConfig):
    """(drafter, target) needed by cfg.mode; None for a side retf does not recompute."""
    from egpt_core.models.loading import load_eventgpt, load_videollava

    need_d, need_t = needs_drafter(cfg), needs_target(cfg)
    drafter = load_eventgpt(cfg.drafter, cfg.load, double_adaptor=cfg.events.double_feature_adaptor,
                            storage_options=cfg.storage_options) if need_d else None
    target = load_videollava(cfg.target, cfg.load, storage_options=cfg.storage_options) if need_t else None
    if drafter is not None and target is not None and drafter.hidden_size != target.hidden_size:
        raise ConfigError(f"drafter hidden size {drafter.hidden_size} != target hidden size {target.hidden_size}")
    return drafter, target


def store_exists(store: str | Location, storage_options: dict | None = None) -> bool:
    """True when a store has committed its manifest at ``store`` (a Location, or a URL with its
    ``storage_options``)."""
    manifest = Location.of(store, storage_options).child("manifest.json")
    return with_retries(manifest.fs).exists(manifest.path)


def pairs_to_extract(cfg: ExtractConfig, only_pairs: set[str] | list[str] | None = None
                     ) -> tuple[list[Pair], StoreReader | None]:
    """The pairs an extraction of ``cfg`` works on: its group's pairs, restricted to ``only_pairs``
    and, in retf mode, to the source store's ok pairs; plus that source store's reader (retf)."""
    pairs = plan_pairs(cfg)
    if only_pairs is not None:
        keep = set(only_pairs)
        pairs = [p for p in pairs if p.pair_id in keep]
    source = None
    if cfg.mode == "retf":
        source = StoreReader(cfg.source_store, cfg.storage_options)
        ok = set(source.pair_ids(status="ok"))
        pairs = [p for p in pairs if p.pair_id in ok]
    return pairs, source


def feature_scene_ids(cfg: ExtractConfig, only_pairs: list[str] | None = None) -> list[str]:
    """Scenes whose event features the extraction of cfg (restricted to ``only_pairs``) will need."""
    return list(dict.fromkeys(p.scene.scene_id for p in pairs_to_extract(cfg, only_pairs)[0]))


@dataclass
class FeaturesSummary:
    """What `compute_scene_features` did: scenes asked for, features computed / found cached, and
    the scenes whose events could not be read (each pair is recorded as failed again by extraction)."""

    scenes: int
    computed: int
    cached: int
    failed: dict[str, str]


def compute_scene_features(cfg: ExtractConfig, scene_ids: list[str] | set[str],
                           progress: Progress | None = None) -> FeaturesSummary:
    """Stage 1 for some scenes: pooled event features cached under the store's ``features/``. Loads
    the drafter only: a new store is created with the full metadata, which names the models the
    extraction records (retf: only the side it recomputes); the target's fingerprint and hidden size
    come from its files (the extract task loads the target, once). A scene whose events are bad is
    recorded, not fatal."""
    from egpt_core.models.loading import load_eventgpt, videollava_identity

    wanted = set(scene_ids)
    scenes = [s for s in load_scenes(cfg.dataset, cfg.storage_options, cfg.max_scenes) if s.scene_id in wanted]
    drafter = load_eventgpt(cfg.drafter, cfg.load, double_adaptor=cfg.events.double_feature_adaptor,
                            storage_options=cfg.storage_options)
    if store_exists(cfg.store, cfg.storage_options):
        writer = StoreWriter(cfg.store, {}, cfg.storage_options)
    else:
        need_d = cfg.mode != "retf" or cfg.retf_side == "drafter"
        target = videollava_identity(cfg.target, cfg.storage_options) \
            if cfg.mode != "retf" or cfg.retf_side == "target" else None
        if target is not None and target.hidden_size != drafter.hidden_size:
            raise ConfigError(f"drafter hidden size {drafter.hidden_size} != target hidden size "
                              f"{target.hidden_size} ({cfg.drafter}, {cfg.target})")
        writer = StoreWriter(cfg.store, store_meta(cfg, drafter if need_d else None, target), cfg.storage_options)
    stats: dict[str, int] = {}
    failed: dict[str, str] = {}
    ahead = _ScenePrefetch(cfg, None, drafter=drafter, writer=writer)  # events read + preprocessed ahead
    writes = StoreWrites(writer, threaded=BACKGROUND_WRITES)  # feature files written behind
    try:
        for i, scene in enumerate(scenes):
            ahead.schedule_scenes(scenes[i : i + FEATURE_SCENES_AHEAD])
            try:
                got = ahead.scene_events(scene)
                if got.cached is not None:
                    stats["features_cached"] = stats.get("features_cached", 0) + 1
                else:
                    writes.put_features(got.key, encode_scene_features(drafter, got))
                    stats["features_computed"] = stats.get("features_computed", 0) + 1
            except BadInputError as exc:
                failed[scene.scene_id] = str(exc)
            if progress is not None and i + 1 < len(scenes):
                progress((i + 1) / len(scenes), f"{i + 1}/{len(scenes)} scenes")
        writes.finish()
    except BaseException:
        writes.close()
        raise
    finally:
        ahead.close()
    if progress is not None and scenes:  # (once every feature file is written)
        progress(1.0, f"{len(scenes)}/{len(scenes)} scenes")
    return FeaturesSummary(scenes=len(scenes), computed=stats.get("features_computed", 0),
                           cached=stats.get("features_cached", 0), failed=failed)


def run_extraction(cfg: ExtractConfig, progress: Progress | None = None, only_pairs: set[str] | None = None,
                   models=None) -> ExtractSummary:
    """Extract every pending pair of cfg's dataset into cfg.store; returns counts (resumable, idempotent)."""
    t0 = time.perf_counter()
    pairs, source = pairs_to_extract(cfg, only_pairs)

    # content fingerprints of every planned pair's inputs, checked against what the store (and a retf
    # source) committed, before any model work: another dataset is refused, never mixed in
    fingerprints = guards.input_fingerprints(pairs, cfg.events, cfg.storage_options)
    if source is not None:
        side = ("event" if cfg.retf_side == "drafter" else "video", "question")
        source_inputs = {r["pair_id"]: (r["status"], r["input_fingerprint"]) for r in
                         source.pairs(columns=["pair_id", "status", "input_fingerprint"]).to_pylist()}
        guards.check_committed_inputs(pairs, fingerprints, source_inputs, store=cfg.store, dataset=cfg.dataset,
                                      render=cfg.events, only=side, source=cfg.source_store)
        for p in pairs:  # the other side's rows are the source's: so are its inputs
            fingerprints[p.pair_id] = source_inputs[p.pair_id][1] or fingerprints[p.pair_id]
    unchecked = guards.check_committed_inputs(pairs, fingerprints, committed_inputs(cfg.store, cfg.storage_options),
                                              store=cfg.store, dataset=cfg.dataset, render=cfg.events)
    if unchecked:
        log.warning("store %s: %d committed pairs were written before input fingerprints existed; their inputs "
                    "cannot be checked against dataset %s", cfg.store, unchecked, cfg.dataset)

    drafter, target = models if models is not None else load_models(cfg)
    check_pair_vocab(cfg, drafter, target, source)
    if source is not None and (target or drafter).hidden_size != source.hidden_size:
        raise ConfigError(f"retf: the {cfg.retf_side} has hidden size {(target or drafter).hidden_size} but the source "
                          f"store {cfg.source_store} has {source.hidden_size}; re-extract with a model of the same pair")
    writer = StoreWriter(cfg.store, store_meta(cfg, drafter, target), cfg.storage_options)
    try:
        return _extract_into(cfg, writer, pairs, fingerprints, drafter, target, source, progress, t0)
    except BaseException:
        try:  # a run that failed before its first commit leaves no store behind to block the rerun
            writer.discard_if_empty()
        except Exception as exc:  # the original error matters more
            log.warning("store %s: could not remove the empty store (%s)", cfg.store, exc)
        raise


def _extract_into(cfg: ExtractConfig, writer: StoreWriter, pairs: list[Pair], fingerprints: dict[str, str | None],
                  drafter, target,
                  source: StoreReader | None, progress: Progress | None, t0: float) -> ExtractSummary:
    committed = writer.committed_pair_ids()
    pending = [p for p in pairs if p.pair_id not in committed]
    reserved = guards.reserved_strings(drafter, target)
    stats: dict[str, int] = {}
    shards = [pending[i : i + cfg.shard_size] for i in range(0, len(pending), cfg.shard_size)]
    scenes = _ScenePrefetch(cfg, target, drafter=drafter, writer=writer)

    def ahead(k: int) -> list[Pair]:  # the pairs of shard k and the next
        return [*shards[k], *(shards[k + 1] if k + 1 < len(shards) else [])]

    n_done, lm_written = 0, False
    bar = tqdm(total=len(pending), desc=f"extract[{cfg.mode}]", unit="pair", disable=None)
    writes = StoreWrites(writer, threaded=BACKGROUND_WRITES)
    inputs = _Inputs(cfg, drafter, target, writer, stats, fingerprints, reserved, scenes, writes)
    try:
        if shards:
            scenes.schedule(ahead(0))  # the first videos decode while the LM head is written
        if target is not None:
            weight, dtype = target_lm_head(cfg, target)
            lm_written = writer.write_lm_head(weight, target.fingerprint, dtype=dtype,
                                              vocab=vocab_tokens(target.tokenizer)) or False
        elif source is not None:
            lm_written = _copy_lm_head(source, writer)
        for k, shard in enumerate(shards):
            scenes.schedule(ahead(k))
            n_done = _extract_shard(cfg, writes, shard, drafter, target, source, inputs, bar,
                                    progress if k + 1 < len(shards) else None, n_done, len(pending))
        n_shards = len(writes.finish())
    except BaseException:
        writes.close()  # the shards extracted before the failure are still committed
        raise
    finally:
        scenes.close()
        bar.close()
    if progress and shards:  # (the last shard's line: once its commit has ended)
        progress(1.0, f"{n_done}/{len(pending)} pairs, {n_shards} shards committed")
    man = StoreReader(cfg.store, cfg.storage_options).info
    reasons = dict(man.reasons)  # counted per shard at commit: no table reads here
    return ExtractSummary(
        store_url=cfg.store, store_fingerprint=man.fingerprint,
        mode=cfg.mode, counts=dict(man.counts), pairs_total=len(pairs), pairs_pending=len(pending),
        shards_committed=n_shards, pairs_processed=n_done, seconds=round(time.perf_counter() - t0, 3),
        reasons=reasons, lm_head_written=bool(lm_written), features=stats,
    )


def _extract_shard(cfg: ExtractConfig, writes: StoreWrites, shard: list[Pair], drafter, target,
                   source: StoreReader | None, inputs: _Inputs, bar, progress: Progress | None, n_done: int,
                   n_pending: int) -> int:
    """Extract one shard and hand it over for committing (in the background) -> pairs done so far."""
    inputs.start_shard(shard)
    source_rows = _source_rows(source, shard) if source is not None else None
    records, d_rows, t_rows = [], [], []
    for b in range(0, len(shard), cfg.batch_size):
        batch = shard[b : b + cfg.batch_size]
        r, d, t = _extract_batch(batch, cfg.mode, cfg, drafter, target, inputs, source_rows)
        records += r
        d_rows += d
        t_rows += t
        bar.update(len(batch))
    writes.commit_shard(records, d_rows, t_rows)  # after the shards before it; their errors raise here
    n_done += len(shard)
    if progress:
        progress(n_done / max(n_pending, 1),
                 f"{n_done}/{n_pending} pairs, {len(writes.committed)} shards committed")
    return n_done


def _source_rows(source: StoreReader, shard: list[Pair]) -> dict:
    out = {}
    for p in shard:
        rows = source.get(p.pair_id)
        rec = {k: getattr(rows, k, None) for k in ("drafter_response_ids", "target_response_ids",
                                                    "drafter_prompt_ids", "target_prompt_ids",
                                                    "drafter_text", "target_text")}  # retf keeps the token ids
        rec.update(drafter=rows.drafter.float(), target=rows.target.float(), length=int(rows.target.shape[0]))
        out[p.pair_id] = rec
    return out


def check_pair_vocab(cfg: ExtractConfig, drafter, target, source: StoreReader | None) -> None:
    """The extraction's one vocabulary check (every mode), before any model work.

    With both models loaded their tokenizers are compared. ``retf`` recomputes one side from the
    source store's token ids, which are the source target's: the recomputed side is compared with the
    target vocabulary the source store records (else with the other checkpoint's tokenizer).
    """
    if drafter is not None and target is not None:
        check_vocab_compat(drafter.tokenizer, target.tokenizer, f"drafter {cfg.drafter}", f"target {cfg.target}")
        return
    if source is None:
        return
    side, name = (drafter, f"drafter {cfg.drafter}") if drafter is not None else (target, f"target {cfg.target}")
    recorded = source.target_vocab()
    if recorded is not None:
        check_vocab_compat(side.tokenizer, recorded, name, f"source store {cfg.source_store}'s target (whose "
                                                         "token ids are re-fed)")
        return
    from egpt_core.models.loading import local_checkpoint
    from egpt_core.models.vocab import load_tokenizer

    other = cfg.target if drafter is not None else cfg.drafter
    other_tok = load_tokenizer(local_checkpoint(other, cfg.storage_options))
    pair = (side.tokenizer, other_tok) if drafter is not None else (other_tok, side.tokenizer)
    names = (name, f"target {other}") if drafter is not None else (f"drafter {other}", name)
    check_vocab_compat(*pair, *names)


def target_lm_head(cfg: ExtractConfig, target) -> tuple[torch.Tensor, str]:
    """The LM head to store and its dtype: the loaded model's (``lm_head_dtype='model'``), or the
    checkpoint's own values in float32 (``'float32'``: no bf16/NF4-load rounding, so near-tie argmaxes
    over the vocabulary are decided exactly)."""
    if cfg.lm_head_dtype == "float32":
        from egpt_core.models.loading import checkpoint_lm_head

        return checkpoint_lm_head(target.path, cfg.storage_options), "float32"
    head = target.model.get_output_embeddings().weight
    return target.lm_head_weight(), {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(head.dtype, "float32")


def _copy_lm_head(source: StoreReader, writer: StoreWriter) -> bool:
    try:
        weight = source.lm_head()
    except StoreError:  # source has none (e.g. a research import): nothing to copy
        return False
    info = source.info.lm_head  # present: lm_head() read it
    return bool(writer.write_lm_head(weight, info.target_fingerprint, dtype=info.dtype, vocab=source.target_vocab()))
