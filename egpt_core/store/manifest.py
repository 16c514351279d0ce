"""The store's manifest, schema, path safety, atomic writes and the commit lock (DESIGN.md §3.4).

``manifest.json`` is the commit point of a store: a shard exists for readers only once the manifest
names it. Everything here works on any fsspec filesystem; local disks get real atomic primitives
(``O_CREAT|O_EXCL`` lock, write-to-temp + ``os.replace``), object stores get whole-object PUTs and a
best-effort create-if-absent lock (a conditional PUT where the backend supports one).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import torch
from fsspec.implementations.memory import MemoryFileSystem
from pydantic import ValidationError

from egpt_core import fsio
from egpt_core.errors import ConfigError, StoreError
from egpt_core.fingerprint import hash_json
from egpt_core.store.schema import StoreManifest, describe_error

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FORMAT = "egpt-hidden-state-store"
MANIFEST = "manifest.json"
LOCK = "_lock"
LM_HEAD = "target_lm_head.safetensors"
#: the target tokenizer's tokens in id order (JSON list; null for an unused id): row i of the LM head
TARGET_VOCAB = "target_vocab.json"
PAIRS_DIR = "pairs"
TENSORS_DIR = "tensors"
FEATURES_DIR = "features"
TMP_MARK = fsio.TMP_MARK  # ".tmp-"

#: DESIGN.md §3.2, recorded in every manifest. Equal to egpt_core.models.positions.POSITION_CONVENTION
#: (a test checks it); not imported from there because egpt_core.models pulls in transformers.
POSITION_CONVENTION = "row t = final post-norm hidden state at input position P-1+t (predicts g_t)"

#: Meta fields that define a store: a writer whose meta differs in one of them is refused.
#: ``compat_key`` comes before the fingerprints it covers, so a mismatch names the differing setting.
DEFINING_FIELDS = ("hidden_size", "dtype", "mode", "position_convention", "compat_key", "model_fingerprints",
                   "config_fingerprint")
#: Defining fields newer than schema 1's first stores: enforced when the store records them; a store
#: written before them (none recorded) takes the next writer's values.
LATER_DEFINING_FIELDS = ("model_fingerprints", "config_fingerprint")

STATUSES = ("ok", "failed", "skipped")

#: One row per pair (CONTRACTS.md PairRecord) + the shard it lives in.
PAIR_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("scene_id", pa.string()),
        ("question_idx", pa.int64()),
        ("question", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("drafter_prompt_ids", pa.list_(pa.int32())),
        ("target_prompt_ids", pa.list_(pa.int32())),
        ("drafter_response_ids", pa.list_(pa.int32())),
        ("target_response_ids", pa.list_(pa.int32())),
        ("drafter_text", pa.string()),
        ("target_text", pa.string()),
        ("length", pa.int64()),
        ("row_offset", pa.int64()),
        ("shard", pa.string()),
        # content fingerprint of the pair's inputs ("event=...,video=...,question=..."); null in
        # stores written before it existed and for pairs without dataset files (imports, synthetic)
        ("input_fingerprint", pa.string()),
    ]
)
PAIR_COLUMNS = tuple(PAIR_SCHEMA.names)
TOKEN_COLUMNS = ("drafter_prompt_ids", "target_prompt_ids", "drafter_response_ids", "target_response_ids")

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
}
_CANON = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
          torch.float8_e4m3fn: "float8_e4m3fn"}
#: safetensors header dtype codes of the dtypes a store may hold
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64,
             "F8_E4M3": torch.float8_e4m3fn}
#: stores whose rows are scaled per row: ``<side>`` [R, D] in this dtype + ``<side>_scale`` [R] float32
SCALED_DTYPES = (torch.float8_e4m3fn,)
SCALE_SUFFIX = "_scale"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def canonical_dtype(dtype: Any) -> str:
    """'bfloat16' | 'float16' | 'float32' | 'float8_e4m3fn' from a string alias or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in _CANON:
            return _CANON[dtype]
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _CANON[_DTYPES[dtype.lower().removeprefix("torch.")]]
    raise ConfigError(f"store dtype {dtype!r} is not supported; use 'bfloat16', 'float16', 'float32' or "
                      "'float8_e4m3fn' (per-row scaled)")


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[canonical_dtype(name)]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def shard_name(pair_ids: list[str]) -> str:
    """Deterministic 12-hex shard name: the same pair set always gets the same name."""
    return hashlib.sha256("\n".join(sorted(pair_ids)).encode()).hexdigest()[:12]


