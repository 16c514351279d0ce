"""Figures of a speculative run (matplotlib, Agg), rendered to PNG bytes:

- ``sd_speedup.png``: measured e2e / decode speedup per γ, with the speedup model's prediction;
- ``sd_timing_breakdown.png``: stacked mean wall-clock per γ next to the target-only baseline;
- ``sd_acceptance.png``: measured vs simulated acceptance length per γ (+ the γ upper bound);
- ``sd_prefill_timeline.png``: one pair's drafter / target lanes (prefill hiding, then the rounds).
``speedup_per_configuration`` is the cross-configuration bar chart of `benchmark_e2e`.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"drafter_vision": "tab:olive", "drafter_prefill": "tab:green", "draft_head": "tab:cyan",
          "drafter_forward": "tab:blue", "drafter_own_answer": "tab:blue", "target_vision": "tab:brown",
          "target_prefill": "tab:red", "verify": "tab:orange", "decode": "tab:purple"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _finish(fig, ax, ylabel: str, title: str) -> bytes:
    """Label a one-axes figure (y label, title, legend) and render it to PNG bytes."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_speedup(doc: dict[str, Any]) -> bytes:
    pg, model = doc["per_gamma"], doc.get("speedup_model") or {}
    gs = [g for g, a in pg.items() if a.get("speedup_e2e") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = range(len(gs))
    ax.bar([i - 0.27 for i in x], [pg[g]["speedup_e2e"] for g in gs], width=0.27, label="measured e2e")
    ax.bar(list(x), [pg[g].get("speedup_decode") or 0 for g in gs], width=0.27, label="measured decode-only")
    ax.bar([i + 0.27 for i in x], [(model.get(g) or {}).get("predicted_e2e") or 0 for g in gs], width=0.27,
           label="speedup model (measured timings)")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(list(x), [f"γ={g}" for g in gs])
    return _finish(fig, ax, "speedup vs target-only greedy",
                   f"{doc['name']}: speedup per γ ({doc['inputs']['config']['mode']})")


def plot_timing(doc: dict[str, Any]) -> bytes:
    pg = doc["per_gamma"]
    gs = [g for g, a in pg.items() if a.get("timing_ms")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = ["baseline"] + [f"γ={g}" for g in gs]
    base = pg[gs[0]]["baseline_timing_ms"] if gs else {}
    stacks = [[base.get("target_vision_ms") or 0, base.get("target_prefill_ms") or 0, 0.0,
               base.get("decode_ms") or 0]]
    for g in gs:
        t = pg[g]["timing_ms"]
        stacks.append([t["target_vision_ms"] or 0, max(0.0, (t["prefill_phase_ms"] or 0) - (t["target_vision_ms"] or 0)),
                       t["drafting_ms"] or 0, t["verify_ms"] or 0])
    totals = [base.get("total_ms") or 0] + [pg[g]["timing_ms"]["total_ms"] or 0 for g in gs]
    bottom = [0.0] * len(labels)
    names = ["vision (target)", "prefill (phase)", "drafting", "verification / decode"]
    for j, name in enumerate(names):
        vals = [s[j] for s in stacks]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.bar(labels, [max(0.0, t - b) for t, b in zip(totals, bottom)], bottom=bottom, label="other (host time)",
           color="lightgrey")
    return _finish(fig, ax, "mean ms per pair", f"{doc['name']}: wall-clock breakdown")


def plot_acceptance(doc: dict[str, Any]) -> bytes:
    pg = doc["per_gamma"]
    cross = (doc.get("cross_check") or {}).get("per_gamma") or {}
    gs = [int(g) for g, a in pg.items() if a.get("acceptance_length") is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(gs, [pg[str(g)]["acceptance_length"] for g in gs], "o-", lw=2, label="measured (real loop)")
    sim = [(g, (cross.get(str(g)) or {}).get("simulated")) for g in gs]
    sim = [(g, v) for g, v in sim if v is not None]
    if sim:
        ax.plot([g for g, _ in sim], [v for _, v in sim], "s--", label="simulated rounds (egpt evaluate, same pairs)")
    ax.plot(gs, gs, ":", color="grey", label="upper bound γ")
    ax.set_xlabel("draft window γ")
    return _finish(fig, ax, "acceptance length (accepted per round)",
                   f"{doc['name']}: measured vs simulated acceptance")


def plot_timeline(doc: dict[str, Any], timeline: dict[str, Any]) -> bytes:
    fig, axes = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True)
    for ax, key, title in ((axes[0], "baseline", "target only"), (axes[1], "sd", f"speculative γ={timeline.get('gamma')}")):
        spans = timeline.get(key) or []
        lanes = sorted({s["lane"] for s in spans}, reverse=True)
        seen = set()
        for s in spans:
            y = lanes.index(s["lane"])
            label = s["label"] if s["label"] not in seen else None
            seen.add(s["label"])
            ax.barh(y, s["end_ms"] - s["start_ms"], left=s["start_ms"], height=0.6,
                    color=COLORS.get(s["label"], "grey"), label=label)
        ax.set_yticks(range(len(lanes)), lanes)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, ncol=4, loc="upper right")
    axes[1].set_xlabel(f"ms since the pair started (pair {timeline.get('pair_id', '')})")
    fig.suptitle(f"{doc['name']}: prefill hiding and rounds of one pair")
    fig.tight_layout()
    return _png(fig)


def render_plots(doc: dict[str, Any], records: list[dict[str, Any]], timeline: dict[str, Any]) -> dict[str, bytes]:
    """All figures of a run; a target-only run gets only its timeline."""
    del records
    out = {}
    if doc["inputs"]["source"] != "target_only":
        out["sd_speedup.png"] = plot_speedup(doc)
        out["sd_timing_breakdown.png"] = plot_timing(doc)
        out["sd_acceptance.png"] = plot_acceptance(doc)
    if timeline:
        out["sd_prefill_timeline.png"] = plot_timeline(doc, timeline)
    return out


def speedup_per_configuration(summaries: list[dict[str, Any]], gamma: int = 5) -> bytes:
    """Bars of measured e2e speedup (and measured acceptance length) per configuration at γ."""
    names = [s["name"] for s in summaries]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4.5))
    sp = [s.get(f"speedup_e2e_gamma{gamma}") or (1.0 if s.get("mode") == "target_only" else 0.0) for s in summaries]
    ax.bar(names, sp, color="tab:blue", label=f"measured e2e speedup (γ={gamma})")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_ylabel("speedup vs target-only")
    ax2 = ax.twinx()
    acc = [s.get(f"acceptance_length_gamma{gamma}") for s in summaries]
    ax2.plot(names, [float("nan") if a is None else a for a in acc], "o", color="tab:red", ms=8,
             label="measured acceptance length")
    ax2.set_ylim(bottom=0)
    ax2.set_ylabel("accepted per round")
    ax.set_title(f"speedup per configuration (γ={gamma})")
    fig.legend(fontsize=8, loc="lower center", ncol=2, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _png(fig)
