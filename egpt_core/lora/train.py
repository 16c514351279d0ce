"""Stage 3b — L6: LoRA on the drafter's decoder so its teacher-forced rows approach the target's rows.

Per pair the drafter runs teacher-forced over its stored prompt ids (with the -200 event sentinel)
and the response ids it was fed at extraction (shared_prefix: the target's tokens), with the scene's
cached event features. Rows are taken by the position convention (`EventGPTDrafter.tf_hidden` +
`gather_rows`: row t = position P-1+t, the state that predicts g_t) — not the research "last T
positions" slice (bug B3). The loss compares them with the stored target rows:

    loss = mse_weight * MSE + cos_weight * (1 - cos) + ce_weight * CE(W_target · row_t, g_t)

with W_target the frozen target LM head from the store and g_t the target's token t (exactly
aligned). LoRA (peft) adapts only the language model's q/k/v/o projections, selected by a module
path regex, so the CLIP tower carries none (bug B8); the reported trainable count is the number of
parameters that actually received a gradient in the first backward.

Data: the store is streamed (`egpt_core.lora.data`): a compact pair index at setup, shards read,
verified and decoded and micro-batches built in background threads, a seeded shard-window shuffle
per epoch; no per-pair objects are kept across shards.

A recipe over `egpt_core.training` (distributed context, schedule, run state, checkpoint layout,
curves, cosine/accept@tau): setup -> resume | start_fresh (the untrained LoRA validated and
committed as epoch 0) -> train_epoch + checkpoint_epoch -> finish.

Run directory (``cfg.out``): ``config.json`` (written at start), ``checkpoint/`` (resume point, each
epoch: `egpt_core.training.checkpoint`), ``best/`` and ``adapter/`` (peft ``save_pretrained`` folders, safetensors; best val loss and
final), ``history.json``, ``training_curves.png``, ``metrics.json``, ``features/`` (event features
the store's cache lacked).

Data parallel: launched under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes a strided share of
every accumulation group's micro-batches, LoRA gradients are summed with ``all_reduce`` before the
optimizer step (gloo on CPU, nccl on CUDA) and only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from tqdm.auto import tqdm

from egpt_core import runfiles as rf
from egpt_core.config import EventRenderConfig, LoraTrainConfig
from egpt_core.data.split import split_scenes
from egpt_core.errors import ConfigError, TrainingDivergedError
from egpt_core.fsio import Location, join
from egpt_core.lora.data import (
    LoraSample,
    MicroBatch,
    PairIndex,
    epoch_plan,
    scan_store,
    split_index,
    store_order_plan,
    stream,
)
from egpt_core.models.positions import POSITION_CONVENTION, gather_rows
from egpt_core.training import checkpoint as ck
from egpt_core.training.curves import Panel, SumAccumulator, plot_curves
from egpt_core.training.dist import DistContext, launch
from egpt_core.training.schedule import param_groups, set_lr, warmup_cosine_lr
from egpt_core.training.similarity import DEFAULT_TAUS, accept_counts, accept_key, cosine_rows
from egpt_core.training.state import RunState

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

#: LoRA targets: the language model's attention projections only (module path, matched in full).
DECODER_ATTN_REGEX = r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
#: where a LoRA layer may live once peft has wrapped the model
_LORA_PLACEMENT = re.compile(r"(base_model\.model\.)?model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj")
TAUS = DEFAULT_TAUS
_ACCEPT_KEYS = tuple(accept_key(t) for t in TAUS)
_SUM_KEYS = ("n", "sq", "cos", "ce", "match", *_ACCEPT_KEYS)
#: ``format`` of the provenance (egpt_lora.json) of a published LoRA folder
LORA_FORMAT = "egpt-lora/1"


# --------------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------------
class LoraResult(BaseModel):
    """What an L6 run produced (small: safe to return from a Prefect task)."""

    out: str
    adapter_dir: str
    best_dir: str
    best_epoch: int
    best_val_loss: float
    initial_val_loss: float
    epochs_run: int
    stopped_early: bool
    trainable_params: int
    declared_trainable_params: int
    lora_modules: int
    n_train_pairs: int
    n_val_pairs: int
    metrics: dict[str, Any]
    resumed_from_epoch: int | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def load_samples(reader, pair_ids: Sequence[str] | None = None, src: int = 0, drafter=None) -> list[LoraSample]:
    """Ok pairs of a store (all, or ``pair_ids`` in that order) with their token ids, as a list (small
    stores, inspection and tests; training streams the store: `egpt_core.lora.data`)."""
    cols = ["pair_id", "scene_id", "question", "drafter_prompt_ids", "drafter_response_ids",
            "target_response_ids", "length"]
    rows = {r["pair_id"]: r for r in reader.pairs(status="ok", columns=cols).to_pylist()}
    ids = list(rows) if pair_ids is None else list(pair_ids)
    out = []
    for pid in ids:
        r = rows[pid]
        n = int(r["length"])
        prompt = list(r["drafter_prompt_ids"] or [])
        if not prompt:
            if drafter is None:
                raise ConfigError(f"pair {pid} in {reader.url} has no drafter prompt ids")
            prompt = drafter.prompt_ids(r["question"])
        fed = list(r["drafter_response_ids"] or [])[:n]
        tgt = list(r["target_response_ids"] or [])[:n]
        if len(fed) < n or len(tgt) < n:
            raise ConfigError(f"pair {pid} in {reader.url}: {len(fed)} drafter / {len(tgt)} target token ids for "
                              f"{n} rows; L6 needs the token ids persisted at extraction (bug B4)")
        out.append(LoraSample(pid, r["scene_id"], r["question"], prompt, fed, tgt, n, src))
    return out


def split_by_scene(samples: Sequence[LoraSample], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of sample indices by scene (egpt_core.data.split): no scene on both sides."""
    _, val_scenes = split_scenes([s.scene_id for s in samples], val_fraction, seed)
    train = [i for i, s in enumerate(samples) if s.scene_id not in val_scenes]
    val = [i for i, s in enumerate(samples) if s.scene_id in val_scenes]
    return train, val


