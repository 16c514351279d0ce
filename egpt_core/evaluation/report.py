"""Markdown reports: one run's ``report.md`` and the cross-run ``comparison.md`` (+ ``comparison.json``)."""

from __future__ import annotations

import json
from typing import Any

from egpt_core.fsio import Location, dumps_json


def _write_text(dest: Location, text: str) -> str:
    """``text`` (UTF-8) into ``dest``, atomically (a crash leaves the old file or none, never a part)."""
    dest.write_atomic(text.encode())
    return dest.url


def fmt(v: Any, pct: bool = False, digits: int = 4) -> str:
    """Numbers for tables: None -> '—', fractions as percentages when ``pct``."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{100 * v:.2f} %" if pct else f"{v:.{digits}f}"
    return str(v)


def _flips(tok: dict) -> str:
    prec = tok.get("lm_head_precision") or {}
    if prec.get("top1_changed_pred") is None:
        return f"not measured (store head {prec.get('store_dtype')}; lm_head_dtype='float32' measures it)"
    return f"{prec['top1_changed_pred']} / {prec['top1_changed_target']} of {prec['positions']}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_report(m: dict[str, Any]) -> str:
    """The markdown of one evaluation (``m`` = metrics.json content), section by section."""
    out: list[str] = [f"# Evaluation: {m.get('name', '')}", ""]
    for section in (_inputs_md, _cosine_md, _hidden_acceptance_md, _token_md, _acceptance_length_md, _speedup_md,
                    _per_position_md):
        out += section(m)
    out += ["![summary](metrics_summary.png)", "", "![per position](per_position.png)", ""]
    return "\n".join(out)


def _inputs_md(m: dict[str, Any]) -> list[str]:
    """The stores, prediction source, fingerprints and counts, then the notes."""
    inp = m.get("inputs", {})
    cnt = m["counts"]
    out: list[str] = []
    out += ["## Inputs", ""]
    rows = [
        ["store", f"`{inp.get('store')}`"],
        ["store fingerprint", f"`{inp.get('store_fingerprint')}`"],
        ["store mode", inp.get("store_mode")],
        ["prediction", inp.get("prediction")],
    ]
    if inp.get("adapter_run"):
        rows += [["adapter run", f"`{inp['adapter_run']}` ({inp.get('adapter_which')})"],
                 ["adapter level", inp.get("adapter_level")],
                 ["adapter fingerprint", f"`{inp.get('adapter_fingerprint')}`"]]
    if inp.get("lora"):
        rows += [["L6 LoRA", f"`{inp['lora']}` (rows re-extracted teacher-forced with the merged drafter)"],
                 ["LoRA fingerprint", f"`{inp.get('lora_fingerprint')}`"]]
    rows += [
        ["target LM head", inp.get("lm_head")],
        ["evaluation fingerprint", f"`{inp.get('eval_fingerprint')}`"],
        ["pairs / positions", f"{cnt['n_pairs']} / {cnt['n_positions']}"],
        ["pairs skipped (status != ok)", inp.get("n_pairs_not_ok", 0)],
        ["response length mean / min / max",
         f"{fmt(cnt['length']['mean'], digits=2)} / {fmt(cnt['length']['min'], digits=0)} / "
         f"{fmt(cnt['length']['max'], digits=0)}"],
    ]
    out += [_table(["input", "value"], rows), ""]
    for note in m.get("notes", []):
        out.append(f"> **Note:** {note}")
    if m.get("notes"):
        out.append("")
    return out


def _cosine_md(m: dict[str, Any]) -> list[str]:
    """Pooled and per-pair cosine."""
    out: list[str] = []
    out += ["## Summary", ""]
    pooled, pair = m["cos"]["pooled"], m["cos"]["pair_mean"]
    out += [_table(
        ["metric", "mean", "std", "min", "max"],
        [["cos_pooled (over all positions)", fmt(pooled["mean"]), fmt(pooled["std"]), fmt(pooled["min"]),
          fmt(pooled["max"])],
         ["cos_pair_mean (mean of per-pair means)", fmt(pair["mean"]), fmt(pair["std"]), fmt(pair["min"]),
          fmt(pair["max"])]],
    ), "", f"Pooled cosine median (from the 200-bin histogram): {fmt(pooled.get('median_hist'))}.", ""]
    return out


def _hidden_acceptance_md(m: dict[str, Any]) -> list[str]:
    """Accept@τ and consecutive runs from position 0."""
    out: list[str] = []
    out += ["## Hidden-state acceptance (cos > τ)", ""]
    rows = []
    for t, rate in m["accept"].items():
        c = m["consecutive"][t]
        rows.append([t, fmt(rate, pct=True), fmt(c["mean"], digits=2), fmt(c["std"], digits=2),
                     fmt(c["median"], digits=1), fmt(c["max"], digits=0)])
    out += [_table(["τ", "accept@τ", "consecutive from 0: mean", "std", "median", "max"], rows), ""]
    return out


def _token_md(m: dict[str, Any]) -> list[str]:
    """Top-k, argmax agreement and self-match through the target LM head."""
    out: list[str] = []
    tok = m.get("token")
    out += ["## Token metrics (target LM head)", ""]
    if tok:
        ref = {"target_response_ids": "the target's stored response token ids",
               "argmax_target_lm_head": "argmax of the LM head on the target row (no stored ids)",
               "mixed": "stored ids where present, else argmax of the target row"}.get(tok["reference"], tok["reference"])
        out += [_table(["metric", "value"], [
            ["top-1 (pred argmax == target's next token)", fmt(tok["top1"], pct=True)],
            ["top-5", fmt(tok["top5"], pct=True)],
            ["top-10", fmt(tok["top10"], pct=True)],
            ["argmax_agreement (argmax W·pred == argmax W·target)", fmt(tok["argmax_agreement"], pct=True)],
            ["token consecutive from 0: mean / median / max",
             f"{fmt(tok['consecutive']['mean'], digits=2)} / {fmt(tok['consecutive']['median'], digits=1)} / "
             f"{fmt(tok['consecutive']['max'], digits=0)}"],
            ["reference token", ref],
            ["target self-match (argmax W·target == stored id)", fmt(tok["target_lm_head_self_match"], pct=True)],
            ["positions whose top-1 changes with the head in bf16 (pred / target)", _flips(tok)],
        ]), ""]
    else:
        out += ["No target LM head in the store: token metrics omitted; acceptance lengths below use the "
                "hidden-state proxy.", ""]
    return out


def _acceptance_length_md(m: dict[str, Any]) -> list[str]:
    """Acceptance length per draft window γ (sim / empirical / rounds)."""
    out: list[str] = []
    basis = m.get("acc_len_basis")
    out += ["## Acceptance length per draft window γ", ""]
    if basis:
        al = m["acceptance_length"][basis]
        out += [f"Basis: `{basis}`. *sim* = SpecForge Σ_k Π_(j<k) p_j from per-position rates; *empirical* = "
                "mean over pairs of min(γ, leading run from position 0); *rounds* = simulated SD rounds over the "
                "whole response (draft from the first unverified position, accept the matching run, +1 "
                "target token), mean accepted per full-window round.", ""]
        rows = [[g, fmt(al["sim"][g], digits=3), fmt(al["empirical"][g], digits=3), fmt(al["rounds"][g], digits=3),
                 fmt(al["tokens_per_round"][g], digits=3), al["rounds_counted"][g]] for g in al["sim"]]
        out += [_table(["γ", "sim", "empirical", "rounds", "tokens/round (all rounds)", "full rounds"], rows), ""]
    return out


def _speedup_md(m: dict[str, Any]) -> list[str]:
    """Expected speedup per γ from the timing model."""
    out: list[str] = []
    out += ["## Expected speedup", ""]
    sp = m.get("speedup") or {}
    if sp.get("by_gamma"):
        tm = sp["timing"]
        out += [f"{sp.get('note', '')}. Acceptance basis: `{sp['basis']}`. Timing (ms): drafter prefill "
                f"{tm['drafter_prefill_ms']}, drafter step {tm['drafter_step_ms']}, target prefill "
                f"{tm['target_prefill_ms']}, target step {tm['target_step_ms']}, verify/token "
                f"{tm['verify_ms_per_token']}, adapter {tm['adapter_ms']}; output tokens {tm['output_tokens']}.", ""]
        rows = []
        for g, d in sp["by_gamma"].items():
            sim = (sp.get("by_gamma_sim") or {}).get(g)
            if d is None:
                rows.append([g, "—", "—", "—", "—", "—", fmt(sim["e2e_speedup"], digits=3) if sim else "—"])
                continue
            rows.append([g, fmt(d["acceptance_length"], digits=3), fmt(d["round_ms"], digits=2),
                         fmt(d["sd_ms_per_token"], digits=2), fmt(d["decode_speedup"], digits=3),
                         fmt(d["e2e_speedup"], digits=3), fmt(sim["e2e_speedup"], digits=3) if sim else "—"])
        out += [_table(["γ", "acc len", "round ms", "SD ms/token", "decode speedup", "e2e speedup",
                        "e2e speedup (sim acc len)"], rows), ""]
    else:
        out += [sp.get("note", "speedup omitted: no timing given"), ""]
    return out


def _per_position_md(m: dict[str, Any]) -> list[str]:
    """The first 20 positions."""
    out: list[str] = []
    out += ["## Per position (first 20)", ""]
    pp = m["per_position"]
    taus = list(pp["accept"])
    header = ["t", "pairs", "mean cos"] + [f"acc@{t}" for t in taus]
    if "token_top1" in pp:
        header.append("token top-1")
    rows = []
    for i in pp["position"][:20]:
        r = [i, pp["count"][i], fmt(pp["cos_mean"][i])] + [fmt(pp["accept"][t][i], pct=True) for t in taus]
        if "token_top1" in pp:
            r.append(fmt(pp["token_top1"][i], pct=True))
        rows.append(r)
    out += [_table(header, rows), ""]
    return out


def write_report(m: dict[str, Any], out: Location) -> str:
    """``report.md`` of metrics document ``m`` into directory ``out`` (atomic); returns its URL."""
    return _write_text(out.child("report.md"), render_report(m))


# --------------------------------------------------------------------------------------------------
COMPARE_COLUMNS: list[tuple[str, str, bool]] = [
    ("cos_pooled", "cos_pooled", False),
    ("cos_pair_mean", "cos_pair_mean", False),
    ("accept@0.90", "accept@0.90", True),
    ("token_top1", "top-1", True),
    ("token_top5", "top-5", True),
    ("acc_len_sim_gamma5", "acc_len sim γ=5", False),
    ("acc_len_rounds_gamma5", "acc_len rounds γ=5", False),
    ("speedup_e2e_gamma5", "e2e speedup γ=5", False),
]


#: measured columns (stage 5 summary keys, joined by run name; stored as ``measured_<key>``) shown
#: next to the simulated ones when given
MEASURED_COLUMNS: list[tuple[str, str, bool]] = [
    ("measured_acceptance_length_gamma5", "measured acc len γ=5", False),
    ("measured_speedup_e2e_gamma5", "measured e2e speedup γ=5", False),
    ("measured_lossless_mismatches_gamma5", "lossless mismatches γ=5", False),
]


def check_metrics_doc(doc: Any, where: str) -> dict[str, Any]:
    """An evaluation's metrics document (``metrics.json``), or ConfigError naming ``where``."""
    from egpt_core.errors import ConfigError

    if not isinstance(doc, dict) or not isinstance(doc.get("summary"), dict) or not doc["summary"]:
        found = f"a JSON {type(doc).__name__.replace('dict', 'object')}"
        if isinstance(doc, dict):
            found += f" with keys {sorted(doc)[:6]}" if doc else " with no keys"
        raise ConfigError(f"{where} is not an evaluation's metrics.json (written by `egpt evaluate`); found {found}")
    return doc


