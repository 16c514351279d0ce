"""Stage 3a: train one alignment adapter from hidden-state stores (reference §7, bugs fixed).

Fixes relative to the research trainer: validation over every val pair (B2; asserted), a
validation split by scene (no scene on both sides) instead of the last train chunk, seeded global
shuffling across shards, AdamW without weight decay on norms/gates/positional tables/biases,
cosine schedule with linear warmup stepped per optimizer step, the same key-padding mask in
train and eval (B9), ``config.json`` written at the start, pickle-free checkpoints, bitwise
resume after a crash, and DistributedDataParallel under torchrun.

A recipe over `egpt_core.training` (distributed context, schedule, run state, checkpoint layout,
curves, cosine/accept@tau): setup -> resume | start_fresh -> train_epoch + checkpoint_epoch -> finish.

Run directory (any fsspec URL): config.json, checkpoint/ (the resume point, `egpt_core.training.
checkpoint`), history.json, best.safetensors and last.safetensors (published copies of the committed
weights), training_curves.png, result.json.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from egpt_core import runfiles as rf
from egpt_core.adapters.checkpoint import adapter_weights_metadata
from egpt_core.adapters.losses import combine_sums, loss_sums
from egpt_core.adapters.modules import LEVEL_SPECS, adapter_inputs, count_parameters, create_adapter
from egpt_core.config import TrainAdapterConfig
from egpt_core.data.split import split_scenes
from egpt_core.errors import ConfigError, TrainingDivergedError
from egpt_core.fsio import Location, is_local
from egpt_core.memory import DataCacheDecision, decide_data_cache
from egpt_core.training import checkpoint as ck
from egpt_core.training.curves import Panel, SumAccumulator, pack, plot_curves, unpack
from egpt_core.training.dist import DistContext, launch
from egpt_core.training.schedule import param_groups, set_lr, warmup_cosine_lr
from egpt_core.training.similarity import DEFAULT_TAUS, accept_counts, accept_key, cosine_rows
from egpt_core.training.state import RunState

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
TAUS = DEFAULT_TAUS
EAGLE_LEVELS = tuple(name for name, spec in LEVEL_SPECS.items() if spec.predicts_next)  # the registry's
RUN_KIND = "adapter-run"


class TrainResult(BaseModel):
    """What `train_adapter` returns (small, JSON-able)."""

    run_url: str
    best_val_loss: float
    epochs_run: int
    best_epoch: int
    metrics: dict[str, Any]
    n_train_pairs: int
    n_val_pairs: int
    param_count: int


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
@dataclass
class _Split:
    train: Dataset
    val: Dataset
    n_train: int
    n_val: int
    hidden_size: int
    fingerprints: dict[str, str]
    val_scenes: list[str]
    train_scenes: list[str]
    shared_scenes: int
    max_len: int
    cache: DataCacheDecision

    @property
    def cached(self) -> bool:
        return self.cache.in_ram

    @property
    def workers(self) -> int:
        return 1 if self.cached else 8


def _open_reader(store: Location):
    from egpt_core.store import StoreReader

    url = store.url
    try:
        return StoreReader(store)
    except FileNotFoundError as exc:
        raise ConfigError(f"store {url!r} not found or not readable ({exc}); check the URL and storage options") from exc


def _manifest_fingerprint(reader) -> str:
    """The store fingerprint the typed manifest records (changes with every commit)."""
    return reader.info.fingerprint


def _tensor_bytes(reader) -> int:
    total = 0
    for sh in reader.shards:
        fb = sh.get("file_bytes") or {}
        total += int(fb.get("tensors") or sh.get("bytes") or 0)
    return total


def _ok_pairs(reader) -> tuple[list[str], list[str], list[int]]:
    table = reader.pairs(status="ok", columns=["pair_id", "scene_id", "length"])
    ids = [str(x) for x in table.column("pair_id").to_pylist()]
    scenes = [str(x) for x in table.column("scene_id").to_pylist()]
    lengths = [int(x) for x in table.column("length").to_pylist()]
    return ids, scenes, lengths


def _model_pair(reader) -> dict[str, str]:
    """{"drafter": fp, "target": fp} of the models a store was extracted with (sides it records)."""
    meta = reader.info.meta
    fps = {side: meta.model_fingerprint(side) for side in ("drafter", "target")}
    return {k: str(v) for k, v in fps.items() if v}


def _check_one_model_pair(stores: list[tuple[str, object]]) -> None:
    """ConfigError when two stores record different fingerprints for the drafter or the target."""
    seen: dict[str, tuple[str, str]] = {}
    for url, reader in stores:
        for side, fp in sorted(_model_pair(reader).items()):
            if side in seen and seen[side][1] != fp:
                raise ConfigError(
                    f"stores of different model pairs: the {side} of {seen[side][0]} has fingerprint "
                    f"{seen[side][1]!r} but the {side} of {url} has {fp!r}. An adapter maps one drafter's hidden "
                    "states into one target's; train on stores extracted with the same models, or set "
                    "allow_mixed_models (--allow-mixed-models) if mixing them is intended."
                )
            seen.setdefault(side, (url, fp))


def _drop_repeated_pairs(per_store: list[tuple[list[str], list[str], list[int]]],
                         urls: Sequence[str]) -> list[tuple[list[str], list[str], list[int]]]:
    """Keep each pair id once (its first store): `--train s1 --train s1`, or stores sharing pairs, must
    not weigh those pairs twice."""
    seen: set[str] = set()
    out, dropped = [], 0
    for ids, scenes, lengths in per_store:
        keep = [k for k, pid in enumerate(ids) if pid not in seen]
        dropped += len(ids) - len(keep)
        seen.update(ids)
        out.append(([ids[k] for k in keep], [scenes[k] for k in keep], [lengths[k] for k in keep]))
    if dropped:
        log.warning("%d pair(s) appear in more than one train store (%s); each is used once", dropped,
                    ", ".join(dict.fromkeys(urls)))
    return out


class PairRandomAccess(Dataset):
    """Per-pair byte-range reads (``StoreReader.get``) for data larger than the RAM cache; items
    match the store's PairDataset items."""

    def __init__(self, reader, pair_ids: Sequence[str]):
        self.reader = reader
        self.ids = list(pair_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        p = self.reader.get(self.ids[i])
        return {"drafter": p.drafter.to(torch.float32), "target": p.target.to(torch.float32),
                "length": int(p.drafter.shape[0]), "pair_id": p.pair_id, "scene_id": p.scene_id}


def _prepare_data(cfg: TrainAdapterConfig, local_ranks: int = 1) -> _Split:
    """Open and check the stores, split the pairs by scene, choose RAM cache or byte-range reads."""
    readers, val_reader, d, fingerprints = _open_stores(cfg)
    parts, train_scenes, val_scenes, shared, max_len = _split_pairs(cfg, readers, val_reader)
    n_train = sum(len(tr) for _, tr, _ in parts)
    n_val = sum(len(va) for _, _, va in parts)
    if not n_train:
        raise ConfigError(f"no 'ok' train pairs in {cfg.train}")
    if not n_val:
        raise ConfigError(f"no 'ok' validation pairs ({cfg.val or 'scene split'})")
    used = [r for r, tr, va in parts if tr or va]
    cache = decide_data_cache(sum(_tensor_bytes(r) for r in used), cfg.data_cache_gb, local_ranks,
                              remote=not all(is_local(r.url) for r in used))
    log.info("training data: %s (%s)", cache.path, cache.reason)
    train, val = _datasets(parts, cache.in_ram)
    return _Split(train, val, n_train, n_val, d, fingerprints, val_scenes, train_scenes, shared, max_len, cache)


def _open_stores(cfg: TrainAdapterConfig) -> tuple[list, Any, int, dict[str, str]]:
    """(train readers, val reader | None, hidden size, fingerprints by URL) after the stores are checked
    to agree on the hidden size (and the adapter's) and on the model pair."""
    if not cfg.train:
        raise ConfigError("no train store given (TrainAdapterConfig.train / --train URL)")
    readers = [_open_reader(cfg.location(u)) for u in cfg.train]
    val_reader = _open_reader(cfg.location(cfg.val)) if cfg.val else None
    sizes = {u: int(r.hidden_size) for u, r in zip(cfg.train, readers)}
    if val_reader is not None:
        sizes[cfg.val] = int(val_reader.hidden_size)
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"stores disagree on hidden size: {sizes}; train and validate on stores of one model pair")
    d = next(iter(sizes.values()))
    want = cfg.adapter.hidden_size
    if want is not None and want != d:
        raise ConfigError(
            f"hidden-size mismatch: adapter.hidden_size={want} but the store(s) have hidden size {d} "
            f"({', '.join(sizes)}); set adapter.hidden_size to {d} or leave it unset"
        )
    if not cfg.allow_mixed_models:
        _check_one_model_pair(list(zip(cfg.train, readers)) + ([(cfg.val, val_reader)] if val_reader else []))
    fingerprints = {u: _manifest_fingerprint(r) for u, r in zip(cfg.train, readers)}
    if val_reader is not None:
        fingerprints[cfg.val] = _manifest_fingerprint(val_reader)
    return readers, val_reader, d, fingerprints


