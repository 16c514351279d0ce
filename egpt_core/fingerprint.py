"""Fingerprints: short content hashes of every input that changes a stage's output (DESIGN.md §3.5)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from egpt_core.fsio import Location

#: Files larger than this are fingerprinted by size + mtime/ETag instead of a content hash.
LARGE_FILE_BYTES = 64 * 1024 * 1024


def hash_json(obj: Any) -> str:
    """Stable 16-hex-digit hash of a JSON-able object (pydantic models: pass ``model_dump()``)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def file_fingerprint(where: str | Location, storage_options: dict | None = None) -> str:
    """Content hash of a file (a Location, or a URL with its ``storage_options``); for files over
    LARGE_FILE_BYTES, size + ETag/mtime."""
    src = Location.of(where, storage_options)
    fs, path = src.fs, src.path
    info = fs.info(path)
    size = int(info.get("size") or 0)
    if size > LARGE_FILE_BYTES:
        marker = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        return hash_json({"size": size, "marker": str(marker)})
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def dir_fingerprint(where: str | Location, storage_options: dict | None = None,
                    suffixes: tuple[str, ...] = ()) -> str:
    """Hash of every file under a directory (a Location, or a URL with its ``storage_options``):
    relative name + file fingerprint, order-independent."""
    src = Location.of(where, storage_options)
    fs, root = src.fs, src.path
    entries = {}
    for p in sorted(fs.find(root)):
        if suffixes and not p.endswith(suffixes):
            continue
        rel = p[len(root.rstrip("/")) + 1 :]
        entries[rel] = file_fingerprint(Location(fs.unstrip_protocol(p), src.storage_options))
    return hash_json(entries)