def pairs_path(name: str) -> str:
    return f"{PAIRS_DIR}/shard-{name}.parquet"


def tensors_path(name: str) -> str:
    return f"{TENSORS_DIR}/shard-{name}.safetensors"


def features_path(key: str) -> str:
    check_feature_key(key)
    return f"{FEATURES_DIR}/{key}.safetensors"


def check_feature_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or ".." in key:
        raise ValueError(
            f"feature key {key!r} is not allowed: use 1-200 characters from [A-Za-z0-9._=-], "
            "starting with a letter or digit, no '..'"
        )
    return key


def safe_relpath(rel: Any, what: str, store: str, under: str | None = None) -> str:
    """Return ``rel`` if it is a plain relative path inside the store, else raise StoreError."""
    problem = None
    if not isinstance(rel, str) or not rel:
        problem = "is empty or not a string"
    elif "://" in rel or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", rel):
        problem = "is a URL"
    elif rel.startswith(("/", "~")) or "\\" in rel:
        problem = "is an absolute path"
    elif any(part in ("", ".", "..") for part in rel.split("/")):
        problem = "contains '..', '.' or an empty component"
    elif under is not None and not rel.startswith(under.rstrip("/") + "/"):
        problem = f"is not under {under}/"
    if problem:
        raise StoreError(
            f"{store}: {what} path {rel!r} {problem}; only relative paths inside {store} are accepted. "
            "Refusing to read it (the file naming it is corrupt or was tampered with)."
        )
    return rel


