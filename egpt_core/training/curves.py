"""Metric sums pooled over batches and ranks, and the ``training_curves.png`` of a run.

Metrics are built from additive sums (positions, squared error, cosine, accept counts ...), so a
metric pooled over every valid position does not depend on how batches or ranks split the data.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from egpt_core.fsio import Location


def pack(sums: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """Sums as one vector [len(keys)] (a key ``sums`` lacks counts 0), on the device of ``sums``."""
    ref = next(iter(sums.values()))
    zero = torch.zeros((), device=ref.device)
    return torch.stack([sums[k].detach().float() if k in sums else zero for k in keys])


def unpack(vec: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: vec[i] for i, k in enumerate(keys)}


class SumAccumulator:
    """Running float64 totals of named sums; :meth:`pooled` sums them over the ranks."""

    def __init__(self, keys: Sequence[str], device: torch.device | str = "cpu"):
        self.keys = tuple(keys)
        self.total = torch.zeros(len(self.keys), dtype=torch.float64, device=device)

    def add(self, sums: Mapping[str, torch.Tensor]) -> None:
        self.total += pack(sums, self.keys).to(self.total.device, torch.float64)

    def pooled(self, ctx) -> dict[str, float]:
        """The totals summed over the ranks of ``ctx`` (a `DistContext`)."""
        return dict(zip(self.keys, ctx.all_sum(self.total).cpu().tolist()))


@dataclass
class Panel:
    """One plot: ``series`` are (history key, label, matplotlib format); ``val_keys`` start at the
    baseline (epoch 0) when the run has one."""

    title: str
    series: list[tuple[str, str, str]] = field(default_factory=list)
    ylim: tuple[float, float] | None = None


def plot_curves(history: list[dict[str, Any]], panels: Sequence[Panel], out: Location,
                baseline: dict[str, Any] | None = None) -> None:
    """Write ``training_curves.png``: one panel per :class:`Panel`, x = epoch. ``baseline``: history-style
    values of epoch 0 (before training), drawn for the keys it holds."""
    if not history:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(4 * len(panels), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    for ax, panel in zip(axes, panels):
        for key, label, fmt in panel.series:
            rows = ([{"epoch": 0, **baseline}] if baseline and key in baseline else []) + history
            ax.plot([h["epoch"] for h in rows], [h.get(key, float("nan")) for h in rows], fmt, label=label)
        ax.set_title(panel.title)
        ax.set_xlabel("epoch (0 = before training)" if baseline else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    out.write_atomic(buf.getvalue())
