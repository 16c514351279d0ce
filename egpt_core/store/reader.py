"""StoreReader: lazy, shard-at-a-time and random access reads of a hidden-state store.

Only shards named by ``manifest.json`` exist for a reader; orphan files are invisible. Random access
(:meth:`StoreReader.get`) parses the safetensors header itself and reads just the byte ranges of one
pair's rows (ranged GETs on object stores).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import safetensors.torch as st
import torch
from torch.utils.data import Dataset, Sampler

from egpt_core.errors import StoreError
from egpt_core.fsio import url_to_fs
from egpt_core.store import manifest as mf
from egpt_core.store.retrying import with_retries
from egpt_core.store.writer import _get_features

_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class PairRows:
    """One pair's rows (``drafter``/``target`` [L, D] in the store dtype) and token ids."""

    pair_id: str
    scene_id: str
    question_idx: int
    drafter: torch.Tensor
    target: torch.Tensor
    drafter_response_ids: list[int]
    target_response_ids: list[int]
    drafter_prompt_ids: list[int]
    target_prompt_ids: list[int]
    question: str = ""
    status: str = "ok"
    reason: str | None = None
    drafter_text: str = ""
    target_text: str = ""
    length: int = 0


@dataclass
class ShardData:
    """One committed shard: its ok pairs (table) and packed rows [R, D] (store dtype)."""

    name: str
    table: pa.Table
    drafter: torch.Tensor
    target: torch.Tensor


@dataclass
class _Header:
    data_start: int
    tensors: dict = field(default_factory=dict)


def _pair_rows(row: dict, drafter: torch.Tensor, target: torch.Tensor) -> PairRows:
    return PairRows(
        pair_id=row["pair_id"],
        scene_id=row["scene_id"],
        question_idx=row["question_idx"],
        drafter=drafter,
        target=target,
        drafter_response_ids=row["drafter_response_ids"],
        target_response_ids=row["target_response_ids"],
        drafter_prompt_ids=row["drafter_prompt_ids"],
        target_prompt_ids=row["target_prompt_ids"],
        question=row["question"],
        status=row["status"],
        reason=row["reason"],
        drafter_text=row["drafter_text"],
        target_text=row["target_text"],
        length=row["length"],
    )