#: atomic whole-file writes live in egpt_core.fsio (``Location.write_atomic``); these names stay for the
#: store's callers
is_local_fs = fsio.is_local_fs
_fsync_dir = fsio.fsync_dir
write_local_tmp = fsio.write_local_tmp
atomic_put = fsio.atomic_put
put_whole = fsio.put_whole
_silent_remove = fsio._remove_quietly


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """Whole file, or None when it does not exist."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, store: str, rel: str,
                 columns: list[str] | None = None) -> pa.Table:
    """A pairs shard as an Arrow table; a file pyarrow cannot parse -> StoreError naming it.

    Decoded on the calling thread: with Arrow's thread pool (``pq.read_table``'s scanner read-ahead,
    or ``use_threads=True``) the last reference to the Python buffer can be dropped by an
    Arrow worker after the call returned; if the interpreter is exiting at that moment the worker
    dies in that destructor and the process aborts ("terminate called without an active
    exception", exit 134). Pairs tables are small; threads buy nothing here.
    """
    import pyarrow.parquet as pq

    data = fs.cat_file(path)  # one whole GET; a read error propagates as is (retryable)
    try:
        return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)
    except pa.ArrowException as exc:
        raise StoreError(f"store {store}: {rel} is not a readable Parquet file ({exc})") from exc


_ST_CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64",
             torch.float8_e4m3fn: "F8_E4M3",
             torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise to the safetensors format, byte-for-byte deterministic.

    ``safetensors.torch.save`` keeps ``__metadata__`` in a Rust HashMap whose order changes between
    processes, so equal inputs may give different bytes; a store must hash reproducibly.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs, off = [], 0
    for name, t in tensors.items():
        if t.dtype not in _ST_CODES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    return len(hj).to_bytes(8, "little") + hj + b"".join(blobs)


# ------------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------------
def new_manifest(meta: dict) -> dict:
    ts = now_iso()
    m = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "fingerprint": "",
        "meta": meta,
        "shards": [],
        "counts": {s: 0 for s in STATUSES},
        "reasons": {},
        "totals": {"pairs": 0, "rows": 0, "tokens": 0, "bytes": 0},
        "lm_head": None,
        "created": ts,
        "updated": ts,
    }
    refresh_manifest(m)
    return m


def refresh_manifest(m: dict) -> dict:
    """Recompute counts, totals and the store fingerprint from the shard list."""
    counts = {s: 0 for s in STATUSES}
    reasons: dict[str, int] = {}
    totals = {"pairs": 0, "rows": 0, "tokens": 0, "bytes": 0}
    for sh in m["shards"]:
        for s in STATUSES:
            counts[s] += int(sh["counts"].get(s, 0))
        for r, n in sh.get("reasons", {}).items():
            reasons[r] = reasons.get(r, 0) + int(n)
        for k in totals:
            totals[k] += int(sh[k])
    m["counts"], m["reasons"], m["totals"] = counts, dict(sorted(reasons.items())), totals
    m["dataset_fingerprint"] = combine_inputs_digests([sh.get("inputs_digest") for sh in m["shards"]])
    m["fingerprint"] = store_fingerprint(m)
    return m


# ------------------------------------------------------------------------------------------------
# content fingerprints of the pairs' inputs (DESIGN.md §3.5)
# ------------------------------------------------------------------------------------------------
def inputs_digest(pairs: list[tuple[str, str | None]]) -> str | None:
    """Order- and sharding-independent digest of (pair_id, input_fingerprint) pairs: the XOR of their
    sha256s (a pair is in exactly one shard, so shard digests XOR into the store's). None when a pair
    has no input fingerprint (imports, synthetic stores, stores written before fingerprints)."""
    acc = 0
    for pid, fp in pairs:
        if not fp:
            return None
        acc ^= int.from_bytes(hashlib.sha256(f"{pid}\0{fp}".encode()).digest(), "big")
    return f"{acc:064x}"


def combine_inputs_digests(digests: list[str | None]) -> str | None:
    """The store's dataset fingerprint (16 hex) from its shards' input digests; None if any is unknown."""
    if not digests or any(not d for d in digests):
        return None
    acc = 0
    for d in digests:
        acc ^= int(d, 16)
    return hashlib.sha256(f"{acc:064x}".encode()).hexdigest()[:16]


def conform_pairs_table(table: pa.Table) -> pa.Table:
    """A pairs table read from any schema-1 shard, with every current PAIR_SCHEMA column (columns a
    store written by an older version lacks are null), in schema order."""
    for f in PAIR_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    extra = [c for c in table.column_names if c not in PAIR_COLUMNS]
    return table.select(list(PAIR_COLUMNS) + extra)


# ------------------------------------------------------------------------------------------------
# tensor shard layout: ONE validation for whole-shard loads and byte-range reads
# ------------------------------------------------------------------------------------------------
#: safetensors ``__metadata__`` key holding one digest per pairs-table row, concatenated: the first
#: ROW_DIGEST_HEX hex digits of sha256(drafter rows bytes + target rows bytes). The header itself is
#: anchored by the manifest (``sha256["header"]``), so a byte-range read can verify the rows it fetches.
ROW_DIGESTS = "row_sha256"
ROW_DIGEST_HEX = 32
TENSOR_KEYS = ("drafter", "target", "offsets")


def row_digest(drafter_raw: bytes | bytearray | memoryview, target_raw: bytes | bytearray | memoryview,
               drafter_scale_raw: bytes | bytearray | memoryview = b"",
               target_scale_raw: bytes | bytearray | memoryview = b"") -> str:
    """sha256 prefix over drafter rows, [drafter row scales], target rows, [target row scales]
    (scaled stores only; without scales it is the digest of rows alone, as before)."""
    h = hashlib.sha256(drafter_raw)
    h.update(drafter_scale_raw)
    h.update(target_raw)
    h.update(target_scale_raw)
    return h.hexdigest()[:ROW_DIGEST_HEX]


def is_scaled(dtype: torch.dtype) -> bool:
    """True for store dtypes kept with a float32 scale per row (float8_e4m3fn)."""
    return dtype in SCALED_DTYPES


def tensor_keys(dtype: torch.dtype) -> tuple[str, ...]:
    """The tensors of a shard of a store with this row dtype."""
    if is_scaled(dtype):
        return ("drafter", "drafter" + SCALE_SUFFIX, "target", "target" + SCALE_SUFFIX, "offsets")
    return TENSOR_KEYS


MAX_HEADER_BYTES = 100 * 1024 * 1024


def header_len(head8: bytes | bytearray | memoryview, where: str) -> int:
    if len(head8) < 8:
        raise StoreError(f"{where} is truncated (no safetensors header)")
    n = int.from_bytes(bytes(head8[:8]), "little")
    if n < 2 or n > MAX_HEADER_BYTES:
        raise StoreError(f"{where} is not readable: implausible safetensors header size {n}")
    return n


def parse_tensor_header(raw: bytes | bytearray | memoryview, where: str) -> tuple[dict, dict]:
    """(tensor entries, __metadata__) of a safetensors header's JSON bytes."""
    try:
        hdr = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{where} is not readable: its header is not JSON ({exc})") from exc
    if not isinstance(hdr, dict):
        raise StoreError(f"{where} is not readable: its header is not a JSON object")
    meta = hdr.pop("__metadata__", None) or {}
    return hdr, meta if isinstance(meta, dict) else {}


def check_tensor_layout(sh: dict, tensors: dict, *, hidden_size: int, dtype: torch.dtype, where: str,
                        data_len: int | None = None) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """Validate a shard's safetensors header against its manifest entry; returns, per tensor,
    (dtype, shape, begin, end) with begin/end relative to the data section.

    ``drafter``/``target`` must be [rows, D] in the store dtype (rows = the manifest's row count),
    ``offsets`` int64 [pairs + 1], and in scaled (fp8) stores ``drafter_scale``/``target_scale``
    float32 [rows]; byte ranges must match the shapes, not overlap and (when
    ``data_len`` is known) lie inside the file. Both read paths use this, so a header whose offsets
    point one tensor at another's data is refused whichever path reads it.
    """
    keys, want_keys = set(tensors), tensor_keys(dtype)
    if keys != set(want_keys):
        raise StoreError(f"{where}: tensors {sorted(keys)} are not the shard layout {list(want_keys)}")
    rows, pairs = sh.get("rows"), sh.get("pairs")
    out: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
    for key in want_keys:
        info = tensors[key]
        try:
            code, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{where}: header entry {key!r} is malformed ({exc})") from exc
        dt = ST_DTYPES.get(code)
        ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, begin, end])
        vector = key == "offsets" or key.endswith(SCALE_SUFFIX)
        if key == "offsets":
            want_dt, want_shape = torch.int64, [int(pairs) + 1] if pairs is not None else None
        elif vector:
            want_dt, want_shape = torch.float32, [int(rows)] if rows is not None else None
        else:
            want_dt, want_shape = dtype, [int(rows), hidden_size] if rows is not None else None
        if (not ints or dt != want_dt or len(shape) != (1 if vector else 2)
                or (not vector and shape[1] != hidden_size)
                or (want_shape is not None and shape != want_shape)):
            raise StoreError(
                f"{where}: tensor {key!r} is {code} {shape} but the manifest says "
                f"{want_dt} {want_shape or (['R'] if vector else ['R', hidden_size])}"
            )
        numel = 1
        for v in shape:
            numel *= v
        if end - begin != numel * torch.empty((), dtype=dt).element_size():
            raise StoreError(f"{where}: tensor {key!r} spans bytes {begin}..{end}, not {shape} {code}")
        if data_len is not None and end > data_len:
            raise StoreError(f"{where}: tensor {key!r} ends at byte {end}, past the file's data ({data_len})")
        out[key] = (dt, shape, begin, end)
    spans = sorted((b, e, k) for k, (_, _, b, e) in out.items() if e > b)
    for (b1, e1, k1), (b2, e2, k2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise StoreError(f"{where}: tensors {k1!r} and {k2!r} overlap (bytes {b1}..{e1} and {b2}..{e2})")
    if len({v[1][0] for k, v in out.items() if k != "offsets"}) != 1:
        raise StoreError(f"{where}: drafter and target row counts differ")
    return out


def check_row_layout(table: pa.Table, rows: int, where: str) -> None:
    """The pairs table packs rows contiguously in table order: row_offset = running sum of length,
    non-ok pairs have none, and the lengths add up to the tensors' rows."""
    ro = table.column("row_offset").to_pylist()
    ln = table.column("length").to_pylist()
    st = table.column("status").to_pylist()
    off = 0
    for o, n, s in zip(ro, ln, st):
        if o != off or n is None or n < 0 or (s != "ok" and n != 0):
            raise StoreError(f"{where}: the pairs table's row offsets/lengths are not a packing of the shard")
        off += n
    if off != rows:
        raise StoreError(f"{where}: the pairs table's lengths add up to {off} rows, the tensors hold {rows}")


def store_fingerprint(m: dict) -> str:
    """Changes whenever the store's content changes (meta, committed shards, LM head)."""
    return hash_json(
        {
            "schema_version": m["schema_version"],
            "meta": m["meta"],
            "shards": sorted((s["name"], s["sha256"]["pairs"], s["sha256"]["tensors"]) for s in m["shards"]),
            "lm_head": (m.get("lm_head") or {}).get("sha256"),
        }
    )


def dump_manifest(m: dict) -> bytes:
    return (json.dumps(m, indent=2, sort_keys=True) + "\n").encode()


def manifest_model(m: dict, store: str) -> StoreManifest:
    """``m`` validated through :class:`~egpt_core.store.schema.StoreManifest` (typed, read-only view);
    a field a reader relies on that is missing or of the wrong type -> StoreError naming the store and
    the field."""
    try:
        return StoreManifest.model_validate(m)
    except ValidationError as exc:
        raise StoreError(f"store {store}: manifest.json is not a valid store manifest: "
                         f"{describe_error(exc, m)}") from None


def parse_manifest(data: bytes, store: str) -> dict:
    """Parse and validate a manifest (through :class:`StoreManifest`); every path it names must stay
    inside the store. Returns the manifest as written (a dict, paths defaulted): the store fingerprint
    hashes it exactly; read fields through :func:`manifest_model` / ``StoreReader.info``."""
    return parse_manifest_typed(data, store)[0]


def parse_manifest_typed(data: bytes, store: str) -> tuple[dict, StoreManifest]:
    """:func:`parse_manifest`, and the typed view it validated (one validation)."""
    try:
        m = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"store {store}: manifest.json is not valid JSON ({exc})") from exc
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"store {store}: manifest.json is not an {FORMAT} manifest")
    ver = m.get("schema_version")
    if not isinstance(ver, int) or ver > SCHEMA_VERSION:
        raise StoreError(
            f"store {store}: manifest schema_version {ver!r} is not supported by this version "
            f"(reads <= {SCHEMA_VERSION}); upgrade egpt-pipeline"
        )
    seen = set()
    for sh in m.get("shards") if isinstance(m.get("shards"), list) else []:
        if not isinstance(sh, dict):
            continue  # the model names it
        name = sh.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            safe_relpath(name, "shard name", store)  # names a '..' / absolute / URL problem if any
            raise StoreError(f"store {store}: shard name {name!r} is not a plain shard name")
        if name in seen:
            raise StoreError(f"store {store}: shard {name!r} is listed twice in the manifest")
        seen.add(name)
        files = sh.get("files") if isinstance(sh.get("files"), dict) else {}
        sh["files"] = {
            "pairs": safe_relpath(files.get("pairs", pairs_path(name)), f"shard {name} pairs", store, PAIRS_DIR),
            "tensors": safe_relpath(
                files.get("tensors", tensors_path(name)), f"shard {name} tensors", store, TENSORS_DIR
            ),
        }
    lm = m.get("lm_head")
    if isinstance(lm, dict):
        lm["path"] = safe_relpath(lm.get("path", LM_HEAD), "lm_head", store)
        if isinstance(lm.get("vocab"), dict):
            lm["vocab"]["path"] = safe_relpath(lm["vocab"].get("path", TARGET_VOCAB), "lm_head vocab", store)
    return m, manifest_model(m, store)