def read_metrics(src: str | Location, storage_options: dict | None = None) -> dict[str, Any]:
    """Read and check one ``metrics.json`` (ConfigError naming the file when it is missing or not one)."""
    from egpt_core.errors import ConfigError

    loc = Location.of(src, storage_options)
    url = loc.url
    try:
        raw = loc.read()
    except FileNotFoundError:
        raise ConfigError(f"{url}: no such file (pass the metrics.json files `egpt evaluate` wrote)") from None
    except IsADirectoryError:
        raise ConfigError(f"{url} is a directory; pass its metrics.json") from None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{url} is not valid JSON ({exc})") from None
    return check_metrics_doc(doc, url)


def comparison_rows(results: list[dict[str, Any]], measured: dict[str, dict[str, Any]] | None = None
                    ) -> list[dict[str, Any]]:
    """One row per evaluation; ``measured`` (name -> stage-5 summary) adds the measured columns."""
    rows = []
    for i, m in enumerate(results):
        s = m.get("summary", m)
        row = {"name": m.get("name") or f"run{i}"}
        for key, _, _ in COMPARE_COLUMNS:
            row[key] = s.get(key)
        row["acc_len_basis"] = s.get("acc_len_basis")
        row["speedup_basis"] = s.get("speedup_basis")
        row["n_pairs"] = s.get("n_pairs")
        row["store_fingerprint"] = (m.get("inputs") or {}).get("store_fingerprint")
        if measured is not None:
            for key, _, _ in MEASURED_COLUMNS:
                row[key] = (measured.get(row["name"]) or {}).get(key.removeprefix("measured_"))
        rows.append(row)
    return rows


