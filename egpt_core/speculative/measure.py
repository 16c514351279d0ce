"""From measured generations to numbers: per-(pair, γ) records, aggregates per γ, and the two
cross-checks that prove the offline numbers (issue 14 §6):

(a) measured acceptance vs `egpt evaluate`'s simulated ``rounds`` acceptance on a ``shared_prefix``
    (or ``retf``) store of the same pairs: the same metric code (`MetricAccumulator`) over the same
    pairs, plus a round-by-round replay that must agree on >= 99 % of rounds; every disagreement is
    listed with its logit margins (a near-tie, or a bug);
(b) the speedup model (`evaluation/speedup.py`) fed the timings this run measured, against the
    measured end-to-end speedup.

Acceptance length (the field's convention, as in EAGLE/SpecForge): mean accepted drafts per round,
over rounds whose whole window lies inside the answer (``full`` rounds: start + γ <= answer length),
the same rounds the offline simulation counts; tokens per round = output tokens / target forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from egpt_core.config import TimingConfig
from egpt_core.evaluation.metrics import MetricAccumulator, runs_from_each_position
from egpt_core.evaluation.speedup import expected_speedup
from egpt_core.speculative.loop import Generation

#: round agreement required between the real loop and the offline simulation
AGREEMENT_GOAL = 0.99
#: a disagreement whose smallest logit margin is below this is reported as a numerical near-tie
NEAR_TIE = 1e-3

SD_TIMING_FIELDS = ("drafter_vision_ms", "drafter_prefill_ms", "hidden_drafting_ms", "target_vision_ms",
                    "target_prefill_ms", "prefill_phase_ms", "overlap_ms", "hidden_fraction", "drafter_forward_ms",
                    "drafter_forwards", "draft_head_ms", "drafting_ms", "verify_ms", "verify_forwards", "total_ms")
BASELINE_TIMING_FIELDS = ("target_vision_ms", "target_prefill_ms", "decode_ms", "decode_steps", "total_ms")


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first differing token (-1 when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return -1 if len(a) == len(b) else min(len(a), len(b))


def pair_record(gen: Generation, baseline: Generation, gamma: int) -> dict[str, Any]:
    """One sd_pairs.parquet row (without the pair's ids, which the caller adds)."""
    n = len(gen.output_ids)
    drafted_rounds = [r for r in gen.rounds if r.drafted > 0]
    full = [r.start + gamma <= n for r in drafted_rounds]
    rec: dict[str, Any] = {
        "gamma": gamma,
        "n_tokens": n,
        "output_ids": list(gen.output_ids),
        "baseline_ids": list(baseline.output_ids),
        "lossless": gen.output_ids == baseline.output_ids,
        "first_divergence": first_divergence(gen.output_ids, baseline.output_ids),
        "rounds": len(drafted_rounds),
        "target_steps": len(gen.rounds) - len(drafted_rounds),
        "full_rounds": int(sum(full)),
        "drafted": int(sum(r.drafted for r in drafted_rounds)),
        "accepted": int(sum(r.accepted for r in drafted_rounds)),
        "accepted_full": int(sum(r.accepted for r, f in zip(drafted_rounds, full) if f)),
        "round_start": [r.start for r in drafted_rounds],
        "round_drafted": [r.drafted for r in drafted_rounds],
        "round_accepted": [r.accepted for r in drafted_rounds],
        "round_full": full,
        "round_min_margin": [_round_margin(r) for r in drafted_rounds],
        "drafter_own_ids": list(gen.drafter_own_ids) if gen.drafter_own_ids is not None else None,
    }
    rec["accept_per_round"] = rec["accepted_full"] / rec["full_rounds"] if rec["full_rounds"] else None
    rec["tokens_per_round"] = n / max(1, len(gen.rounds))
    for k in SD_TIMING_FIELDS:
        rec[k] = float(gen.timings.get(k, 0.0))
    for k in BASELINE_TIMING_FIELDS:
        rec[f"baseline_{k}"] = float(baseline.timings[k])
    rec["speedup_e2e"] = rec["baseline_total_ms"] / rec["total_ms"] if rec["total_ms"] > 0 else None
    sd_decode = rec["total_ms"] - rec["prefill_phase_ms"]
    rec["speedup_decode"] = rec["baseline_decode_ms"] / sd_decode if sd_decode > 0 else None
    return rec


def baseline_record(baseline: Generation) -> dict[str, Any]:
    """A target_only row: the baseline's ids and timings."""
    rec: dict[str, Any] = {"gamma": 0, "n_tokens": len(baseline.output_ids), "output_ids": list(baseline.output_ids),
                           "baseline_ids": list(baseline.output_ids), "lossless": True, "first_divergence": -1}
    for k in BASELINE_TIMING_FIELDS:
        rec[f"baseline_{k}"] = float(baseline.timings[k])
    rec["total_ms"] = rec["baseline_total_ms"]
    rec["speedup_e2e"] = 1.0
    return rec


def _round_margin(r) -> float | None:
    """Smallest logit margin among the positions this round compared (draft and target side)."""
    k = min(r.accepted + 1, r.drafted)
    vals = list(r.draft_margins[:k]) + list(r.target_margins[:k])
    return float(min(vals)) if vals else None


def _sum(rows: list[dict], key: str) -> float:
    return float(sum(r.get(key) or 0.0 for r in rows))


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def aggregate(records: list[dict[str, Any]], gammas: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per γ: measured acceptance length, accept rate, tokens/round, speedups, lossless mismatches, timings."""
    out: dict[str, dict[str, Any]] = {}
    for g in gammas:
        rows = [r for r in records if r.get("status") == "ok" and r.get("gamma") == g]
        if not rows:
            out[str(g)] = {"n_pairs": 0}
            continue
        full, acc_full = _sum(rows, "full_rounds"), _sum(rows, "accepted_full")
        rounds, drafted, accepted = _sum(rows, "rounds"), _sum(rows, "drafted"), _sum(rows, "accepted")
        forwards = _sum(rows, "rounds") + _sum(rows, "target_steps")
        mismatched = [r for r in rows if not r["lossless"]]
        base_total, sd_total = _sum(rows, "baseline_total_ms"), _sum(rows, "total_ms")
        base_decode = _sum(rows, "baseline_decode_ms")
        sd_decode = sd_total - _sum(rows, "prefill_phase_ms")
        agg = {
            "n_pairs": len(rows),
            "acceptance_length": acc_full / full if full else None,
            "acceptance_length_all_rounds": accepted / rounds if rounds else None,
            "full_rounds": int(full),
            "rounds": int(rounds),
            "target_steps": int(_sum(rows, "target_steps")),
            "drafted": int(drafted),
            "accepted": int(accepted),
            "accept_rate": accepted / drafted if drafted else None,
            "tokens_per_round": _sum(rows, "n_tokens") / forwards if forwards else None,
            "output_tokens_mean": _mean(rows, "n_tokens"),
            "speedup_e2e": base_total / sd_total if sd_total > 0 else None,
            "speedup_e2e_mean_of_pairs": _mean(rows, "speedup_e2e"),
            "speedup_decode": base_decode / sd_decode if sd_decode > 0 else None,
            "lossless_mismatches": len(mismatched),
            "lossless_mismatch_rate": len(mismatched) / len(rows),
            "first_divergences": {r["pair_id"]: r["first_divergence"] for r in mismatched},
            "timing_ms": {k: _mean(rows, k) for k in SD_TIMING_FIELDS},
            "baseline_timing_ms": {k: _mean(rows, f"baseline_{k}") for k in BASELINE_TIMING_FIELDS},
        }
        out[str(g)] = agg
    return out


# ------------------------------------------------------------------------------------------------
# (a) measured vs simulated
# ------------------------------------------------------------------------------------------------
def simulated_rounds(accept: Sequence[bool], gamma: int) -> list[tuple[int, int]]:
    """The offline SD-round replay of `evaluation.metrics.simulate_rounds`, per round: (start, accepted)."""
    run_from = _runs(accept)
    out, s, n = [], 0, len(accept)
    while s < n:
        a = min(gamma, run_from[s])
        out.append((s, a))
        s += a + 1
    return out


def _runs(accept: Sequence[bool]) -> list[int]:
    ok = torch.tensor([list(map(bool, accept))], dtype=torch.bool)
    return runs_from_each_position(ok)[0].tolist() if len(accept) else []


def compare_rounds(measured: list[tuple[int, int]], accept: Sequence[bool], gamma: int) -> list[int | None]:
    """The offline decision for each measured round: min(γ, run of offline accepts from the round's
    start) - what the simulation accepts for a round starting there. A round agrees when it equals the
    measured count; one disagreement does not make the later rounds of the pair disagree."""
    run_from = _runs(accept)
    return [min(gamma, run_from[s]) if s < len(run_from) else None for s, _ in measured]


class CrossCheck:
    """Collects, per measured (pair, γ), the store's simulated rounds and the MetricAccumulator of
    `egpt evaluate` over the same pairs (predictions computed exactly as `evaluate` does)."""

    def __init__(self, lm_head: torch.Tensor, gammas: Sequence[int], max_positions: int, device: torch.device):
        self.gammas = list(gammas)
        self.acc = MetricAccumulator([0.9], self.gammas, max_positions, lm_head, device=device)
        self.rounds_total = {str(g): 0 for g in self.gammas}
        self.rounds_agree = {str(g): 0 for g in self.gammas}
        self.disagreements: list[dict[str, Any]] = []
        self.store_target_mismatch: list[str] = []
        self.pairs = 0

    def add(self, pair_id: str, pred: torch.Tensor, target_rows: torch.Tensor, target_ids: list[int],
            offline_margins: list[float], records: dict[int, dict[str, Any]]) -> dict[int, list[int]]:
        """pred / target_rows [T, D]: the offline prediction and target rows of one pair; ``records``: the
        measured rows of this pair by γ. Returns the simulated accepted count per round, by γ."""
        T = target_rows.shape[0]
        mask = torch.ones(1, T, dtype=torch.bool)
        tok = torch.tensor([target_ids[:T] + [-1] * (T - len(target_ids[:T]))], dtype=torch.long)
        self.acc.update(pred[None].float(), target_rows[None].float(), mask, tok)
        self.pairs += 1
        W = self.acc.lm_head
        accept = ((pred.to(W.device, torch.float32) @ W.T).argmax(-1).cpu() == tok[0]).tolist()
        out: dict[int, list[int]] = {}
        for g, rec in records.items():
            sim = simulated_rounds(accept, g)
            out[g] = [a for _, a in sim]
            if rec.get("baseline_ids") != list(target_ids):
                self.store_target_mismatch.append(f"{pair_id} (γ={g})")
            measured = list(zip(rec["round_start"], rec["round_accepted"]))
            offline = compare_rounds(measured, accept, g)
            bad = [i for i, ((_, a), b) in enumerate(zip(measured, offline)) if a != b]
            self.rounds_total[str(g)] += len(measured)
            self.rounds_agree[str(g)] += len(measured) - len(bad)
            for i in bad:
                s, a = measured[i]
                j = s + min(a, offline[i] if offline[i] is not None else a)  # first position they disagree on
                self.disagreements.append({
                    "pair_id": pair_id, "gamma": g, "round": i, "start": s, "measured_accepted": a,
                    "simulated_accepted": offline[i], "position": j,
                    "online_min_margin": rec["round_min_margin"][i],
                    "offline_draft_margin": offline_margins[j] if j < len(offline_margins) else None,
                })
        return out

    def result(self, measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
        metrics = self.acc.result() if self.pairs else None
        sim = (metrics or {}).get("acceptance_length", {}).get("token", {}).get("rounds", {})
        per_gamma = {}
        for g in self.gammas:
            m = (measured.get(str(g)) or {}).get("acceptance_length")
            s = sim.get(str(g))
            total = self.rounds_total[str(g)]
            per_gamma[str(g)] = {
                "measured": m, "simulated": s,
                "relative_difference": abs(m - s) / s if (m is not None and s) else None,
                "rounds": total, "rounds_agree": self.rounds_agree[str(g)],
                "round_agreement": self.rounds_agree[str(g)] / total if total else None,
            }
        near = [d for d in self.disagreements
                if min(abs(x) for x in (d["online_min_margin"], d["offline_draft_margin"]) if x is not None) < NEAR_TIE]
        return {
            "pairs": self.pairs,
            "per_gamma": per_gamma,
            "goal_round_agreement": AGREEMENT_GOAL,
            "near_tie_threshold": NEAR_TIE,
            "disagreements": self.disagreements,
            "disagreements_near_tie": len(near),
            "store_vs_baseline_token_mismatches": self.store_target_mismatch,
        }


# ------------------------------------------------------------------------------------------------
# (b) the speedup model
# ------------------------------------------------------------------------------------------------
def measured_timing(agg: dict[str, Any], records: list[dict[str, Any]], gamma: int) -> TimingConfig | None:
    """TimingConfig from this run's measurements at window γ (sums over its ok pairs).

    ``drafter_prefill_ms`` is the drafter's whole prefill-phase work (vision, prefill, round-0 drafts:
    what has to hide under the target's prefill); ``target_step_ms`` is the baseline's decode wall time per token (host time between forwards
    included, as in the baseline's total); ``drafter_step_ms`` the mean drafter forward; ``adapter_ms``
    everything else a round costs besides its drafter forwards and its verify forward (draft head,
    host bookkeeping); ``verify_ms_per_token`` what a verify forward costs above one decode forward,
    per draft token."""
    rows = [r for r in records if r.get("status") == "ok" and r.get("gamma") == gamma]
    if not rows or agg.get("acceptance_length") is None:
        return None
    eps = 1e-6
    steps = _sum(rows, "baseline_decode_steps")
    base_decode_wall = _sum(rows, "baseline_total_ms") - _sum(rows, "baseline_target_vision_ms") \
        - _sum(rows, "baseline_target_prefill_ms")
    forward_ms = _sum(rows, "baseline_decode_ms") / steps if steps else eps
    fwd = _sum(rows, "drafter_forwards")
    verifies = _sum(rows, "verify_forwards")
    drafted_per_verify = _sum(rows, "drafted") / verifies if verifies else 0.0
    verify_ms = _sum(rows, "verify_ms") / verifies if verifies else forward_ms
    decode_wall = _sum(rows, "total_ms") - _sum(rows, "prefill_phase_ms")
    other = decode_wall - _sum(rows, "drafter_forward_ms") - _sum(rows, "verify_ms")
    return TimingConfig(
        drafter_prefill_ms=max(eps, _mean(rows, "drafter_vision_ms") + _mean(rows, "drafter_prefill_ms")
                               + _mean(rows, "hidden_drafting_ms")),
        drafter_step_ms=max(eps, _sum(rows, "drafter_forward_ms") / fwd if fwd else eps),
        target_prefill_ms=max(eps, _mean(rows, "baseline_target_vision_ms") + _mean(rows, "baseline_target_prefill_ms")),
        target_step_ms=max(eps, base_decode_wall / steps if steps else eps),
        verify_ms_per_token=max(0.0, (verify_ms - forward_ms) / drafted_per_verify) if drafted_per_verify else 0.0,
        adapter_ms=max(0.0, other / verifies) if verifies else 0.0,
        output_tokens=max(1, round(_mean(rows, "n_tokens"))),
    )


def speedup_model_check(aggregates: dict[str, dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per γ: the speedup model's e2e prediction from measured timings + the measured acceptance per
    round (over every drafted round: what the number of rounds depends on) vs the measured e2e speedup
    (relative error)."""
    out: dict[str, Any] = {}
    for g, agg in aggregates.items():
        timing = measured_timing(agg, records, int(g))
        if timing is None or agg.get("speedup_e2e") is None:
            out[g] = None
            continue
        acc = agg.get("acceptance_length_all_rounds") or 0.0
        pred = expected_speedup(min(acc, float(g)), int(g), timing)
        measured = agg["speedup_e2e"]
        out[g] = {"timing": timing.model_dump(), "acceptance_length_fed": acc, "predicted_e2e": pred["e2e_speedup"],
                  "predicted_decode": pred["decode_speedup"], "measured_e2e": measured,
                  "measured_decode": agg.get("speedup_decode"),
                  "relative_error": abs(pred["e2e_speedup"] - measured) / measured}
    return out
