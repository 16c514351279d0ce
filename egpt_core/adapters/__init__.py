"""Stage 3a: alignment adapters L1..L5, B1, L5F (reference §6), their losses and trainer (§7).

Public API::

    create_adapter(cfg: AdapterConfig, hidden_size: int | None = None) -> nn.Module
    count_parameters(module, trainable_only=True) -> int
    level_parameter_count(cfg, hidden_size) -> int              # exact, on the meta device
    apply_adapter(module, cfg, drafter, target, mask, output="aligned") -> [B, S, D]
    train_adapter(cfg: TrainAdapterConfig, progress=None, resume=True) -> TrainResult
    load_adapter(run_url, which="best", storage_options=None) -> (module, AdapterConfig)

The trainer is imported lazily so that model code never needs the store package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from egpt_core.adapters.checkpoint import load_adapter
from egpt_core.adapters.losses import (
    accept_rates,
    alignment_loss,
    eagle_loss,
    masked_cos,
    masked_cos_per_position,
    masked_mse,
)
from egpt_core.adapters.modules import (
    LEVELS,
    apply_adapter,
    count_parameters,
    create_adapter,
    input_side,
    level_parameter_count,
)

if TYPE_CHECKING:
    from egpt_core.adapters.trainer import TrainResult, train_adapter

__all__ = [
    "LEVELS", "TrainResult", "accept_rates", "alignment_loss", "apply_adapter", "count_parameters",
    "create_adapter", "eagle_loss", "input_side", "level_parameter_count", "load_adapter", "masked_cos",
    "masked_cos_per_position", "masked_mse", "train_adapter",
]


def __getattr__(name: str) -> Any:
    if name in ("train_adapter", "TrainResult"):
        from egpt_core.adapters import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'egpt_core.adapters' has no attribute {name!r}")
