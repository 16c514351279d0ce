"""Pickle-free run-directory I/O for L6: safetensors for tensors, JSON for the rest, on any fsspec URL.

Resume checkpoint (``<out>/checkpoint/``), written at the end of every epoch:

* ``lora.safetensors`` — the LoRA weights (peft state-dict names), metadata ``format``, ``epoch``.
* ``optim.safetensors`` — AdamW state tensors as ``state.<idx>.<name>`` plus RNG states
  (``rng.torch``, ``rng.cuda.<i>``) as uint8 tensors; metadata ``format``, ``epoch``.
* ``state.json`` — the commit point: epoch, optimizer step, optimizer param groups and scalar state,
  python RNG, best-so-far, patience, history, config fingerprint. It is written last; a checkpoint
  whose tensor files carry another epoch (a crash between writes) is ignored.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from egpt_core.fsio import is_local, join, url_to_fs

FORMAT = "egpt-lora/1"
CHECKPOINT_DIR = "checkpoint"


# --------------------------------------------------------------------------------------------------
# bytes / JSON / directories on URLs
# --------------------------------------------------------------------------------------------------
def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write a whole file atomically (temp + rename locally, one whole PUT elsewhere)."""
    fs, path = url_to_fs(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if is_local(url):
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes | None:
    fs, path = url_to_fs(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def remove(url: str, storage_options: dict | None = None) -> None:
    """Delete a file if it exists."""
    fs, path = url_to_fs(url, storage_options)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def write_json(url: str, obj: Any, storage_options: dict | None = None) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), storage_options)


def read_json(url: str, storage_options: dict | None = None) -> Any | None:
    data = read_bytes(url, storage_options)
    return None if data is None else json.loads(data)


def put_dir(local_dir: str | Path, url: str, storage_options: dict | None = None) -> None:
    """Replace the directory at ``url`` by ``local_dir``'s files (a rename locally)."""
    local_dir = Path(local_dir)
    if is_local(url):
        dest = Path(str(url).removeprefix("file://"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            trash = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
        shutil.move(str(local_dir), str(dest))
        return
    fs, root = url_to_fs(url, storage_options)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    for f in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = f.relative_to(local_dir).as_posix()
        fs.makedirs(join(root, rel).rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(f), join(root, rel))


def staging_dir(url: str) -> Path:
    """A fresh local directory to build an output directory in before :func:`put_dir`."""
    if is_local(url):
        dest = Path(str(url).removeprefix("file://"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    return Path(tempfile.mkdtemp(prefix="egpt-lora-"))


def local_dir(url: str, storage_options: dict | None = None) -> Path:
    """A local directory holding the files of directory ``url`` (fetched to a temp dir when remote)."""
    if is_local(url):
        return Path(str(url).removeprefix("file://"))
    fs, root = url_to_fs(url, storage_options)
    tmp = Path(tempfile.mkdtemp(prefix="egpt-lora-fetch-"))
    for p in fs.find(root):
        rel = p[len(root.rstrip("/")) + 1 :]
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(p, str(tmp / rel))
    return tmp


# --------------------------------------------------------------------------------------------------
# optimizer / RNG flattening
# --------------------------------------------------------------------------------------------------
def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in info["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = []
    for g in info["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_to_flat() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s.clone()
    version, st, gauss = random.getstate()
    return tensors, {"python": {"version": version, "state": list(st), "gauss": gauss}}


def rng_from_flat(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda[:n]])
    py = info["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


# --------------------------------------------------------------------------------------------------
# the resume checkpoint
# --------------------------------------------------------------------------------------------------
def _meta(data: bytes) -> dict[str, str]:
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}


def save_checkpoint(out: str, lora_state: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                    state: dict[str, Any], storage_options: dict | None = None) -> None:
    """LoRA weights, optimizer + RNG tensors, then state.json (the commit point)."""
    ck = join(out, CHECKPOINT_DIR)
    epoch = str(state["epoch"])
    meta = {"format": FORMAT, "epoch": epoch}
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in lora_state.items()}
    write_bytes(join(ck, "lora.safetensors"), st_save(weights, metadata=meta), storage_options)
    opt_tensors, opt_info = optimizer_to_flat(opt)
    rng_tensors, rng_info = rng_to_flat()
    write_bytes(join(ck, "optim.safetensors"), st_save({**opt_tensors, **rng_tensors}, metadata=meta), storage_options)
    write_json(join(ck, "state.json"), dict(state, optimizer=opt_info, rng=rng_info, format=FORMAT), storage_options)


def load_checkpoint(out: str, storage_options: dict | None = None):
    """-> (state, lora tensors, optimizer+rng tensors) of the committed checkpoint, or None."""
    ck = join(out, CHECKPOINT_DIR)
    state = read_json(join(ck, "state.json"), storage_options)
    if state is None:
        return None
    w = read_bytes(join(ck, "lora.safetensors"), storage_options)
    o = read_bytes(join(ck, "optim.safetensors"), storage_options)
    if w is None or o is None:
        return None
    epoch = str(state["epoch"])
    if _meta(w).get("epoch") != epoch or _meta(o).get("epoch") != epoch:
        return None
    return state, st_load(w), st_load(o)