class StoreReader:
    """Read a store at ``url``. ``manifest`` is the parsed manifest (validated: every path it names
    stays inside the store)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = str(url)
        self.storage_options = storage_options
        fs, root = url_to_fs(self.url, storage_options)
        self.fs = with_retries(fs)  # a transient fault costs one more request, not a task retry
        self.root = root.rstrip("/")
        self.refresh()

    def refresh(self) -> None:
        """Re-read the manifest (to see shards committed since this reader opened)."""
        m = mf.load_manifest(self.fs, self.root, self.url)
        if m is None:
            raise StoreError(f"no manifest.json at {self.url}: not a store (or nothing committed yet)")
        self.manifest = m
        self.meta: dict = m["meta"]
        self.hidden_size = int(self.meta["hidden_size"])
        self.dtype = mf.torch_dtype(self.meta["dtype"])
        self._tables: dict[str, pa.Table] = {}
        self._headers: dict[str, _Header] = {}
        self._index: dict[str, tuple[int, int]] | None = None

    # -- manifest views ---------------------------------------------------------------------------
    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.manifest["counts"])

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # -- pairs tables -----------------------------------------------------------------------------
    def _table(self, sh: dict) -> pa.Table:
        name = sh["name"]
        if name not in self._tables:
            path = self._abs(sh["files"]["pairs"])
            try:
                t = mf.read_parquet(self.fs, path, self.url, sh["files"]["pairs"])
            except FileNotFoundError as exc:
                raise StoreError(f"store {self.url}: shard file {sh['files']['pairs']} is missing") from exc
            self._tables[name] = t
        return self._tables[name]

    def pairs(self, status: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """All pairs (or those with ``status``) as one Arrow table; shard tables are read lazily."""
        tables = [self._table(sh) for sh in self.shards]
        t = pa.concat_tables(tables) if tables else mf.PAIR_SCHEMA.empty_table()
        if status is not None:
            t = t.filter(pc.equal(t.column("status"), status))
        return t.select(list(columns)) if columns else t

    def pair_ids(self, status: str | None = "ok") -> list[str]:
        return self.pairs(status, columns=["pair_id"]).column("pair_id").to_pylist()

    # -- whole shards -------------------------------------------------------------------------------
    def _load_tensors(self, sh: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        path = self._abs(sh["files"]["tensors"])
        local = mf.is_local_fs(self.fs)
        try:
            # a transient read error propagates as itself (retryable); only a bad file is a StoreError
            data = None if local else self.fs.cat_file(path)
        except FileNotFoundError as exc:
            raise StoreError(f"store {self.url}: shard file {sh['files']['tensors']} is missing") from exc
        try:
            ts = st.load_file(path) if local else st.load(data)
        except FileNotFoundError as exc:
            raise StoreError(f"store {self.url}: shard file {sh['files']['tensors']} is missing") from exc
        except Exception as exc:  # safetensors' own errors
            raise StoreError(f"store {self.url}: {sh['files']['tensors']} is not readable ({exc})") from exc
        try:
            d, t, off = ts["drafter"], ts["target"], ts["offsets"]
        except KeyError as exc:
            raise StoreError(f"store {self.url}: {sh['files']['tensors']} lacks tensor {exc}") from exc
        if d.shape != t.shape or d.dim() != 2 or d.shape[1] != self.hidden_size or d.dtype != self.dtype:
            raise StoreError(
                f"store {self.url}: shard {sh['name']} tensors {tuple(d.shape)}/{tuple(t.shape)} {d.dtype} "
                f"do not match the manifest ([R, {self.hidden_size}] {self.dtype})"
            )
        return d, t, off

    def _check_offsets(self, sh: dict, table: pa.Table, offsets: torch.Tensor, rows: int) -> None:
        ro = table.column("row_offset").to_pylist()
        ln = table.column("length").to_pylist()
        if len(offsets) != len(ro) + 1 or offsets.tolist()[:-1] != ro or int(offsets[-1]) != rows or (
            ro and ro[-1] + ln[-1] != rows
        ):
            raise StoreError(f"store {self.url}: shard {sh['name']} offsets disagree with its pairs table")

    def iter_shards(self) -> Iterator[ShardData]:
        """One shard at a time: (name, table of its ok pairs, drafter [R, D], target [R, D])."""
        for sh in self.shards:
            table = self._table(sh)
            d, t, off = self._load_tensors(sh)
            self._check_offsets(sh, table, off, d.shape[0])
            ok = table.filter(pc.equal(table.column("status"), "ok"))
            yield ShardData(sh["name"], ok, d, t)

    def iter_pairs(self, status: str | None = "ok") -> Iterator[PairRows]:
        """Every pair (with ``status``), shard by shard; rows are views into the loaded shard."""
        empty = torch.zeros(0, self.hidden_size, dtype=self.dtype)
        for sh in self.shards:
            table = self._table(sh)
            if status is not None:
                table = table.filter(pc.equal(table.column("status"), status))
            if table.num_rows == 0:
                continue
            if status is not None and status != "ok":
                for row in table.to_pylist():
                    yield _pair_rows(row, empty, empty)
                continue
            d, t, _ = self._load_tensors(sh)
            for row in table.to_pylist():
                a, n = row["row_offset"], row["length"]
                yield _pair_rows(row, d[a:a + n], t[a:a + n])

    # -- random access ------------------------------------------------------------------------------
    def _build_index(self) -> dict[str, tuple[int, int]]:
        if self._index is None:
            idx = {}
            for si, sh in enumerate(self.shards):
                for ri, pid in enumerate(self._table(sh).column("pair_id").to_pylist()):
                    idx[pid] = (si, ri)
            self._index = idx
        return self._index

    def _header(self, sh: dict) -> _Header:
        name = sh["name"]
        if name not in self._headers:
            path = self._abs(sh["files"]["tensors"])
            head = self.fs.cat_file(path, start=0, end=8)
            if len(head) != 8:
                raise StoreError(f"store {self.url}: {sh['files']['tensors']} is truncated")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise StoreError(f"store {self.url}: {sh['files']['tensors']} has an implausible header size {n}")
            try:
                hdr = json.loads(self.fs.cat_file(path, start=8, end=8 + n))
            except (ValueError, UnicodeDecodeError) as exc:
                raise StoreError(f"store {self.url}: {sh['files']['tensors']} header is not JSON") from exc
            hdr.pop("__metadata__", None)
            self._headers[name] = _Header(8 + n, hdr)
        return self._headers[name]

    def _read_rows(self, sh: dict, key: str, row_offset: int, length: int) -> torch.Tensor:
        D = self.hidden_size
        if length == 0:
            return torch.zeros(0, D, dtype=self.dtype)
        h = self._header(sh)
        info = h.tensors.get(key)
        if info is None:
            raise StoreError(f"store {self.url}: {sh['files']['tensors']} lacks tensor {key!r}")
        dt = mf.ST_DTYPES.get(info["dtype"])
        shape = info["shape"]
        if dt != self.dtype or len(shape) != 2 or shape[1] != D or row_offset + length > shape[0]:
            raise StoreError(
                f"store {self.url}: {sh['files']['tensors']}:{key} is {info['dtype']} {shape}; cannot read rows "
                f"{row_offset}..{row_offset + length} of [R, {D}] {self.dtype}"
            )
        item = torch.empty((), dtype=dt).element_size()
        begin, _ = info["data_offsets"]
        start = h.data_start + begin + row_offset * D * item
        nbytes = length * D * item
        data = self.fs.cat_file(self._abs(sh["files"]["tensors"]), start=start, end=start + nbytes)
        if len(data) != nbytes:
            raise StoreError(f"store {self.url}: {sh['files']['tensors']} is truncated")
        if sys.byteorder != "little":  # safetensors is little-endian
            raise StoreError("random access needs a little-endian host; use iter_pairs()")
        return torch.frombuffer(bytearray(data), dtype=dt).view(length, D)

    def get(self, pair_id: str) -> PairRows:
        """One pair by id, reading only the byte ranges of its rows."""
        loc = self._build_index().get(pair_id)
        if loc is None:
            raise KeyError(f"pair {pair_id!r} is not in store {self.url}")
        sh = self.shards[loc[0]]
        row = self._table(sh).slice(loc[1], 1).to_pylist()[0]
        a, n = row["row_offset"], row["length"]
        return _pair_rows(row, self._read_rows(sh, "drafter", a, n), self._read_rows(sh, "target", a, n))

    # -- integrity ----------------------------------------------------------------------------------
    def _hash_file(self, rel: str) -> tuple[str, int] | None:
        h, size = hashlib.sha256(), 0
        try:
            with self.fs.open(self._abs(rel), "rb") as f:
                for block in iter(lambda: f.read(8 << 20), b""):
                    h.update(block)
                    size += len(block)
        except FileNotFoundError:
            return None
        return h.hexdigest(), size

    def verify(self, raise_on_error: bool = True) -> dict:
        """Check the sha256 and size of every committed file against the manifest.

        Returns ``{"files", "bytes", "problems"}``; with ``raise_on_error`` a problem raises StoreError.
        """
        problems, files, total = [], 0, 0
        checks = []
        for sh in self.shards:
            for kind in ("pairs", "tensors"):
                checks.append((sh["files"][kind], sh["sha256"].get(kind), (sh.get("file_bytes") or {}).get(kind)))
        if self.manifest.get("lm_head"):
            lm = self.manifest["lm_head"]
            checks.append((lm["path"], lm.get("sha256"), lm.get("bytes")))
        for rel, want, size in checks:
            got = self._hash_file(rel)
            files += 1
            if got is None:
                problems.append(f"{rel}: missing")
                continue
            total += got[1]
            if size is not None and got[1] != size:
                problems.append(f"{rel}: {got[1]} bytes, manifest says {size}")
            elif got[0] != want:
                problems.append(f"{rel}: sha256 {got[0][:16]}... != manifest {str(want)[:16]}...")
        if problems and raise_on_error:
            raise StoreError(f"store {self.url} failed verification: " + "; ".join(problems))
        return {"files": files, "bytes": total, "problems": problems}

    # -- training views -----------------------------------------------------------------------------
    def dataset(self, pair_ids: Sequence[str] | None = None, cache_shards: int = 2) -> PairDataset:
        """A torch Dataset of unpadded ok pairs (all, or ``pair_ids`` in that order)."""
        items = []
        if pair_ids is None:
            for si, sh in enumerate(self.shards):
                t = self._table(sh)
                for pid, sid, st_, off, n in zip(*(t.column(c).to_pylist() for c in
                                                  ("pair_id", "scene_id", "status", "row_offset", "length"))):
                    if st_ == "ok":
                        items.append((si, off, n, pid, sid))
        else:
            idx = self._build_index()
            for pid in pair_ids:
                if pid not in idx:
                    raise KeyError(f"pair {pid!r} is not in store {self.url}")
                si, ri = idx[pid]
                row = self._table(self.shards[si]).slice(ri, 1).to_pylist()[0]
                if row["status"] != "ok":
                    raise KeyError(f"pair {pid!r} has status {row['status']!r} ({row['reason']}); it has no rows")
                items.append((si, row["row_offset"], row["length"], pid, row["scene_id"]))
        return PairDataset(self, items, cache_shards)

    def lm_head(self) -> torch.Tensor:
        """The target's LM head ``[V, D]`` in its stored dtype."""
        lm = self.manifest.get("lm_head")
        if not lm:
            raise StoreError(f"store {self.url} holds no target LM head (write_lm_head was never called)")
        data = mf.read_bytes(self.fs, self._abs(lm["path"]))
        if data is None:
            raise StoreError(f"store {self.url}: {lm['path']} is missing")
        return st.load(data)["weight"]

    def get_features(self, key: str) -> dict[str, torch.Tensor] | None:
        return _get_features(self.fs, self.root, key)


