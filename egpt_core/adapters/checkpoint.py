"""Pickle-free checkpoints: safetensors for tensors, JSON for everything else; atomic writes on any
fsspec URL.

Adapter weight files (``best.safetensors`` / ``last.safetensors`` of a run directory, and the
weights files of its ``checkpoint/``): the adapter state dict; metadata ``format``, ``level``,
``hidden_size``, ``adapter_config`` (JSON of :class:`AdapterConfig`), ``epoch``. The resume
checkpoint itself is `egpt_core.training.checkpoint`.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from egpt_core import runfiles as rf
from egpt_core.config import AdapterConfig
from egpt_core.errors import ConfigError, StoreError
from egpt_core.fsio import Location

FORMAT = "egpt-adapter/1"


# --------------------------------------------------------------------------------------------------
# adapter weights
# --------------------------------------------------------------------------------------------------
def adapter_weights_metadata(cfg: AdapterConfig, hidden_size: int) -> dict[str, str]:
    """The safetensors metadata that makes a weights file loadable by :func:`load_adapter` (the
    training checkpoint adds ``epoch``)."""
    adapter_cfg = cfg.model_copy(update={"hidden_size": hidden_size})
    return {"format": FORMAT, "level": str(cfg.level), "hidden_size": str(hidden_size),
            "adapter_config": adapter_cfg.model_dump_json()}


def save_adapter_weights(dest: str | Location, module: nn.Module, cfg: AdapterConfig, hidden_size: int, epoch: int,
                         extra: dict[str, str] | None = None) -> None:
    """The adapter's weights as a safetensors file at ``dest`` (its metadata rebuilds the module)."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    meta = {**adapter_weights_metadata(cfg, hidden_size), "epoch": str(epoch)}
    meta.update(extra or {})
    Location.of(dest).write_atomic(st_save(state, metadata=meta))


def weights_file_name(which: str) -> str:
    """The file an ``adapter_which`` setting names: ``best``/``last`` -> ``best.safetensors``, a file name as is."""
    return which if which.endswith(".safetensors") else f"{which}.safetensors"


def configured_weights(cfg) -> Location:
    """The weights file of ``cfg.adapter_run`` that ``cfg.adapter_which`` names (evaluation and
    speculative configs), reached with the config's storage options."""
    return cfg.location(cfg.adapter_run).child(weights_file_name(cfg.adapter_which))


def _weights_file(run: Location, which: str) -> Location:
    if which.endswith(".safetensors"):
        return Location(which, run.storage_options) if "/" in which else run.child(which)
    if which not in ("best", "last"):
        raise ConfigError(f"which={which!r}: expected 'best', 'last' or a .safetensors file name")
    return run.child(f"{which}.safetensors")


def load_adapter(run_dir: str | Location, which: str = "best", storage_options: dict | None = None,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, AdapterConfig]:
    """Rebuild a trained adapter from a run directory (a Location, or a URL with its
    ``storage_options``) without pickle -> (module in eval mode, config)."""
    from egpt_core.adapters.modules import create_adapter

    run = Location.of(run_dir, storage_options)
    weights = _weights_file(run, which)
    url = weights.url
    data = weights.read_or_none()
    if data is None:
        raise ConfigError(f"no adapter checkpoint at {url} (is {run.url!r} an adapter run directory?)")
    meta = rf.safetensors_metadata(data)
    if meta.get("format") != FORMAT:
        raise StoreError(f"{url}: not an egpt adapter checkpoint (format={meta.get('format')!r})")
    cfg = AdapterConfig.model_validate_json(meta["adapter_config"])
    module = create_adapter(cfg, int(meta["hidden_size"]))
    module.load_state_dict(st_load(data), strict=True)
    return module.to(device).eval(), cfg
