"""L6's data path: a store streamed shard by shard through background read-ahead threads.

Setup scans each store's pairs tables once (token ids present, fed ids inside the drafter's vocabulary,
the split by scene) and keeps a compact index per side (train / val): for every pair its shard and its
row in that shard's pairs table, and a code for its scene, as int32 arrays (12 bytes a pair) — no
per-pair Python objects survive the scan, so memory does not grow with the store beyond that.

A pass over a side (one training epoch, one validation pass) is a plan of shard *windows*:

- training: the shards holding the side's pairs are permuted, taken ``SHUFFLE_WINDOW_SHARDS`` at a
  time, and the pairs of a window are permuted together (a shard-level + in-window shuffle, as
  webdataset / torchtune shuffle streams; a store of at most that many shards gets a full permutation).
  The generator is seeded with ``seed * 1_000_003 + epoch``: the order is a function of (seed, epoch),
  so a resumed run replays exactly the epochs of an uninterrupted one.
- validation (and the finite-rows check): shards in store order, pairs in store order.

Consecutive pairs form micro-batches (``micro_batch`` pairs; the last may be short), consecutive
micro-batches accumulation groups.

Two daemon threads per pass (`egpt_core.store.prefetch.background`): ``lora-shards`` reads whole tensor
shards ``PREFETCH_SHARDS`` ahead, checks them against the manifest's sha256 and decodes them (fp8 ->
bf16), keeping only the target rows; ``lora-batches`` builds micro-batches (token ids, target rows as
float32, the scene's event features) ``batch_queue`` ahead. The training step only takes the next
micro-batch from a queue. A read or integrity error is raised in the training loop at the micro-batch
it belongs to, naming the shard; closing the pass (its end, an exception, early exit) stops and joins
both threads. Memory held: at most window + prefetch + 1 shards' target rows and the queued
micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from egpt_core.errors import ConfigError
from egpt_core.store.prefetch import background

#: shards whose pairs are shuffled together in a training epoch (memory: that many shards' target rows)
SHUFFLE_WINDOW_SHARDS = 8
#: shards read, verified and decoded ahead of the micro-batch builder
PREFETCH_SHARDS = 2

_SCAN_COLUMNS = ["scene_id", "question", "status", "drafter_prompt_ids", "drafter_response_ids",
                 "target_response_ids", "length"]
_BATCH_COLUMNS = ["pair_id", "scene_id", "question", "drafter_prompt_ids", "drafter_response_ids",
                  "target_response_ids", "length", "row_offset"]


@dataclass
class LoraSample:
    """One ok pair: what the drafter is fed and what its rows are compared with."""

    pair_id: str
    scene_id: str
    question: str
    prompt_ids: list[int]  # drafter prompt, with the -200 sentinel
    fed_ids: list[int]  # response ids the drafter is teacher-forced on (g_0..g_{L-1})
    target_ids: list[int]  # target token t <-> row t
    length: int
    src: int = 0  # index of the store it came from (0 = train store, 1 = val store)


@dataclass
class MicroBatch:
    """One forward's pairs: ``target`` [N, D] float32 (their target rows concatenated, N = sum of
    lengths), ``target_ids`` [N] int64, ``features`` one [F, D_v] tensor per pair."""

    samples: list[LoraSample]
    features: list[torch.Tensor]
    target: torch.Tensor
    target_ids: torch.Tensor


@dataclass(frozen=True)
class PairIndex:
    """The ok pairs of one store that a side uses, sorted by shard: ``shard``/``row`` [N] int32 (shard
    index, row in its pairs table), ``scene`` [N] int32 (code into ``scene_names``)."""

    reader: object  # StoreReader
    src: int
    shard: np.ndarray
    row: np.ndarray
    scene: np.ndarray
    scene_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.shard.shape[0])

    def subset(self, keep: np.ndarray) -> PairIndex:
        return PairIndex(self.reader, self.src, self.shard[keep], self.row[keep], self.scene[keep], self.scene_names)

    def scenes(self) -> list[str]:
        """Scene ids of the side's pairs, in store order."""
        _, first = np.unique(self.scene, return_index=True)
        return [self.scene_names[self.scene[i]] for i in sorted(first.tolist())]

    def shard_ranges(self) -> list[tuple[int, int, int]]:
        """(shard, start, end) of each shard holding pairs: positions start..end-1 in this index."""
        if not len(self):
            return []
        cut = np.flatnonzero(np.diff(self.shard)) + 1
        starts = np.concatenate([[0], cut]).tolist()
        ends = [*cut.tolist(), len(self)]
        return [(int(self.shard[s]), s, e) for s, e in zip(starts, ends)]