class PairDataset(Dataset):
    """Unpadded pairs; item = {drafter [L, D] f32, target [L, D] f32, length, pair_id, scene_id}.

    Rows come from whole-shard loads kept in a small LRU (``cache_shards``). Iterate in shard order
    (the default order, or :class:`ShardGroupedSampler` for shuffling) so each shard loads once.
    """

    def __init__(self, reader: StoreReader, items: list[tuple[int, int, int, str, str]], cache_shards: int = 2):
        self.reader = reader
        self.items = items
        self.cache_shards = max(1, int(cache_shards))
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> list[int]:
        return [it[2] for it in self.items]

    @property
    def pair_ids(self) -> list[str]:
        return [it[3] for it in self.items]

    def shard_of(self, i: int) -> int:
        return self.items[i][0]

    def _shard(self, si: int) -> tuple[torch.Tensor, torch.Tensor]:
        if si in self._cache:
            self._cache.move_to_end(si)
            return self._cache[si]
        d, t, _ = self.reader._load_tensors(self.reader.shards[si])
        self._cache[si] = (d, t)
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return d, t

    def __getitem__(self, i: int) -> dict:
        si, off, n, pid, sid = self.items[i]
        d, t = self._shard(si)
        return {
            "drafter": d[off:off + n].to(torch.float32, copy=True),
            "target": t[off:off + n].to(torch.float32, copy=True),
            "length": n,
            "pair_id": pid,
            "scene_id": sid,
        }

    def __getstate__(self) -> dict:  # DataLoader workers: do not ship cached shards
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state