def _split_pairs(cfg: TrainAdapterConfig, readers: list, val_reader):
    """-> (parts, train scenes, val scenes, scenes on both sides, longest pair); parts are (reader,
    train pair ids, val pair ids): one dataset per store keeps one RAM copy."""
    per_store = _drop_repeated_pairs([_ok_pairs(r) for r in readers], cfg.train)
    if not any(ids for ids, _, _ in per_store):
        counts = {u: r.counts for u, r in zip(cfg.train, readers)}
        raise ConfigError(f"no 'ok' pairs to train on in {', '.join(cfg.train)} (counts {counts}): every pair "
                          "failed or was skipped; see `egpt inspect` for the reasons")
    max_len = max((max(p[2], default=0) for p in per_store), default=0)
    all_train_scenes = sorted({s for _, scenes, _ in per_store for s in scenes})
    if val_reader is not None:
        v_ids, v_scenes, v_len = _ok_pairs(val_reader)
        val_scene_set = set(v_scenes)
        shared = len(val_scene_set & set(all_train_scenes))
        if shared:
            log.warning("%d scene(s) appear in both the train and the val store (leakage)", shared)
        parts = [(r, ids, []) for r, (ids, _, _) in zip(readers, per_store)] + [(val_reader, [], v_ids)]
        return parts, all_train_scenes, sorted(val_scene_set), shared, max(max_len, max(v_len, default=0))
    if len(all_train_scenes) < 2:
        raise ConfigError(
            f"cannot split validation by scene: the train store(s) hold {len(all_train_scenes)} scene(s); "
            "give a --val store or more scenes"
        )
    _, val_set = split_scenes(all_train_scenes, cfg.val_fraction, cfg.seed)
    parts = [(r, [i for i, s in zip(ids, sc) if s not in val_set], [i for i, s in zip(ids, sc) if s in val_set])
             for r, (ids, sc, _) in zip(readers, per_store)]
    return parts, sorted(set(all_train_scenes) - val_set), sorted(val_set), 0, max_len


