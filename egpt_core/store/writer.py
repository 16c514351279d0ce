"""StoreWriter: commits shards of pairs to a hidden-state store (DESIGN.md §3.4).

Invariants kept here:

* shard files reach their final names before the manifest names them, and the manifest (the commit
  point) is rewritten whole, under the store lock;
* a shard's name is a hash of its sorted pair ids, so an interrupted and redone shard gets the same
  name and replaces its own orphan;
* under the lock the writer re-reads the manifest and drops pairs another writer committed
  meanwhile, so a pair is in exactly one committed shard;
* final-name files are only created while the lock is held, so a committed shard is never
  overwritten by a racing writer.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch as st
import torch
from pydantic import ValidationError

from egpt_core.errors import ConfigError, StoreError
from egpt_core.fingerprint import hash_json
from egpt_core.fsio import Location
from egpt_core.store import manifest as mf
from egpt_core.store.fp8 import encode_rows
from egpt_core.store.retrying import with_retries
from egpt_core.store.schema import PairRecord, StoreMeta, describe_error

log = logging.getLogger(__name__)

NON_FINITE = "non-finite hidden state"
_RECORD_FIELDS = set(mf.PAIR_COLUMNS)


@dataclass
class ShardInfo:
    """One committed shard, as recorded in the manifest."""

    name: str
    pairs: int
    rows: int
    tokens: int
    bytes: int
    files: dict[str, str]
    file_bytes: dict[str, int]
    sha256: dict[str, str]
    counts: dict[str, int]
    reasons: dict[str, int] = field(default_factory=dict)
    meta_fingerprint: str = ""
    inputs_digest: str | None = None  # XOR-sha256 of (pair_id, input_fingerprint): manifest.inputs_digest

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Entry:
    rec: dict
    drafter: torch.Tensor | None
    target: torch.Tensor | None
    drafter_scale: torch.Tensor | None = None  # [L] float32, scaled (fp8) stores only
    target_scale: torch.Tensor | None = None


@dataclass
class _Serialized:
    name: str
    pairs_bytes: bytes
    tensors_bytes: bytes
    info: ShardInfo
    tmp: dict[str, str] = field(default_factory=dict)  # local temp files, by kind


# ------------------------------------------------------------------------------------------------
# features (shared by writer and reader)
# ------------------------------------------------------------------------------------------------
def _put_features(fs, root: str, key: str, tensors: torch.Tensor | dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> str:
    rel = mf.features_path(key)
    if isinstance(tensors, torch.Tensor):
        tensors = {"features": tensors}
    if not tensors or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"put_features({key!r}): give a tensor or a non-empty dict of tensors")
    data = mf.safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                   metadata={str(k): str(v) for k, v in (metadata or {}).items()} or None)
    mf.atomic_put(fs, f"{root}/{rel}", data)
    return rel


def _get_features(fs, root: str, key: str) -> dict[str, torch.Tensor] | None:
    data = mf.read_bytes(fs, f"{root}/{mf.features_path(key)}")
    if data is None:
        return None
    try:
        return dict(st.load(data))
    except Exception as exc:  # safetensors raises its own error types
        raise StoreError(f"features/{key}.safetensors is not a readable safetensors file: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# committed pairs (parquet id/status/input-fingerprint columns only, never tensors)
# ------------------------------------------------------------------------------------------------
def _committed_rows(fs, root: str, url: str, sh: dict) -> list[tuple[str, str, str | None]]:
    """[(pair_id, status, input_fingerprint or None)] of one committed shard."""
    try:
        with fs.open(f"{root}/{sh['files']['pairs']}", "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in ("pair_id", "status", "input_fingerprint") if c in pf.schema_arrow.names]
            t = pf.read(columns=cols, use_threads=False)  # no pyarrow thread pool (see reader._table)
    except FileNotFoundError as exc:
        raise StoreError(f"store {url}: committed shard file {sh['files']['pairs']} is missing") from exc
    fps = t.column("input_fingerprint").to_pylist() if "input_fingerprint" in cols else [None] * t.num_rows
    return list(zip(t.column("pair_id").to_pylist(), t.column("status").to_pylist(), fps))


def committed_inputs(url: str | Location, storage_options: dict | None = None) -> dict[str, tuple[str, str | None]]:
    """pair_id -> (status, input_fingerprint or None) of every pair committed at ``url`` ({} when there
    is no store yet). Reads the manifest and two or three parquet columns per shard."""
    store = Location.of(url, storage_options)
    fs, root = store.fs, store.path
    m = mf.load_manifest(fs, root, store.url)
    if m is None:
        return {}
    return {p: (s, fp) for sh in m["shards"] for p, s, fp in _committed_rows(fs, root, store.url, sh)}


# ------------------------------------------------------------------------------------------------
# the writer
# ------------------------------------------------------------------------------------------------
class StoreWriter:
    """Append shards of pairs to the store at ``url`` (any fsspec URL).

    ``meta`` must give ``hidden_size`` and ``dtype`` ('bfloat16' | 'float16' | 'float32' |
    'float8_e4m3fn': rows scaled to the fp8 range, one float32 scale per row, see
    :mod:`egpt_core.store.fp8`), unless the store exists already; recognised further keys: ``mode``, ``position_convention`` (default
    :data:`POSITION_CONVENTION`), ``compat_key`` (any string that must match for writers to share a
    store, e.g. a hash of model fingerprints + generation config), ``model_fingerprints`` and
    ``config_fingerprint`` (defining too; a store written before they existed takes the first
    values given), ``models``, ``notes``. On an existing store a differing defining field
    (:data:`DEFINING_FIELDS`) raises :class:`ConfigError`. The manifest's ``dataset_fingerprint`` is
    derived from the records' ``input_fingerprint`` (content fingerprints of each pair's inputs).
    """

    def __init__(self, url: str | Location, meta: dict, storage_options: dict | None = None, *,
                 lock_timeout_s: float = 600.0, stale_lock_s: float = 600.0):
        self.location = Location.of(url, storage_options)
        self.url = self.location.url
        self.storage_options = self.location.storage_options
        self.fs = with_retries(self.location.fs)  # a transient fault costs one more request, not a task retry
        self.root = self.location.path
        self.local = mf.is_local_fs(self.fs)
        self._lock_args = {"timeout_s": lock_timeout_s, "stale_s": stale_lock_s}
        self.meta = self._normalize_meta(meta)
        self._committed: dict[str, list[tuple[str, str, str | None]]] = {}  # shard -> [(pair_id, status, input fp)]
        self._committed_ids: set[str] = set()
        self._feature_keys: set[str] | None = None  # listed once: no GET per cache miss
        self.created_store = False  # True when this writer created the manifest (see discard_if_empty)
        m = self._load()
        if m is None:  # a new store: create its manifest (under the lock: another writer may race us)
            with self._lock():
                m = self._load()
                if m is None:
                    self._require_meta(("hidden_size", "dtype"))
                    self.meta.setdefault("position_convention", mf.POSITION_CONVENTION)
                    self._check_meta()
                    self._save(mf.new_manifest(dict(self.meta)))
                    self.created_store = True
                    m = self._load()
        mf.check_compatible(m["meta"], self.meta, self.url)
        for f in mf.DEFINING_FIELDS:  # inherit what this writer did not say
            if f not in self.meta and f in m["meta"]:
                self.meta[f] = m["meta"][f]
        self._check_meta()
        self.hidden_size = int(self.meta["hidden_size"])
        self.dtype = mf.torch_dtype(self.meta["dtype"])
        self.scaled = mf.is_scaled(self.dtype)

    # -- meta ------------------------------------------------------------------------------------
    def _normalize_meta(self, meta: dict) -> dict:
        if not isinstance(meta, dict):
            raise ConfigError(f"store {self.url}: meta must be a dict, got {type(meta).__name__}")
        out = dict(meta)
        if "dtype" in out:
            out["dtype"] = mf.canonical_dtype(out["dtype"])
        if "hidden_size" in out:
            hs = out["hidden_size"]
            if isinstance(hs, bool) or not isinstance(hs, int) or hs < 1:
                raise ConfigError(f"store {self.url}: meta hidden_size must be a positive int, got {hs!r}")
        try:
            json.dumps(out)
        except TypeError as exc:
            raise ConfigError(f"store {self.url}: meta must be JSON-serialisable ({exc})") from exc
        return out

    def _check_meta(self) -> None:
        """The complete meta (given + inherited) must be what readers accept (:class:`StoreMeta`)."""
        try:
            StoreMeta.model_validate(self.meta)
        except ValidationError as exc:
            raise ConfigError(f"store {self.url}: meta {describe_error(exc)}") from None

    def _require_meta(self, fields: Sequence[str]) -> None:
        missing = [f for f in fields if f not in self.meta]
        if missing:
            raise ConfigError(f"store {self.url} is new: meta must give {', '.join(missing)}")

    # -- io helpers --------------------------------------------------------------------------------
    def discard_if_empty(self) -> bool:
        """Remove the manifest (and LM head) of a store this writer created when no shard was ever
        committed to it: a run that failed before its first commit must not leave a store whose
        settings refuse the corrected rerun. True when it was removed."""
        if not self.created_store:
            return False
        with self._lock():
            m = self._load()
            if m is None or m["shards"]:
                return False
            if m.get("lm_head"):
                try:
                    self.fs.rm_file(self._abs(m["lm_head"]["path"]))
                except FileNotFoundError:
                    pass
            self.fs.rm_file(f"{self.root}/{mf.MANIFEST}")
        log.warning("store %s: removed the empty store this failed run created", self.url)
        return True

    def _lock(self) -> mf.StoreLock:
        return mf.StoreLock(self.fs, self.root, self.url, **self._lock_args)

    def _load(self) -> dict | None:
        return mf.load_manifest(self.fs, self.root, self.url)

    def _save(self, m: dict) -> None:
        m["updated"] = mf.now_iso()
        mf.refresh_manifest(m)
        mf.manifest_model(m, self.url)  # never commit a manifest readers would refuse
        mf.atomic_put(self.fs, f"{self.root}/{mf.MANIFEST}", mf.dump_manifest(m))

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _sync_committed(self, m: dict) -> None:
        """Learn the pair ids of shards committed since we last looked (pair_id column only)."""
        names = [s["name"] for s in m["shards"]]
        if set(self._committed) - set(names):  # manifest rewritten behind our back: start over
            self._committed.clear()
        for sh in m["shards"]:
            if sh["name"] in self._committed:
                continue
            self._committed[sh["name"]] = _committed_rows(self.fs, self.root, self.url, sh)
        self._committed_ids = {p for rows in self._committed.values() for p, _, _ in rows}

    def committed_pair_ids(self, status: str | None = None) -> set[str]:
        """Pair ids already committed (any status, or only ``status``): reads the manifest and the
        parquet ``pair_id``/``status`` columns of shards not seen before; never tensors."""
        m = self._load()
        if m is None:
            return set()
        self._sync_committed(m)
        if status is None:
            return set(self._committed_ids)
        return {p for rows in self._committed.values() for p, s, _ in rows if s == status}

    def committed_inputs(self) -> dict[str, tuple[str, str | None]]:
        """pair_id -> (status, input_fingerprint or None) of every committed pair (parquet columns only)."""
        m = self._load()
        if m is None:
            return {}
        self._sync_committed(m)
        return {p: (s, fp) for rows in self._committed.values() for p, s, fp in rows}

    # -- validation and serialisation --------------------------------------------------------------
    def _normalize_record(self, rec: dict | PairRecord, i: int) -> dict:
        """A record (a :class:`PairRecord` or a dict of its fields) validated through PairRecord;
        ``row_offset``/``shard`` are the writer's and ignored when given."""
        if isinstance(rec, PairRecord):
            return rec.to_row()
        if not isinstance(rec, dict):
            raise ValueError(f"record {i} is not a dict")
        unknown = set(rec) - _RECORD_FIELDS
        if unknown:
            raise ValueError(f"record {i}: unknown fields {sorted(unknown)}; allowed: {list(mf.PAIR_COLUMNS)}")
        pid = rec.get("pair_id")
        if not isinstance(pid, str) or not pid:
            raise ValueError(f"record {i}: pair_id must be a non-empty string, got {pid!r}")
        try:
            return PairRecord.model_validate({k: v for k, v in rec.items() if k not in ("row_offset", "shard")}).to_row()
        except ValidationError as exc:
            raise ValueError(f"pair {pid}: {describe_error(exc)}") from None

    def _prepare(self, records: Sequence[dict | PairRecord], drafter: Sequence, target: Sequence) -> list[_Entry]:
        if not (len(records) == len(drafter) == len(target)):
            raise ValueError(
                f"commit_shard: {len(records)} records but {len(drafter)} drafter and {len(target)} target tensors"
            )
        entries, seen = [], set()
        D = self.hidden_size
        for i, (raw, d, t) in enumerate(zip(records, drafter, target)):
            rec = self._normalize_record(raw, i)
            pid = rec["pair_id"]
            if pid in seen:
                raise ValueError(f"commit_shard: pair {pid} appears twice in one shard")
            seen.add(pid)
            if rec["status"] != "ok":
                rec["length"] = 0
                entries.append(_Entry(rec, None, None))
                continue
            given = raw.model_fields_set if isinstance(raw, PairRecord) else raw
            if "length" not in given and isinstance(d, torch.Tensor):
                rec["length"] = int(d.shape[0])  # length may be left to the tensors
            L = rec["length"]
            for side, x in (("drafter", d), ("target", t)):
                if not isinstance(x, torch.Tensor) or x.dim() != 2:
                    raise ValueError(f"pair {pid}: {side} must be a 2-D tensor [length, D], got {_shape(x)}")
                if x.shape[1] != D:
                    raise ConfigError(
                        f"pair {pid}: {side} hidden size {x.shape[1]} != store hidden_size {D} ({self.url})"
                    )
                if x.shape[0] != L or L < 1:
                    raise ValueError(
                        f"pair {pid}: {side} has {x.shape[0]} rows but record length is {L} (must match, >= 1)"
                    )
            row_dtype = torch.float32 if self.scaled else self.dtype  # fp8: scaled below, from float32
            d = d.detach().to("cpu", row_dtype).contiguous()
            t = t.detach().to("cpu", row_dtype).contiguous()
            if not (bool(torch.isfinite(d).all()) and bool(torch.isfinite(t).all())):
                rec.update(status="failed", reason=NON_FINITE, length=0)
                entries.append(_Entry(rec, None, None))
                continue
            if self.scaled:
                (d, ds), (t, ts) = encode_rows(d), encode_rows(t)
                entries.append(_Entry(rec, d, t, ds, ts))
                continue
            entries.append(_Entry(rec, d, t))
        return entries

    def _serialize(self, entries: list[_Entry]) -> _Serialized:
        name = mf.shard_name([e.rec["pair_id"] for e in entries])
        rows, offsets, off = [], [0], 0
        counts = {s: 0 for s in mf.STATUSES}
        reasons: dict[str, int] = {}
        tokens = 0
        for e in entries:
            r = dict(e.rec, row_offset=off, shard=name)
            rows.append(r)
            off += r["length"]
            offsets.append(off)
            counts[r["status"]] += 1
            if r["status"] != "ok":
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
            tokens += len(r["drafter_response_ids"]) + len(r["target_response_ids"])
        table = pa.Table.from_pylist(rows, schema=mf.PAIR_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        pairs_bytes = buf.getvalue()
        empty = torch.zeros(0, self.hidden_size, dtype=self.dtype)
        oks = [e for e in entries if e.drafter is not None]
        tensors = {
            "drafter": torch.cat([e.drafter for e in oks]) if oks else empty,
            "target": torch.cat([e.target for e in oks]) if oks else empty.clone(),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }
        if self.scaled:  # float32 [R] beside each side's rows, same file
            none = torch.zeros(0, dtype=torch.float32)
            for side in ("drafter", "target"):
                key = side + mf.SCALE_SUFFIX
                tensors[key] = torch.cat([getattr(e, key) for e in oks]) if oks else none.clone()
            tensors = {k: tensors[k] for k in mf.tensor_keys(self.dtype)}
        # per-pair digests of the rows (and row scales), in table order: byte-range readers verify
        # what they fetch
        nothing = memoryview(b"")

        def raw(t: torch.Tensor | None) -> memoryview:
            return _raw(t) if t is not None else nothing

        digests = "".join(mf.row_digest(raw(e.drafter), raw(e.target), raw(e.drafter_scale), raw(e.target_scale))
                          for e in entries)
        tensors_bytes = mf.safetensors_bytes(
            tensors,
            metadata={"format": mf.FORMAT, "schema_version": str(mf.SCHEMA_VERSION), "shard": name,
                      "pairs": str(len(entries)), "dtype": mf.canonical_dtype(self.dtype),
                      mf.ROW_DIGESTS: digests},
        )
        header_bytes = tensors_bytes[: 8 + mf.header_len(tensors_bytes[:8], name)]
        files = {"pairs": mf.pairs_path(name), "tensors": mf.tensors_path(name)}
        info = ShardInfo(
            name=name,
            pairs=len(entries),
            rows=off,
            tokens=tokens,
            bytes=len(pairs_bytes) + len(tensors_bytes),
            files=files,
            file_bytes={"pairs": len(pairs_bytes), "tensors": len(tensors_bytes)},
            sha256={"pairs": mf.sha256_hex(pairs_bytes), "tensors": mf.sha256_hex(tensors_bytes),
                    "header": mf.sha256_hex(header_bytes)},
            counts=counts,
            reasons=dict(sorted(reasons.items())),
            meta_fingerprint=hash_json(self.meta),
            inputs_digest=mf.inputs_digest([(r["pair_id"], r["input_fingerprint"]) for r in rows]),
        )
        return _Serialized(name, pairs_bytes, tensors_bytes, info)

    # -- placing files -------------------------------------------------------------------------------
    def _stage(self, s: _Serialized) -> None:
        """Local disks: write both files under temporary names before taking the lock."""
        if self.local:
            s.tmp = {
                "pairs": mf.write_local_tmp(self._abs(s.info.files["pairs"]), s.pairs_bytes),
                "tensors": mf.write_local_tmp(self._abs(s.info.files["tensors"]), s.tensors_bytes),
            }

    def _unstage(self, s: _Serialized) -> None:
        for p in s.tmp.values():
            mf._silent_remove(p)
        s.tmp = {}

    def _place(self, s: _Serialized) -> None:
        """Under the lock: rename temp files (local) or PUT each file whole (object stores)."""
        if self.local:
            for kind in ("tensors", "pairs"):
                os.replace(s.tmp[kind], self._abs(s.info.files[kind]))
            s.tmp = {}
            for d in (mf.PAIRS_DIR, mf.TENSORS_DIR):
                mf._fsync_dir(self._abs(d))
        else:
            for kind, data in (("tensors", s.tensors_bytes), ("pairs", s.pairs_bytes)):
                mf.put_whole(self.fs, self._abs(s.info.files[kind]), data)

    def _before_manifest(self, name: str) -> None:
        """Test hook: runs after a shard's files are in place, before the manifest names it."""

    # -- commit ------------------------------------------------------------------------------------
    def commit_shard(self, records: Sequence[dict | PairRecord], drafter: Sequence[torch.Tensor | None],
                     target: Sequence[torch.Tensor | None]) -> ShardInfo | None:
        """Validate, write and commit one shard; return its info, or None if every pair in it was
        already committed (by us or by another writer)."""
        entries = self._prepare(records, drafter, target)
        entries = [e for e in entries if e.rec["pair_id"] not in self._committed_ids]
        if not entries:
            return None
        s = self._serialize(entries)
        self._stage(s)
        try:
            with self._lock():
                m = self._load()
                if m is None:
                    raise StoreError(f"store {self.url}: manifest.json disappeared while writing")
                mf.check_compatible(m["meta"], self.meta, self.url)
                self._sync_committed(m)
                fresh = [e for e in entries if e.rec["pair_id"] not in self._committed_ids]
                if not fresh:
                    return None
                if len(fresh) != len(entries):
                    log.info("shard %s: %d of %d pairs were committed by another writer; rewriting",
                             s.name, len(entries) - len(fresh), len(entries))
                    self._unstage(s)
                    s = self._serialize(fresh)
                    self._stage(s)
                self._place(s)
                self._before_manifest(s.name)
                for f, v in self.meta.items():  # non-defining meta: the latest writer's values
                    if f not in mf.DEFINING_FIELDS or (f in mf.LATER_DEFINING_FIELDS and m["meta"].get(f) is None):
                        m["meta"][f] = v
                m["shards"].append(s.info.to_dict())
                self._save(m)
                self._committed[s.name] = [(e.rec["pair_id"], e.rec["status"], e.rec["input_fingerprint"])
                                           for e in fresh]
                self._committed_ids.update(e.rec["pair_id"] for e in fresh)
                return s.info
        finally:
            self._unstage(s)

    # -- LM head ------------------------------------------------------------------------------------
    def write_lm_head(self, weight: torch.Tensor, fingerprint: str, dtype: str | None = None,
                      vocab: Sequence[str | None] | None = None) -> dict:
        """Store the target's LM head ``[V, D]`` (key ``weight``); idempotent for the same fingerprint,
        ConfigError if the store already holds another target's head. ``vocab`` (the target tokenizer's
        tokens in id order) is stored beside it as ``target_vocab.json``, so token ids in the store can be
        decoded and checked against a drafter's tokenizer without the target checkpoint."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != self.hidden_size:
            raise ConfigError(
                f"lm head must be [V, {self.hidden_size}] (store hidden_size), got {_shape(weight)}"
            )
        head_dtype = mf.torch_dtype(dtype or self.meta["dtype"])
        if mf.is_scaled(head_dtype):  # fp8 is for rows (scaled per row); the head stays bf16
            head_dtype = torch.bfloat16
        w = weight.detach().to("cpu", head_dtype).contiguous()
        data = mf.safetensors_bytes({"weight": w}, metadata={"format": mf.FORMAT, "fingerprint": str(fingerprint)})
        info = {
            "path": mf.LM_HEAD,
            "shape": list(w.shape),
            "dtype": mf.canonical_dtype(w.dtype),
            "target_fingerprint": str(fingerprint),
            "bytes": len(data),
            "sha256": mf.sha256_hex(data),
        }
        vocab_bytes = None
        if vocab is not None:
            vocab_bytes = json.dumps(list(vocab), ensure_ascii=False).encode()
            info["vocab"] = {"path": mf.TARGET_VOCAB, "size": len(vocab), "sha256": mf.sha256_hex(vocab_bytes)}
        path = self._abs(mf.LM_HEAD)
        tmp = mf.write_local_tmp(path, data) if self.local else None
        try:
            with self._lock():
                m = self._load()
                old = m.get("lm_head")
                if old and old.get("target_fingerprint") != info["target_fingerprint"]:
                    raise ConfigError(
                        f"store {self.url} already holds the LM head of target {old.get('target_fingerprint')!r}; "
                        f"refusing to replace it with {info['target_fingerprint']!r} (use a new store)"
                    )
                if old and self.fs.exists(path):
                    return old
                if vocab_bytes is not None:  # before the manifest names it; never replaces a named one
                    mf.atomic_put(self.fs, self._abs(mf.TARGET_VOCAB), vocab_bytes)
                if tmp:
                    os.replace(tmp, path)
                    tmp = None
                else:
                    mf.put_whole(self.fs, path, data)
                m["lm_head"] = info
                self._save(m)
                return info
        finally:
            if tmp:
                mf._silent_remove(tmp)

    # -- features -----------------------------------------------------------------------------------
    def put_features(self, key: str, tensors: torch.Tensor | dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> str:
        """Cache event features under ``features/<key>.safetensors`` (atomic); returns the path."""
        rel = _put_features(self.fs, self.root, key, tensors, metadata)
        if self._feature_keys is not None:
            self._feature_keys.add(key)
        return rel

    def get_features(self, key: str) -> dict[str, torch.Tensor] | None:
        """Cached features, or None. The features/ listing is read once per writer, so a miss costs
        no request on object stores (features another writer adds meanwhile are recomputed, identically)."""
        if self._feature_keys is None:
            try:
                names = self.fs.ls(f"{self.root}/{mf.FEATURES_DIR}", detail=False)
            except FileNotFoundError:
                names = []
            self._feature_keys = {n.rsplit("/", 1)[-1].removesuffix(".safetensors") for n in names}
        if key not in self._feature_keys:
            return None
        return _get_features(self.fs, self.root, key)

    def has_features(self, key: str) -> bool:
        return self.fs.exists(f"{self.root}/{mf.features_path(key)}")

    # -- garbage collection ----------------------------------------------------------------------------
    def gc(self, min_tmp_age_s: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove shard files the manifest does not name (orphans of crashed commits) and temporary
        files older than ``min_tmp_age_s`` (younger ones may belong to a running writer)."""
        removed = []
        with self._lock():
            m = self._load() or {"shards": [], "lm_head": None}
            keep = {p for sh in m["shards"] for p in sh["files"].values()}
            keep.add(mf.MANIFEST)
            if m.get("lm_head"):
                keep.add(m["lm_head"]["path"])
                keep.add((m["lm_head"].get("vocab") or {}).get("path", mf.TARGET_VOCAB))
            for d in (mf.PAIRS_DIR, mf.TENSORS_DIR, mf.FEATURES_DIR, ""):
                for rel, age in self._list(d):
                    if rel in keep or rel == mf.LOCK:
                        continue
                    base = rel.rsplit("/", 1)[-1]
                    is_tmp = mf.TMP_MARK in base or base.startswith(f"{mf.LOCK}.stale-")
                    if d == mf.FEATURES_DIR or d == "":
                        if not is_tmp:
                            continue  # features and unknown root files are not shard orphans
                    if is_tmp and age < min_tmp_age_s:
                        continue
                    removed.append(rel)
                    if not dry_run:
                        self.fs.rm_file(self._abs(rel))
        return sorted(removed)

    def _list(self, d: str) -> list[tuple[str, float]]:
        base = self._abs(d) if d else self.root
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        out, now = [], time.time()
        for e in entries:
            if e.get("type") != "file":
                continue
            rel = e["name"].rstrip("/")[len(self.root) + 1:] if e["name"].startswith(self.root) else e["name"]
            rel = rel.lstrip("/")
            mtime = e.get("mtime") or e.get("LastModified") or e.get("created")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            age = now - float(mtime) if mtime else float("inf")
            out.append((rel, age))
        return out


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as safetensors stores them (little-endian hosts)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
