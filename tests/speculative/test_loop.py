"""The greedy draft -> verify loop on the tiny fixtures (fp32): lossless for γ = 1..8, with EOS and
max_new_tokens falling mid-round; cache lengths equal the accepted length after every round; a
drafter that is the target accepts γ every full round; a random drafter still yields the target's
output."""

from __future__ import annotations

import pytest
import torch

from egpt_core.config import AdapterConfig
from egpt_core.speculative import DraftHead, speculative_generate, target_greedy

GAMMAS = range(1, 9)
PAIRS = [(0, 0), (1, 1), (3, 2)]
N = 16


def _random_adapter(level: str, hidden: int, scale: float, seed: int = 0):
    from egpt_core.adapters.modules import create_adapter

    torch.manual_seed(seed)
    module = create_adapter(AdapterConfig(level=level, num_heads=4, ffn_dim=128, dropout=0.0), hidden)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval(), AdapterConfig(level=level, num_heads=4, ffn_dim=128, dropout=0.0)


@pytest.fixture(scope="module")
def noisy_self_head(target):
    """Drafts from the target's own rows through a randomly perturbed L1: right at some positions,
    wrong at others (partial accepts, full accepts and rejections all happen)."""
    module, cfg = _random_adapter("L1", target.hidden_size, 0.35, seed=3)
    return DraftHead(target.lm_head_weight(), "cpu", module, cfg)


def test_baseline_is_the_targets_own_greedy_generate(target, sessions, pair_inputs, eos):
    for si, qi in PAIRS:
        inp = pair_inputs(si, qi)
        ids, _ = target.generate([inp.target_prompt_ids], [inp.video_pixel_values], N)
        assert target_greedy(sessions[0], inp, N, eos).output_ids == ids[0]


@pytest.mark.parametrize("mode", ["resync", "research"])
def test_lossless_for_every_gamma_with_the_real_drafter(target, sessions, pair_inputs, eos, mode):
    tsess, dsess = sessions
    head = DraftHead(target.lm_head_weight(), "cpu")
    for si, qi in PAIRS:
        inp = pair_inputs(si, qi)
        base = target_greedy(tsess, inp, N, eos).output_ids
        for g in GAMMAS:
            gen = speculative_generate(tsess, dsess, head, inp, g, N, eos, mode=mode)
            assert gen.output_ids == base, (mode, si, qi, g)
            assert sum(r.new_tokens for r in gen.rounds) == len(base)


def test_lossless_with_partial_acceptance_and_cache_lengths(target, sessions, pair_inputs, eos, noisy_self_head,
                                                             target_as_drafter):
    tsess, _ = sessions
    seen = {"partial": 0, "full": 0, "reject": 0}
    for si, qi in PAIRS[:2]:
        inp = pair_inputs(si, qi)
        base = target_greedy(tsess, inp, N, eos).output_ids
        for g in (1, 2, 3, 5, 8):
            dsess = target_as_drafter(inp)
            gen = speculative_generate(tsess, dsess, noisy_self_head, inp, g, N, eos)
            assert gen.output_ids == base, (si, qi, g)
            p_t = len(inp.target_prompt_ids)
            s = 0
            for r in gen.rounds[:-1]:  # the last round stops the loop: nothing is cropped after it
                s += r.new_tokens
                assert r.target_cache == p_t + s - 1, (g, r)          # prompt + g_0..g_{s-2}
                assert r.drafter_cache + r.drafter_pending == p_t + s, (g, r)  # prompt + g_0..g_{s-1}
                assert r.drafter_pending in (1, 2)
                seen["reject" if r.accepted == 0 else "full" if r.accepted == r.drafted else "partial"] += 1
    assert all(v > 0 for v in seen.values()), seen


def test_drafter_cache_matches_the_accepted_prefix_with_the_real_drafter(drafter, target, sessions, pair_inputs, eos):
    """The real EventGPT drafter: its cache + pending tokens always cover prompt + accepted tokens."""
    tsess, dsess = sessions
    module, cfg = _random_adapter("L1", target.hidden_size, 0.0)  # L1 at init: LN of the drafter rows
    head = DraftHead(target.lm_head_weight(), "cpu", module, cfg)
    inp = pair_inputs(0, 0)
    feats = dsess.encode_events(inp.event_pixel_values)
    p_d = drafter.model.expanded_len(inp.drafter_prompt_ids, feats.shape[0])
    for g in (1, 3, 8):
        gen = speculative_generate(tsess, dsess, head, inp, g, N, eos)
        s = 0
        for r in gen.rounds[:-1]:
            s += r.new_tokens
            assert r.drafter_cache + r.drafter_pending == p_d + s
            assert r.target_cache == len(inp.target_prompt_ids) + s - 1


