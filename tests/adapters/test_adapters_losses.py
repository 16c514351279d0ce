"""Losses and metric helpers on hand-computable tensors."""

import math

import pytest
import torch

from egpt_core.adapters.losses import (
    accept_rates,
    alignment_loss,
    combine_sums,
    eagle_loss,
    loss_sums,
    masked_cos,
    masked_cos_per_position,
    masked_mse,
)


def _case():
    # B=1, S=3, D=2; position 2 is padding (garbage that must be ignored)
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [-5.0, 3.0]]])
    mask = torch.tensor([[True, True, False]])
    return pred, target, mask


def test_masked_mse_and_cos_by_hand():
    pred, target, mask = _case()
    # squared errors: pos0 (0 + 1) = 1, pos1 (0 + 1) = 1 -> 2 / (D=2 * 2 positions) = 0.5
    assert masked_mse(pred, target, mask).item() == pytest.approx(0.5)
    cos = masked_cos_per_position(pred, target, mask)
    assert cos[0, 0].item() == pytest.approx(1 / math.sqrt(2))
    assert cos[0, 1].item() == pytest.approx(1.0)
    assert cos[0, 2].item() == 0.0
    assert masked_cos(pred, target, mask).item() == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    out = alignment_loss(pred, target, mask)
    expected_cos = (1 / math.sqrt(2) + 1) / 2
    assert out["total_loss"].item() == pytest.approx(0.5 + 0.5 * (1 - expected_cos))
    assert out["cos_sim"].item() == pytest.approx(expected_cos)


def test_eagle_research_and_separate_head():
    pred, target, mask = _case()
    nxt = torch.tensor([[[0.0, 1.0], [7.0, 7.0], [3.0, 3.0]]])
    align = 0.5 + 0.5 * (1 - (1 / math.sqrt(2) + 1) / 2)
    # research: the aligned output at t=0 vs y[1] = (0,1): (1-0)^2 + (0-1)^2 = 2 -> 2/(2*1) = 1; t=1 -> y[2] invalid
    r = eagle_loss(pred, None, target, mask, prediction_weight=0.5, separate_prediction_head=False)
    assert r["align_loss"].item() == pytest.approx(align)
    assert r["pred_loss"].item() == pytest.approx(1.0)
    assert r["total_loss"].item() == pytest.approx(0.5 * align + 0.5 * 1.0)
    # separate head: nxt at t=0 = (0,1) equals y[1] exactly -> mse 0, cos 1 -> pred 0
    s = eagle_loss(pred, nxt, target, mask, prediction_weight=0.25, separate_prediction_head=True)
    assert s["pred_loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert s["total_loss"].item() == pytest.approx(0.75 * align)
    assert s["next_cos_sim"].item() == pytest.approx(1.0)


def test_sums_are_additive_and_global_denominators():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 1, 4])[:, None]
    whole = alignment_loss(pred, target, mask)["total_loss"]
    a, b = loss_sums(pred[:2], target[:2], mask[:2]), loss_sums(pred[2:], target[2:], mask[2:])
    pooled = combine_sums({k: a[k] + b[k] for k in a}, 3)["total_loss"]
    assert pooled.item() == pytest.approx(whole.item(), rel=1e-6)
    # split-batch gradient with global denominators == whole-batch gradient (what DDP relies on)
    p1 = pred.clone().requires_grad_(True)
    alignment_loss(p1, target, mask)["total_loss"].backward()
    p2 = pred.clone().requires_grad_(True)
    a, b = loss_sums(p2[:2], target[:2], mask[:2]), loss_sums(p2[2:], target[2:], mask[2:])
    den = {"n": (a["n"] + b["n"]).detach()}
    (combine_sums(a, 3, denominators=den)["total_loss"] + combine_sums(b, 3, denominators=den)["total_loss"]).backward()
    assert torch.allclose(p1.grad, p2.grad, atol=1e-7)


def test_accept_rates_strict_and_pooled():
    cos = torch.tensor([[0.96, 0.90, 0.81, 0.5], [0.85, 0.99, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    r = accept_rates(cos, mask, (0.80, 0.85, 0.90, 0.95))
    assert r[0.80] == pytest.approx(5 / 6)
    assert r[0.85] == pytest.approx(3 / 6)  # strictly greater: 0.85 itself is not accepted
    assert r[0.90] == pytest.approx(2 / 6)
    assert r[0.95] == pytest.approx(2 / 6)
