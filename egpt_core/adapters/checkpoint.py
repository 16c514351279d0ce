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
from egpt_core.fsio import join

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


def save_adapter_weights(url: str, module: nn.Module, cfg: AdapterConfig, hidden_size: int, epoch: int,
                         storage_options: dict | None = None, extra: dict[str, str] | None = None) -> None:
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    meta = {**adapter_weights_metadata(cfg, hidden_size), "epoch": str(epoch)}
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