def test_a_drafter_that_is_the_target_accepts_gamma_every_full_round(target, sessions, pair_inputs, eos,
                                                                    target_as_drafter):
    tsess, _ = sessions
    head = DraftHead(target.lm_head_weight(), "cpu")
    for si, qi in PAIRS[:2]:
        inp = pair_inputs(si, qi)
        base = target_greedy(tsess, inp, N, eos).output_ids
        for g in GAMMAS:
            gen = speculative_generate(tsess, target_as_drafter(inp), head, inp, g, N, eos)
            assert gen.output_ids == base
            full = [r for r in gen.rounds if r.start + g <= len(base)]
            assert full and all(r.accepted == g == r.drafted for r in full), (g, gen.rounds)
            assert len(gen.rounds) == -(-len(base) // (g + 1))  # every round yields γ + 1 tokens but the last


@pytest.mark.parametrize("level", ["L1", "L4"])
def test_a_random_drafter_still_yields_exactly_the_targets_output(target, sessions, pair_inputs, eos, level):
    tsess, dsess = sessions
    module, cfg = _random_adapter(level, target.hidden_size, 2.0, seed=11)
    head = DraftHead(target.lm_head_weight(), "cpu", module, cfg)
    inp = pair_inputs(*PAIRS[1])
    base = target_greedy(tsess, inp, N, eos).output_ids
    for g in GAMMAS if level == "L1" else (2, 5, 8):
        gen = speculative_generate(tsess, dsess, head, inp, g, N, eos)
        assert gen.output_ids == base
        assert sum(r.accepted for r in gen.rounds) <= len(base) // 4  # it really is a bad drafter


def test_eos_falling_mid_round(target, sessions, pair_inputs, target_as_drafter, noisy_self_head):
    """With EOS = a token the target emits at position p, both the baseline and every SD run stop
    right after it, whether EOS is an accepted draft inside a window or the target's bonus token."""
    tsess, _ = sessions
    inp = pair_inputs(1, 1)
    free = target_greedy(tsess, inp, N, None).output_ids
    p = next(i for i in range(4, N) if free[i] not in free[:i])
    eos_id = free[p]
    base = target_greedy(tsess, inp, N, eos_id).output_ids
    assert base == free[: p + 1]
    inside = bonus = 0
    for head in (DraftHead(target.lm_head_weight(), "cpu"), noisy_self_head):
        for g in GAMMAS:
            gen = speculative_generate(tsess, target_as_drafter(inp), head, inp, g, N, eos_id)
            assert gen.output_ids == base, g
            last = gen.rounds[-1]
            if last.accepted and last.start + last.accepted - 1 == p:
                inside += 1            # EOS was an accepted draft (the round's window went past it)
            elif last.start + last.accepted == p:
                bonus += 1             # EOS was the target's own token after the accepted drafts
    assert inside and bonus


@pytest.mark.parametrize("max_new", [1, 5, 7, 13])
def test_max_new_tokens_falling_mid_round(target, sessions, pair_inputs, eos, target_as_drafter, max_new):
    tsess, _ = sessions
    head = DraftHead(target.lm_head_weight(), "cpu")
    inp = pair_inputs(3, 2)
    base = target_greedy(tsess, inp, max_new, eos).output_ids
    assert len(base) == max_new
    for g in GAMMAS:
        gen = speculative_generate(tsess, target_as_drafter(inp), head, inp, g, max_new, eos)
        assert gen.output_ids == base
        assert all(r.drafted <= max_new - r.start for r in gen.rounds)


def test_prefill_hiding_off_gives_the_same_tokens(target, sessions, pair_inputs, eos):
    tsess, dsess = sessions
    head = DraftHead(target.lm_head_weight(), "cpu")
    inp = pair_inputs(0, 1)
    on = speculative_generate(tsess, dsess, head, inp, 4, N, eos, hide_prefill=True)
    off = speculative_generate(tsess, dsess, head, inp, 4, N, eos, hide_prefill=False)
    assert on.output_ids == off.output_ids
    assert [(r.start, r.accepted) for r in on.rounds] == [(r.start, r.accepted) for r in off.rounds]
    phase = {s.label for s in on.timeline.spans if s.end_ms <= on.timings["prefill_phase_ms"] + 1e-6}
    assert {"drafter_vision", "drafter_prefill", "target_vision", "target_prefill"} <= phase
    assert on.rounds[0].hidden_in_prefill and on.rounds[0].drafted == 4


@pytest.mark.parametrize("level", ["B1", "L5F"])
def test_target_row_adapters_draft_from_verified_rows_and_stay_lossless(target, sessions, pair_inputs, eos, level):
    """B1 / L5F draft from the target's verified rows: nothing is drafted before the first verified
    row exists (round 0 is a plain target step), the output is still the target's."""
    tsess, dsess = sessions
    module, cfg = _random_adapter(level, target.hidden_size, 0.05, seed=5)
    head = DraftHead(target.lm_head_weight(), "cpu", module, cfg)
    inp = pair_inputs(2, 0)
    base = target_greedy(tsess, inp, N, eos).output_ids
    for g in (1, 3):
        gen = speculative_generate(tsess, dsess if level == "L5F" else None, head, inp, g, N, eos)
        assert gen.output_ids == base
        assert gen.rounds[0].drafted == 0 and all(r.drafted > 0 for r in gen.rounds[1:-1])


def test_bad_arguments_are_refused(target, sessions, pair_inputs, eos):
    tsess, dsess = sessions
    head = DraftHead(target.lm_head_weight(), "cpu")
    inp = pair_inputs(0, 0)
    with pytest.raises(ValueError, match="mode"):
        speculative_generate(tsess, dsess, head, inp, 3, N, eos, mode="fast")
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(tsess, dsess, head, inp, 0, N, eos)
    with pytest.raises(ValueError, match="drafter"):
        speculative_generate(tsess, None, head, inp, 3, N, eos)
