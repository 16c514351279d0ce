"""StoreReader: lazy, shard-at-a-time and random access reads of a hidden-state store.

Only shards named by ``manifest.json`` exist for a reader; orphan files are invisible. Random access
(:meth:`StoreReader.get`) parses the safetensors header itself and reads just the byte ranges of one
pair's rows (ranged GETs on object stores).

Everything read is checked against what the manifest recorded at commit, over the bytes already
fetched (no second read): whole files (pairs tables, tensor shards, the LM head) against their sha256;
byte-range reads against the header's sha256 (in the manifest) and the per-pair row sha256s the
header holds. Stores written before per-pair digests existed get one streamed hash of the whole
tensor shard per reader the first time a range of it is read. A mismatch is a :class:`StoreError`
naming the shard (never retried: it is not a transient fault). Both read paths validate the tensor
header against the manifest and the pairs table with the same function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import safetensors.torch as st
import torch
from torch.utils.data import Dataset, Sampler

from egpt_core.errors import StoreError
from egpt_core.fsio import Location
from egpt_core.memory import pin_mmap_threshold
from egpt_core.store import manifest as mf
from egpt_core.store.fp8 import decode_rows
from egpt_core.store.prefetch import ShardLoader, background
from egpt_core.store.retrying import with_retries
from egpt_core.store.schema import StoreManifest
from egpt_core.store.writer import _get_features

log = logging.getLogger(__name__)

_READ_CHUNK = 256 << 10  # hash each chunk while it is still in cache
_WHOLE_VERIFY_LOCK = threading.Lock()  # old stores: one whole-shard hash at a time, not one per thread
DECODED_DTYPE = torch.bfloat16  # what rows of an fp8 (per-row scaled) store decode to
PREFETCH_SHARDS = 2  # shards read (fetched, verified, decoded) ahead of the consumer, in a thread
TABLE_CACHE = 16  # pairs tables kept per reader (LRU): memory does not grow with the store


@dataclass
class PairRows:
    """One pair's rows (``drafter``/``target`` [L, D] in the reader's dtype: the store dtype, or
    bfloat16 decoded from an fp8 store) and token ids."""

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
    """One committed shard: its ok pairs (table) and packed rows [R, D] (reader dtype)."""

    name: str
    table: pa.Table
    drafter: torch.Tensor
    target: torch.Tensor


@dataclass
class _Header:
    data_start: int
    tensors: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)  # key -> (dtype, shape, begin, end), validated
    row_digests: str | None = None  # per-pair digests (manifest.ROW_DIGESTS) when the header is anchored


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
    """Read a store at ``url`` (a Location, or a URL with its ``storage_options``). ``info`` is the
    validated manifest (:class:`~egpt_core.store.schema.StoreManifest`; every path it names stays inside
    the store); ``manifest`` the same as written (a dict)."""

    def __init__(self, url: str | Location, storage_options: dict | None = None):
        pin_mmap_threshold()  # shard buffers and decoded rows: freed memory goes back to the OS
        self.location = Location.of(url, storage_options)
        self.url = self.location.url
        self.storage_options = self.location.storage_options
        self.fs = with_retries(self.location.fs)  # a transient fault costs one more request, not a task retry
        self.root = self.location.path
        self.refresh()

    def refresh(self) -> None:
        """Re-read the manifest (to see shards committed since this reader opened)."""
        loaded = mf.load_manifest_typed(self.fs, self.root, self.url)
        if loaded is None:
            raise StoreError(f"no manifest.json at {self.url}: not a store (or nothing committed yet)")
        m, info = loaded
        self.manifest = m  # the manifest as written (a dict: the writer's format)
        self.info: StoreManifest = info  # the same, typed: readers read fields from here
        self.meta: dict = m["meta"]
        self.hidden_size = self.info.meta.hidden_size
        #: dtype of the rows in the files; ``dtype`` is what readers hand out (fp8 rows decode to bf16)
        self.stored_dtype = mf.torch_dtype(self.info.meta.dtype)
        self.scaled = mf.is_scaled(self.stored_dtype)
        self.dtype = DECODED_DTYPE if self.scaled else self.stored_dtype
        self._tables: OrderedDict[str, pa.Table] = OrderedDict()  # LRU of TABLE_CACHE shards
        self._tables_lock = threading.Lock()
        self._headers: dict[str, _Header] = {}
        self._whole_verified: set[str] = set()
        self._index: dict[str, tuple[int, int]] | None = None

    def __getstate__(self) -> dict:  # spawned DataLoader workers: no lock, no cached tables
        state = self.__dict__.copy()
        state.pop("_tables_lock", None)
        state["_tables"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tables_lock = threading.Lock()

    # -- manifest views ---------------------------------------------------------------------------
    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.info.counts)

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # -- verified whole-file reads ------------------------------------------------------------------
    def _where(self, sh: dict, kind: str) -> str:
        return f"store {self.url}: shard {sh['name']} ({sh['files'][kind]})"

    def _fetch(self, rel: str, what: str, want_sha: str | None, want_size: int | None) -> bytearray:
        """Read a whole committed file once, hashing the bytes as they arrive, and check them against
        the manifest's sha256/size. A transient read error propagates as itself (retryable); a missing
        or changed file is a StoreError naming it."""
        path = self._abs(rel)
        h = hashlib.sha256()
        try:
            if mf.is_local_fs(self.fs):
                with open(path, "rb", buffering=0) as f:
                    size = os.fstat(f.fileno()).st_size
                    buf = bytearray(size)
                    view, pos = memoryview(buf), 0
                    while pos < size:
                        n = f.readinto(view[pos:pos + _READ_CHUNK])
                        if not n:
                            break
                        h.update(view[pos:pos + n])
                        pos += n
                    del view
                    if pos != size:
                        del buf[pos:]
            else:
                data = self.fs.cat_file(path)
                h.update(data)
                buf = bytearray(data)
        except FileNotFoundError as exc:
            raise StoreError(f"{what} is missing") from exc
        if want_size is not None and len(buf) != int(want_size):
            raise StoreError(f"{what} is not readable as committed: {len(buf)} bytes, the manifest recorded "
                             f"{want_size}. The store is corrupt or was modified after commit; "
                             f"`egpt inspect --verify {self.url}` lists every damaged file.")
        got = h.hexdigest()
        if want_sha and got != want_sha:
            raise StoreError(f"{what} is not readable as committed: sha256 {got[:16]}... != {want_sha[:16]}... "
                             "recorded in the manifest. The store is corrupt or was modified after commit; "
                             f"`egpt inspect --verify {self.url}` lists every damaged file.")
        return buf

    def _fetch_shard_file(self, sh: dict, kind: str) -> bytearray:
        return self._fetch(sh["files"][kind], self._where(sh, kind), (sh.get("sha256") or {}).get(kind),
                           (sh.get("file_bytes") or {}).get(kind))

    # -- pairs tables -----------------------------------------------------------------------------
    def _table(self, sh: dict) -> pa.Table:
        """The shard's pairs table (verified); the last TABLE_CACHE are kept, so a reader's memory does
        not grow with the number of shards it has read."""
        name = sh["name"]
        with self._tables_lock:
            if name in self._tables:
                self._tables.move_to_end(name)
                return self._tables[name]
        data = self._fetch_shard_file(sh, "pairs")
        try:
            # single-threaded: pyarrow's thread pools racing interpreter exit abort the process
            # ("terminate called without an active exception") after torch is loaded
            t = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StoreError(f"{self._where(sh, 'pairs')} is not a readable Parquet file ({exc})") from exc
        t = mf.conform_pairs_table(t)
        with self._tables_lock:
            self._tables[name] = t
            while len(self._tables) > TABLE_CACHE:
                self._tables.popitem(last=False)
        return t

    def pairs(self, status: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """All pairs (or those with ``status``) as one Arrow table of ``columns`` (all by default); shard
        tables are read one at a time and only the selected rows and columns are kept."""
        tables = []
        for sh in self.shards:
            t = self._table(sh)
            if status is not None:
                t = t.filter(pc.equal(t.column("status"), status))
            tables.append(t.select(list(columns)) if columns else t)
        if tables:
            return pa.concat_tables(tables)
        t = mf.PAIR_SCHEMA.empty_table()
        return t.select(list(columns)) if columns else t

    def pair_ids(self, status: str | None = "ok") -> list[str]:
        return self.pairs(status, columns=["pair_id"]).column("pair_id").to_pylist()

    # -- whole shards -------------------------------------------------------------------------------
    def _load_tensors(self, sh: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """drafter [R, D], target [R, D] (store dtype: views of one verified buffer; fp8 stores: decoded
        with their row scales to bf16) and offsets [n+1]."""
        where = self._where(sh, "tensors")
        buf = self._fetch_shard_file(sh, "tensors")
        n = mf.header_len(buf[:8], where)
        if 8 + n > len(buf):
            raise StoreError(f"{where} is truncated (header of {n} bytes)")
        tensors, _ = mf.parse_tensor_header(memoryview(buf)[8:8 + n], where)
        layout = mf.check_tensor_layout(sh, tensors, hidden_size=self.hidden_size, dtype=self.stored_dtype,
                                        where=where, data_len=len(buf) - 8 - n)
        if sys.byteorder != "little":  # safetensors is little-endian
            loaded = st.load(bytes(buf))
            d, t, off = (loaded[k] for k in mf.TENSOR_KEYS)
            if self.scaled:
                d, t = (decode_rows(loaded[k], loaded[k + mf.SCALE_SUFFIX], self.dtype) for k in ("drafter", "target"))
        else:
            def view(key: str) -> torch.Tensor:
                dt, shape, begin, end = layout[key]
                if end == begin:
                    return torch.empty(shape, dtype=dt)
                return torch.frombuffer(buf, dtype=dt, offset=8 + n + begin,
                                        count=(end - begin) // dt.itemsize).view(shape)

            d, t, off = view("drafter"), view("target"), view("offsets").clone()
            if self.scaled:
                d = decode_rows(d, view("drafter" + mf.SCALE_SUFFIX), self.dtype)
                t = decode_rows(t, view("target" + mf.SCALE_SUFFIX), self.dtype)
        self._check_offsets(sh, self._table(sh), off, d.shape[0])
        return d, t, off

    def _check_offsets(self, sh: dict, table: pa.Table, offsets: torch.Tensor, rows: int) -> None:
        where = self._where(sh, "tensors")
        mf.check_row_layout(table, rows, where)
        if offsets.tolist()[:-1] != table.column("row_offset").to_pylist() or int(offsets[-1]) != rows:
            raise StoreError(f"{where}: offsets disagree with its pairs table")

    def iter_shards(self, prefetch: int = PREFETCH_SHARDS) -> Iterator[ShardData]:
        """One shard at a time: (name, table of its ok pairs, drafter [R, D], target [R, D]). The next
        ``prefetch`` shards are read, verified and decoded in a background thread meanwhile (0: inline);
        a read error is raised here, at the shard it belongs to."""
        def shards() -> Iterator[ShardData]:
            for sh in self.shards:
                table = self._table(sh)
                d, t, _ = self._load_tensors(sh)
                ok = table.filter(pc.equal(table.column("status"), "ok"))
                yield ShardData(sh["name"], ok, d, t)

        return background(shards, prefetch, name=f"prefetch {self.url}")

    def iter_pairs(self, status: str | None = "ok", prefetch: int = PREFETCH_SHARDS) -> Iterator[PairRows]:
        """Every pair (with ``status``), shard by shard; rows are views into the loaded shard, and the
        next ``prefetch`` shards load in a background thread (see :meth:`iter_shards`)."""
        empty = torch.zeros(0, self.hidden_size, dtype=self.dtype)

        def shards() -> Iterator[tuple[pa.Table, torch.Tensor | None, torch.Tensor | None]]:
            for sh in self.shards:
                table = self._table(sh)
                if status is not None:
                    table = table.filter(pc.equal(table.column("status"), status))
                if table.num_rows == 0:
                    continue
                if status is not None and status != "ok":
                    yield table, None, None
                    continue
                d, t, _ = self._load_tensors(sh)
                yield table, d, t

        for table, d, t in background(shards, prefetch, name=f"prefetch {self.url}"):
            for row in table.to_pylist():
                if d is None:
                    yield _pair_rows(row, empty, empty)
                else:
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
        """The shard's tensor header (two small ranged reads), checked against the manifest's header
        sha256 when recorded, and validated like a whole-shard load (layout vs manifest + pairs table)."""
        name = sh["name"]
        if name not in self._headers:
            where = self._where(sh, "tensors")
            path = self._abs(sh["files"]["tensors"])
            try:
                head = self.fs.cat_file(path, start=0, end=8)
            except FileNotFoundError as exc:
                raise StoreError(f"{where} is missing") from exc
            n = mf.header_len(head, where)
            raw = self.fs.cat_file(path, start=8, end=8 + n)
            if len(raw) != n:
                raise StoreError(f"{where} is truncated (header of {n} bytes)")
            want = (sh.get("sha256") or {}).get("header")
            got = hashlib.sha256(head + raw).hexdigest()
            if want and got != want:
                raise StoreError(f"{where} is not readable as committed: its header's sha256 {got[:16]}... != "
                                 f"{want[:16]}... recorded in the manifest. The store is corrupt or was modified "
                                 f"after commit; `egpt inspect --verify {self.url}` lists every damaged file.")
            tensors, meta = mf.parse_tensor_header(raw, where)
            layout = mf.check_tensor_layout(sh, tensors, hidden_size=self.hidden_size, dtype=self.stored_dtype,
                                            where=where)
            mf.check_row_layout(self._table(sh), layout["drafter"][1][0], where)
            digests = meta.get(mf.ROW_DIGESTS) if want else None
            if digests is not None and (not isinstance(digests, str)
                                        or len(digests) != mf.ROW_DIGEST_HEX * self._table(sh).num_rows):
                raise StoreError(f"{where}: per-pair row digests are malformed (one per pair expected)")
            self._headers[name] = _Header(8 + n, tensors, layout, digests)
        return self._headers[name]

    def _verify_whole_once(self, sh: dict) -> None:
        """A store written before per-pair digests: hash the whole tensor shard once per reader (streamed,
        nothing kept) before trusting a byte range of it."""
        name = sh["name"]
        if name in self._whole_verified:
            return
        with _WHOLE_VERIFY_LOCK:
            if name in self._whole_verified:
                return
            rel = sh["files"]["tensors"]
            got = self._hash_file(rel)
            where = self._where(sh, "tensors")
            if got is None:
                raise StoreError(f"{where} is missing")
            want, size = (sh.get("sha256") or {}).get("tensors"), (sh.get("file_bytes") or {}).get("tensors")
            if (size is not None and got[1] != size) or (want and got[0] != want):
                raise StoreError(f"{where} is not readable as committed: sha256 {got[0][:16]}... != "
                                 f"{str(want)[:16]}... recorded in the manifest. The store is corrupt or was "
                                 f"modified after commit; `egpt inspect --verify {self.url}` lists every damaged file.")
            log.info("%s: written before per-pair digests; verified the whole shard once", where)
            self._whole_verified.add(name)

    def _read_rows(self, sh: dict, index: int, row_offset: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """drafter and target rows ``row_offset .. row_offset+length`` [L, D] of the pair at table row
        ``index``: one ranged request per side, checked against the pair's row digest."""
        D = self.hidden_size
        if length == 0:
            return torch.zeros(0, D, dtype=self.dtype), torch.zeros(0, D, dtype=self.dtype)
        if sys.byteorder != "little":  # safetensors is little-endian
            raise StoreError("random access needs a little-endian host; use iter_pairs()")
        h = self._header(sh)
        where = self._where(sh, "tensors")
        if h.row_digests is None:
            self._verify_whole_once(sh)
        keys = ("drafter", "target")
        if self.scaled:
            keys += ("drafter" + mf.SCALE_SUFFIX, "target" + mf.SCALE_SUFFIX)
        raw = []
        for key in keys:
            dt, shape, begin, _ = h.layout[key]
            if row_offset < 0 or row_offset + length > shape[0]:
                raise StoreError(f"{where}:{key} has {shape[0]} rows; cannot read rows "
                                 f"{row_offset}..{row_offset + length}")
            width = D if len(shape) == 2 else 1
            start = h.data_start + begin + row_offset * width * dt.itemsize
            nbytes = length * width * dt.itemsize
            data = self.fs.cat_file(self._abs(sh["files"]["tensors"]), start=start, end=start + nbytes)
            if len(data) != nbytes:
                raise StoreError(f"{where} is truncated")
            raw.append(data)
        if h.row_digests is not None:
            want = h.row_digests[index * mf.ROW_DIGEST_HEX:(index + 1) * mf.ROW_DIGEST_HEX]
            if mf.row_digest(*raw) != want:
                pid = self._table(sh).column("pair_id")[index].as_py()
                raise StoreError(f"{where} is not readable as committed: the rows of pair {pid!r} do not match "
                                 "their sha256 in the shard header. The store is corrupt or was modified after "
                                 f"commit; `egpt inspect --verify {self.url}` lists every damaged file.")
        if self.scaled:
            q = [torch.frombuffer(bytearray(b), dtype=self.stored_dtype).view(length, D) for b in raw[:2]]
            sc = [torch.frombuffer(bytearray(b), dtype=torch.float32) for b in raw[2:]]
            return decode_rows(q[0], sc[0], self.dtype), decode_rows(q[1], sc[1], self.dtype)
        return tuple(torch.frombuffer(bytearray(b), dtype=self.dtype).view(length, D) for b in raw)

    def get(self, pair_id: str) -> PairRows:
        """One pair by id, reading only the byte ranges of its rows."""
        loc = self._build_index().get(pair_id)
        if loc is None:
            raise KeyError(f"pair {pair_id!r} is not in store {self.url}")
        sh = self.shards[loc[0]]
        row = self._table(sh).slice(loc[1], 1).to_pylist()[0]
        a, n = row["row_offset"], row["length"]
        return _pair_rows(row, *self._read_rows(sh, loc[1], a, n))

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
        if (lm := self.info.lm_head) is not None:
            checks.append((lm.path, lm.sha256, lm.bytes))
            if lm.vocab is not None:
                checks.append((lm.vocab.path, lm.vocab.sha256, None))
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
    def dataset(self, pair_ids: Sequence[str] | None = None, cache_shards: int = 2,
                prefetch: int = PREFETCH_SHARDS) -> PairDataset:
        """A torch Dataset of unpadded ok pairs (all, or ``pair_ids`` in that order); shards load
        ``prefetch`` ahead in a background thread (see :class:`PairDataset`)."""
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
        return PairDataset(self, items, cache_shards, prefetch)

    def lm_head(self) -> torch.Tensor:
        """The target's LM head ``[V, D]`` in its stored dtype."""
        lm = self.info.lm_head
        if lm is None:
            raise StoreError(f"store {self.url} holds no target LM head (write_lm_head was never called)")
        where = f"store {self.url}: LM head {lm.path}"
        buf = self._fetch(lm.path, where, lm.sha256, lm.bytes)
        n = mf.header_len(buf[:8], where)
        tensors, _ = mf.parse_tensor_header(memoryview(buf)[8:8 + n], where)
        info = tensors.get("weight")
        try:
            dt, shape, (begin, end) = mf.ST_DTYPES[info["dtype"]], list(info["shape"]), info["data_offsets"]
            numel = shape[0] * shape[1] if len(shape) == 2 else -1
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise StoreError(f"{where} is not readable: no 2-D 'weight' tensor ({exc})") from exc
        if numel < 0 or end - begin != numel * dt.itemsize or 8 + n + end > len(buf):
            raise StoreError(f"{where} is not readable: 'weight' {shape} does not match its bytes")
        if sys.byteorder != "little" or numel == 0:
            return st.load(bytes(buf))["weight"]
        return torch.frombuffer(buf, dtype=dt, offset=8 + n + begin, count=numel).view(shape)

    def target_vocab(self) -> list[str | None] | None:
        """The target tokenizer's tokens in id order, as recorded with the LM head (sha256-checked);
        None when the store records none (no LM head, or written before vocabularies were kept)."""
        info = self.info.lm_head.vocab if self.info.lm_head is not None else None
        if info is None:
            return None
        data = mf.read_bytes(self.fs, self._abs(info.path))
        if data is None:
            raise StoreError(f"store {self.url}: {info.path} is missing")
        if mf.sha256_hex(data) != info.sha256:
            raise StoreError(f"store {self.url}: {info.path} does not match its sha256 in the manifest")
        vocab = json.loads(data)
        if not isinstance(vocab, list) or not all(t is None or isinstance(t, str) for t in vocab):
            raise StoreError(f"store {self.url}: {info['path']} is not a list of token strings")
        return vocab

    def get_features(self, key: str) -> dict[str, torch.Tensor] | None:
        return _get_features(self.fs, self.root, key)