def scan_store(reader, src: int, vocab_size: int, prompts: dict[str, list[int]], drafter=None) -> PairIndex:
    """Index a store's ok pairs, checking what L6 needs of each (token ids persisted at extraction,
    fed ids inside the drafter's ``vocab_size``). Questions of pairs stored without drafter prompt ids
    get theirs tokenised once into ``prompts`` (by question: there are few)."""
    shards, rows, scenes = [], [], []
    codes: dict[str, int] = {}
    for si, sh in enumerate(reader.shards):
        t = reader._table(sh)
        ok = np.flatnonzero(np.asarray(pc.fill_null(pc.equal(t.column("status"), "ok"), False)))
        if not len(ok):
            continue
        cols = {c: t.column(c).take(ok).to_pylist() for c in _SCAN_COLUMNS if c != "status"}
        pids = t.column("pair_id").take(ok).to_pylist()
        for k, pid in enumerate(pids):
            n = int(cols["length"][k])
            if not cols["drafter_prompt_ids"][k]:
                q = cols["question"][k]
                if drafter is None:
                    raise ConfigError(f"pair {pid} in {reader.url} has no drafter prompt ids")
                if q not in prompts:
                    prompts[q] = drafter.prompt_ids(q)
            fed = (cols["drafter_response_ids"][k] or [])[:n]
            tgt = (cols["target_response_ids"][k] or [])[:n]
            if len(fed) < n or len(tgt) < n:
                raise ConfigError(f"pair {pid} in {reader.url}: {len(fed)} drafter / {len(tgt)} target token ids "
                                  f"for {n} rows; L6 needs the token ids persisted at extraction (bug B4)")
            if fed and max(fed) >= vocab_size:
                raise ConfigError(f"pair {pid}: a fed token id is outside the drafter vocabulary ({vocab_size})")
            scenes.append(codes.setdefault(cols["scene_id"][k], len(codes)))
        shards.append(np.full(len(ok), si, dtype=np.int32))
        rows.append(ok.astype(np.int32))
    return PairIndex(reader, src, _concat(shards), _concat(rows), np.asarray(scenes, dtype=np.int32), tuple(codes))


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def split_index(index: PairIndex, val_scenes: set[str]) -> tuple[PairIndex, PairIndex]:
    """(pairs of the other scenes, pairs of ``val_scenes``)."""
    codes = [c for c, s in enumerate(index.scene_names) if s in val_scenes]
    is_val = np.isin(index.scene, np.asarray(codes, dtype=np.int32))
    return index.subset(~is_val), index.subset(is_val)


# --------------------------------------------------------------------------------------------------
# pass plans
# --------------------------------------------------------------------------------------------------
Plan = list[tuple[list[int], np.ndarray]]  # windows: (shards to hold, positions in the index, in order)


def epoch_plan(index: PairIndex, seed: int, epoch: int, window: int | None = None) -> Plan:
    """A training epoch's order: shards permuted, then the pairs of each ``window`` shards (default
    ``SHUFFLE_WINDOW_SHARDS``) permuted together."""
    window = SHUFFLE_WINDOW_SHARDS if window is None else window
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    ranges = index.shard_ranges()
    order = [ranges[k] for k in torch.randperm(len(ranges), generator=gen).tolist()]
    plan: Plan = []
    for w in range(0, len(order), max(1, window)):
        group = order[w:w + max(1, window)]
        members = np.concatenate([np.arange(s, e, dtype=np.int64) for _, s, e in group])
        perm = torch.randperm(len(members), generator=gen).numpy()
        plan.append(([si for si, _, _ in group], members[perm]))
    return plan


