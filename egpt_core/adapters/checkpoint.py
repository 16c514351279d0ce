"""Pickle-free checkpoints: safetensors for tensors, JSON for everything else; atomic writes on any
fsspec URL.

Run directory files written here:

* ``best.safetensors`` / ``last.safetensors`` — adapter state dict; metadata ``format``, ``level``,
  ``hidden_size``, ``adapter_config`` (JSON of :class:`AdapterConfig`), ``epoch``.
* ``last_optim.safetensors`` — optimizer state tensors flattened as ``state.<param>.<name>`` and RNG
  states as uint8 tensors (``rng.torch``, ``rng.cuda.<i>``, ``rng.numpy``).
* ``last_state.json`` — the commit point of a ``last`` checkpoint: optimizer param groups and
  non-tensor state, scheduler state, python/numpy RNG scalars, epoch, best-so-far, patience,
  history, config fingerprint.
"""

from __future__ import annotations

import json
import os
import random
import struct
import uuid
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from egpt_core.config import AdapterConfig
from egpt_core.errors import ConfigError, StoreError
from egpt_core.fsio import join, url_to_fs

FORMAT = "egpt-adapter/1"


# --------------------------------------------------------------------------------------------------
# bytes I/O
# --------------------------------------------------------------------------------------------------
def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write a whole file atomically: temp name + rename locally, one whole PUT elsewhere."""
    fs, path = url_to_fs(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if "file" in fs.protocol or "local" in fs.protocol:
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


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = url_to_fs(url, storage_options)
    return fs.cat_file(path)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = url_to_fs(url, storage_options)
    return fs.exists(path)


def remove(url: str, storage_options: dict | None = None) -> None:
    fs, path = url_to_fs(url, storage_options)
    if fs.exists(path):
        fs.rm_file(path)


def write_json(url: str, obj: Any, storage_options: dict | None = None) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=False, default=str).encode(), storage_options)


def read_json(url: str, storage_options: dict | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options))


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (no tensor is decoded)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


# --------------------------------------------------------------------------------------------------
# adapter weights
# --------------------------------------------------------------------------------------------------
def save_adapter_weights(url: str, module: nn.Module, cfg: AdapterConfig, hidden_size: int, epoch: int,
                         storage_options: dict | None = None, extra: dict[str, str] | None = None) -> None:
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    adapter_cfg = cfg.model_copy(update={"hidden_size": hidden_size})
    meta = {"format": FORMAT, "level": str(cfg.level), "hidden_size": str(hidden_size),
            "adapter_config": adapter_cfg.model_dump_json(), "epoch": str(epoch)}
    meta.update(extra or {})
    write_bytes(url, st_save(state, metadata=meta), storage_options)


def _weights_url(run_url: str, which: str) -> str:
    if which.endswith(".safetensors"):
        return which if "/" in which else join(run_url, which)
    if which not in ("best", "last"):
        raise ConfigError(f"which={which!r}: expected 'best', 'last' or a .safetensors file name")
    return join(run_url, f"{which}.safetensors")


def load_adapter(run_url: str, which: str = "best", storage_options: dict | None = None,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, AdapterConfig]:
    """Rebuild a trained adapter from a run directory without pickle -> (module in eval mode, config)."""
    from egpt_core.adapters.modules import create_adapter

    url = _weights_url(run_url, which)
    if not exists(url, storage_options):
        raise ConfigError(f"no adapter checkpoint at {url} (is {run_url!r} an adapter run directory?)")
    data = read_bytes(url, storage_options)
    meta = safetensors_metadata(data)
    if meta.get("format") != FORMAT:
        raise StoreError(f"{url}: not an egpt adapter checkpoint (format={meta.get('format')!r})")
    cfg = AdapterConfig.model_validate_json(meta["adapter_config"])
    module = create_adapter(cfg, int(meta["hidden_size"]))
    module.load_state_dict(st_load(data), strict=True)
    return module.to(device).eval(), cfg


# --------------------------------------------------------------------------------------------------
# optimizer / scheduler / RNG
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


def rng_to_flat() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s.clone()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint32).view(np.uint8).copy())
    py_version, py_state, py_gauss = random.getstate()
    info = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}
    return tensors, info


def rng_from_flat(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda[:n]])
    npi = info["numpy"]
    keys = tensors["rng.numpy"].numpy().view(np.uint32)
    np.random.set_state((npi["kind"], keys, npi["pos"], npi["has_gauss"], npi["gauss"]))
    py = info["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def save_train_state(run_url: str, opt: torch.optim.Optimizer, scheduler_state: dict[str, Any],
                     state: dict[str, Any], rng: tuple[dict[str, torch.Tensor], dict[str, Any]],
                     storage_options: dict | None = None) -> None:
    """Write last_optim.safetensors then last_state.json (the commit point)."""
    opt_tensors, opt_info = optimizer_to_flat(opt)
    rng_tensors, rng_info = rng
    epoch = str(state["epoch"])
    write_bytes(join(run_url, "last_optim.safetensors"),
                st_save({**opt_tensors, **rng_tensors}, metadata={"format": FORMAT, "epoch": epoch}), storage_options)
    full = dict(state, optimizer=opt_info, scheduler=scheduler_state, rng=rng_info)
    write_json(join(run_url, "last_state.json"), full, storage_options)


def load_train_state(run_url: str, storage_options: dict | None = None):
    """-> (state dict, weights, optimizer+rng tensors) of the committed ``last`` checkpoint, or None
    when there is none or its files disagree (a crash between writes)."""
    state_url = join(run_url, "last_state.json")
    if not exists(state_url, storage_options):
        return None
    state = read_json(state_url, storage_options)
    w = read_bytes(join(run_url, "last.safetensors"), storage_options)
    o = read_bytes(join(run_url, "last_optim.safetensors"), storage_options)
    epoch = str(state["epoch"])
    if safetensors_metadata(w).get("epoch") != epoch or safetensors_metadata(o).get("epoch") != epoch:
        return None
    return state, st_load(w), st_load(o)
