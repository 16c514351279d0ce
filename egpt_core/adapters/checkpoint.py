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

from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from egpt_core import runfiles as rf
from egpt_core.config import AdapterConfig
from egpt_core.errors import ConfigError, StoreError
from egpt_core.fsio import join

FORMAT = "egpt-adapter/1"


# --------------------------------------------------------------------------------------------------
# bytes I/O
# --------------------------------------------------------------------------------------------------


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
    rf.write_bytes(url, st_save(state, metadata=meta), storage_options)


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
    if not rf.exists(url, storage_options):
        raise ConfigError(f"no adapter checkpoint at {url} (is {run_url!r} an adapter run directory?)")
    data = rf.read_bytes(url, storage_options)
    meta = rf.safetensors_metadata(data)
    if meta.get("format") != FORMAT:
        raise StoreError(f"{url}: not an egpt adapter checkpoint (format={meta.get('format')!r})")
    cfg = AdapterConfig.model_validate_json(meta["adapter_config"])
    module = create_adapter(cfg, int(meta["hidden_size"]))
    module.load_state_dict(st_load(data), strict=True)
    return module.to(device).eval(), cfg


# --------------------------------------------------------------------------------------------------
# optimizer / scheduler / RNG
# --------------------------------------------------------------------------------------------------


def save_train_state(run_url: str, opt: torch.optim.Optimizer, scheduler_state: dict[str, Any],
                     state: dict[str, Any], rng: tuple[dict[str, torch.Tensor], dict[str, Any]],
                     storage_options: dict | None = None) -> None:
    """Write last_optim.safetensors then last_state.json (the commit point)."""
    opt_tensors, opt_info = rf.optimizer_to_flat(opt)
    rng_tensors, rng_info = rng
    epoch = str(state["epoch"])
    rf.write_bytes(join(run_url, "last_optim.safetensors"),
                st_save({**opt_tensors, **rng_tensors}, metadata={"format": FORMAT, "epoch": epoch}), storage_options)
    full = dict(state, optimizer=opt_info, scheduler=scheduler_state, rng=rng_info)
    rf.write_json(join(run_url, "last_state.json"), full, storage_options)


def load_train_state(run_url: str, storage_options: dict | None = None):
    """-> (state dict, weights, optimizer+rng tensors) of the committed ``last`` checkpoint, or None
    when there is none or its files disagree (a crash between writes)."""
    state_url = join(run_url, "last_state.json")
    if not rf.exists(state_url, storage_options):
        return None
    state = rf.read_json(state_url, storage_options)
    w = rf.read_bytes(join(run_url, "last.safetensors"), storage_options)
    o = rf.read_bytes(join(run_url, "last_optim.safetensors"), storage_options)
    epoch = str(state["epoch"])
    if rf.safetensors_metadata(w).get("epoch") != epoch or rf.safetensors_metadata(o).get("epoch") != epoch:
        return None
    return state, st_load(w), st_load(o)
