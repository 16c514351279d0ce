"""Evaluation reads an fp8 store transparently: the same pairs in a bf16 and an fp8 store give the same
metrics within the fp8 bound (benchmarks/bench_fp8.py measures the same drift on more pairs)."""

from __future__ import annotations

from benchmarks.bench_fp8 import DRIFT_KEYS, metric_drift

FP8_DRIFT_BOUND = 0.005  # the fp8_metric_drift goal (absolute)


def test_evaluation_on_fp8_store_agrees_with_bf16_store(tmp_path):
    drift = metric_drift(tmp_path, n=120)
    for k in DRIFT_KEYS:
        assert drift["delta"][k] <= FP8_DRIFT_BOUND, (k, drift)
    # the fp8 store really was decoded from fp8 (not the bf16 values): cos differs, slightly
    assert drift["delta"]["cos_pooled"] > 0
    assert 0.5 < drift["bf16"]["cos_pooled"] < 0.99 and 0.05 < drift["bf16"]["accept@0.90"] < 0.95