def _datasets(parts: list, cached: bool) -> tuple[Dataset, Dataset]:
    """(train, val) views over one dataset per store: RAM-cached shards, or per-pair byte-range reads."""
    datasets, train_idx, val_idx, base = [], [], [], 0
    for r, tr, va in parts:
        ids = tr + va
        if not ids:
            continue
        ds = r.dataset(pair_ids=ids, cache_shards=max(1, len(r.shards))) if cached else PairRandomAccess(r, ids)
        if len(ds) != len(ids):
            raise RuntimeError(f"store {r.url}: dataset holds {len(ds)} items, expected {len(ids)}")
        datasets.append(ds)
        train_idx += range(base, base + len(tr))
        val_idx += range(base + len(tr), base + len(ids))
        base += len(ids)
    full = ConcatDataset(datasets)
    return Subset(full, train_idx), Subset(full, val_idx)


def _collate(items):
    from egpt_core.store import collate_pairs

    return collate_pairs(items)


def iter_batches(dataset: Dataset, order: Sequence[int], batch_size: int, rank: int = 0, world: int = 1,
                 collate: Callable | None = None, prefetch: int = 2, workers: int = 1) -> Iterator[dict | None]:
    """Global batches of ``batch_size`` indices from ``order``; this rank's contiguous slice of each
    (``None`` when the slice is empty). Loading runs ``prefetch`` batches ahead in a thread;
    ``workers`` > 1 reads the items of a batch in parallel threads (byte-range reads)."""
    collate = collate or _collate
    slices = []
    for start in range(0, len(order), batch_size):
        chunk = np.asarray(order[start : start + batch_size])
        slices.append(np.array_split(chunk, world)[rank].tolist())
    item_pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

    def load(idx):
        if not idx:
            return None
        items = list(item_pool.map(dataset.__getitem__, idx)) if item_pool else [dataset[i] for i in idx]
        return collate(items)

    try:
        if prefetch <= 0:
            for idx in slices:
                yield load(idx)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            futures = [pool.submit(load, idx) for idx in slices[:prefetch]]
            nxt = prefetch
            for i in range(len(slices)):
                batch = futures[i].result()
                futures[i] = None
                if nxt < len(slices):
                    futures.append(pool.submit(load, slices[nxt]))
                    nxt += 1
                yield batch
    finally:
        if item_pool is not None:
            item_pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------------