def store_order_plan(index: PairIndex) -> Plan:
    """Every pair once, in store order (validation, checks)."""
    return [([si], np.arange(s, e, dtype=np.int64)) for si, s, e in index.shard_ranges()]


# --------------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------------
@dataclass
class _LoadedShard:
    columns: dict[str, list]  # the side's rows of the shard: table row -> value, per _BATCH_COLUMNS
    target: torch.Tensor  # [R, D] reader dtype (the shard's target rows only)


def _load_shard(index: PairIndex, si: int, rows: np.ndarray) -> _LoadedShard:
    """Read, verify (whole-file sha256 against the manifest) and decode shard ``si``; keep its target
    rows and the needed columns of the pairs table's ``rows``."""
    reader = index.reader
    sh = reader.shards[si]
    table = reader._table(sh)
    _, target, _ = reader._load_tensors(sh)
    target = target.clone()  # drop the buffer that also holds the drafter rows
    sel = table.take(pa.array(rows.astype(np.int64)))
    columns = {c: dict(zip(rows.tolist(), sel.column(c).to_pylist())) for c in _BATCH_COLUMNS}
    return _LoadedShard(columns, target)


def stream(index: PairIndex, plan: Plan, micro_batch: int, *, prompts: dict[str, list[int]] | None = None,
           features: Callable[[str], torch.Tensor] | None = None, use: Callable[[int], bool] | None = None,
           batch_queue: int = 4, prefetch: int = PREFETCH_SHARDS) -> Iterator[MicroBatch | None]:
    """The plan's micro-batches, built in background threads (see the module docstring). Micro-batch
    ``k`` is built only when ``use(k)`` (else ``None`` stands for it: another rank's share); ``features``
    maps a scene id to its event features (omitted: empty list). Close the iterator (or exhaust it) to
    stop the threads."""
    url = getattr(index.reader, "url", "store")

    def shard_loads() -> Iterator[tuple[int, _LoadedShard]]:
        ranges = {si: (s, e) for si, s, e in index.shard_ranges()}
        for shards, _ in plan:
            for si in shards:
                s, e = ranges[si]
                yield si, _load_shard(index, si, index.row[s:e])

    def batches() -> Iterator[MicroBatch | None]:
        loads = background(shard_loads, prefetch, name=f"lora-shards {url}")
        with closing(loads):
            pending: list[tuple[LoraSample, torch.Tensor]] = []
            k = count = 0
            for shards, positions in plan:
                held = dict(next(loads) for _ in shards)
                for pos in positions.tolist():
                    if use is None or use(k):
                        pending.append(_pair(index, held[int(index.shard[pos])], int(index.row[pos]), prompts))
                    count += 1
                    if count == micro_batch:
                        yield _micro_batch(pending, features) if pending else None
                        pending, count, k = [], 0, k + 1
                del held
            if count:
                yield _micro_batch(pending, features) if pending else None

    return background(batches, max(1, batch_queue), name=f"lora-batches {url}")


def _pair(index: PairIndex, shard: _LoadedShard, row: int, prompts: dict[str, list[int]] | None
          ) -> tuple[LoraSample, torch.Tensor]:
    c = {k: v[row] for k, v in shard.columns.items()}
    n, a = int(c["length"]), int(c["row_offset"])
    prompt = list(c["drafter_prompt_ids"] or []) or list((prompts or {})[c["question"]])
    sample = LoraSample(c["pair_id"], c["scene_id"], c["question"], prompt, list(c["drafter_response_ids"])[:n],
                        list(c["target_response_ids"])[:n], n, index.src)
    return sample, shard.target[a:a + n].float()


def _micro_batch(pending: Sequence[tuple[LoraSample, torch.Tensor]],
                 features: Callable[[str], torch.Tensor] | None) -> MicroBatch:
    samples = [s for s, _ in pending]
    feats = [features(s.scene_id) for s in samples] if features is not None else []
    ids = torch.tensor([t for s in samples for t in s.target_ids], dtype=torch.long)
    return MicroBatch(samples, feats, torch.cat([r for _, r in pending]), ids)
