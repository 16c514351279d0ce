"""``report.md`` of a speculative run, and the cross-configuration table of `benchmark_e2e`."""

from __future__ import annotations

from typing import Any

from egpt_core.evaluation.report import _table, fmt

TIMING_ROWS = [
    ("drafter_vision_ms", "drafter vision (events -> features)"),
    ("drafter_prefill_ms", "drafter prefill"),
    ("hidden_drafting_ms", "drafting during the prefill phase (round 0 / own answer)"),
    ("target_vision_ms", "target vision (8 frames)"),
    ("target_prefill_ms", "target prefill"),
    ("prefill_phase_ms", "prefill phase wall time"),
    ("overlap_ms", "overlap (drafter busy + target busy - wall)"),
    ("drafting_ms", "drafting after the prefill phase"),
    ("verify_ms", "verification forwards"),
    ("total_ms", "total"),
]


def render_report(m: dict[str, Any]) -> str:
    """The markdown of one run (``m`` = sd_metrics.json content), section by section."""
    out = [f"# Speculative decoding: {m['name']}", ""] + _inputs_md(m)
    pg = m["per_gamma"]
    cross = m.get("cross_check") or {}
    model = m.get("speedup_model") or {}
    if m["inputs"]["source"] == "target_only":
        b = (pg.get("0") or {}).get("baseline_timing_ms", {})
        out += ["## Target-only baseline", "", _table(["metric", "mean ms"], [[k, fmt(v, digits=2)] for k, v in b.items()]),
                ""]
        return "\n".join(out)
    out += _measured_md(pg, cross, model) + _speedup_model_md(pg, model) + _wall_clock_md(pg)
    out += _lossless_md(pg) + _cross_check_md(cross)
    out += ["![speedup](sd_speedup.png)", "", "![timing](sd_timing_breakdown.png)", "",
            "![acceptance](sd_acceptance.png)", "", "![prefill hiding](sd_prefill_timeline.png)", ""]
    return "\n".join(out)


def _inputs_md(m: dict[str, Any]) -> list[str]:
    """The configuration, models, fingerprints and notes."""
    inp = m["inputs"]
    cfg = inp["config"]
    fps = inp.get("fingerprints") or {}
    out: list[str] = []
    rows = [["configuration", f"{inp['source']}" + (f" ({inp['adapter_level']})" if inp.get("adapter_level") else "")],
            ["mode", cfg["mode"]], ["γ", ", ".join(map(str, m["gammas"]))],
            ["max_new_tokens", cfg["max_new_tokens"]], ["pairs", f"{m['summary']['n_pairs']} measured, "
                                                                 f"{m['summary']['n_failed']} failed"],
            ["target", f"`{cfg['target']}` (`{fps.get('target')}`)"],
            ["drafter", f"`{cfg.get('drafter')}` (`{fps.get('drafter')}`)"],
            ["device / dtype / quant", f"{inp['device']} (drafter {inp.get('drafter_device')}) / {inp['dtype']} / "
                                       f"{inp['quant']}"],
            ["prefill hiding", "on" if cfg["prefill_hiding"] else "off"],
            ["run fingerprint", f"`{inp['run_fingerprint']}`"]]
    if cfg.get("adapter_run"):
        rows.append(["adapter run", f"`{cfg['adapter_run']}` (`{fps.get('adapter')}`)"])
    if cfg.get("lora"):
        rows.append(["L6 LoRA (merged in memory)", f"`{cfg['lora']}` (`{fps.get('lora')}`)"])
    if cfg.get("store"):
        rows.append(["store", f"`{cfg['store']}` ({inp.get('store_mode')}, `{inp.get('store_fingerprint')}`)"])
    out += ["## Inputs", "", _table(["input", "value"], rows), ""]
    out += [f"> **Note:** {n}" for n in m.get("notes", [])]
    out.append("")
    return out


