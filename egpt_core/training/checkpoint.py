"""The one checkpoint layout of both trainers: atomic, versioned, crash-safe on any fsspec URL.

``<run>/checkpoint/`` holds, per committed epoch N::

    epoch-000N-<sha12>.weights.safetensors   trainable weights (+ the recipe's metadata)
    epoch-000N-<sha12>.train.safetensors     optimizer state tensors + every rank's RNG state
    commit.json                              the commit record (written last)

Weight files are immutable: named by epoch and a hash of their content, never overwritten. ``commit.json``
names the files of the last committed epoch and of the best epoch (with their sha256), and holds the
run state (`RunState`), the optimizer's scalar state and the RNG infos. The commit rule:

1. write the epoch's weight and train-state files (each atomically, under new names);
2. write ``commit.json`` atomically (rename locally, one whole PUT elsewhere) — the commit point;
3. only then delete the ``epoch-*`` files the new record no longer names.

A crash before step 2 leaves the previous record and every file it names intact, so the finished
epochs are kept and a resumed run continues after the last committed one. A record whose files are
missing or whose hashes differ was tampered with (not a crash): loading fails naming the file.
Checkpoints of the older layouts (``last_state.json`` of adapter runs, ``checkpoint/state.json``
of L6 runs) are recognised and refused with a clear message. Only tensors go into safetensors and
only JSON into the record: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from egpt_core import runfiles as rf
from egpt_core.errors import ConfigError, StoreError
from egpt_core.fsio import Location

FORMAT = "egpt-checkpoint/2"
CHECKPOINT_DIR = "checkpoint"
COMMIT = "commit.json"
#: commit points of the layouts before FORMAT (relative to the run directory)
LEGACY_COMMITS = ("last_state.json", f"{CHECKPOINT_DIR}/state.json")
#: the tensor files those layouts wrote beside them
LEGACY_FILES = ("last_optim.safetensors", f"{CHECKPOINT_DIR}/lora.safetensors", f"{CHECKPOINT_DIR}/optim.safetensors")
_OWN_FILE = re.compile(r"epoch-\d{4,}-[0-9a-f]{12}\.(weights|train)\.safetensors")


@dataclass
class Committed:
    """The committed checkpoint of a run: its record and the tensors of its last epoch."""

    run: Location
    record: dict[str, Any]  # commit.json: format, kind, epoch, files, sha256, state, extra
    weights: dict[str, torch.Tensor]
    train_tensors: dict[str, torch.Tensor]
    blobs: dict[str, bytes] = field(default_factory=dict)  # file name -> bytes this process just wrote


    @property
    def epoch(self) -> int:
        return int(self.record["epoch"])

    @property
    def state(self) -> dict[str, Any]:
        return self.record["state"]

    @property
    def extra(self) -> dict[str, Any]:
        return self.record["extra"]

    def weights_bytes(self, which: str) -> bytes | None:
        """The verified bytes of the ``"last"`` or ``"best"`` weights file (None: no best file)."""
        name = self.record["files"].get(f"{which}_weights")
        if name is None:
            return None
        return self.blobs.get(name) or _read_verified(self.run, self.record, name)


def checkpoint_dir(run: Location, name: str = "") -> Location:
    """The run's ``checkpoint/`` directory, or the file ``name`` in it."""
    return run.child(CHECKPOINT_DIR, name) if name else run.child(CHECKPOINT_DIR)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _content_digest(data: bytes) -> str:
    """sha256 of a safetensors blob's content: its tensor bytes, tensor index and metadata in a canonical
    order (safetensors writes the metadata map in no fixed order, so equal content can differ in bytes)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode() + data[8 + n :]).hexdigest()


def _put_immutable(run: Location, epoch: int, role: str, data: bytes) -> str:
    name = f"epoch-{epoch:04d}-{_content_digest(data)[:12]}.{role}.safetensors"
    checkpoint_dir(run, name).write_atomic(data)
    return name


def commit_epoch(run: str | Location, kind: str, epoch: int, *, weights: dict[str, torch.Tensor],
                 weights_metadata: dict[str, str], train_tensors: dict[str, torch.Tensor], state: dict[str, Any],
                 extra: dict[str, Any], best: bool) -> Committed:
    """Commit epoch ``epoch`` of the run directory ``run`` (see the module docstring for the order);
    returns it as committed.

    ``best``: this epoch's weights become the best ones; else the previous record's best file stays.
    """
    run = Location.of(run)
    previous = rf.read_json(checkpoint_dir(run, COMMIT)) or {}
    w = st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()},
                metadata={**weights_metadata, "epoch": str(epoch)})
    t = st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in train_tensors.items()},
                metadata={"format": FORMAT, "epoch": str(epoch)})
    files = {"last_weights": _put_immutable(run, epoch, "weights", w),
             "train_state": _put_immutable(run, epoch, "train", t)}
    sha = {files["last_weights"]: _sha(w), files["train_state"]: _sha(t)}
    prev_best = (previous.get("files") or {}).get("best_weights") if previous.get("format") == FORMAT else None
    files["best_weights"] = files["last_weights"] if best else prev_best
    if files["best_weights"] and files["best_weights"] not in sha:
        sha[files["best_weights"]] = previous["sha256"][files["best_weights"]]
    record = {"format": FORMAT, "kind": kind, "epoch": int(epoch), "files": files, "sha256": sha,
              "state": state, "extra": extra}
    rf.write_json(checkpoint_dir(run, COMMIT), record)  # the commit point
    _collect_garbage(run, set(sha))
    return Committed(run, record, weights, train_tensors, blobs={files["last_weights"]: w})


def _collect_garbage(run: Location, keep: set[str]) -> None:
    """Delete this layout's files that the committed record no longer names (nothing else)."""
    directory = checkpoint_dir(run)
    fs, root = directory.fs, directory.path
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return
    for name in names:
        if _OWN_FILE.fullmatch(name) and name not in keep:
            checkpoint_dir(run, name).remove()


