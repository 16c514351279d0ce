"""Stage 3a: train one alignment adapter from hidden-state stores (reference §7, bugs fixed).

Fixes relative to the research trainer: validation over every val pair (B2; asserted), a
validation split by scene (no scene on both sides) instead of the last train chunk, seeded global
shuffling across shards, AdamW without weight decay on norms/gates/positional tables/biases,
cosine schedule with linear warmup stepped per optimizer step, the same key-padding mask in
train and eval (B9), ``config.json`` written at the start, pickle-free checkpoints, bitwise
resume after a crash, and DistributedDataParallel under torchrun.

Run directory (any fsspec URL): config.json, history.json, best.safetensors, last.safetensors,
last_optim.safetensors, last_state.json, training_curves.png, result.json.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from egpt_core import outdir
from egpt_core import runfiles as rf
from egpt_core.adapters import checkpoint as ck
from egpt_core.adapters.losses import (
    DEFAULT_TAUS,
    accept_counts,
    accept_key,
    combine_sums,
    loss_sums,
    masked_cos_per_position,
)
from egpt_core.adapters.modules import adapter_inputs, count_parameters, create_adapter
from egpt_core.config import TrainAdapterConfig
from egpt_core.data.split import split_scenes
from egpt_core.errors import ConfigError, TrainingDivergedError
from egpt_core.fingerprint import hash_json
from egpt_core.fsio import is_local, join
from egpt_core.memory import DataCacheDecision, decide_data_cache

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
TAUS = DEFAULT_TAUS
EAGLE_LEVELS = ("L5", "B1", "L5F")
RUN_KIND = "adapter-run"
#: fields that do not change what is trained (excluded from the config fingerprint)
_NON_SEMANTIC = {"storage_options", "device", "out", "data_cache_gb"}


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
# distributed context
# --------------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    local_world: int = 1  # ranks on this node (they share its memory)
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device_setting: str) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        want_cuda = device_setting.startswith("cuda") or (device_setting == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ConfigError(f"device={device_setting!r} but CUDA is not available (use 'auto' or 'cpu')")
        if want_cuda:
            device = torch.device(f"cuda:{local_rank}") if world > 1 else torch.device(
                device_setting if device_setting.startswith("cuda") else "cuda")
        else:
            device = torch.device("cpu")
        owns = False
        if world > 1 and device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives (all_gather_object too) use the current device
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            owns = True
        rank = dist.get_rank() if world > 1 else 0
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))  # torchrun sets it; else assume one node
        return cls(rank=rank, world=world, device=device, owns_group=owns, local_world=local_world)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def teardown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


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


def _open_reader(url: str, storage_options: dict):
    from egpt_core.store import StoreReader

    try:
        return StoreReader(url, storage_options=storage_options or None)
    except FileNotFoundError as exc:
        raise ConfigError(f"store {url!r} not found or not readable ({exc}); check the URL and storage options") from exc


def _manifest_fingerprint(reader) -> str:
    m = reader.manifest
    if not isinstance(m, dict):
        m = m.model_dump() if hasattr(m, "model_dump") else dict(vars(m))
    for key in ("fingerprint", "store_fingerprint"):
        if m.get(key):
            return str(m[key])
    return hash_json(m)


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
    meta = reader.meta or {}
    fps = dict(meta.get("model_fingerprints") or {})
    for side, info in (meta.get("models") or {}).items():
        if isinstance(info, dict) and info.get("fingerprint"):
            fps.setdefault(side, info["fingerprint"])
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
    if not cfg.train:
        raise ConfigError("no train store given (TrainAdapterConfig.train / --train URL)")
    so = cfg.storage_options
    readers = [_open_reader(u, so) for u in cfg.train]
    val_reader = _open_reader(cfg.val, so) if cfg.val else None
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

    per_store = _drop_repeated_pairs([_ok_pairs(r) for r in readers], cfg.train)
    if not any(ids for ids, _, _ in per_store):
        counts = {u: r.counts for u, r in zip(cfg.train, readers)}
        raise ConfigError(f"no 'ok' pairs to train on in {', '.join(cfg.train)} (counts {counts}): every pair "
                          "failed or was skipped; see `egpt inspect` for the reasons")
    max_len = max((max(p[2], default=0) for p in per_store), default=0)
    all_train_scenes = sorted({s for _, scenes, _ in per_store for s in scenes})
    shared = 0
    # parts: (reader, train pair ids, val pair ids); one dataset per store keeps one RAM copy
    if val_reader is not None:
        v_ids, v_scenes, v_len = _ok_pairs(val_reader)
        max_len = max(max_len, max(v_len, default=0))
        val_scene_set = set(v_scenes)
        shared = len(val_scene_set & set(all_train_scenes))
        if shared:
            log.warning("%d scene(s) appear in both the train and the val store (leakage)", shared)
        parts = [(r, ids, []) for r, (ids, _, _) in zip(readers, per_store)] + [(val_reader, [], v_ids)]
        train_scenes, val_scenes = all_train_scenes, sorted(val_scene_set)
    else:
        if len(all_train_scenes) < 2:
            raise ConfigError(
                f"cannot split validation by scene: the train store(s) hold {len(all_train_scenes)} scene(s); "
                "give a --val store or more scenes"
            )
        _, val_set = split_scenes(all_train_scenes, cfg.val_fraction, cfg.seed)
        parts = [(r, [i for i, s in zip(ids, sc) if s not in val_set], [i for i, s in zip(ids, sc) if s in val_set])
                 for r, (ids, sc, _) in zip(readers, per_store)]
        train_scenes, val_scenes = sorted(set(all_train_scenes) - val_set), sorted(val_set)

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
    cached = cache.in_ram
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
    return _Split(Subset(full, train_idx), Subset(full, val_idx), n_train, n_val, d, fingerprints, val_scenes,
                  train_scenes, shared, max_len, cache)


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


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, gates (alpha), positional tables and biases."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or "pos_embed" in leaf or "alpha" in leaf or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CosineWarmup:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio``."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float):
        self.total = max(int(total_steps), 1)
        self.warmup = int(warmup_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


_SUM_KEYS = ("n", "sq", "cos", "n_next", "sq_next", "cos_next")


def _pack(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    zero = torch.zeros((), device=sums["n"].device)
    return torch.stack([sums[k].detach().float() if k in sums else zero for k in _SUM_KEYS])


def _unpack(vec: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: vec[i] for i, k in enumerate(_SUM_KEYS)}


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------
def plot_curves(history: list[dict[str, Any]], url: str, storage_options: dict | None = None) -> None:
    """training_curves.png: loss (train/val), cosine (train/val), val accept@tau."""
    if not history:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 3)
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="val")
    ax[0].set_title("loss")
    ax[1].plot(ep, [h["train_cos_sim"] for h in history], label="train")
    ax[1].plot(ep, [h["val_cos_sim"] for h in history], label="val")
    ax[1].set_title("cosine similarity")
    for tau in TAUS:
        k = f"val_{accept_key(tau)}"
        ax[2].plot(ep, [h[k] for h in history], label=f"> {tau:.2f}")
    ax[2].set_ylim(0, 1)
    ax[2].set_title("val accept@tau (pooled positions)")
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    rf.write_bytes(url, buf.getvalue(), storage_options)


def config_fingerprint(cfg) -> str:
    return rf.config_fingerprint(cfg, _NON_SEMANTIC)


def _result_from_state(cfg: TrainAdapterConfig, state: dict[str, Any]) -> TrainResult:
    hist = state["history"]
    best = next((h for h in hist if h["epoch"] == state["best_epoch"]), hist[-1] if hist else {})
    return TrainResult(run_url=cfg.out, best_val_loss=float(state["best_val_loss"]), epochs_run=len(hist),
                       best_epoch=int(state["best_epoch"]), metrics=dict(best), n_train_pairs=state["n_train"],
                       n_val_pairs=state["n_val"], param_count=state["param_count"])


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
def train_adapter(cfg: TrainAdapterConfig, progress: Progress | None = None, resume: bool = True) -> TrainResult:
    """Train ``cfg.adapter`` on ``cfg.train`` store(s); see the module docstring for outputs.

    ``resume=True`` continues from the run directory's committed ``last`` checkpoint (same config
    fingerprint required; a finished run is returned as is). Under torchrun (WORLD_SIZE > 1) it
    runs data-parallel; every rank must call it with the same config.
    """
    ctx = _Dist.setup(cfg.device)
    try:
        # one run owns cfg.out; never a directory egpt did not write (egpt_core/outdir.py); rank 0 holds it
        claim = outdir.claim_output(cfg.out, RUN_KIND, config_fingerprint(cfg), cfg.storage_options or None,
                                    replace=not resume, replace_hint="--no-resume") if ctx.main else nullcontext()
        with claim:
            return _train(cfg, progress, resume, ctx)
    finally:
        ctx.teardown()


def _train(cfg: TrainAdapterConfig, progress: Progress | None, resume: bool, ctx: _Dist) -> TrainResult:
    so = cfg.storage_options or None
    acfg = cfg.adapter
    level = str(acfg.level)
    eagle = level in EAGLE_LEVELS
    data = _prepare_data(cfg, ctx.local_world)  # hidden-size/config checks happen here, before any training
    d = data.hidden_size
    if eagle and data.max_len > acfg.max_seq_len:
        raise ConfigError(f"{level}: the stores hold sequences of {data.max_len} rows but adapter.max_seq_len="
                          f"{acfg.max_seq_len}; raise adapter.max_seq_len to at least {data.max_len}")
    fp = config_fingerprint(cfg)

    # ---- model, optimizer, schedule (seeded identically on every rank) -------------------------
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    adapter = create_adapter(acfg, d).to(ctx.device)
    n_params = count_parameters(adapter)
    step_module: nn.Module = _Step(adapter, level)
    if ctx.world > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=ids)
        if ctx.rank:
            torch.manual_seed(cfg.seed + 7919 * ctx.rank)  # decorrelate dropout across ranks
    opt = torch.optim.AdamW(param_groups(adapter, cfg.weight_decay), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(data.n_train / cfg.batch_size)
    schedule = CosineWarmup(cfg.epochs * steps_per_epoch, cfg.warmup_steps, min(cfg.min_lr / cfg.lr, 1.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    # ---- resume ----------------------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    start_epoch, best_loss, best_epoch, patience, finished = 0, float("inf"), 0, 0, False
    loaded = ck.load_train_state(cfg.out, so) if resume else None
    if loaded is None and resume and rf.exists(join(cfg.out, "last_state.json"), so):
        log.warning("%s: last checkpoint is incomplete (crash while writing); starting from scratch", cfg.out)
    if loaded is not None and loaded[0].get("finished") and not rf.exists(join(cfg.out, "best.safetensors"), so):
        log.warning("%s: the finished run's best.safetensors is gone; training again from scratch", cfg.out)
        loaded = None
    if loaded is not None:
        state, weights, tensors = loaded
        if state.get("config_fingerprint") != fp:
            raise ConfigError(
                f"{cfg.out} holds a run with a different configuration (fingerprint {state.get('config_fingerprint')}"
                f" != {fp}); use another --out, or --no-resume to replace it")
        adapter.load_state_dict(weights, strict=True)
        rf.optimizer_from_flat(opt, tensors, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _restore_rng(tensors, state, ctx, cfg.seed)
        history = list(state["history"])
        start_epoch, best_loss = int(state["epoch"]), float(state["best_val_loss"])
        best_epoch, patience, finished = int(state["best_epoch"]), int(state["patience"]), bool(state.get("finished"))
        log.info("resuming %s after epoch %d (best %.5f at epoch %d)", cfg.out, start_epoch, best_loss, best_epoch)
        if finished:
            result = _result_from_state(cfg, state)
            if ctx.main and not rf.exists(join(cfg.out, "result.json"), so):
                rf.write_json(join(cfg.out, "result.json"), result.model_dump(), so)
            return result

    if ctx.main and loaded is None:
        rf.remove(join(cfg.out, "last_state.json"), so)  # a stale commit point must not outlive a restart
        rf.write_json(join(cfg.out, "config.json"), {
            "task": "train_adapter", "config": rf.config_record(cfg), "config_fingerprint": fp,
            "data_fingerprints": data.fingerprints, "level": level, "hidden_size": d, "param_count": n_params,
            "n_train_pairs": data.n_train, "n_val_pairs": data.n_val,
            "n_train_scenes": len(data.train_scenes), "n_val_scenes": len(data.val_scenes),
            "val_scenes": data.val_scenes, "scenes_in_train_and_val": data.shared_scenes,
            "val_source": cfg.val or f"scene split (fraction {cfg.val_fraction}, seed {cfg.seed})",
            "data_in_ram": data.cached, "data_cache": data.cache.record(), "world_size": ctx.world, "torch": torch.__version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "loss": "MSE + 0.5*(1-cos)" if not eagle else (
                f"(1-w)*align + w*pred, w={acfg.prediction_weight}, separate_prediction_head="
                f"{acfg.separate_prediction_head}"),
        }, so)
    ctx.barrier()

    loss_kw = dict(eagle=eagle, prediction_weight=acfg.prediction_weight,
                   separate_prediction_head=acfg.separate_prediction_head)
    params = [p for p in adapter.parameters() if p.requires_grad]
    last_plot = 0.0
    from tqdm.auto import tqdm

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        # ---- train -----------------------------------------------------------------------------
        step_module.train()
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        order = torch.randperm(data.n_train, generator=g).tolist()
        tot = torch.zeros(len(_SUM_KEYS), device=ctx.device)
        bar = tqdm(total=steps_per_epoch, desc=f"{level} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if ctx.main else True)
        for batch in iter_batches(data.train, order, cfg.batch_size, ctx.rank, ctx.world, workers=data.workers):
            drafter, target, mask, _ = _to(batch, ctx.device, d)
            with _autocast(ctx.device):
                aligned, nxt = step_module(drafter, target, mask)
            if eagle and nxt is None:
                nxt = aligned
            sums = loss_sums(aligned.float(), target, mask, nxt.float() if eagle else None)
            den = None
            if ctx.world > 1:
                den = _unpack(ctx.all_sum(_pack(sums)))
            loss = combine_sums(sums, d, denominators=den, **loss_kw)["total_loss"] * ctx.world
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            tot += _pack(sums).to(ctx.device)
            bar.update(1)
        bar.close()
        train_m = combine_sums(_unpack(ctx.all_sum(tot).cpu()), d, **loss_kw)

        # ---- validate (every val pair) ----------------------------------------------------------
        val_m, acc, n_seen = _validate(step_module, data, cfg.batch_size, ctx, d, eagle)
        if n_seen != data.n_val:
            raise RuntimeError(f"validated {n_seen} pairs but the validation set holds {data.n_val}")
        vm = combine_sums(val_m, d, **loss_kw)
        _check_finite(cfg, data, epoch + 1, float(train_m["total_loss"]), float(vm["total_loss"]))
        n_pos = max(float(val_m["n"]), 1.0)
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": float(train_m["total_loss"]), "train_cos_sim": float(train_m["cos_sim"]),
            "val_loss": float(vm["total_loss"]), "val_cos_sim": float(vm["cos_sim"]),
            "val_mse": float(vm["mse_loss"]),
        }
        for i, tau in enumerate(TAUS):
            entry[f"val_{accept_key(tau)}"] = float(acc[i]) / n_pos
        if eagle:
            entry.update(train_align_loss=float(train_m["align_loss"]), train_pred_loss=float(train_m["pred_loss"]),
                         val_align_loss=float(vm["align_loss"]), val_pred_loss=float(vm["pred_loss"]),
                         val_next_cos_sim=float(vm["next_cos_sim"]))
        entry.update(val_positions=int(val_m["n"]), val_pairs=n_seen, lr=float(sched.get_last_lr()[0]),
                     seconds=round(time.perf_counter() - t0, 3))
        history.append(entry)

        improved = math.isfinite(entry["val_loss"]) and entry["val_loss"] < best_loss
        if improved:
            best_loss, best_epoch, patience = entry["val_loss"], epoch + 1, 0
        else:
            patience += 1
        stop = patience >= cfg.early_stopping
        finished = stop or epoch + 1 == cfg.epochs

        # ---- checkpoint (rank 0 writes; RNG of every rank is kept) -------------------------------
        rng = rf.rng_to_flat()
        rng_all = _gather_rng(rng, ctx)
        if ctx.main:
            if improved:
                ck.save_adapter_weights(join(cfg.out, "best.safetensors"), adapter, acfg, d, epoch + 1, so)
            ck.save_adapter_weights(join(cfg.out, "last.safetensors"), adapter, acfg, d, epoch + 1, so)
            rf.write_json(join(cfg.out, "history.json"), history, so)
            rng_tensors, rng_info = rng_all
            state = {
                "epoch": epoch + 1, "best_val_loss": best_loss, "best_epoch": best_epoch, "patience": patience,
                "finished": finished, "stopped_early": stop and epoch + 1 < cfg.epochs, "history": history,
                "config_fingerprint": fp, "n_train": data.n_train, "n_val": data.n_val, "param_count": n_params,
                "world_size": ctx.world,
            }
            if ctx.world > 1:
                state["rng_ranks"] = rng_info
                rng_info = rng_info["0"]
            ck.save_train_state(cfg.out, opt, sched.state_dict(), state, (rng_tensors, rng_info), so)
            now = time.perf_counter()
            if finished or now - last_plot > 30:
                plot_curves(history, join(cfg.out, "training_curves.png"), so)
                last_plot = now
            if progress is not None:
                progress((epoch + 1) / cfg.epochs,
                         f"epoch {epoch + 1}/{cfg.epochs} val_loss {entry['val_loss']:.5f} "
                         f"val_cos {entry['val_cos_sim']:.4f}")
        ctx.barrier()
        if stop:
            log.info("early stopping after epoch %d (best epoch %d)", epoch + 1, best_epoch)
            break

    best_entry = next(h for h in history if h["epoch"] == best_epoch) if best_epoch else history[-1]
    result = TrainResult(run_url=cfg.out, best_val_loss=best_loss, epochs_run=len(history), best_epoch=best_epoch,
                         metrics=dict(best_entry), n_train_pairs=data.n_train, n_val_pairs=data.n_val,
                         param_count=n_params)
    if ctx.main:
        rf.write_json(join(cfg.out, "result.json"), result.model_dump(), so)
    ctx.barrier()
    return result


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


@torch.no_grad()
def _validate(step_module: nn.Module, data: _Split, batch_size: int, ctx: _Dist, d: int, eagle: bool):
    step_module.eval()
    tot = torch.zeros(len(_SUM_KEYS), device=ctx.device)
    acc = torch.zeros(len(TAUS), device=ctx.device)
    n_pairs = 0
    for batch in iter_batches(data.val, list(range(data.n_val)), batch_size, ctx.rank, ctx.world,
                              workers=data.workers):
        if batch is None:
            continue
        drafter, target, mask, b = _to(batch, ctx.device, d)
        # the inner adapter: validation needs no DDP gradient sync
        inner = step_module.module if isinstance(step_module, nn.parallel.DistributedDataParallel) else step_module
        with _autocast(ctx.device):
            aligned, nxt = inner(drafter, target, mask)
        aligned = aligned.float()
        if eagle and nxt is None:
            nxt = aligned
        tot += _pack(loss_sums(aligned, target, mask, nxt.float() if eagle else None))
        acc += accept_counts(masked_cos_per_position(aligned, target, mask), mask, TAUS)
        n_pairs += b
    tot = ctx.all_sum(tot).cpu()
    acc = ctx.all_sum(acc).cpu()
    n = int(ctx.all_sum(torch.tensor(float(n_pairs), device=ctx.device)).item())
    return _unpack(tot), acc, n


def _gather_rng(rng: tuple[dict[str, torch.Tensor], dict[str, Any]], ctx: _Dist):
    """Single process: the RNG state as is. DDP: rank 0's under plain keys plus every other rank's
    tensors suffixed ``.rank<r>``; infos keyed by rank."""
    if ctx.world == 1:
        return rng
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, rng)
    tensors: dict[str, torch.Tensor] = {}
    infos: dict[str, Any] = {}
    for r, (t, info) in enumerate(gathered):
        for k, v in t.items():
            tensors[k if r == 0 else f"{k}.rank{r}"] = v
        infos[str(r)] = info
    return tensors, infos


def _restore_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any], ctx: _Dist, seed: int) -> None:
    suffix = f".rank{ctx.rank}"
    if ctx.rank == 0:
        mine = {k: v for k, v in tensors.items() if k.startswith("rng.") and ".rank" not in k}
        info = state["rng"]
    else:
        mine = {k[: -len(suffix)]: v for k, v in tensors.items() if k.startswith("rng.") and k.endswith(suffix)}
        info = state.get("rng_ranks", {}).get(str(ctx.rank))
    if not mine or info is None:  # resumed with more ranks than were saved
        torch.manual_seed(seed + 7919 * ctx.rank + 104729 * int(state["epoch"]))
        return
    rf.rng_from_flat(mine, info)
