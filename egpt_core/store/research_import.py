"""Import the research pipeline's chunked hidden states into a store.

Research layout (``reference/upstream_research_pipeline.md`` §5.5-5.7): a directory with
``index.json`` and ``chunks/chunk_<start:06d>.pt`` torch pickles holding padded fp32
``egpt_hidden``/``vl_hidden`` [n, S, D], ``seq_lens`` int64 [n] and ``metadata`` (list of dicts).
Chunks are loaded with ``torch.load(weights_only=True)``: a pickle holding anything but tensors and
plain containers is refused. The research format has no token ids, so those lists stay empty.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Callable
from typing import Any

import torch

from egpt_core.errors import BadInputError, StoreError
from egpt_core.fingerprint import file_fingerprint, hash_json
from egpt_core.fsio import Location
from egpt_core.store import manifest as mf
from egpt_core.store.writer import StoreWriter

DEFAULT_SHARD_SIZE = 256
_REQUIRED = ("egpt_hidden", "vl_hidden", "seq_lens", "metadata")


def research_pair_id(sample_idx: int, question: str) -> str:
    return f"research-{int(sample_idx):06d}|q{hashlib.sha1(question.encode()).hexdigest()[:8]}"


def research_scene_id(sample_idx: int) -> str:
    return f"research-{int(sample_idx):06d}"


def _load_index(fs, root: str, dir_url: str) -> tuple[dict, list[str]]:
    raw = mf.read_bytes(fs, f"{root}/index.json")
    if raw is None:
        raise BadInputError(f"{dir_url}/index.json", "missing: not a research chunk directory")
    try:
        index = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{dir_url}/index.json", f"not valid JSON ({exc})") from exc
    chunks = index.get("chunks") if isinstance(index, dict) else None
    if not isinstance(chunks, list) or not chunks:
        raise BadInputError(f"{dir_url}/index.json", "lists no chunks")
    paths = []
    for c in chunks:
        rel = c.get("path") if isinstance(c, dict) else None
        mf.safe_relpath(rel, "index.json chunk", dir_url)
        paths.append(rel if "/" in rel else f"chunks/{rel}")
    return index, paths


def load_research_chunk(fs, path: str, url: str) -> dict:
    """``torch.load(weights_only=True)`` of one chunk; StoreError if the pickle is not plain data."""
    try:
        if mf.is_local_fs(fs):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) torch.save format cannot be mmapped
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(io.BytesIO(fs.cat_file(path)), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise BadInputError(url, "chunk listed in index.json is missing") from exc
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(
            f"{url}: refused to load: the pickle holds objects other than tensors and plain containers "
            f"(torch.load weights_only=True: {first})"
        ) from exc
    except Exception as exc:  # truncated zip, wrong format...
        raise BadInputError(url, f"not a readable torch chunk ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or any(k not in obj for k in _REQUIRED):
        raise BadInputError(url, f"chunk must be a dict with {', '.join(_REQUIRED)}")
    eg, vl, sl, md = (obj[k] for k in _REQUIRED)
    if not (isinstance(eg, torch.Tensor) and isinstance(vl, torch.Tensor) and isinstance(sl, torch.Tensor)):
        raise BadInputError(url, "egpt_hidden, vl_hidden and seq_lens must be tensors")
    if eg.dim() != 3 or eg.shape != vl.shape or sl.dim() != 1 or sl.shape[0] != eg.shape[0]:
        raise BadInputError(
            url, f"shapes egpt_hidden {tuple(eg.shape)}, vl_hidden {tuple(vl.shape)}, seq_lens {tuple(sl.shape)} "
            "are not [n, S, D], [n, S, D], [n]"
        )
    if not isinstance(md, list) or len(md) != eg.shape[0] or not all(isinstance(x, dict) for x in md):
        raise BadInputError(url, f"metadata must be a list of {eg.shape[0]} dicts")
    return obj


def _pair(md: dict, L: int, S: int, url: str, i: int) -> dict:
    try:
        sample_idx = int(md["sample_idx"])
        question = str(md["question"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(url, f"metadata[{i}] lacks sample_idx/question ({exc})") from exc
    rec: dict[str, Any] = {
        "pair_id": research_pair_id(sample_idx, question),
        "scene_id": research_scene_id(sample_idx),
        "question_idx": int(md.get("question_idx", -1)),
        "question": question,
        "drafter_text": str(md.get("egpt_text") or ""),
        "target_text": str(md.get("vl_text") or ""),
        "status": "ok",
        "length": L,
    }
    if md.get("seq_len") is not None and int(md["seq_len"]) != L:
        rec.update(status="failed", reason=f"metadata seq_len {md['seq_len']} != seq_lens {L}")
    elif L > S:
        rec.update(status="failed", reason=f"seq_len {L} exceeds the chunk's padded length {S}")
    elif L < 1:
        rec.update(status="skipped", reason="empty aligned sequence")
    return rec


class _ShardQueue:
    """Imported pairs waiting for their shard: committed every ``shard_size`` pairs, counted in ``summary``."""

    def __init__(self, writer: StoreWriter, shard_size: int, summary: dict[str, Any]):
        self.writer, self.shard_size, self.summary = writer, shard_size, summary
        self.pending: list[tuple[dict, torch.Tensor | None, torch.Tensor | None]] = []

    def add(self, rec: dict, drafter: torch.Tensor | None, target: torch.Tensor | None) -> bool:
        """Queue one pair (rows [L, D], None unless ok); True when that filled and committed a shard."""
        self.pending.append((rec, drafter, target))
        if len(self.pending) < self.shard_size:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        if not self.pending:
            return
        info = self.writer.commit_shard(*(list(col) for col in zip(*self.pending)))
        if info is not None:
            self.summary["shards"] += 1
            self.summary["imported"] += info.pairs
            for s, n in info.counts.items():
                self.summary["counts"][s] += n
        self.pending.clear()


def import_research(source: str | Location, store: str | Location, storage_options: dict | None = None,
                    shard_size: int = DEFAULT_SHARD_SIZE, *, dtype: str = "bfloat16",
                    lm_head_url: str | Location | None = None,
                    progress: Callable[[float, str], None] | None = None) -> dict:
    """Import a research chunk directory (``source``) into the store at ``store``; resumable and idempotent.

    ``source``, ``store`` and ``lm_head_url`` are Locations, or URLs reached with ``storage_options``.
    ``lm_head_url``: optional research ``vl_lm_head.pt`` (``{"lm_head_weight": [V, D]}``).
    Returns a summary: chunks, pairs seen, imported (new pairs committed), already committed,
    duplicates, shards written, per-status counts of the new pairs, hidden size.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    src, dest = Location.of(source, storage_options), Location.of(store, storage_options)
    index, paths = _load_index(src.fs, src.path, src.url)
    run = _ResearchImport(dest, index, len(paths), shard_size, dtype)
    for ci, rel in enumerate(paths):
        url = src.child(rel).url
        chunk = load_research_chunk(src.fs, f"{src.path}/{rel}", url)

        def shard_done(i: int, n: int, ci: int = ci) -> None:
            if progress:
                progress((ci + (i + 1) / n) / len(paths), f"{run.summary['imported']} pairs imported")

        run.add_chunk(chunk, url, shard_done)
        del chunk
        if progress:
            progress((ci + 1) / len(paths), f"chunk {ci + 1}/{len(paths)}")
    run.flush()
    if lm_head_url:
        head = Location.of(lm_head_url, storage_options)
        w = _load_research_lm_head(head)
        run.writer.write_lm_head(w, file_fingerprint(head.url, head.storage_options))
        run.summary["lm_head"] = list(w.shape)
    return run.summary


