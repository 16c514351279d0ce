"""Expected speculative-decoding speedup from an acceptance length and MEASURED per-component latencies.

Standard SD cost model (one target, one drafter, greedy verification), per round with window γ:

- draft:  γ · drafter_step_ms + adapter_ms   (the drafter's catch-up on the accepted/bonus tokens is
  folded into its first step: KV rollback + one forward over the new tokens);
- verify: target_step_ms + γ · verify_ms_per_token   (ONE target forward over the γ drafts);
- tokens per round = acceptance_length + 1   (the accepted drafts + the target's correction/bonus);
- SD ms per token = (draft + verify) / tokens per round, vs the target's AR ``target_step_ms``.

End to end over ``output_tokens`` N: the target's prefill yields the first token, so both sides
decode N - 1 tokens after it. Baseline = target_prefill + (N-1)·target_step. SD = max(target_prefill,
drafter_prefill) + (N-1)/(tokens per round)·round_ms: the drafter's prefill runs concurrently and is
hidden under the target's prefill when it is shorter (this assumes real concurrency — two devices or
measured stream overlap; reference §12.2 P1.7). Rounds are fractional (an expectation).

There are no built-in timing constants (reference §12.2 P1.6): timings come from
``EvalConfig.timing`` or a JSON file (``timing_file``); without them no speedup is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from egpt_core.config import EvalConfig, TimingConfig
from egpt_core.errors import ConfigError
from egpt_core.evaluation.metrics import simulated_acceptance_length
from egpt_core.fsio import Location


def expected_speedup(
    acceptance: float | Sequence[float],
    gamma: int,
    timing: TimingConfig,
) -> dict[str, Any]:
    """Expected speedup of SD with window ``gamma`` over the target's AR decoding.

    ``acceptance`` is either the acceptance length (expected accepted draft tokens per round, in
    [0, γ]) or per-position acceptance probabilities p_0, p_1, ... from which the acceptance length is
    Σ_{k=1..γ} Π_{j<k} p_j. Returns every term of the model (see the module doc). The terms are
    written out in one place, in the module doc's order (~65 lines), so they can be checked against it.
    """
    gamma = int(gamma)
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    if isinstance(acceptance, int | float):
        acc_len = float(acceptance)
        source = "acceptance_length"
    else:
        probs = [float(p) for p in acceptance]
        if any(not 0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"per-position accept probabilities must be in [0, 1]: {probs}")
        acc_len = simulated_acceptance_length(probs, gamma)
        source = "per_position_probs"
    if not -1e-9 <= acc_len <= gamma + 1e-9:
        raise ValueError(f"acceptance length {acc_len} outside [0, gamma={gamma}]")
    acc_len = min(max(acc_len, 0.0), float(gamma))

    t = timing
    n_out = int(t.output_tokens)
    draft_ms = gamma * t.drafter_step_ms + t.adapter_ms
    verify_ms = t.target_step_ms + gamma * t.verify_ms_per_token
    round_ms = draft_ms + verify_ms
    tokens_per_round = acc_len + 1.0
    sd_ms_per_token = round_ms / tokens_per_round
    ar_ms_per_token = t.target_step_ms
    decode_tokens = n_out - 1
    baseline_prefill = t.target_prefill_ms
    sd_prefill = max(t.target_prefill_ms, t.drafter_prefill_ms)
    rounds = decode_tokens / tokens_per_round
    baseline_decode = decode_tokens * ar_ms_per_token
    sd_decode = rounds * round_ms
    baseline_total = baseline_prefill + baseline_decode
    sd_total = sd_prefill + sd_decode
    return {
        "gamma": gamma,
        "acceptance_length": acc_len,
        "acceptance_source": source,
        "tokens_per_round": tokens_per_round,
        "draft_ms_per_round": draft_ms,
        "verify_ms_per_round": verify_ms,
        "round_ms": round_ms,
        "sd_ms_per_token": sd_ms_per_token,
        "ar_ms_per_token": ar_ms_per_token,
        "decode_speedup": ar_ms_per_token / sd_ms_per_token,
        "output_tokens": n_out,
        "decode_tokens": decode_tokens,
        "rounds": rounds,
        "baseline_prefill_ms": baseline_prefill,
        "sd_prefill_ms": sd_prefill,
        "drafter_prefill_hidden": t.drafter_prefill_ms <= t.target_prefill_ms,
        "baseline_decode_ms": baseline_decode,
        "sd_decode_ms": sd_decode,
        "baseline_total_ms": baseline_total,
        "sd_total_ms": sd_total,
        "e2e_speedup": baseline_total / sd_total,
    }


def load_timing_file(src: str | Location, storage_options: dict | None = None) -> TimingConfig:
    """Read a JSON file with :class:`TimingConfig` fields (a Location, or a URL with its
    ``storage_options``); a bad file is a ConfigError naming it."""
    loc = Location.of(src, storage_options)
    url = loc.url
    try:
        data = loc.read_json()
    except FileNotFoundError as exc:
        raise ConfigError(f"timing_file {url!r} does not exist; measure the latencies and write them there") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"timing_file {url!r} is not readable JSON: {exc}") from exc
    try:
        return TimingConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"timing_file {url!r} does not hold valid TimingConfig fields: {exc}") from exc


def resolve_timing(cfg: EvalConfig) -> tuple[TimingConfig | None, str]:
    """``(timing, note)``: from ``cfg.timing`` or ``cfg.timing_file``; ``None`` with the reason otherwise."""
    if cfg.timing is not None and cfg.timing_file:
        raise ConfigError("set either EvalConfig.timing or EvalConfig.timing_file (--timing), not both")
    if cfg.timing is not None:
        return cfg.timing, "timing from EvalConfig.timing"
    if cfg.timing_file:
        return load_timing_file(Location(cfg.timing_file, cfg.storage_options)), f"timing from {cfg.timing_file}"
    return None, ("speedup omitted: no timing given (set EvalConfig.timing or --timing FILE with measured "
                  "drafter/target prefill and step latencies; no constants are assumed)")


def speedup_table(
    acceptance_lengths: dict[str, float | None], timing: TimingConfig
) -> dict[str, dict[str, Any] | None]:
    """``{gamma: expected_speedup(...)}`` for ``{str(gamma): acceptance length}`` (None stays None)."""
    return {g: (None if a is None else expected_speedup(a, int(g), timing)) for g, a in acceptance_lengths.items()}