# model plumbing
# --------------------------------------------------------------------------------------------------
class _Step(nn.Module):
    """Wraps an adapter so that DDP sees one forward(drafter, target, mask) -> (aligned, next|None)."""

    def __init__(self, adapter: nn.Module, level: str):
        super().__init__()
        self.adapter = adapter
        self.level = level

    def forward(self, drafter, target, mask):
        args = adapter_inputs(self.level, drafter, target)
        if self.level in EAGLE_LEVELS:
            return self.adapter.forward_with_prediction(*args, mask=mask)
        return self.adapter(*args, mask=mask), None


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _to(batch: dict | None, device: torch.device, d: int):
    if batch is None:  # empty slice on this rank: a fully masked dummy row keeps DDP in step
        z = torch.zeros(1, 1, d, device=device)
        return z, z, torch.zeros(1, 1, dtype=torch.bool, device=device), 0
    nb = device.type == "cuda"
    return (batch["drafter"].to(device, torch.float32, non_blocking=nb),
            batch["target"].to(device, torch.float32, non_blocking=nb),
            batch["mask"].to(device, non_blocking=nb), int(batch["mask"].shape[0]))



def _check_finite(cfg: TrainAdapterConfig, data: _Split, epoch: int, train_loss: float, val_loss: float) -> None:
    """A non-finite loss ends the run (nothing of the epoch is written): TrainingDivergedError naming
    the first pair with non-finite rows, if the data holds one, else the learning rate."""
    if math.isfinite(train_loss) and math.isfinite(val_loss):
        return
    where = f"{cfg.out}: training diverged in epoch {epoch} (train loss {train_loss}, val loss {val_loss})"
    for part in (data.train, data.val):
        for i in range(len(part)):
            item = part[i]
            for side in ("drafter", "target"):
                if not torch.isfinite(item[side]).all():
                    raise TrainingDivergedError(
                        f"{where}: pair {item['pair_id']!r} holds non-finite {side} rows in its store "
                        f"({', '.join(cfg.train + ([cfg.val] if cfg.val else []))}); re-extract or drop that pair")
    raise TrainingDivergedError(f"{where}: the data is finite, so the learning rate (lr={cfg.lr}) is too high "
                                "for this adapter; lower it (the last good checkpoint is kept)")



