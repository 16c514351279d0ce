"""Hand-computed checks of every metric in egpt_core.evaluation.metrics."""

from __future__ import annotations

import math

import pytest
import torch
from eval_helpers import assert_close

from egpt_core.errors import ConfigError
from egpt_core.evaluation.metrics import (
    MetricAccumulator,
    runs_from_each_position,
    simulate_rounds,
    simulated_acceptance_length,
)


def _rows_with_cos(cos_values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """pred = e0, target = [c, sqrt(1-c^2)] -> cosine exactly c."""
    pred = torch.tensor([[1.0, 0.0]] * len(cos_values), dtype=torch.float64)
    target = torch.tensor([[c, math.sqrt(1 - c * c)] for c in cos_values], dtype=torch.float64)
    return pred, target


def _batch(pairs: list[list[float]]):
    S = max(len(p) for p in pairs)
    B = len(pairs)
    pred = torch.zeros(B, S, 2)
    target = torch.zeros(B, S, 2)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for i, cs in enumerate(pairs):
        p, t = _rows_with_cos(cs)
        pred[i, : len(cs)] = p.float()
        target[i, : len(cs)] = t.float()
        mask[i, : len(cs)] = True
    return pred, target, mask


PAIRS = [[0.99, 0.92, 0.50], [0.86, 0.96, 0.97, 0.10]]


@pytest.fixture(scope="module")
def cos_result():
    acc = MetricAccumulator(gammas=[1, 2, 3, 4], max_positions=10)
    acc.update(*_batch(PAIRS))
    return acc.result()


def test_cosine_pooled_vs_pair_mean(cos_result):
    r = cos_result
    assert r["counts"]["n_pairs"] == 2 and r["counts"]["n_positions"] == 7
    # pooled: (0.99+0.92+0.50+0.86+0.96+0.97+0.10)/7 = 5.30/7
    assert r["cos"]["pooled"]["mean"] == pytest.approx(5.30 / 7, abs=1e-6)
    # pair means: 2.41/3 = 0.80333, 2.89/4 = 0.7225 -> mean 0.762917, std(ddof=1) = |a-b|/sqrt(2)
    assert r["cos"]["pair_mean"]["mean"] == pytest.approx((2.41 / 3 + 2.89 / 4) / 2, abs=1e-6)
    assert r["cos"]["pair_mean"]["std"] == pytest.approx(abs(2.41 / 3 - 2.89 / 4) / math.sqrt(2), abs=1e-6)
    assert r["cos"]["pair_mean"]["min"] == pytest.approx(0.7225, abs=1e-6)
    assert r["cos"]["pooled"]["min"] == pytest.approx(0.10, abs=1e-6)
    assert r["cos"]["pooled"]["max"] == pytest.approx(0.99, abs=1e-6)
    # unbiased std of the 7 values: sum of squares 4.6886; (4.6886 - 5.3^2/7) / 6
    assert r["cos"]["pooled"]["std"] == pytest.approx(math.sqrt((4.6886 - 5.3**2 / 7) / 6), abs=1e-5)
    assert sum(r["cos"]["histogram"]["counts"]) == 7
    assert len(r["cos"]["histogram"]["counts"]) == 200
    s = r["summary"]
    assert s["cos_pooled"] == r["cos"]["pooled"]["mean"] and s["cos_pair_mean"] == r["cos"]["pair_mean"]["mean"]


def test_accept_at_tau(cos_result):
    a = cos_result["accept"]
    assert a["0.80"] == pytest.approx(5 / 7)  # 0.99 0.92 0.86 0.96 0.97
    assert a["0.85"] == pytest.approx(5 / 7)
    assert a["0.90"] == pytest.approx(4 / 7)  # 0.99 0.92 0.96 0.97
    assert a["0.95"] == pytest.approx(3 / 7)  # 0.99 0.96 0.97
    assert cos_result["summary"]["accept@0.90"] == pytest.approx(4 / 7)


def test_consecutive_from_position_zero(cos_result):
    c = cos_result["consecutive"]
    # tau 0.90: pair A run 2 (0.99, 0.92), pair B run 0 (0.86 fails first)
    assert (c["0.90"]["mean"], c["0.90"]["median"], c["0.90"]["max"], c["0.90"]["min"]) == (1.0, 1.0, 2.0, 0.0)
    assert c["0.90"]["std"] == pytest.approx(math.sqrt(2))
    assert c["0.90"]["histogram"] == [1, 0, 1]
    # tau 0.85: A 2, B 3
    assert c["0.85"]["mean"] == 2.5 and c["0.85"]["max"] == 3
    # tau 0.95: A 1, B 0
    assert c["0.95"]["mean"] == 0.5


def test_per_position(cos_result):
    pp = cos_result["per_position"]
    assert pp["position"] == [0, 1, 2, 3]
    assert pp["count"] == [2, 2, 2, 1]
    assert pp["cos_mean"] == pytest.approx([0.925, 0.94, 0.735, 0.10], abs=1e-6)
    assert pp["accept"]["0.90"] == pytest.approx([0.5, 1.0, 0.5, 0.0])
    assert "token_top1" not in pp


def test_acceptance_lengths_cos_basis(cos_result):
    al = cos_result["acceptance_length"]["cos@0.90"]
    # per-position accept rates p = [0.5, 1.0, 0.5, 0.0]
    assert al["sim"] == pytest.approx({"1": 0.5, "2": 1.0, "3": 1.25, "4": 1.25})
    # leading runs [2, 0]: mean of min(g, run)
    assert al["empirical"] == pytest.approx({"1": 0.5, "2": 1.0, "3": 1.0, "4": 1.0})
    # rounds, g=2: A ok=[1,1,0] -> one round accepting 2; B ok=[0,1,1,0] -> rounds at s=0 (0), s=1 (2)
    assert al["rounds"]["2"] == pytest.approx(4 / 3)
    assert al["tokens_per_round"]["2"] == pytest.approx(7 / 3)
    assert al["rounds"]["3"] == pytest.approx(4 / 3)
    # g=4: only B's first round (s=0, window 4 <= L=4) is a full window; it accepts 0
    assert al["rounds"]["4"] == 0.0 and al["rounds_counted"]["4"] == 1
    assert al["rounds_incl_truncated"]["4"] == pytest.approx(4 / 3)
    # no LM head -> the headline basis is the hidden-state proxy cos@0.90
    assert cos_result["summary"]["acc_len_basis"] == "cos@0.90"
    assert cos_result["summary"]["acc_len_sim_gamma3"] == pytest.approx(1.25)


def test_runs_and_rounds_helpers():
    ok = torch.tensor([[1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    assert runs_from_each_position(ok).tolist() == [[2, 1, 0, 3, 2, 1, 0]]
    r = simulate_rounds(runs_from_each_position(ok), torch.tensor([7]), gamma=2)
    # s=0 a=2 -> s=3 a=2 -> s=6 a=0 (window 6+2 > 7: truncated) -> s=7
    assert r["accepted"].tolist() == [4] and r["rounds"].tolist() == [3]
    assert r["accepted_full"].tolist() == [4] and r["rounds_full"].tolist() == [2]
    assert simulated_acceptance_length([0.9, 0.8, 0.5], 3) == pytest.approx(0.9 + 0.72 + 0.36)
    assert simulated_acceptance_length([0.9], 3) == pytest.approx(0.9)


# ----------------------------------------------------------------------------------------------
# token metrics: W = [e0, e1, e2, -e0, -e1, -e2] (V=6, D=3): logits of h = [h, -h]
W = torch.cat([torch.eye(3), -torch.eye(3)])


def _token_batch():
    pred = torch.zeros(2, 3, 3)
    target = torch.zeros(2, 3, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    # pair A: stored tokens [0, 1, 3]
    target[0, 0], pred[0, 0] = torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0.1, 0])  # argmax 0 == 0
    target[0, 1], pred[0, 1] = torch.tensor([0, 1.0, 0]), torch.tensor([3.0, 2, 1])  # pred 0 != 1; 1 in top-5
    target[0, 2], pred[0, 2] = torch.tensor([-1.0, 0, 0]), torch.tensor([3.0, 2, 1])  # 3 is ranked last
    # pair B: stored tokens [2, 4]; target row 1 has argmax 5 (stored id differs from the target argmax)
    target[1, 0], pred[1, 0] = torch.tensor([0, 0, 1.0]), torch.tensor([0.1, 0.2, 1])  # 2 == 2
    target[1, 1], pred[1, 1] = torch.tensor([0, 0, -1.0]), torch.tensor([0, 0, -2.0])  # pred 5 != 4, agree 5==5
    tokens = torch.tensor([[0, 1, 3], [2, 4, -1]])
    return pred, target, mask, tokens


def test_token_metrics_against_stored_ids():
    acc = MetricAccumulator(gammas=[1, 2, 3], max_positions=5, lm_head=W)
    acc.update(*_token_batch())
    r = acc.result()
    t = r["token"]
    assert t["reference"] == "target_response_ids"
    assert t["top1"] == pytest.approx(2 / 5)  # A0, B0
    assert t["top5"] == pytest.approx(4 / 5)  # + A1, B1 (ties at 0 keep token 4 inside the top 5)
    assert t["top10"] == pytest.approx(1.0)  # k clipped to V=6
    assert t["argmax_agreement"] == pytest.approx(3 / 5)  # A0, B0, B1
    assert t["target_lm_head_self_match"] == pytest.approx(4 / 5)  # B1: argmax 5 != stored 4
    assert t["consecutive"]["mean"] == 1.0 and t["consecutive"]["histogram"] == [0, 2]
    pp = r["per_position"]
    assert pp["token_top1"] == pytest.approx([1.0, 0.0, 0.0])
    assert pp["argmax_agreement"] == pytest.approx([1.0, 0.5, 0.0])
    al = r["acceptance_length"]["token"]
    assert al["sim"] == pytest.approx({"1": 1.0, "2": 1.0, "3": 1.0})
    assert al["empirical"] == pytest.approx({"1": 1.0, "2": 1.0, "3": 1.0})
    # g=2: A: s=0 accepts 1 (full), s=2 truncated; B: s=0 accepts 1 (full) -> 2 / 2
    assert al["rounds"]["2"] == pytest.approx(1.0)
    s = r["summary"]
    assert s["acc_len_basis"] == "token" and s["token_top1"] == pytest.approx(0.4)


def test_token_reference_fallback_and_chunking():
    pred, target, mask, _ = _token_batch()
    a = MetricAccumulator(gammas=[1], lm_head=W)
    a.update(pred, target, mask)  # no ids -> argmax of W·target (B1 reference becomes 5)
    ra = a.result()["token"]
    assert ra["reference"] == "argmax_target_lm_head" and ra["target_lm_head_self_match"] is None
    assert ra["top1"] == pytest.approx(3 / 5)
    b = MetricAccumulator(gammas=[1], lm_head=W, logits_chunk_bytes=1)  # one row per logits chunk
    b.update(pred, target, mask)
    assert b.result()["token"] == ra


def test_token_id_outside_vocab_is_config_error():
    pred, target, mask, tokens = _token_batch()
    tokens[0, 0] = 99
    with pytest.raises(ConfigError, match="vocabulary"):
        MetricAccumulator(lm_head=W).update(pred, target, mask, tokens)


def test_identity_gives_perfect_scores():
    g = torch.Generator().manual_seed(0)
    D, V = 16, 40
    lm = torch.randn(V, D, generator=g)
    rows = torch.randn(3, 12, D, generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2, 10:] = False
    tokens = (rows @ lm.T).argmax(-1)
    acc = MetricAccumulator(lm_head=lm, max_positions=12)
    acc.update(rows, rows.clone(), mask, tokens)
    r = acc.result()
    assert r["cos"]["pooled"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert all(v == 1.0 for v in r["accept"].values())
    assert r["token"]["top1"] == 1.0 and r["token"]["argmax_agreement"] == 1.0
    for kind in ("sim", "empirical", "rounds"):
        assert r["acceptance_length"]["token"][kind] == pytest.approx({str(k): float(k) for k in range(1, 9)})


def test_streaming_equals_all_in_memory():
    g = torch.Generator().manual_seed(1)
    B, S, D, V = 10, 9, 8, 30
    lm = torch.randn(V, D, generator=g)
    tgt = torch.randn(B, S, D, generator=g)
    pred = tgt + 0.6 * torch.randn(B, S, D, generator=g)
    lengths = torch.randint(2, S + 1, (B,), generator=g)
    mask = torch.arange(S)[None, :] < lengths[:, None]
    tokens = torch.randint(0, V, (B, S), generator=g)
    whole = MetricAccumulator(lm_head=lm, max_positions=6)
    whole.update(pred, tgt, mask, tokens)
    parts = MetricAccumulator(lm_head=lm, max_positions=6)
    for i in range(0, B, 3):  # batches of 3, each cut to its own max length
        sl = slice(i, i + 3)
        Sm = int(lengths[sl].max())
        parts.update(pred[sl, :Sm], tgt[sl, :Sm], mask[sl, :Sm], tokens[sl, :Sm])
    assert_close(whole.result(), parts.result())


def test_empty_rows_are_ignored_and_shape_errors():
    acc = MetricAccumulator()
    acc.update(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    r = acc.result()
    assert r["counts"]["n_pairs"] == 0 and r["cos"]["pooled"]["mean"] is None
    with pytest.raises(ValueError):
        acc.update(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(2, 3, dtype=torch.bool))