class PairDataset(Dataset):
    """Unpadded pairs; item = {drafter [L, D] f32, target [L, D] f32, length, pair_id, scene_id}.

    Rows come from whole-shard loads kept in a small LRU (``cache_shards``). Iterate in shard order
    (the default order, or :class:`ShardGroupedSampler` for shuffling) so each shard loads once.
    When a shard is first needed, the shards that follow it in the items' order and are not cached
    yet (up to ``prefetch``, and never more than the cache holds) load in a background thread, so
    the consumer finds them ready; a load error is raised by the ``__getitem__`` that needs it.
    """

    def __init__(self, reader: StoreReader, items: list[tuple[int, int, int, str, str]], cache_shards: int = 2,
                 prefetch: int = PREFETCH_SHARDS):
        self.reader = reader
        self.items = items
        self.cache_shards = max(1, int(cache_shards))
        self.prefetch = max(0, min(int(prefetch), self.cache_shards - 1))
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._sequence = list(dict.fromkeys(it[0] for it in items))  # shards in order of first use
        self._position = {s: k for k, s in enumerate(self._sequence)}
        self._loader: ShardLoader | None = None
        self._loader_pid = 0
        self._lock = threading.Lock()

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

    def _load(self, si: int) -> tuple[torch.Tensor, torch.Tensor]:
        d, t, _ = self.reader._load_tensors(self.reader.shards[si])
        return d, t

    def _shard(self, si: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if si in self._cache:
                self._cache.move_to_end(si)
                return self._cache[si]
            if self._loader is not None and self._loader_pid != os.getpid():
                self._loader = None  # a forked DataLoader worker: the parent's thread is not here
            if self.prefetch and self._loader is None:
                self._loader = ShardLoader(self._load, self.prefetch)
                self._loader_pid = os.getpid()
            loader = self._loader
        d, t = loader.get(si) if loader is not None else self._load(si)
        with self._lock:
            self._cache[si] = (d, t)
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
            if loader is not None:  # read ahead: the next shards not cached, within the cache's room
                room = self.cache_shards - 1
                k = self._position.get(si, len(self._sequence))
                for nxt in self._sequence[k + 1:k + 1 + 4 * self.cache_shards]:
                    if room <= 0:
                        break
                    if nxt in self._cache:
                        continue
                    loader.request(nxt)
                    room -= 1
        return d, t

    def close(self) -> None:
        """Stop the read-ahead thread (it also ends with the dataset)."""
        if self._loader is not None:
            self._loader.close()
            self._loader = None

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
        state["_loader"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


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