class _FeatureCache:
    """`get_features`/`put_features` over the stores' caches (read-only) and the run's own cache."""

    def __init__(self, readers: Sequence, run_url: str | None, storage_options: dict | None, write: bool):
        self.readers, self.run_url, self.so, self.write = list(readers), run_url, storage_options, write
        self._mem: dict[str, dict[str, torch.Tensor]] = {}

    def get_features(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._mem:
            return self._mem[key]
        for r in self.readers:
            got = r.get_features(key)
            if got is not None:
                return got
        if self.run_url:
            data = rf.read_bytes(join(self.run_url, "features", f"{key}.safetensors"), self.so)
            if data is not None:
                from safetensors.torch import load

                return dict(load(data))
        return None

    def put_features(self, key: str, tensors, metadata=None) -> None:
        if isinstance(tensors, torch.Tensor):
            tensors = {"features": tensors}
        if self.run_url and self.write:
            from safetensors.torch import save

            rf.write_bytes(join(self.run_url, "features", f"{key}.safetensors"),
                           save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}), self.so)
        else:
            self._mem[key] = {k: v.detach().cpu() for k, v in tensors.items()}


class FeatureSource:
    """Pooled event features per scene, keyed exactly as extraction keys them.

    Lookup order: the stores' ``features/`` caches, the run's ``features/``, else computed from the
    dataset (`egpt_core.extraction.features.scene_features`) and cached in the run directory. Loaded
    features are kept in a small LRU.
    """

    def __init__(self, drafter, render: EventRenderConfig, readers: Sequence, dataset_urls: Sequence[str],
                 run_url: str | None = None, storage_options: dict | None = None, write: bool = True,
                 lru: int = 64):
        self.drafter, self.render, self.so = drafter, render, storage_options
        self.cache = _FeatureCache(readers, run_url, storage_options, write)
        self.dataset_urls = [u for u in dict.fromkeys(dataset_urls) if u]
        self._scenes: dict[str, Any] | None = None
        self._keys: dict[str, str] = {}
        self._lru: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lru_size = lru
        self.stats: dict[str, int] = {}
        self._lock = threading.RLock()  # the micro-batch builder thread reads features too

    def _scene(self, scene_id: str):
        from egpt_core.data import load_scenes

        if self._scenes is None:
            self._scenes = {}
            problems = []
            for url in self.dataset_urls:
                try:
                    for s in load_scenes(url, self.so):
                        self._scenes.setdefault(s.scene_id, s)
                except Exception as exc:  # an unreadable dataset: try the next, report below
                    problems.append(f"{url}: {exc}")
            if not self._scenes:
                raise ConfigError("L6 needs the dataset to key/compute event features; none readable "
                                  f"(tried {self.dataset_urls or 'nothing: set dataset'}; {problems})")
        if scene_id not in self._scenes:
            raise ConfigError(f"scene {scene_id!r} is not in the dataset(s) {self.dataset_urls}; set dataset")
        return self._scenes[scene_id]

    def get(self, scene_id: str) -> torch.Tensor:
        with self._lock:
            return self._get(scene_id)

    def _get(self, scene_id: str) -> torch.Tensor:
        from egpt_core.extraction.features import feature_key, scene_features

        if scene_id in self._lru:
            self._lru.move_to_end(scene_id)
            return self._lru[scene_id]
        scene = self._scene(scene_id)
        if scene_id not in self._keys:
            self._keys[scene_id] = feature_key(scene, self.drafter, self.render, self.so)
        got = self.cache.get_features(self._keys[scene_id])
        if got is not None:
            feats = got["features"].float()
            self.stats["cached"] = self.stats.get("cached", 0) + 1
        else:
            feats = scene_features(scene, self.drafter, self.render, self.cache, self.so).float()
            self.stats["computed"] = self.stats.get("computed", 0) + 1
        self._lru[scene_id] = feats
        while len(self._lru) > self._lru_size:
            self._lru.popitem(last=False)
        return feats


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------
def check_store_vocab(drafter, reader, drafter_path: str) -> None:
    """The drafter is fed the store's target token ids: its tokenizer must agree with the target
    vocabulary the store records (else with the recorded target checkpoint's tokenizer, reached with
    the store's storage options)."""
    from egpt_core.models.loading import local_checkpoint
    from egpt_core.models.vocab import check_vocab_compat, load_tokenizer

    recorded = reader.target_vocab()
    where = f"store {reader.url}'s target"
    if recorded is None:
        ref = (reader.info.meta.models or {}).get("target")
        tpath = getattr(ref, "path", None)
        try:
            recorded = load_tokenizer(local_checkpoint(Location(tpath, reader.storage_options))) if tpath else None
            where = f"target {tpath} (the store's)"
        except ConfigError:
            recorded = None
        if recorded is None:
            raise ConfigError(
                f"store {reader.url} records no target vocabulary and its target checkpoint {tpath!r} cannot be "
                "read here, so the drafter's tokenizer cannot be checked against the token ids it would be fed; "
                "re-extract the store with this version (it stores target_vocab.json)")
    check_vocab_compat(drafter.tokenizer, recorded, f"drafter {drafter_path}", where)


