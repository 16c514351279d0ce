"""Hand example of the SD speedup model and timing resolution."""

from __future__ import annotations

import json

import pytest

from egpt_core.config import EvalConfig, TimingConfig
from egpt_core.errors import ConfigError
from egpt_core.evaluation.speedup import expected_speedup, resolve_timing

T = TimingConfig(drafter_prefill_ms=90, drafter_step_ms=10, target_prefill_ms=300, target_step_ms=20,
                 verify_ms_per_token=1, adapter_ms=2, output_tokens=51)


def test_hand_example():
    d = expected_speedup(3.0, 4, T)
    assert d["draft_ms_per_round"] == 42  # 4*10 + 2
    assert d["verify_ms_per_round"] == 24  # 20 + 4*1
    assert d["round_ms"] == 66
    assert d["tokens_per_round"] == 4  # 3 accepted + 1 bonus
    assert d["sd_ms_per_token"] == pytest.approx(16.5)
    assert d["decode_speedup"] == pytest.approx(20 / 16.5)
    assert d["baseline_total_ms"] == 1300  # 300 + 50 * 20 (prefill yields token 0)
    assert d["drafter_prefill_hidden"] is True and d["sd_prefill_ms"] == 300
    assert d["rounds"] == pytest.approx(12.5)  # 50 / 4
    assert d["sd_total_ms"] == pytest.approx(300 + 12.5 * 66)  # 1125
    assert d["e2e_speedup"] == pytest.approx(1300 / 1125)


def test_per_position_probs_and_slow_drafter_prefill():
    t = T.model_copy(update={"drafter_prefill_ms": 400.0})
    d = expected_speedup([0.9, 0.8, 0.5], 3, t)
    assert d["acceptance_length"] == pytest.approx(0.9 + 0.72 + 0.36)
    assert d["acceptance_source"] == "per_position_probs"
    assert d["sd_prefill_ms"] == 400 and d["drafter_prefill_hidden"] is False
    # zero acceptance: every round costs more than one AR step -> slowdown
    assert expected_speedup(0.0, 2, T)["decode_speedup"] < 1
    with pytest.raises(ValueError):
        expected_speedup(5.0, 4, T)


def test_resolve_timing(tmp_path):
    base = {"store": "x", "out": "y", "identity": True}
    t, note = resolve_timing(EvalConfig(**base))
    assert t is None and "no timing" in note
    f = tmp_path / "timing.json"
    f.write_text(json.dumps(T.model_dump()))
    t, _ = resolve_timing(EvalConfig(**base, timing_file=str(f)))
    assert t == T
    with pytest.raises(ConfigError):
        resolve_timing(EvalConfig(**base, timing=T, timing_file=str(f)))
    f.write_text('{"drafter_step_ms": 1}')
    with pytest.raises(ConfigError, match="TimingConfig"):
        resolve_timing(EvalConfig(**base, timing_file=str(f)))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_timing(EvalConfig(**base, timing_file=str(tmp_path / "missing.json")))