def load_manifest(fs: fsspec.AbstractFileSystem, root: str, store: str) -> dict | None:
    """The store's manifest as written (validated), or None when there is none."""
    loaded = load_manifest_typed(fs, root, store)
    return None if loaded is None else loaded[0]


def load_manifest_typed(fs: fsspec.AbstractFileSystem, root: str, store: str) -> tuple[dict, StoreManifest] | None:
    """(manifest as written, typed view), or None when the store has no manifest."""
    path = f"{root}/{MANIFEST}"
    if not is_local_fs(fs):
        fs.invalidate_cache(root)
    data = read_bytes(fs, path)
    return None if data is None else parse_manifest_typed(data, store)


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """``path: store X, now Y`` for every leaf where two JSON-like values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [f"{path or 'value'}: {old!r} in the store, {new!r} now"]


#: what a compat_key is made of, as far as older manifests record it in meta
_COMPAT_META = ("mode", "generation", "events", "n_video_frames", "models")


def check_compatible(existing: dict, new: dict, store: str) -> None:
    """ConfigError naming the first defining field whose value differs (for ``compat_key``, the
    settings that differ)."""
    for f in DEFINING_FIELDS:
        if f in LATER_DEFINING_FIELDS and existing.get(f) is None:
            continue  # a store written before the field existed: compat_key still guards it
        if f in new and existing.get(f) != new[f]:
            what = f"meta field {f!r} is {existing.get(f)!r} in the store but {new[f]!r} for this writer"
            if f == "compat_key":
                if "compat_settings" in existing and "compat_settings" in new:
                    diff = _differences(existing["compat_settings"], new["compat_settings"])
                else:
                    diff = _differences({k: existing.get(k) for k in _COMPAT_META}, {k: new.get(k) for k in _COMPAT_META})
                what += (" (settings that differ: " + "; ".join(diff[:6]) + ")" if diff else
                         " (the extraction version, model loading or retf side differ)")
            raise ConfigError(
                f"store {store} is incompatible: {what}. Write to a new store URL, or use settings that match "
                "the store."
            )


# ------------------------------------------------------------------------------------------------
# the commit lock
# ------------------------------------------------------------------------------------------------
_MEMORY_GUARD = threading.Lock()  # memory:// lives in this process: make create-if-absent atomic

#: tokens of locks this process may have created but does not hold (acquire failed on a storage
#: error after its create was sent, or release could not remove the lock): nobody holds them, so
#: this process breaks them on its next acquire instead of waiting ``stale_s`` for itself. Other
#: processes break them after ``stale_s``.
_ABANDONED: set[str] = set()


def _retry_transient_io(fn, tries: int = 4):
    """Call ``fn``, retrying an OSError that is not FileNotFoundError/FileExistsError (a transient
    storage error) a few times: lock bookkeeping must not leave a lock behind on one hiccup."""
    for i in range(tries):
        try:
            return fn()
        except (FileNotFoundError, FileExistsError):
            raise
        except OSError:
            if i == tries - 1:
                raise
            time.sleep(0.02 * 2**i)


#: per filesystem instance: does a conditional create (S3 If-None-Match) refuse an existing object?
_EXCLUSIVE_CREATE: dict[int, bool] = {}


def _exclusive_create_honoured(fs: fsspec.AbstractFileSystem, path: str, payload: bytes) -> bool:
    """Probe once per filesystem, on the lock object we just created: a second conditional create
    must fail. AWS S3 and moto honour it; some S3-compatible stores silently overwrite (same bytes)."""
    key = id(fs)
    if key not in _EXCLUSIVE_CREATE:
        try:
            fs.pipe_file(path, payload, mode="create")
            _EXCLUSIVE_CREATE[key] = False
        except FileExistsError:
            _EXCLUSIVE_CREATE[key] = True
        except (OSError, TypeError):
            return False  # undecided (transient fault): confirm this time, probe again next time
    return _EXCLUSIVE_CREATE[key]


def _holder_is_dead(holder: dict) -> bool:
    """True when the lock's writer ran on this host and its process no longer exists (kill -9)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


