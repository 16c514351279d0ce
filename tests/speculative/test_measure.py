"""Measurement arithmetic: round replay, per-round comparison, records, aggregates, speedup model."""

from __future__ import annotations

import pytest
import torch

from egpt_core.evaluation.metrics import runs_from_each_position, simulate_rounds
from egpt_core.speculative import measure
from egpt_core.speculative.loop import Generation, RoundRecord
from egpt_core.speculative.sessions import Timeline


def test_round_replay_equals_the_evaluation_simulation():
    """The per-round replay sums to exactly what `egpt evaluate`'s simulate_rounds counts."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 30, (1,), generator=g))
        accept = (torch.rand(n, generator=g) < 0.7).tolist()
        for gamma in (1, 3, 5, 8):
            rounds = measure.simulated_rounds(accept, gamma)
            ref = simulate_rounds(runs_from_each_position(torch.tensor([accept])), torch.tensor([n]), gamma)
            assert sum(a for _, a in rounds) == int(ref["accepted"][0])
            assert len(rounds) == int(ref["rounds"][0])
            assert sum(a for s, a in rounds if s + gamma <= n) == int(ref["accepted_full"][0])


def test_compare_rounds_judges_each_round_at_its_own_start():
    accept = [True, True, False, True, True, True, False, True]
    #          run-from:  2     1     0      3    2     1     0      1
    measured = [(0, 2), (3, 2), (6, 0), (7, 1)]   # (3, 2) disagrees: the offline run from 3 is 3 -> min(γ=3, 3) = 3
    assert measure.compare_rounds(measured, accept, 3) == [2, 3, 0, 1]
    assert measure.compare_rounds([(9, 0)], accept, 3) == [None]  # past the answer: no offline decision


def _gen(rounds: list[RoundRecord], out: list[int], timings: dict) -> Generation:
    return Generation(out, rounds, Timeline(), timings)


def test_pair_record_counts_full_rounds_like_the_simulation():
    out = list(range(12))
    rounds = [RoundRecord(0, 5, 5, 6), RoundRecord(6, 5, 2, 3), RoundRecord(9, 3, 2, 3)]  # last window cut at 12
    base = _gen([], out, {"target_vision_ms": 1.0, "target_prefill_ms": 2.0, "decode_ms": 11.0,
                          "decode_steps": 11.0, "total_ms": 14.0})
    sd = _gen(rounds, out, {"total_ms": 7.0, "prefill_phase_ms": 3.0})
    rec = measure.pair_record(sd, base, 5)
    assert rec["lossless"] and rec["first_divergence"] == -1
    assert (rec["rounds"], rec["full_rounds"], rec["drafted"], rec["accepted"], rec["accepted_full"]) == (3, 2, 13, 9, 7)
    assert rec["accept_per_round"] == pytest.approx(3.5)
    assert rec["speedup_e2e"] == pytest.approx(2.0) and rec["speedup_decode"] == pytest.approx(11.0 / 4.0)
    bad = measure.pair_record(_gen(rounds, out[:5] + [99] + out[6:], {"total_ms": 7.0}), base, 5)
    assert not bad["lossless"] and bad["first_divergence"] == 5


def test_aggregate_is_a_ratio_of_sums_and_counts_mismatches():
    def row(pid, full, acc_full, base_total, total, lossless=True):
        return {"status": "ok", "gamma": 5, "pair_id": pid, "full_rounds": full, "accepted_full": acc_full, "rounds": full,
                "accepted": acc_full, "drafted": 5 * full, "target_steps": 0, "n_tokens": 10,
                "baseline_total_ms": base_total, "total_ms": total, "baseline_decode_ms": base_total / 2,
                "prefill_phase_ms": 0.0, "lossless": lossless, "first_divergence": -1 if lossless else 3,
                "speedup_e2e": base_total / total}
    agg = measure.aggregate([row("a", 2, 8, 100.0, 50.0), row("b", 1, 0, 100.0, 150.0, lossless=False)], [5])["5"]
    assert agg["acceptance_length"] == pytest.approx(8 / 3)
    assert agg["speedup_e2e"] == pytest.approx(200 / 200)
    assert agg["speedup_e2e_mean_of_pairs"] == pytest.approx((2.0 + 100 / 150) / 2)
    assert agg["lossless_mismatches"] == 1 and agg["first_divergences"] == {"b": 3}


def test_cross_check_reports_every_disagreeing_round_with_its_margins():
    """A measured round that differs from the offline decision is listed (pair, γ, start, both counts,
    both margins); agreement is the share of measured rounds that match."""
    V, D, T = 6, 4, 6
    W = torch.eye(V, D)
    ids = [0, 1, 2, 3, 0, 1]
    pred = torch.stack([W[i] * 3 for i in [0, 1, 3, 3, 0, 1]])   # wrong at position 2
    check = measure.CrossCheck(W, [3], 50, torch.device("cpu"))
    rec = {"round_start": [0, 4], "round_accepted": [3, 2], "round_min_margin": [0.5, 0.7], "baseline_ids": ids}
    sim = check.add("p", pred, torch.stack([W[i] for i in ids]), ids, [3.0] * T, {3: rec})
    assert sim[3] == [2, 3]  # offline trajectory: accept 0,1, correct 2 (s=3); accept 3,4,5 (s=6)
    res = check.result({"3": {"acceptance_length": 3.0}})
    assert res["per_gamma"]["3"]["rounds"] == 2 and res["per_gamma"]["3"]["rounds_agree"] == 1
    (d,) = res["disagreements"]
    assert (d["pair_id"], d["gamma"], d["start"], d["measured_accepted"], d["simulated_accepted"]) == ("p", 3, 0, 3, 2)
    assert d["online_min_margin"] == 0.5 and d["offline_draft_margin"] == 3.0 and d["position"] == 2
