"""The one cosine-similarity and accept@tau definition of the project.

Training history (adapters and L6) and evaluation (`egpt_core.evaluation.metrics`) both call these
functions, so a history's ``val_accept_90`` and an evaluation's ``accept@0.90`` on the same
predictions are the same number by construction.

cos(p, y) = p . y / max(|p| |y|, EPS) computed in float32 over the last dimension; a position is
accepted at tau when cos > tau (strictly).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

#: denominator floor of the cosine (torch's ``F.cosine_similarity`` default)
EPS = 1e-8
DEFAULT_TAUS: tuple[float, ...] = (0.80, 0.85, 0.90, 0.95)


def accept_key(tau: float) -> str:
    """'accept_80' for tau = 0.80 (the history/metrics naming)."""
    return f"accept_{round(tau * 100):d}"


def cosine_rows(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity per row: pred/target [..., D] -> [...] (float32); 0 where ``mask`` is False."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=EPS)
    if mask is not None:
        cos = torch.where(mask.bool(), cos, torch.zeros_like(cos))
    return cos


def accepted(cos: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean [...]: the rows whose cosine is strictly above ``tau``."""
    return cos > float(tau)


def accept_counts(cos: torch.Tensor, mask: torch.Tensor | None = None,
                  taus: Iterable[float] = DEFAULT_TAUS) -> torch.Tensor:
    """Number of (valid) rows with cos > tau, per tau -> float tensor [len(taus)]."""
    valid = torch.ones_like(cos, dtype=torch.bool) if mask is None else mask.bool()
    return torch.stack([(accepted(cos, t) & valid).sum().to(torch.float32) for t in taus])
