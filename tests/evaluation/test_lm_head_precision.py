"""Precision of the token metrics: a float32 LM head in the store, and how many positions' top-1
changes when the same head is rounded to bf16 (near ties over the vocabulary)."""

from __future__ import annotations

import json

import torch
from eval_helpers import build_store

from egpt_core.config import EvalConfig
from egpt_core.evaluation.evaluate import evaluate
from egpt_core.evaluation.metrics import MetricAccumulator


def _near_tie_batch():
    """Head rows 0 and 1 differ by 2**-10 (lost in bf16): positions along x flip, others do not."""
    W = torch.tensor([[1.0, 0.0, 0.0], [1.0 + 2**-10, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    pred = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.1, 0.0]]])
    target = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 2.0, 0.0]]])
    return W, pred, target, torch.ones(1, 3, dtype=torch.bool)


def test_flips_counted_exactly():
    W, pred, target, mask = _near_tie_batch()
    acc = MetricAccumulator(lm_head=W, lm_head_dtype="float32")
    acc.update(pred, target, mask)
    prec = acc.result()["token"]["lm_head_precision"]
    bf = W.to(torch.bfloat16).float()
    want_pred = int(((pred[0] @ W.T).argmax(1) != (pred[0] @ bf.T).argmax(1)).sum())
    want_target = int(((target[0] @ W.T).argmax(1) != (target[0] @ bf.T).argmax(1)).sum())
    assert (want_pred, want_target) == (2, 1)  # the fixture really has near ties
    assert prec["top1_changed_pred"] == want_pred and prec["top1_changed_target"] == want_target
    assert prec["positions"] == 3 and prec["store_dtype"] == "float32"
    assert acc.result()["summary"]["top1_changed_bf16_head"] == 2


def test_bf16_store_head_says_it_cannot_measure():
    W, pred, target, mask = _near_tie_batch()
    acc = MetricAccumulator(lm_head=W.to(torch.bfloat16).float(), lm_head_dtype="bfloat16")
    acc.update(pred, target, mask)
    prec = acc.result()["token"]["lm_head_precision"]
    assert prec["top1_changed_pred"] is None and "lm_head_dtype='float32'" in prec["note"]


def test_metrics_json_and_report_carry_the_count(tmp_path):
    url = str(tmp_path / "s")
    build_store(url)  # float32 store head
    evaluate(EvalConfig(store=url, out=str(tmp_path / "ev"), identity=True, device="cpu"))
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    prec = doc["token"]["lm_head_precision"]
    assert prec["store_dtype"] == "float32" and isinstance(prec["top1_changed_pred"], int)
    assert prec["positions"] == doc["counts"]["n_positions"]
    assert "top-1 changes with the head in bf16" in (tmp_path / "ev" / "report.md").read_text()