def compare_runs(results: list[dict[str, Any]], out: str | Location, storage_options: dict | None = None,
                 measured: dict[str, dict[str, Any]] | None = None) -> str:
    """Write ``comparison.md`` and ``comparison.json`` (one row per run) under ``out`` (a Location, or a
    URL with its ``storage_options``); return the markdown.

    ``measured`` (run name -> `egpt speculate` summary) adds the real-loop columns next to the simulated
    ones. ``out_url`` must be new, empty or an earlier comparison (replaced: it is derived from the runs'
    metrics, which stay where they are); see :mod:`egpt_core.outdir`."""
    from egpt_core import outdir
    from egpt_core.errors import ConfigError

    if not results:
        raise ConfigError("nothing to compare: pass one or more metrics.json files")
    for i, doc in enumerate(results):
        check_metrics_doc(doc, f"run {i + 1} ({doc.get('name') if isinstance(doc, dict) else '?'})")
    out = Location.of(out, storage_options)
    with outdir.claim_output(out, "comparison", None):
        return _compare_runs(results, out, measured)


def _compare_runs(results: list[dict[str, Any]], out: Location,
                  measured: dict[str, dict[str, Any]] | None) -> str:
    rows = comparison_rows(results, measured)
    columns = COMPARE_COLUMNS + (MEASURED_COLUMNS if measured is not None else [])
    header = ["run"] + [label for _, label, _ in columns] + ["pairs", "acc-len basis"]
    table = [[r["name"]] + [fmt(r[k], pct=pct, digits=3) for k, _, pct in columns]
             + [fmt(r["n_pairs"]), r["acc_len_basis"] or "—"] for r in rows]
    md = ["# Comparison", "", _table(header, table), ""]
    stores = {r["store_fingerprint"] for r in rows}
    if len(stores) > 1:
        md += ["> **Note:** the runs were evaluated on different stores (fingerprints "
               + ", ".join(f"`{s}`" for s in sorted(map(str, stores))) + "); their numbers are not comparable.", ""]
    md += ["*sim* = SpecForge simulated acceptance length from per-position rates (from position 0); *rounds* = "
           "simulated SD rounds over the whole response; speedup uses the rounds acceptance length and the "
           "measured timing (— when no timing was given).", ""]
    if measured is not None:
        md += ["*measured* = the real draft -> verify loop (`egpt speculate`, resync) on the evaluated pairs: "
               "mean accepted drafts per full round, wall-clock speedup vs the target-only greedy baseline of the "
               "same run, and the pairs whose output differed from that baseline (— for runs not measured).", ""]
    text = "\n".join(md)
    _write_text(out.child("comparison.md"), text)
    _write_text(out.child("comparison.json"), dumps_json({"runs": rows}, indent=2))
    return text