class StoreLock:
    """Exclusive ``_lock`` object in the store root, held while the manifest is read-modified-written.

    Local disks: ``os.open(O_CREAT | O_EXCL)`` (atomic, also on NFS v3+). Other filesystems: a
    conditional create where supported (S3 ``If-None-Match``), else exists-check + PUT, confirmed by
    re-reading our unique token. A lock older than ``stale_s`` (its writer crashed) is broken.
    """

    lock_name = LOCK

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, store: str, *, timeout_s: float = 600.0,
                 stale_s: float = 600.0):
        self.fs, self.root, self.store = fs, root, store
        self.path = f"{root}/{self.lock_name}"
        self.timeout_s, self.stale_s = timeout_s, stale_s
        self.token = ""

    # -- acquisition --------------------------------------------------------------------------
    def acquire(self) -> None:
        self.token = uuid.uuid4().hex
        payload = json.dumps(
            {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        ).encode()
        try:
            self._acquire(payload)
        except BaseException:
            _ABANDONED.add(self.token)  # a create of ours may have landed: never wait for it
            raise

    def _acquire(self, payload: bytes) -> None:
        deadline = time.monotonic() + self.timeout_s
        delay = 0.005
        while True:
            if self._try_create(payload):
                return
            holder = self._holder()
            if holder is not None and holder.get("token") == self.token:
                return  # our create landed though its answer was lost (an error, then "exists")
            if holder is not None and (holder.get("token") in _ABANDONED or _holder_is_dead(holder)
                                       or time.time() - holder.get("time", time.time()) > self.stale_s):
                log.warning("breaking stale store lock %s held by %s", self.path, holder)
                self._break(holder)
                continue
            if time.monotonic() > deadline:
                raise self.busy_error(holder)
            time.sleep(delay * (0.5 + uuid.uuid4().int % 1000 / 1000))
            delay = min(delay * 2, 0.25)

    def busy_error(self, holder: dict | None) -> Exception:
        return StoreError(f"store {self.store}: could not acquire the commit lock {LOCK} within "
                          f"{self.timeout_s:.0f}s (held by {holder}). If no writer is running, delete {LOCK}.")

    def _try_create(self, payload: bytes) -> bool:
        fs = self.fs
        if is_local_fs(fs):
            os.makedirs(self.root, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        if isinstance(fs, MemoryFileSystem):
            with _MEMORY_GUARD:
                if fs.exists(self.path):
                    return False
                fs.pipe_file(self.path, payload)
                return True
        fs.invalidate_cache(self.root)
        try:
            fs.pipe_file(self.path, payload, mode="create")
        except TypeError:  # backend without exclusive create: best effort
            if fs.exists(self.path):
                return False
            fs.pipe_file(self.path, payload)
        except FileExistsError:
            return False
        except OSError:
            fs.invalidate_cache(self.root)
            if fs.exists(self.path):
                return False
            raise
        if _exclusive_create_honoured(fs, self.path, payload):
            return True  # the backend refuses a second conditional create: ours is the lock
        time.sleep(0.05)  # backend may ignore If-None-Match: let a racing PUT land, then confirm ours won
        return _retry_transient_io(lambda: read_bytes(fs, self.path)) == payload

    def _holder(self) -> dict | None:
        if is_local_fs(self.fs):
            try:
                with open(self.path, "rb") as f:
                    raw = f.read()
                mtime = os.path.getmtime(self.path)
            except FileNotFoundError:
                return None
        else:
            raw = read_bytes(self.fs, self.path)
            if raw is None:
                return None
            try:
                mtime = self.fs.modified(self.path).timestamp()
            except Exception:  # backend without modification times
                mtime = time.time()
        try:
            info = json.loads(raw)
            if not isinstance(info, dict):
                raise ValueError
        except ValueError:
            # a writer died between creating and filling the lock: age it by mtime
            info = {"token": None, "time": mtime, "raw": raw[:64].decode(errors="replace")}
        if not isinstance(info.get("time"), int | float):
            info["time"] = mtime
        return info

    def _break(self, holder: dict) -> None:
        if is_local_fs(self.fs):
            aside = f"{self.path}.stale-{self.token}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return  # someone else broke it
            try:
                with open(aside, "rb") as f:
                    got = json.loads(f.read() or b"{}")
            except ValueError:
                got = {"token": None}
            if got.get("token") != holder.get("token"):
                # we raced and moved a fresh lock aside: put it back if the slot is still free
                try:
                    os.link(aside, self.path)
                except OSError:
                    pass
            _silent_remove(aside)
        else:
            cur = self._holder()
            if cur is not None and cur.get("token") == holder.get("token"):
                try:
                    self.fs.rm_file(self.path)
                except FileNotFoundError:
                    pass

    # -- release ------------------------------------------------------------------------------
    def release(self) -> None:
        try:
            holder = _retry_transient_io(self._holder)
        except OSError as exc:
            return self._abandon(exc)
        if holder is None or holder.get("token") != self.token:
            log.warning("store lock %s was broken while held (stale timeout %.0fs)", self.path, self.stale_s)
            return
        if is_local_fs(self.fs):
            _silent_remove(self.path)
        else:
            try:
                _retry_transient_io(lambda: self.fs.rm_file(self.path))
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._abandon(exc)

    def _abandon(self, exc: OSError) -> None:
        """Releasing failed on a storage error: the commit (if any) stands; remember the lock so
        this process breaks it on its next acquire (others break it after ``stale_s``)."""
        _ABANDONED.add(self.token)
        log.warning("could not release store lock %s (%s); it is broken on this process's next commit, "
                    "by other writers after %.0fs", self.path, exc, self.stale_s)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