def lora_modules(model) -> list[str]:
    """Names of the modules that carry a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def check_lora_placement(model) -> list[str]:
    """Every LoRA module must be a decoder-layer q/k/v/o projection (never the CLIP tower, bug B8)."""
    names = lora_modules(model)
    bad = [n for n in names if not _LORA_PLACEMENT.fullmatch(n)]
    if bad or not names:
        raise ConfigError(f"LoRA modules outside the decoder's q/k/v/o projections: {bad[:5]}" if bad
                          else "no LoRA module was created (target regex matched nothing)")
    return names


def expected_trainable_params(model_config, rank: int) -> int:
    """layers x sum over q/k/v/o of r * (d_in + d_out)."""
    d = model_config.hidden_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or d // heads
    kv = getattr(model_config, "num_key_value_heads", None) or heads
    q, kvd, o = (d, heads * head_dim), (d, kv * head_dim), (heads * head_dim, d)
    per_layer = sum(rank * (a + b) for a, b in (q, kvd, kvd, o))
    return model_config.num_hidden_layers * per_layer


def apply_lora(drafter, cfg: LoraTrainConfig):
    """Freeze the drafter, prepare it for k-bit training when quantised, add decoder-only LoRA.

    Returns the peft model; ``drafter.model`` is modified in place (LoRA layers injected), so the
    drafter's own TF forward (`tf_hidden`) runs through the adapters.
    """
    model = drafter.model
    model.requires_grad_(False)
    gc_kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():  # transformers 5 renamed gradient -> activation checkpointing; peft uses the old names
        warnings.simplefilter("ignore", FutureWarning)
        return _apply_lora(model, cfg, gc_kwargs)


def _apply_lora(model, cfg: LoraTrainConfig, gc_kwargs: dict):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.load.quant == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    if cfg.gradient_checkpointing and not getattr(model, "is_activation_checkpointing", False):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if cfg.gradient_checkpointing:
        # the embedding is frozen: make the spliced inputs_embeds require grad under checkpointing
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=DECODER_ATTN_REGEX)
    torch.manual_seed(cfg.seed)  # LoRA A init
    peft_model = get_peft_model(model, lcfg)
    peft_model.peft_config["default"].base_model_name_or_path = cfg.drafter
    check_lora_placement(peft_model)
    return peft_model


def trainable_parameters(peft_model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------------
# forward + loss
# --------------------------------------------------------------------------------------------------
def tf_rows(drafter, samples: Sequence[LoraSample], features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Teacher-forced drafter rows [L_i, D] (grad-enabled) by the position convention."""
    hidden, starts, plens = drafter.tf_hidden([s.prompt_ids for s in samples], [s.fed_ids for s in samples],
                                              list(features))
    return gather_rows(hidden, starts, plens, [s.length for s in samples])