class _ResearchImport:
    """One import's state: the store writer (opened at the first chunk, which gives the hidden size),
    the pair ids already committed or seen, and the summary :func:`import_research` returns."""

    def __init__(self, store: Location, index: dict, n_chunks: int, shard_size: int, dtype: str):
        self.store, self.index, self.shard_size, self.dtype = store, index, shard_size, dtype
        self.summary: dict[str, Any] = {
            "store": store.url, "chunks": n_chunks, "pairs_seen": 0, "imported": 0, "already_committed": 0,
            "duplicates": 0, "shards": 0, "counts": {s: 0 for s in mf.STATUSES}, "hidden_size": None,
        }
        self.writer: StoreWriter | None = None
        self.queue: _ShardQueue | None = None
        self.committed: set[str] = set()
        self.seen: set[str] = set()

    def _queue_for(self, hidden_size: int, url: str) -> _ShardQueue:
        """The shard queue; the first chunk opens the writer, later ones must match its hidden size."""
        if self.writer is None:
            hd = (self.index.get("config") or {}).get("hidden_dim")
            if hd is not None and int(hd) != hidden_size:
                raise BadInputError(url, f"hidden size {hidden_size} != index.json config hidden_dim {hd}")
            self.writer = StoreWriter(self.store, _research_meta(self.index, hidden_size, self.dtype))
            self.queue = _ShardQueue(self.writer, self.shard_size, self.summary)
            self.committed = self.writer.committed_pair_ids()
            self.summary["hidden_size"] = hidden_size
        elif hidden_size != self.writer.hidden_size:
            raise BadInputError(url, f"hidden size {hidden_size} differs from earlier chunks ({self.writer.hidden_size})")
        return self.queue

    def add_chunk(self, chunk: dict, url: str, shard_done: Callable[[int, int], None]) -> None:
        """Queue the new pairs of one loaded chunk (rows [L, D] cut from its padded [n, S, D]);
        ``shard_done(i, n)`` after pair ``i`` of ``n`` filled a shard."""
        eg, vl, sl, md = (chunk[k] for k in _REQUIRED)
        n, S, D = eg.shape
        queue = self._queue_for(int(D), url)
        lens = sl.tolist()
        for i in range(n):
            self.summary["pairs_seen"] += 1
            rec = _pair(md[i], int(lens[i]), S, url, i)
            pid = rec["pair_id"]
            if pid in self.committed:
                self.summary["already_committed"] += 1
                continue
            if pid in self.seen:
                self.summary["duplicates"] += 1
                continue
            self.seen.add(pid)
            ok = rec["status"] == "ok"
            if queue.add(rec, eg[i, :rec["length"]] if ok else None, vl[i, :rec["length"]] if ok else None):
                shard_done(i, n)

    def flush(self) -> None:
        if self.queue is not None:
            self.queue.flush()


def _research_meta(index: dict, hidden_size: int, dtype: str) -> dict[str, Any]:
    """Store metadata of an imported research directory (its config pins the compat key)."""
    cfg = index.get("config") or {}
    return {
        "hidden_size": hidden_size,
        "dtype": dtype,
        "mode": "independent",
        "position_convention": mf.POSITION_CONVENTION,
        "compat_key": "research-import:" + hash_json(cfg),
        "dataset_fingerprint": hash_json({"config": cfg, "chunks": index.get("chunks")}),
        "notes": "imported from research format",
        "source": {"format": "research-chunks", "config": cfg},
    }


def _load_research_lm_head(head: Location) -> torch.Tensor:
    """The research ``vl_lm_head.pt`` weight [V, D] (``torch.load(weights_only=True)``; anything else refused)."""
    url = head.url
    try:
        obj = torch.load(io.BytesIO(head.read()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise StoreError(f"{url}: refused to load: not a plain tensor pickle") from exc
    w = obj.get("lm_head_weight") if isinstance(obj, dict) else obj
    if not isinstance(w, torch.Tensor):
        raise BadInputError(url, "expected {'lm_head_weight': Tensor[V, D]}")
    return w