class ShardGroupedSampler(Sampler[int]):
    """Shuffle shards, then pairs within each shard: random order with one shard load per shard per
    epoch (a plain shuffle over a shard-cached dataset reloads a shard for nearly every item)."""

    def __init__(self, dataset: PairDataset, shuffle: bool = True, seed: int = 0):
        self.dataset, self.shuffle, self.seed, self.epoch = dataset, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        groups: dict[int, list[int]] = {}
        for i in range(len(self.dataset)):
            groups.setdefault(self.dataset.shard_of(i), []).append(i)
        order = list(groups)
        if not self.shuffle:
            for s in order:
                yield from groups[s]
            return
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        for k in torch.randperm(len(order), generator=g).tolist():
            idx = groups[order[k]]
            for j in torch.randperm(len(idx), generator=g).tolist():
                yield idx[j]


def collate_pairs(items: Sequence[dict]) -> dict:
    """Pad a list of dataset items to the batch's longest pair.

    Returns drafter/target [B, S, D] float32 (zeros past each length), mask [B, S] bool (True on
    real rows), lengths [B] int64, pair_ids and scene_ids lists.
    """
    if not items:
        raise ValueError("collate_pairs: empty batch")
    B = len(items)
    D = items[0]["drafter"].shape[1]
    S = max(1, max(int(it["length"]) for it in items))
    drafter = torch.zeros(B, S, D, dtype=torch.float32)
    target = torch.zeros(B, S, D, dtype=torch.float32)
    mask = torch.zeros(B, S, dtype=torch.bool)
    lengths = torch.zeros(B, dtype=torch.int64)
    for b, it in enumerate(items):
        n = int(it["length"])
        drafter[b, :n] = it["drafter"]
        target[b, :n] = it["target"]
        mask[b, :n] = True
        lengths[b] = n
    return {
        "drafter": drafter,
        "target": target,
        "mask": mask,
        "lengths": lengths,
        "pair_ids": [it["pair_id"] for it in items],
        "scene_ids": [it.get("scene_id", "") for it in items],
    }
