"""Adapter losses and pooled metrics (reference §6.9), computed from additive sums.

Every loss is built from per-batch *sums* (valid positions, squared error, cosine) so that
(a) validation metrics are pooled over ALL valid positions, independent of the batch split, and
(b) data-parallel training can use global denominators, which makes the gradient of a split global
batch equal to the single-process gradient.

Let M be the validity mask, y_hat the adapter output, y the target:

* masked MSE = sum M*(y_hat - y)^2 / (D * sum M)          (mean over valid elements)
* cos_sim    = sum M*cos(y_hat, y) / sum M; cos_loss = 1 - cos_sim
* L1-L4:       total = MSE + 0.5 * cos_loss
* L5/B1/L5F:   total = (1 - w) * align + w * pred, align as L1-L4 on y[t];
  - default (separate prediction head): pred = MSE + 0.5*(1 - cos) between the next-position
    head's output at t and y[t+1], over t whose t+1 is valid;
  - research (``separate_prediction_head=False``): pred = MSE only, between the *same* aligned
    output at t and y[t+1].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

# the one cosine / accept@tau definition (shared with evaluation), re-exported for this module's users
from egpt_core.training.similarity import DEFAULT_TAUS, accept_counts, accept_key, cosine_rows

COS_WEIGHT = 0.5
__all__ = ["DEFAULT_TAUS", "accept_counts", "accept_key", "accept_rates", "combine_sums", "loss_sums",
           "masked_cos_per_position"]


def masked_cos_per_position(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity per position [B, S] (`egpt_core.training.similarity.cosine_rows`); 0 where
    mask is False."""
    return cosine_rows(pred, target, mask)


def _sq_per_position(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    sq = (pred.float() - target.float()).pow(2).sum(-1)
    return torch.where(mask, sq, torch.zeros_like(sq))


def loss_sums(aligned: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
              next_pred: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Additive statistics of one batch: n, sq, cos (+ n_next, sq_next, cos_next when next_pred)."""
    mask = mask.bool()
    out = {
        "n": mask.sum().to(torch.float32),
        "sq": _sq_per_position(aligned, target, mask).sum(),
        "cos": masked_cos_per_position(aligned, target, mask).sum(),
    }
    if next_pred is not None:
        m_next = mask[:, 1:] & mask[:, :-1]
        p, y = next_pred[:, :-1], target[:, 1:]
        out["n_next"] = m_next.sum().to(torch.float32)
        out["sq_next"] = _sq_per_position(p, y, m_next).sum()
        out["cos_next"] = masked_cos_per_position(p, y, m_next).sum()
    return out


def combine_sums(sums: Mapping[str, torch.Tensor], hidden_size: int, *, eagle: bool = False,
                 prediction_weight: float = 0.5, separate_prediction_head: bool = True,
                 denominators: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Loss/metrics from :func:`loss_sums` output (or their sum over batches / ranks).

    ``denominators`` overrides ``n``/``n_next`` (data-parallel: the global counts).
    """
    den = denominators or sums
    n = den["n"].clamp_min(1.0)
    mse = sums["sq"] / (hidden_size * n)
    cos_sim = sums["cos"] / n
    cos_loss = 1.0 - cos_sim
    align = mse + COS_WEIGHT * cos_loss
    out = {"mse_loss": mse, "cos_loss": cos_loss, "cos_sim": cos_sim}
    if not eagle:
        out["total_loss"] = align
        return out
    n_next = den["n_next"].clamp_min(1.0)
    mse_next = sums["sq_next"] / (hidden_size * n_next)
    next_cos = sums["cos_next"] / n_next
    pred = mse_next + COS_WEIGHT * (1.0 - next_cos) if separate_prediction_head else mse_next
    w = prediction_weight
    out.update(align_loss=align, pred_loss=pred, next_cos_sim=next_cos,
               total_loss=(1.0 - w) * align + w * pred)
    return out


# --------------------------------------------------------------------------------------------------
# convenience wrappers (hand-checkable; used by tests and evaluation)
# --------------------------------------------------------------------------------------------------
def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over valid elements: sum M*(pred-target)^2 / (D * sum M)."""
    s = loss_sums(pred, target, mask)
    return s["sq"] / (pred.shape[-1] * s["n"].clamp_min(1.0))


def masked_cos(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine similarity pooled over valid positions."""
    s = loss_sums(pred, target, mask)
    return s["cos"] / s["n"].clamp_min(1.0)


def alignment_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1-L4 objective: MSE + 0.5*(1 - cos)."""
    return combine_sums(loss_sums(pred, target, mask), pred.shape[-1])


def eagle_loss(aligned: torch.Tensor, next_pred: torch.Tensor | None, target: torch.Tensor, mask: torch.Tensor,
               prediction_weight: float = 0.5, separate_prediction_head: bool = True) -> dict[str, torch.Tensor]:
    """L5/B1/L5F objective; ``next_pred=None`` (or research mode) uses ``aligned`` for y[t+1]."""
    if next_pred is None or not separate_prediction_head:
        next_pred = aligned
    sums = loss_sums(aligned, target, mask, next_pred)
    return combine_sums(sums, aligned.shape[-1], eagle=True, prediction_weight=prediction_weight,
                        separate_prediction_head=separate_prediction_head)


def accept_rates(cos: torch.Tensor, mask: torch.Tensor, taus: Iterable[float] = DEFAULT_TAUS) -> dict[float, float]:
    """{tau: fraction of valid positions with cos > tau} (pooled over positions)."""
    taus = [float(t) for t in taus]
    n = max(int(mask.bool().sum()), 1)
    counts = accept_counts(cos, mask, taus)
    return {t: float(c) / n for t, c in zip(taus, counts)}