def loss_and_sums(pred: torch.Tensor, target: torch.Tensor, target_ids: torch.Tensor,
                  lm_head: torch.Tensor | None, cfg: LoraTrainConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """pred/target [N, D] (rows of all pairs, concatenated), target_ids [N].

    Returns the micro-batch loss (means over its positions) and pooled sums for metrics.
    """
    pred = pred.float()
    n = pred.shape[0]
    sq = (pred - target).pow(2).sum()
    cos = cosine_rows(pred, target)
    loss = cfg.mse_weight * sq / (n * pred.shape[1]) + cfg.cos_weight * (1.0 - cos.mean())
    sums = {"n": torch.tensor(float(n)), "sq": sq.detach().cpu(), "cos": cos.detach().sum().cpu()}
    sums.update(zip(_ACCEPT_KEYS, accept_counts(cos.detach(), None, TAUS).cpu()))
    if lm_head is not None:
        logits = pred @ lm_head.t()
        ce = F.cross_entropy(logits, target_ids, reduction="sum")
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * ce / n
        sums["ce"] = ce.detach().cpu()
        sums["match"] = (logits.detach().argmax(-1) == target_ids).sum().float().cpu()
    else:
        sums["ce"] = torch.tensor(float("nan"))
        sums["match"] = torch.tensor(float("nan"))
    return loss, sums


def summarize(sums: dict[str, float], cfg: LoraTrainConfig, d: int) -> dict[str, float]:
    """Pooled-over-positions metrics from summed parts."""
    n = max(float(sums["n"]), 1.0)
    mse = float(sums["sq"]) / (n * d)
    cos = float(sums["cos"]) / n
    ce = float(sums["ce"]) / n
    out = {"loss": cfg.mse_weight * mse + cfg.cos_weight * (1.0 - cos) + (cfg.ce_weight * ce if cfg.ce_weight else 0.0),
           "mse": mse, "cos_loss": 1.0 - cos, "cos_sim": cos, "ce": ce, "token_match": float(sums["match"]) / n,
           "positions": int(n)}
    out.update({k: float(sums[k]) / n for k in _ACCEPT_KEYS})
    return out


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------
CURVES = (
    Panel("loss", [("train_loss", "train loss", "-"), ("val_loss", "val loss", "-"), ("val_mse", "val mse", "--"),
                   ("val_ce", "val ce", ":")]),
    Panel("cosine similarity (pooled)", [("train_cos_sim", "train", "-"), ("val_cos_sim", "val", "-")]),
    Panel("val accept@tau (pooled)", [(f"val_{accept_key(t)}", f"cos > {t:.2f}", "-") for t in TAUS],
          ylim=(0.0, 1.0)),
    Panel("token match (target LM head)", [("train_token_match", "train", "-"), ("val_token_match", "val", "-")]),
)


def save_adapter(peft_model, out: str | Location, provenance: dict[str, Any]) -> None:
    """peft ``save_pretrained`` (safetensors) + ``egpt_lora.json`` into the directory ``out``."""
    out = Location.of(out)
    tmp = rf.staging_dir(out.url)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    rf.write_json(str(tmp / "egpt_lora.json"), provenance)
    rf.put_dir(tmp, out, kind="lora-adapter")


RUN_KIND = "lora-run"


def config_fingerprint(cfg) -> str:
    return rf.config_fingerprint(cfg)  # NON_SEMANTIC: egpt_core.config


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
def train_lora(cfg: LoraTrainConfig, progress: Progress | None = None, resume: bool = True) -> LoraResult:
    """Train an L6 LoRA on the drafter from a store; resumes from the committed ``cfg.out/checkpoint``
    when present (a finished run is returned as is, a run asked for more epochs continues)."""
    return launch(cfg.location(cfg.out), RUN_KIND, config_fingerprint(cfg), resume=resume, device="auto",
                  run=lambda ctx: _LoraRecipe(cfg, progress, ctx).run(resume))


class _LoraRecipe:
    """One L6 run: setup -> resume (or start fresh: validate the untrained LoRA as epoch 0) ->
    train_epoch + checkpoint_epoch until the run state says done -> finish."""

    def __init__(self, cfg: LoraTrainConfig, progress: Progress | None, ctx: DistContext):
        self.cfg, self.progress, self.ctx = cfg, progress, ctx
        self.so = cfg.storage_options
        self.run_dir = cfg.location(cfg.out)
        self.fingerprint = config_fingerprint(cfg)
        self.state = RunState()
        self.extra: dict[str, Any] = {}  # what the checkpoint keeps besides the run state
        self.resumed_from: int | None = None

    def run(self, resume: bool) -> LoraResult:
        t0 = time.perf_counter()
        committed = self.setup(resume)
        if committed is not None:
            self.resume(committed)
        else:
            self.start_fresh()
        total = self.steps_per_epoch * self.cfg.epochs
        self.bar = tqdm(total=total, initial=min(self.state.step, total), desc="train-lora", unit="step",
                        disable=None if self.ctx.main else True)
        while not self.state.finished(self.cfg.epochs):
            improved = self.train_epoch()
            self.checkpoint_epoch(improved)
        self.bar.close()
        return self.finish(time.perf_counter() - t0)

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, resume: bool) -> ck.Committed | None:
        """Stores, the committed checkpoint to continue (checked before the model loads), config.json,
        the drafter with its LoRA, the data and the optimizer."""
        cfg, ctx = self.cfg, self.ctx
        self._open()
        committed = ck.load_committed(self.run_dir, RUN_KIND) if resume else None
        if committed is not None and committed.extra.get("config_fingerprint") != self.fingerprint:
            raise ConfigError(f"{cfg.out} holds a checkpoint of a different L6 config; use another --out, "
                              "or --no-resume to replace it")
        if ctx.main:
            if committed is None:  # a fresh start never continues a stale checkpoint left in cfg.out later
                ck.clear(self.run_dir)
            rf.write_json(join(cfg.out, "config.json"), rf.config_record(cfg), self.so)
        ctx.barrier()
        self._load_model()
        self._data()
        self.peft = apply_lora(self.drafter, cfg)
        named = trainable_parameters(self.peft)
        self.params = [p for _, p in named]
        self.declared = sum(p.numel() for p in self.params)
        self.lora_names = lora_modules(self.peft)
        self.opt = torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.lr)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.train) / cfg.micro_batch) / cfg.grad_accum)
        return committed

    def resume(self, committed: ck.Committed) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft, committed.weights)
        rf.optimizer_from_flat(self.opt, committed.train_tensors, committed.extra["optimizer"])
        self.state, self.extra = RunState.from_json(committed.state), dict(committed.extra)
        self.ctx.restore_rng(committed.train_tensors, committed.extra["rng"], self.cfg.seed + 104729 * self.state.epoch)
        self.resumed_from = self.state.epoch
        log.info("resuming %s after epoch %d", self.cfg.out, self.state.epoch)
        if self.ctx.main:
            rf.write_json(join(self.cfg.out, "history.json"), self.state.history, self.so)
            if _published_epoch(self.run_dir.child("best")) != self.state.best_epoch:
                self._publish_best_from(committed)  # a crash after the commit, or a deleted best/
        self.ctx.barrier()

    def start_fresh(self) -> None:
        """Validate the untrained LoRA (B = 0): the baseline and first "best", committed as epoch 0."""
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        initial = self.validate()
        self._check_finite(0, 0.0, initial["loss"])
        self.state.best_val_loss = initial["loss"]
        self.extra = {"initial_val": initial, "trainable_params": None, "config_fingerprint": self.fingerprint,
                      "n_train": len(self.train), "n_val": len(self.val)}
        self.checkpoint_epoch(improved=True)

    def _open(self):
        from egpt_core.store import StoreReader

        cfg = self.cfg
        self.reader = StoreReader(cfg.store, self.so)
        self.val_reader = StoreReader(cfg.val_store, self.so) if cfg.val_store else None
        readers = [self.reader] + ([self.val_reader] if self.val_reader else [])
        d = self.reader.hidden_size
        if self.val_reader is not None and self.val_reader.hidden_size != d:
            raise ConfigError(f"val store hidden size {self.val_reader.hidden_size} != train store {d}")
        self.readers = readers
        meta = self.reader.info.meta
        conv = meta.position_convention
        if conv and conv != POSITION_CONVENTION:
            raise ConfigError(f"store {cfg.store} uses position convention {conv!r}, not {POSITION_CONVENTION!r}")
        self.render = EventRenderConfig(**(meta.events or {}))
        if self.val_reader is not None:
            vr = EventRenderConfig(**(self.val_reader.info.meta.events or {}))
            if vr != self.render:
                raise ConfigError("train and val stores render events differently; their features are not comparable")

    def _load_model(self):
        from egpt_core.models import load_eventgpt

        load = self.cfg.load
        if self.ctx.world > 1 and torch.cuda.is_available():
            load = load.model_copy(update={"device": f"cuda:{self.ctx.local_rank}"})
        self.drafter = load_eventgpt(self.cfg.drafter, load, double_adaptor=self.render.double_feature_adaptor,
                                     storage_options=self.so)
        if self.drafter.hidden_size != self.reader.hidden_size:
            raise ConfigError(f"drafter hidden size {self.drafter.hidden_size} != store hidden size "
                              f"{self.reader.hidden_size}")
        self.device = self.drafter.device
        for reader in self.readers:
            check_store_vocab(self.drafter, reader, self.cfg.drafter)
    def _data(self):
        """Index the stores' ok pairs (checked; no per-pair objects kept: `egpt_core.lora.data`), split
        by scene, the LM head, and every scene's event features."""
        cfg = self.cfg
        vocab = self.drafter.model.get_input_embeddings().num_embeddings
        self.prompts: dict[str, list[int]] = {}  # question -> drafter prompt ids (stores without them)
        train = scan_store(self.reader, 0, vocab, self.prompts, self.drafter)
        if self.val_reader is not None:
            val = scan_store(self.val_reader, 1, vocab, self.prompts, self.drafter)
            overlap = set(train.scenes()) & set(val.scenes())
            if overlap:
                log.warning("%d scene(s) are in both the train and the val store (e.g. %s)", len(overlap),
                            sorted(overlap)[0])
        else:
            _, val_scenes = split_scenes(train.scenes(), cfg.val_fraction, cfg.seed)
            train, val = split_index(train, val_scenes)
        if not len(train) or not len(val):
            raise ConfigError(f"L6 needs train and val pairs (have {len(train)} / {len(val)} ok pairs)")
        self.train, self.val = train, val
        self.lm_head = None
        if self.reader.info.lm_head is not None:  # read errors propagate (transient faults are retried)
            self.lm_head = self.reader.lm_head().to(self.device, torch.float32)
        elif cfg.ce_weight:
            raise ConfigError(f"ce_weight={cfg.ce_weight} needs the target LM head, but store {cfg.store} holds "
                              "none (extract with a target model, or set ce_weight=0)")
        if self.lm_head is not None and self.lm_head.shape[1] != self.reader.hidden_size:
            raise ConfigError(f"LM head {tuple(self.lm_head.shape)} does not match hidden size {self.reader.hidden_size}")
        dataset_urls = [cfg.dataset or "", self.reader.info.meta.dataset or ""]
        if self.val_reader is not None:
            dataset_urls.append(self.val_reader.info.meta.dataset or "")
        self.features = FeatureSource(self.drafter, self.render, self.readers, dataset_urls,
                                      run_url=cfg.out, storage_options=self.so, write=self.ctx.main)
        # every scene's features before LoRA / k-bit preparation (same numerics as extraction)
        for sid in dict.fromkeys([*train.scenes(), *val.scenes()]):
            self.features.get(sid)

    def _stream(self, side: PairIndex, plan, use=None, features: bool = True):
        """The micro-batches of ``plan`` over ``side``, read and built in background threads; close it
        (``contextlib.closing``) to stop them."""
        return stream(side, plan, self.cfg.micro_batch, prompts=self.prompts, use=use,
                      features=self.features.get if features else None,
                      batch_queue=max(2, 2 * self.cfg.grad_accum))

    def _forward(self, batch: MicroBatch):
        rows = tf_rows(self.drafter, batch.samples, batch.features)
        return loss_and_sums(torch.cat(rows), batch.target.to(self.device), batch.target_ids.to(self.device),
                             self.lm_head, self.cfg)

    # -- evaluation --------------------------------------------------------------------------------

    # -- one epoch ---------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Pooled metrics over every val pair (micro-batches strided over the ranks)."""
        self.peft.eval()
        acc = SumAccumulator(_SUM_KEYS, self.ctx.device)
        rank, world = self.ctx.rank, self.ctx.world
        with closing(self._stream(self.val, store_order_plan(self.val), use=lambda k: k % world == rank)) as batches:
            for b in batches:
                if b is not None:
                    acc.add(self._forward(b)[1])
        return summarize(acc.pooled(self.ctx), self.cfg, self.reader.hidden_size)

    def train_epoch(self) -> bool:
        """Train one epoch (seeded shuffle, gradient accumulation), validate, record the epoch in the
        run state; returns whether it is the new best."""
        cfg, epoch, t0 = self.cfg, self.state.epoch + 1, time.perf_counter()
        train_m, step, lr = self._train_steps(epoch)
        val_m = self.validate()
        self._check_finite(epoch, train_m["loss"], val_m["loss"])
        entry = {"epoch": epoch, "step": step, "lr": lr, "seconds": round(time.perf_counter() - t0, 3),
                 **{f"train_{k}": v for k, v in train_m.items()}, **{f"val_{k}": v for k, v in val_m.items()}}
        self.bar.set_postfix(loss=f"{train_m['loss']:.4f}", val=f"{val_m['loss']:.4f}", cos=f"{val_m['cos_sim']:.3f}")
        return self.state.after_epoch(entry, val_m["loss"], step=step, early_stopping=cfg.early_stopping,
                                      epochs=cfg.epochs)

    def _train_steps(self, epoch: int) -> tuple[dict[str, float], int, float]:
        """The optimizer steps of one epoch -> (pooled train metrics, step count after, last LR). Each
        rank takes a strided share of every accumulation group; gradients are summed over ranks."""
        cfg, ctx = self.cfg, self.ctx
        self.peft.train()
        total = self.steps_per_epoch * cfg.epochs
        acc, step, lr = SumAccumulator(_SUM_KEYS, ctx.device), self.state.step, cfg.lr
        with closing(self._accumulation_groups(epoch)) as groups:  # an exception stops the read-ahead
            for group in groups:
                for mbatch in group[ctx.rank :: ctx.world]:
                    loss, sums = self._forward(mbatch)
                    (loss / len(group)).backward()
                    acc.add(sums)
                    if self.extra["trainable_params"] is None:
                        self.extra["trainable_params"] = sum(p.numel() for p in self.params if p.grad is not None)
                ctx.sum_grads(self.params)
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                lr = warmup_cosine_lr(step, total, cfg.warmup_steps, cfg.lr, cfg.min_lr)
                set_lr(self.opt, lr)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                step += 1
                self.bar.update(1)
                if self.progress:
                    self.progress(min(step / total, 1.0), f"epoch {epoch}/{cfg.epochs} step {step}/{total}")
        return summarize(acc.pooled(ctx), cfg, self.reader.hidden_size), step, lr

    def _accumulation_groups(self, epoch: int) -> Iterator[list[MicroBatch | None]]:
        """The epoch's seeded order (`egpt_core.lora.data.epoch_plan`) as optimizer steps: lists of
        ``grad_accum`` micro-batches, read and built ahead in background threads. This rank's share of a
        group (``group[rank::world]``) is built; the other ranks' micro-batches are ``None``."""
        ga, rank, world = self.cfg.grad_accum, self.ctx.rank, self.ctx.world
        plan = epoch_plan(self.train, self.cfg.seed, epoch)
        with closing(self._stream(self.train, plan, use=lambda k: (k % ga) % world == rank)) as batches:
            group: list[MicroBatch | None] = []
            for b in batches:
                group.append(b)
                if len(group) == ga:
                    yield group
                    group = []
            if group:
                yield group

    # -- checkpoint and outputs --------------------------------------------------------------------
    def checkpoint_epoch(self, improved: bool) -> None:
        """Commit the epoch (rank 0 writes; every rank's RNG is kept), then publish best/ (when it
        improved), history.json and the curves."""
        from peft import get_peft_model_state_dict

        ctx, cfg, epoch = self.ctx, self.cfg, self.state.epoch
        rng_tensors, rng_infos = ctx.gather_rng(numpy_state=False)  # L6 draws no numpy randomness
        if ctx.main:
            opt_tensors, opt_info = rf.optimizer_to_flat(self.opt)
            self.extra.update(optimizer=opt_info, rng=rng_infos)
            ck.commit_epoch(self.run_dir, RUN_KIND, epoch, weights=get_peft_model_state_dict(self.peft),
                            weights_metadata={"format": LORA_FORMAT}, train_tensors={**opt_tensors, **rng_tensors},
                            state=self.state.to_json(), extra=self.extra, best=improved)
            if improved:
                self._save("best")
            rf.write_json(join(cfg.out, "history.json"), self.state.history, self.so)
            plot_curves(self.state.history, CURVES, self.run_dir.child("training_curves.png"), self._baseline())
        ctx.barrier()
        if self.progress and epoch:
            val = self.state.history[-1]
            self.progress(min(self.state.step / (self.steps_per_epoch * cfg.epochs), 1.0),
                          f"epoch {epoch}/{cfg.epochs}: val loss {val['val_loss']:.4f} cos {val['val_cos_sim']:.3f}")

    def _publish_best_from(self, committed: ck.Committed) -> None:
        """Write best/ from the committed best weights (the model holds the last ones meanwhile)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load as st_load

        data = committed.weights_bytes("best", self.so)
        if data is None:
            return
        last = {k: v.clone() for k, v in get_peft_model_state_dict(self.peft).items()}
        set_peft_model_state_dict(self.peft, st_load(data))
        self._save("best", epoch=self.state.best_epoch)
        set_peft_model_state_dict(self.peft, last)

    def _baseline(self) -> dict[str, float]:
        return {f"val_{k}": v for k, v in self.extra["initial_val"].items()}

    def _check_finite(self, epoch: int, train_loss: float, val_loss: float) -> None:
        """A non-finite loss ends the run: TrainingDivergedError naming the first pair with non-finite
        target rows when the store holds one, else the learning rate (epoch 0 = the untrained LoRA)."""
        if math.isfinite(train_loss) and math.isfinite(val_loss):
            return
        where = f"{self.cfg.out}: L6 training diverged in epoch {epoch} (train loss {train_loss}, val loss {val_loss})"
        for side in (self.train, self.val):
            with closing(self._stream(side, store_order_plan(side), features=False)) as batches:
                for b in batches:
                    rows = 0
                    for s in b.samples:
                        if not torch.isfinite(b.target[rows:rows + s.length]).all():
                            raise TrainingDivergedError(f"{where}: pair {s.pair_id!r} holds non-finite target rows "
                                                        "in its store; re-extract or drop that pair")
                        rows += s.length
        raise TrainingDivergedError(f"{where}: the target rows are finite, so the learning rate (lr={self.cfg.lr}) is "
                                    "too high; lower it (the last good checkpoint is kept)")

    def _save(self, which: str, epoch: int | None = None) -> None:
        """best/ or adapter/: the peft folder of the model's current LoRA + its provenance."""
        provenance = {"format": LORA_FORMAT, "drafter": self.cfg.drafter, "drafter_fingerprint": self.drafter.fingerprint,
                      "clip_path": self.cfg.load.clip_path,
                      "store": self.cfg.store, "store_fingerprint": self.reader.fingerprint,
                      "val_store": self.cfg.val_store, "events": self.render.model_dump(mode="json"),
                      "position_convention": POSITION_CONVENTION, "target_modules": DECODER_ATTN_REGEX,
                      "rank": self.cfg.rank, "alpha": self.cfg.alpha,
                      "epoch": self.state.epoch if epoch is None else epoch,
                      "trainable_params": self.extra.get("trainable_params")}
        save_adapter(self.peft, self.run_dir.child(which), provenance)

    def _measured_trainable(self) -> int:
        """Parameters that receive a gradient (one backward when no step ran in this process)."""
        if self.extra.get("trainable_params") is None:
            self.peft.train()
            with closing(self._stream(self.train, store_order_plan(self.train))) as batches:
                first = next(batches)
            loss, _ = self._forward(first)
            loss.backward()
            self.extra["trainable_params"] = sum(p.numel() for _, p in trainable_parameters(self.peft)
                                                 if p.grad is not None)
            self.peft.zero_grad(set_to_none=True)
        return int(self.extra["trainable_params"])

    def finish(self, seconds: float) -> LoraResult:
        """adapter/ (the final LoRA), history.json, the curves and metrics.json; the result."""
        cfg, st = self.cfg, self.state
        trainable = self._measured_trainable()
        hist = st.history
        metrics = {
            "best_epoch": st.best_epoch, "best_val_loss": st.best_val_loss, "best": st.best_entry(),
            "final": hist[-1] if hist else None, "initial_val": self.extra["initial_val"],
            "epochs_run": len(hist), "stopped_early": st.stopped_early,
            "trainable_params": trainable, "declared_trainable_params": self.declared,
            "lora_modules": len(self.lora_names), "n_train_pairs": len(self.train), "n_val_pairs": len(self.val),
            "train_scenes": len(self.train.scenes()), "val_scenes": len(self.val.scenes()),
            "store_fingerprint": self.reader.fingerprint, "position_convention": POSITION_CONVENTION,
            "features": dict(self.features.stats), "world_size": self.ctx.world,
        }
        if self.ctx.main:
            self._save("adapter")
            rf.write_json(join(cfg.out, "history.json"), hist, self.so)
            plot_curves(hist, CURVES, self.run_dir.child("training_curves.png"), self._baseline())
            rf.write_json(join(cfg.out, "metrics.json"), metrics, self.so)
        self.ctx.barrier()
        return LoraResult(
            out=cfg.out, adapter_dir=join(cfg.out, "adapter"), best_dir=join(cfg.out, "best"),
            best_epoch=st.best_epoch, best_val_loss=st.best_val_loss,
            initial_val_loss=float(self.extra["initial_val"]["loss"]), epochs_run=len(hist),
            stopped_early=st.stopped_early, trainable_params=trainable, declared_trainable_params=int(self.declared),
            lora_modules=len(self.lora_names), n_train_pairs=len(self.train), n_val_pairs=len(self.val),
            metrics=metrics, resumed_from_epoch=self.resumed_from, seconds=round(seconds, 3),
        )


def _published_epoch(folder: Location) -> int | None:
    """The epoch a published peft folder (best/, adapter/) holds, from its egpt_lora.json (None: none)."""
    prov = rf.read_json(folder.child("egpt_lora.json"))
    return None if prov is None else prov.get("epoch")