_LOSS_KEYS = ("n", "sq", "cos", "n_next", "sq_next", "cos_next")
_ACCEPT_KEYS = tuple(f"val_{accept_key(t)}" for t in TAUS)
_SUM_KEYS = _LOSS_KEYS + _ACCEPT_KEYS
CURVES = (
    Panel("loss", [("train_loss", "train", "-"), ("val_loss", "val", "-")]),
    Panel("cosine similarity", [("train_cos_sim", "train", "-"), ("val_cos_sim", "val", "-")]),
    Panel("val accept@tau (pooled positions)", [(k, f"> {t:.2f}", "-") for k, t in zip(_ACCEPT_KEYS, TAUS)],
          ylim=(0.0, 1.0)),
)


def config_fingerprint(cfg) -> str:
    """What a resumed run must share with its checkpoint (``epochs`` is not part of it: see
    `egpt_core.training.state`)."""
    return rf.config_fingerprint(cfg)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
def train_adapter(cfg: TrainAdapterConfig, progress: Progress | None = None, resume: bool = True) -> TrainResult:
    """Train ``cfg.adapter`` on ``cfg.train`` store(s); see the module docstring for outputs.

    ``resume=True`` continues from the run directory's committed checkpoint (same config fingerprint
    required; a finished run is returned as is, a run asked for more epochs than it ran continues).
    Under torchrun (WORLD_SIZE > 1) it runs data-parallel; every rank must call it with the same config.
    """
    return launch(cfg.location(cfg.out), RUN_KIND, config_fingerprint(cfg), resume=resume,
                  device=cfg.device, run=lambda ctx: _AdapterRecipe(cfg, progress, ctx).run(resume))