def _read_verified(run: Location, record: dict[str, Any], name: str) -> bytes:
    file = checkpoint_dir(run, name)
    url = file.url
    data = file.read_or_none()
    if data is None:
        raise StoreError(f"{url}: named by the committed checkpoint {checkpoint_dir(run, COMMIT).url} but missing; "
                         "the checkpoint was altered after it was written (resume with --no-resume to start over)")
    if _sha(data) != record["sha256"].get(name):
        raise StoreError(f"{url}: content differs from the sha256 its commit record holds; the checkpoint was "
                         "altered after it was written (resume with --no-resume to start over)")
    return data


def load_committed(run: str | Location, kind: str) -> Committed | None:
    """The committed checkpoint of the run directory ``run`` (verified), or None when there is none.

    Raises ConfigError for a checkpoint of an older layout or of another kind of run, StoreError
    when a file the record names is missing or altered."""
    run = Location.of(run)
    run_url = run.url
    record = rf.read_json(checkpoint_dir(run, COMMIT))
    if record is None:
        for legacy in LEGACY_COMMITS:
            if run.child(legacy).exists():
                raise ConfigError(
                    f"{run.child(legacy).url}: a checkpoint of an older layout (before {FORMAT}); this version "
                    "cannot continue it. Finish it with the egpt version that wrote it, or start over here with "
                    "--no-resume (or another --out)")
        return None
    if record.get("format") != FORMAT:
        raise ConfigError(f"{checkpoint_dir(run, COMMIT).url}: checkpoint format {record.get('format')!r}, this version "
                          f"reads {FORMAT!r}; use the egpt version that wrote it, or --no-resume")
    if record.get("kind") != kind:
        raise ConfigError(f"{run_url} holds a {record.get('kind')!r} checkpoint, not a {kind!r} one; use another --out")
    files = record["files"]
    weights = st_load(_read_verified(run, record, files["last_weights"]))
    tensors = st_load(_read_verified(run, record, files["train_state"]))
    return Committed(run, record, weights, tensors)


def clear(run: str | Location) -> None:
    """A fresh start: remove the commit record (and the older layouts' checkpoint files) so no stale
    checkpoint is continued later; the epoch files go with the next commit's garbage collection."""
    run = Location.of(run)
    checkpoint_dir(run, COMMIT).remove()
    for legacy in LEGACY_COMMITS + LEGACY_FILES:
        run.child(legacy).remove()