def _measured_md(pg: dict[str, Any], cross: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """Acceptance, speedups and lossless mismatches per γ, with the simulation alongside."""
    out: list[str] = []
    out += ["## Measured per γ", "",
            "*acceptance length* = mean accepted drafts per full-window round (the rounds the offline simulation "
            "counts); *simulated* = `egpt evaluate`'s `rounds` acceptance on the store's rows of the same pairs; "
            "*agreement* = measured rounds with the same start and accepted count as the simulation; speedups are "
            "ratios of summed wall time vs the target-only baseline measured in the same run; *predicted* = the "
            "speedup model fed this run's timings.", ""]
    rows = []
    for g, a in pg.items():
        c = (cross.get("per_gamma") or {}).get(g) or {}
        mc = model.get(g) or {}
        rows.append([g, a.get("n_pairs"), fmt(a.get("acceptance_length"), digits=3), fmt(c.get("simulated"), digits=3),
                     fmt(c.get("round_agreement"), pct=True), fmt(a.get("accept_rate"), pct=True),
                     fmt(a.get("tokens_per_round"), digits=2), fmt(a.get("speedup_e2e"), digits=3),
                     fmt(a.get("speedup_decode"), digits=3), fmt(mc.get("predicted_e2e"), digits=3),
                     fmt(mc.get("relative_error"), pct=True), a.get("lossless_mismatches")])
    out += [_table(["γ", "pairs", "acceptance length", "simulated", "agreement", "accept rate", "tokens/round",
                    "e2e speedup", "decode speedup", "predicted e2e", "model error", "lossless mismatches"], rows), ""]
    return out


def _speedup_model_md(pg: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """The speedup model fed this run's timings, per γ (empty when it was not run)."""
    out: list[str] = []
    if any(model.get(g) for g in pg):
        out += ["## Speedup model fed this run's timings", "",
                "`evaluation/speedup.py` with the timings measured here (ms; *round overhead* = a round's cost "
                "besides its drafter forwards and its verify forward: draft head and host time) and the "
                "measured acceptance per drafted round.", ""]
        rows = []
        for g, mc in model.items():
            if not mc:
                continue
            t = mc["timing"]
            rows.append([g, fmt(t["drafter_prefill_ms"], digits=2), fmt(t["drafter_step_ms"], digits=2),
                         fmt(t["target_prefill_ms"], digits=2), fmt(t["target_step_ms"], digits=2),
                         fmt(t["verify_ms_per_token"], digits=2), fmt(t["adapter_ms"], digits=2), t["output_tokens"],
                         fmt(mc["acceptance_length_fed"], digits=3), fmt(mc["predicted_e2e"], digits=3),
                         fmt(mc["measured_e2e"], digits=3), fmt(mc["relative_error"], pct=True)])
        out += [_table(["γ", "drafter prefill", "drafter step", "target prefill", "target step", "verify/token",
                        "round overhead", "tokens", "acceptance", "predicted e2e", "measured e2e", "error"], rows), ""]
    return out


def _wall_clock_md(pg: dict[str, Any]) -> list[str]:
    """Mean wall-clock components per pair and γ, and the target-only baseline."""
    out: list[str] = []
    out += ["## Wall-clock breakdown (mean ms per pair)", ""]
    gs = list(pg)
    rows = [[label] + [fmt((pg[g].get("timing_ms") or {}).get(k), digits=2) for g in gs] for k, label in TIMING_ROWS]
    rows.append(["hidden fraction of the drafter's prefill-phase work"]
                + [fmt((pg[g].get("timing_ms") or {}).get("hidden_fraction"), pct=True) for g in gs])
    base = pg[gs[0]].get("baseline_timing_ms") or {}
    out += [_table(["component"] + [f"γ={g}" for g in gs], rows), "",
            f"Target-only baseline (same pairs, same run): vision {fmt(base.get('target_vision_ms'), digits=2)} ms, "
            f"prefill {fmt(base.get('target_prefill_ms'), digits=2)} ms, decode {fmt(base.get('decode_ms'), digits=2)} "
            f"ms ({fmt(base.get('decode_steps'), digits=1)} steps), total {fmt(base.get('total_ms'), digits=2)} ms.", ""]
    return out


def _lossless_md(pg: dict[str, Any]) -> list[str]:
    """Whether every speculative output equals the target-only greedy output."""
    out: list[str] = []
    out += ["## Lossless check", ""]
    bad = {g: a.get("first_divergences") for g, a in pg.items() if a.get("lossless_mismatches")}
    if not bad:
        out += ["Every speculative output equals the target-only greedy output token for token.", ""]
    else:
        for g, d in bad.items():
            out.append(f"- γ={g}: {len(d)} pair(s) differ; first divergence at token " +
                       ", ".join(f"{v} (`{k}`)" for k, v in list(d.items())[:10]))
        out.append("")
    return out


def _cross_check_md(cross: dict[str, Any]) -> list[str]:
    """Measured vs simulated rounds (store runs only): agreement and the disagreeing rounds."""
    if not cross.get("per_gamma"):
        return []
    out: list[str] = []
    out += ["## Cross-check: measured vs simulated rounds", ""]
    dis = cross.get("disagreements") or []
    out.append(f"{cross['pairs']} pairs; {len(dis)} disagreeing rounds ({cross['disagreements_near_tie']} at a "
               f"logit margin < "
               f"{cross['near_tie_threshold']}); goal: agreement >= {100 * cross['goal_round_agreement']:.0f} %.")
    if cross.get("store_vs_baseline_token_mismatches"):
        out.append(f"Store answers differing from this run's baseline: "
                   f"{', '.join(cross['store_vs_baseline_token_mismatches'][:10])}.")
    out.append("")
    if dis:
        rows = [[d["pair_id"], d["gamma"], d["start"], d["measured_accepted"], fmt(d["simulated_accepted"]),
                 fmt(d["online_min_margin"], digits=5), fmt(d["offline_draft_margin"], digits=5)]
                for d in dis[:30]]
        out += ["Each measured round is compared with what the simulation accepts for a round starting at "
                "the same position.", "",
                _table(["pair", "γ", "round start", "measured", "simulated", "online min margin",
                        "offline margin"], rows), ""]
    return out


def measured_table(summaries: list[dict[str, Any]], gamma: int = 5) -> str:
    """One row per configuration (benchmark_e2e): measured acceptance, speedups, lossless mismatches."""
    rows = []
    for s in summaries:
        g = f"gamma{gamma}"
        rows.append([s.get("name"), s.get("mode"), s.get("n_pairs"), fmt(s.get(f"acceptance_length_{g}"), digits=3),
                     fmt(s.get(f"simulated_acceptance_length_{g}"), digits=3),
                     fmt(s.get(f"accept_rate_{g}"), pct=True), fmt(s.get(f"tokens_per_round_{g}"), digits=2),
                     fmt(s.get(f"speedup_e2e_{g}"), digits=3), fmt(s.get(f"speedup_decode_{g}"), digits=3),
                     fmt(s.get(f"predicted_speedup_e2e_{g}"), digits=3), fmt(s.get(f"lossless_mismatches_{g}"))])
    return _table(["configuration", "mode", "pairs", f"acc len γ={gamma}", "simulated", "accept rate", "tokens/round",
                   "e2e speedup", "decode speedup", "predicted e2e", "lossless mismatches"], rows)