class _AdapterRecipe:
    """One adapter run: setup -> resume (or start fresh) -> train_epoch + checkpoint_epoch until the
    run state says done -> finish."""

    def __init__(self, cfg: TrainAdapterConfig, progress: Progress | None, ctx: DistContext):
        self.cfg, self.progress, self.ctx = cfg, progress, ctx
        self.run_dir = cfg.location(cfg.out)
        self.level = str(cfg.adapter.level)
        self.eagle = self.level in EAGLE_LEVELS
        self.fingerprint = config_fingerprint(cfg)
        self.state = RunState()
        self.last_plot = 0.0

    def run(self, resume: bool) -> TrainResult:
        self.setup()
        if not (resume and self.resume()):
            self.start_fresh()
        while not self.state.finished(self.cfg.epochs):
            improved = self.train_epoch()
            self.checkpoint_epoch(improved)
        if self.state.stopped_early:
            log.info("early stopping after epoch %d (best epoch %d)", self.state.epoch, self.state.best_epoch)
        return self.finish()

    # -- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Data (every config/store check happens here, before any training), then the adapter and
        its optimizer, seeded identically on every rank."""
        cfg, acfg, ctx = self.cfg, self.cfg.adapter, self.ctx
        self.data = _prepare_data(cfg, ctx.local_world)
        self.d = self.data.hidden_size
        if self.eagle and self.data.max_len > acfg.max_seq_len:
            raise ConfigError(f"{self.level}: the stores hold sequences of {self.data.max_len} rows but "
                              f"adapter.max_seq_len={acfg.max_seq_len}; raise adapter.max_seq_len to at least "
                              f"{self.data.max_len}")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        self.adapter = create_adapter(acfg, self.d).to(ctx.device)
        self.n_params = count_parameters(self.adapter)
        self.step_module: nn.Module = _Step(self.adapter, self.level)
        if ctx.world > 1:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.step_module = nn.parallel.DistributedDataParallel(self.step_module, device_ids=ids)
            if ctx.rank:
                torch.manual_seed(cfg.seed + 7919 * ctx.rank)  # decorrelate dropout across ranks
        self.params = [p for p in self.adapter.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(param_groups(self.adapter.named_parameters(), cfg.weight_decay), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(self.data.n_train / cfg.batch_size)
        self.loss_kw = dict(eagle=self.eagle, prediction_weight=acfg.prediction_weight,
                            separate_prediction_head=acfg.separate_prediction_head)

    def resume(self) -> bool:
        """Continue from the committed checkpoint (False: there is none)."""
        cfg, ctx = self.cfg, self.ctx
        committed = ck.load_committed(self.run_dir, RUN_KIND)
        if committed is None:
            return False
        if committed.extra.get("config_fingerprint") != self.fingerprint:
            raise ConfigError(
                f"{cfg.out} holds a run with a different configuration (fingerprint "
                f"{committed.extra.get('config_fingerprint')} != {self.fingerprint}); use another --out, or "
                "--no-resume to replace it")
        self.adapter.load_state_dict(committed.weights, strict=True)
        rf.optimizer_from_flat(self.opt, committed.train_tensors, committed.extra["optimizer"])
        self.state = RunState.from_json(committed.state)
        ctx.restore_rng(committed.train_tensors, committed.extra["rng"], cfg.seed + 104729 * self.state.epoch)
        log.info("resuming %s after epoch %d (best %.5f at epoch %d)", cfg.out, self.state.epoch,
                 self.state.best_val_loss, self.state.best_epoch)
        if ctx.main:  # outputs published from the commit (a crash after it, or a deleted file)
            self._publish(committed, best_changed=False)
        ctx.barrier()
        return True

    def start_fresh(self) -> None:
        if self.ctx.main:
            ck.clear(self.run_dir)  # a stale commit must not outlive a restart
            self.run_dir.child("config.json").write_json(self._config_record())
        self.ctx.barrier()

    def _config_record(self) -> dict[str, Any]:
        cfg, data, acfg = self.cfg, self.data, self.cfg.adapter
        return {
            "task": "train_adapter", "config": rf.config_record(cfg), "config_fingerprint": self.fingerprint,
            "data_fingerprints": data.fingerprints, "level": self.level, "hidden_size": self.d,
            "param_count": self.n_params, "n_train_pairs": data.n_train, "n_val_pairs": data.n_val,
            "n_train_scenes": len(data.train_scenes), "n_val_scenes": len(data.val_scenes),
            "val_scenes": data.val_scenes, "scenes_in_train_and_val": data.shared_scenes,
            "val_source": cfg.val or f"scene split (fraction {cfg.val_fraction}, seed {cfg.seed})",
            "data_in_ram": data.cached, "data_cache": data.cache.record(), "world_size": self.ctx.world,
            "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "loss": "MSE + 0.5*(1-cos)" if not self.eagle else (
                f"(1-w)*align + w*pred, w={acfg.prediction_weight}, separate_prediction_head="
                f"{acfg.separate_prediction_head}"),
        }

    # -- one epoch ---------------------------------------------------------------------------------
    def train_epoch(self) -> bool:
        """Train one epoch over a seeded global shuffle, validate over every val pair, record the
        epoch in the run state; returns whether it is the new best."""
        cfg, epoch, t0 = self.cfg, self.state.epoch + 1, time.perf_counter()
        train_m, step, lr = self._train_steps(epoch)
        val_sums, n_seen = self._validate()
        if n_seen != self.data.n_val:
            raise RuntimeError(f"validated {n_seen} pairs but the validation set holds {self.data.n_val}")
        vm = combine_sums({k: torch.tensor(val_sums[k]) for k in _LOSS_KEYS}, self.d, **self.loss_kw)
        _check_finite(cfg, self.data, epoch, float(train_m["total_loss"]), float(vm["total_loss"]))
        entry: dict[str, Any] = {
            "epoch": epoch, "train_loss": float(train_m["total_loss"]), "train_cos_sim": float(train_m["cos_sim"]),
            "val_loss": float(vm["total_loss"]), "val_cos_sim": float(vm["cos_sim"]), "val_mse": float(vm["mse_loss"]),
        }
        entry.update({k: val_sums[k] / max(val_sums["n"], 1.0) for k in _ACCEPT_KEYS})
        if self.eagle:
            entry.update(train_align_loss=float(train_m["align_loss"]), train_pred_loss=float(train_m["pred_loss"]),
                         val_align_loss=float(vm["align_loss"]), val_pred_loss=float(vm["pred_loss"]),
                         val_next_cos_sim=float(vm["next_cos_sim"]))
        entry.update(val_positions=int(val_sums["n"]), val_pairs=n_seen, lr=lr,
                     seconds=round(time.perf_counter() - t0, 3))
        return self.state.after_epoch(entry, entry["val_loss"], step=step, early_stopping=cfg.early_stopping,
                                      epochs=cfg.epochs)

    def _train_steps(self, epoch: int) -> tuple[dict[str, torch.Tensor], int, float]:
        """The optimizer steps of one epoch -> (pooled train metrics, step count after, last LR)."""
        from tqdm.auto import tqdm

        cfg, ctx, d = self.cfg, self.ctx, self.d
        self.step_module.train()
        order = torch.randperm(self.data.n_train, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        total_steps = cfg.epochs * self.steps_per_epoch
        step, lr, sums_total = self.state.step, cfg.lr, SumAccumulator(_LOSS_KEYS, ctx.device)
        bar = tqdm(total=self.steps_per_epoch, desc=f"{self.level} epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=None if ctx.main else True)
        for batch in iter_batches(self.data.train, order, cfg.batch_size, ctx.rank, ctx.world,
                                  workers=self.data.workers):
            drafter, target, mask, _ = _to(batch, ctx.device, d)
            sums, _ = self._sums(self.step_module, drafter, target, mask)
            # DDP: global denominators make the split batch's gradient the single-process one
            den = unpack(ctx.all_sum(pack(sums, _LOSS_KEYS)), _LOSS_KEYS) if ctx.world > 1 else None
            loss = combine_sums(sums, d, denominators=den, **self.loss_kw)["total_loss"] * ctx.world
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            lr = warmup_cosine_lr(step, total_steps, cfg.warmup_steps, cfg.lr, min(cfg.min_lr, cfg.lr))
            set_lr(self.opt, lr)
            self.opt.step()
            step += 1
            sums_total.add(sums)
            bar.update(1)
        bar.close()
        pooled = sums_total.pooled(ctx)
        return combine_sums({k: torch.tensor(v) for k, v in pooled.items()}, d, **self.loss_kw), step, lr

    def _sums(self, module: nn.Module, drafter, target, mask) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Additive loss statistics of one batch (`loss_sums`, the EAGLE levels' next-row part included)
        and the aligned rows [B, S, D]."""
        with _autocast(self.ctx.device):
            aligned, nxt = module(drafter, target, mask)
        aligned = aligned.float()
        if self.eagle and nxt is None:
            nxt = aligned
        return loss_sums(aligned, target, mask, nxt.float() if self.eagle else None), aligned

    @torch.no_grad()
    def _validate(self) -> tuple[dict[str, float], int]:
        """Sums over every val pair (pooled over ranks): loss parts and accept@tau counts; pairs seen."""
        ctx = self.ctx
        self.step_module.eval()
        # the inner adapter: validation needs no DDP gradient sync
        inner = self.step_module.module if ctx.world > 1 else self.step_module
        acc, n_pairs = SumAccumulator(_SUM_KEYS, ctx.device), 0
        for batch in iter_batches(self.data.val, list(range(self.data.n_val)), self.cfg.batch_size, ctx.rank,
                                  ctx.world, workers=self.data.workers):
            if batch is None:
                continue
            drafter, target, mask, b = _to(batch, ctx.device, self.d)
            sums, aligned = self._sums(inner, drafter, target, mask)
            counts = accept_counts(cosine_rows(aligned, target, mask), mask, TAUS)
            acc.add(sums | dict(zip(_ACCEPT_KEYS, counts.to(ctx.device))))
            n_pairs += b
        n = int(ctx.all_sum(torch.tensor(float(n_pairs), device=ctx.device)).item())
        return acc.pooled(ctx), n

    # -- checkpoint and outputs --------------------------------------------------------------------
    def checkpoint_epoch(self, improved: bool) -> None:
        """Commit the epoch (rank 0 writes; every rank's RNG is kept), then publish its outputs."""
        ctx, cfg = self.ctx, self.cfg
        rng_tensors, rng_infos = ctx.gather_rng()
        if ctx.main:
            opt_tensors, opt_info = rf.optimizer_to_flat(self.opt)
            extra = {"config_fingerprint": self.fingerprint, "optimizer": opt_info, "rng": rng_infos,
                     "n_train": self.data.n_train, "n_val": self.data.n_val, "param_count": self.n_params,
                     "world_size": ctx.world}
            committed = ck.commit_epoch(
                self.run_dir, RUN_KIND, self.state.epoch, weights=self.adapter.state_dict(),
                weights_metadata=adapter_weights_metadata(cfg.adapter, self.d),
                train_tensors={**opt_tensors, **rng_tensors}, state=self.state.to_json(), extra=extra,
                best=improved)
            self._publish(committed, best_changed=improved)
            entry = self.state.history[-1]
            if self.progress is not None:
                self.progress(self.state.epoch / cfg.epochs, f"epoch {self.state.epoch}/{cfg.epochs} val_loss "
                              f"{entry['val_loss']:.5f} val_cos {entry['val_cos_sim']:.4f}")
        ctx.barrier()

    def _publish(self, committed: ck.Committed, best_changed: bool) -> None:
        """best.safetensors / last.safetensors (copies of the committed weight files), history.json and
        the curves; on resume (``best_changed`` False) only what is missing or of another epoch."""
        out = self.run_dir
        for which, epoch in (("best", self.state.best_epoch), ("last", self.state.epoch)):
            weights = out.child(f"{which}.safetensors")
            if which == "last" or best_changed or _file_epoch(weights) != str(epoch):
                data = committed.weights_bytes(which)
                if data is not None:
                    weights.write_atomic(data)
        out.child("history.json").write_json(self.state.history)
        now = time.perf_counter()
        if self.state.finished(self.cfg.epochs) or now - self.last_plot > 30:
            plot_curves(self.state.history, CURVES, out.child("training_curves.png"))
            self.last_plot = now

    def finish(self) -> TrainResult:
        best = self.state.best_entry() or (self.state.history[-1] if self.state.history else {})
        result = TrainResult(run_url=self.cfg.out, best_val_loss=self.state.best_val_loss,
                             epochs_run=len(self.state.history), best_epoch=self.state.best_epoch,
                             metrics=dict(best), n_train_pairs=self.data.n_train, n_val_pairs=self.data.n_val,
                             param_count=self.n_params)
        if self.ctx.main:
            self.run_dir.child("result.json").write_json(result.model_dump())
        self.ctx.barrier()
        return result


def _file_epoch(weights: Location) -> str | None:
    """The ``epoch`` metadata of a weights file (None: no such file)."""
    data = weights.read_or_none()
    return None if data is None else rf.safetensors_metadata(data).get("epoch")


