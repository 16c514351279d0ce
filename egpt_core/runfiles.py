"""Run-directory files on any fsspec URL, without pickle: atomic bytes/JSON writes, whole-directory
puts, and optimizer / RNG state flattened into safetensors tensors + JSON scalars.

Used by the training checkpoint (`egpt_core/training/checkpoint.py`) of adapters and L6.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from egpt_core.credentials import redact_values
from egpt_core.fingerprint import hash_json
from egpt_core.fsio import Location, is_local
from egpt_core.fsio import dumps_json as dumps_json  # re-exported: runfiles.dumps_json is public
from egpt_core.fsio import finite_json as finite_json


def write_bytes(url: str | Location, data: bytes, storage_options: dict | None = None) -> None:
    """Write a whole file atomically (temp + rename locally, one whole PUT elsewhere)."""
    Location.of(url, storage_options).write_atomic(data)


def read_bytes(url: str | Location, storage_options: dict | None = None) -> bytes | None:
    """The whole file, or None when it does not exist."""
    return Location.of(url, storage_options).read_or_none()


def remove(url: str | Location, storage_options: dict | None = None) -> None:
    """Delete a file if it exists."""
    Location.of(url, storage_options).remove()


def write_json(url: str | Location, obj: Any, storage_options: dict | None = None) -> None:
    """``obj`` as JSON (sorted keys, non-finite floats as null), atomically."""
    Location.of(url, storage_options).write_json(obj)


def read_json(url: str | Location, storage_options: dict | None = None) -> Any | None:
    """Parsed JSON of the file, or None when it does not exist."""
    data = read_bytes(url, storage_options)
    return None if data is None else json.loads(data)


def put_dir(local_dir: str | Path, url: str | Location, storage_options: dict | None = None, *,
            kind: str = "files") -> None:
    """Write the staged directory ``local_dir`` into the directory ``url`` (a Location, or a URL with its
    ``storage_options``), then remove the staging.

    Replaces what an earlier ``put_dir`` wrote there (the files its marker lists, see
    :mod:`egpt_core.outdir`) and nothing else: files egpt did not write are never deleted, and a
    non-empty ``url`` egpt did not write is refused (OutputDirError). Each file lands atomically
    (rename locally, one whole PUT elsewhere); the marker lists the new files before they are written,
    so a crash part-way leaves a directory still recognised as egpt's.
    """
    from egpt_core import outdir

    local_dir = Path(local_dir)
    files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    out = Location.of(url, storage_options)
    outdir.check_output(out, kind, None)
    outdir.add_files(out, files, kind=kind)
    fs, root = out.fs, out.path
    for rel in files:
        src, dest = local_dir / rel, f"{root}/{rel}"
        if out.is_local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(src, dest)  # the staging dir sits beside the destination: same filesystem
        else:
            fs.put_file(str(src), dest)
    for rel in outdir.record_files(out, files, kind=kind):
        try:
            fs.rm_file(f"{root}/{rel}")
        except FileNotFoundError:
            pass
    shutil.rmtree(local_dir, ignore_errors=True)


def staging_dir(url: str) -> Path:
    """A fresh local directory to build an output directory in before :func:`put_dir`."""
    if is_local(url):
        dest = Path(str(url).removeprefix("file://"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    return Path(tempfile.mkdtemp(prefix="egpt-lora-"))


def local_dir(url: str | Location, storage_options: dict | None = None) -> Path:
    """A local directory holding the files of directory ``url`` (fetched to a temp dir when remote)."""
    src = Location.of(url, storage_options)
    if src.is_local:
        return Path(src.url.removeprefix("file://"))
    fs, root = src.fs, src.path
    tmp = Path(tempfile.mkdtemp(prefix="egpt-lora-fetch-"))
    for p in fs.find(root):
        rel = p[len(root.rstrip("/")) + 1 :]
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(p, str(tmp / rel))
    return tmp


def exists(url: str | Location, storage_options: dict | None = None) -> bool:
    return Location.of(url, storage_options).exists()


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (no tensor is decoded)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


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
        if not key.startswith("state."):
            continue
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


def rng_to_flat(numpy_state: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch (+ CUDA), python and (optionally) numpy RNG states as uint8 tensors + JSON scalars."""
    tensors = {"rng.torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s.clone()
    py_version, py_state, py_gauss = random.getstate()
    info: dict[str, Any] = {"python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}
    if numpy_state:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint32).view(np.uint8).copy())
        info["numpy"] = {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return tensors, info


def rng_from_flat(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda[:n]])
    if "numpy" in info and "rng.numpy" in tensors:
        npi = info["numpy"]
        keys = tensors["rng.numpy"].numpy().view(np.uint32)
        np.random.set_state((npi["kind"], keys, npi["pos"], npi["has_gauss"], npi["gauss"]))
    py = info["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def config_fingerprint(cfg) -> str:
    """What a resumed run must share with the checkpoint it continues: a stage config's
    ``semantic_settings()`` (its ``NON_SEMANTIC`` fields, e.g. out, storage options, epochs, left out)."""
    return hash_json(cfg.semantic_settings())


def config_record(cfg) -> dict[str, Any]:
    """A pydantic config as written to a run's files: without storage_options (they say how to reach
    the storage, not what was computed), secret parts of any value (a URL's password) masked."""
    return redact_values(cfg.model_dump(mode="json", exclude={"storage_options"}))
