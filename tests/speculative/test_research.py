"""`research` mode reproduces the research benchmark's windowing: the drafter decodes its own answer
once and every round drafts the window [s, s + γ) of it (s = the first unverified position: the
research code started one position early, bug B5), never re-synchronised with what was accepted;
when the answer runs out the target decodes alone."""

from __future__ import annotations

import torch

from egpt_core.speculative import DraftHead, speculative_generate, target_greedy
from egpt_core.speculative.sessions import Lane

N = 14


class ScriptedDrafter:
    """A drafter whose own greedy answer is a hand-made token list: its row t is the one-hot vector
    of its own token t, read by an identity 'LM head' (V x V), so draft t = own answer[t]."""

    def __init__(self, own: list[int], vocab: int):
        self.own, self.vocab = own, vocab
        self.lane = Lane("drafter", "cpu")
        self.drafter = type("D", (), {"double_adaptor": False})()
        self.fed: list[int] = []
        self.cache_len = 0

    def _row(self, t: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(self.own[t]), self.vocab).float()

    def encode_events(self, pixel_values):
        return None

    def prefill(self, prompt_ids, features):
        self.fed = []
        return self._row(0)

    def own_next(self, row: torch.Tensor) -> int:
        return int(row.argmax())

    def feed(self, token_ids):
        self.fed += list(token_ids)
        return torch.stack([self._row(len(self.fed))])

    def crop(self, length: int) -> None:
        raise AssertionError("research mode never rolls the drafter back")


def test_research_windows_of_a_hand_made_own_answer(target, sessions, pair_inputs):
    """Target answer g; the drafter's own answer agrees with g at some positions only. Research mode
    drafts own[s..s+γ-1] every round wherever s lands - the hand-computed windows below."""
    tsess, _ = sessions
    inp = pair_inputs(1, 1)
    g = target_greedy(tsess, inp, N, None).output_ids
    vocab = target.model.get_output_embeddings().weight.shape[0]
    x, end = [t for t in range(vocab) if t not in g][:2]  # tokens the target never emits here
    # own answer: right at 0,1 | wrong at 2 | right at 3..7 | wrong at 8 | right at 9..10, then its EOS (12 tokens)
    own = [g[0], g[1], x, g[3], g[4], g[5], g[6], g[7], x, g[9], g[10], end]
    head = DraftHead(torch.eye(vocab), "cpu")
    gen = speculative_generate(tsess, ScriptedDrafter(own, vocab), head, inp, 3, N, end, mode="research")
    assert gen.output_ids == g
    rounds = [(r.start, r.draft_tokens, r.accepted) for r in gen.rounds]
    assert rounds == [
        (0, own[0:3], 2),    # g0 g1 ok, x rejected -> the target's g2 is the correction; s = 3
        (3, own[3:6], 3),    # all three accepted + bonus g6; s = 7
        (7, own[7:10], 1),   # g7 ok, x rejected -> g8; s = 9
        (9, own[9:12], 2),   # g9 g10 ok, the drafter's EOS rejected -> g11; s = 12
        (12, [], 0),         # the own answer has run out: the target decodes alone
        (13, [], 0),
    ], rounds
    assert gen.drafter_own_ids == own


def test_research_is_not_resynchronised_resync_is(target, sessions, pair_inputs, drafter):
    """With the real drafter, research drafts are exactly windows of the drafter's own generate()
    output read through the target's LM head; resync drafts are not (they follow the accepted prefix)."""
    tsess, dsess = sessions
    inp = pair_inputs(0, 2)
    W = target.lm_head_weight()
    head = DraftHead(W, "cpu")
    feats = dsess.encode_events(inp.event_pixel_values)
    own_ids, own_rows = drafter.generate([inp.drafter_prompt_ids], [feats.float()], N)
    window_tokens = (own_rows[0] @ W.T).argmax(-1).tolist()
    for gamma in (2, 5):
        gen = speculative_generate(tsess, dsess, head, inp, gamma, N, None, mode="research")
        assert gen.drafter_own_ids == own_ids[0]
        for r in gen.rounds:
            k = min(gamma, N - r.start, max(0, len(own_ids[0]) - r.start))
            assert r.draft_tokens == window_tokens[r.start : r.start + k], (gamma, r)
    resync = speculative_generate(tsess, dsess, head, inp, 5, N, None, mode="resync")
    assert any(r.draft_tokens != window_tokens[r.start : r.start + len(r.draft_tokens)] for r in resync.rounds)
