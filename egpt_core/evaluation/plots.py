"""Evaluation figures (matplotlib, Agg backend): ``metrics_summary.png`` and ``per_position.png``."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402

from egpt_core.fsio import Location  # noqa: E402


def _save(fig, dest: Location) -> str:
    """The figure as PNG into ``dest``, atomically (rendered in memory, then one whole write)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    dest.write_atomic(buf.getvalue())
    return dest.url


def _xy(values: list) -> tuple[list[int], list[float]]:
    pts = [(i, v) for i, v in enumerate(values) if v is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_summary(metrics: dict[str, Any], dest: Location) -> str:
    """2x2: cos histogram with τ lines; accept@τ per position; consecutive-accept distribution;
    acceptance length vs γ (+ expected e2e speedup vs γ on a twin axis when timing was given).
    One figure drawn panel by panel (~65 lines, each panel a short block on its own axes)."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    taus = [f"{t:.2f}" for t in metrics["taus"]]

    ax = axes[0, 0]
    hist = metrics["cos"]["histogram"]
    edges, counts = hist["edges"], hist["counts"]
    ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="tab:blue", alpha=0.8)
    for t in taus:
        ax.axvline(float(t), ls="--", lw=1, color="tab:red")
    pooled = metrics["cos"]["pooled"]["mean"]
    ax.set_title(f"cosine (pooled mean {pooled:.3f})" if pooled is not None else "cosine")
    ax.set_xlabel("cos(pred, target)")
    ax.set_ylabel("positions")

    ax = axes[0, 1]
    pp = metrics["per_position"]
    for t in taus:
        ax.plot(*_xy(pp["accept"][t]), marker=".", label=f"cos > {t}")
    if "token_top1" in pp:
        ax.plot(*_xy(pp["token_top1"]), color="k", lw=2, label="token top-1")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("acceptance per position")
    ax.set_xlabel("position")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    series = {f"cos > {t}": metrics["consecutive"][t]["histogram"] for t in taus}
    if metrics.get("token"):
        series["token top-1"] = metrics["token"]["consecutive"]["histogram"]
    width = 0.8 / max(1, len(series))
    for i, (name, h) in enumerate(series.items()):
        total = sum(h) or 1
        ax.bar([x + i * width for x in range(len(h))], [c / total for c in h], width=width, label=name)
    ax.set_title("consecutive accepts from position 0 (fraction of pairs)")
    ax.set_xlabel("leading run length")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    basis = metrics.get("acc_len_basis")
    if basis:
        al = metrics["acceptance_length"][basis]
        for kind, style in (("sim", "o-"), ("empirical", "s--"), ("rounds", "^-")):
            xs = [int(g) for g, v in al[kind].items() if v is not None]
            ys = [v for v in al[kind].values() if v is not None]
            ax.plot(xs, ys, style, label=f"{kind} ({basis})")
        ax.set_xlabel("draft window γ")
        ax.set_ylabel("acceptance length")
        ax.legend(fontsize=8, loc="upper left")
        sp = metrics.get("speedup")
        if sp and sp.get("by_gamma"):
            ax2 = ax.twinx()
            xs = [int(g) for g, v in sp["by_gamma"].items() if v]
            ys = [v["e2e_speedup"] for v in sp["by_gamma"].values() if v]
            ax2.plot(xs, ys, "D-", color="tab:purple", label=f"e2e speedup ({sp['basis']})")
            ax2.axhline(1.0, color="tab:purple", lw=0.8, ls=":")
            ax2.set_ylabel("expected e2e speedup")
            ax2.legend(fontsize=8, loc="lower right")
    ax.set_title("acceptance length vs γ (upper bound: γ)")

    fig.suptitle(metrics.get("name", ""))
    fig.tight_layout()
    return _save(fig, dest)


def plot_per_position(metrics: dict[str, Any], dest: Location) -> str:
    """Per-position mean cosine, accept@τ and token top-1 (with the number of pairs valid at each position)."""
    pp = metrics["per_position"]
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(11, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(*_xy(pp["cos_mean"]), "k-", lw=2, label="mean cos")
    for t, vals in pp["accept"].items():
        ax.plot(*_xy(vals), marker=".", label=f"accept@{t}")
    if "token_top1" in pp:
        ax.plot(*_xy(pp["token_top1"]), "r-", lw=2, label="token top-1")
    ax.set_ylim(min(0.0, min((v for v in pp["cos_mean"] if v is not None), default=0.0)) - 0.02, 1.02)
    ax.set_ylabel("value")
    ax.legend(fontsize=8)
    ax.set_title("per-position statistics")
    axn.bar(pp["position"], pp["count"], color="grey")
    axn.set_ylabel("pairs valid")
    axn.set_xlabel("position t (row t predicts response token t)")
    fig.tight_layout()
    return _save(fig, dest)


def write_plots(metrics: dict[str, Any], out: Location) -> list[str]:
    return [
        plot_summary(metrics, out.child("metrics_summary.png")),
        plot_per_position(metrics, out.child("per_position.png")),
    ]
