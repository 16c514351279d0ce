"""The greedy draft -> verify loop for one pair, and the target-only greedy baseline.

Positions follow DESIGN.md §3.2: the answer is g_0, g_1, ...; drafter/target row t predicts g_t.
A round starts with s tokens accepted. Invariant at the start of a round: the target's cache holds
the prompt and g_0..g_{s-2} (P_t + s - 1 positions) and g_{s-1} is *pending* (for s = 0 the pending
token is the prompt's last one, so the target's prefill runs over prompt[:-1]); the drafter's cache
plus its pending tokens cover its prompt and g_0..g_{s-1}.

One round (``resync``, the default):
1. the drafter feeds its pending tokens (catch-up: 1 token, 2 after a fully accepted round) and drafts
   d_s..d_{s+k-1} autoregressively from its own cache, each read through the target's LM head
   (after the adapter), k = min(γ, max_new_tokens - s), stopping early at a drafted EOS;
2. the target verifies ``[pending, d_s..d_{s+k-1}]`` in ONE forward: a = the longest prefix of drafts
   equal to its own greedy tokens, plus its own token at s + a (the correction or the bonus);
3. both caches are cropped back to the accepted length; s += a + 1.
It stops at EOS or ``max_new_tokens`` (a round cut by either keeps only what fits).

Round 0 is drafted during the prefill phase: the drafter's vision + prefill + first k drafts run
concurrently with the target's vision + prefill (threads; on CUDA each model on its own stream or
device), which is the research pipeline's "prefill hiding", measured rather than assumed.

Why measured acceptance equals the offline ``rounds`` simulation on a ``shared_prefix`` store: draft
s+i is only compared when d_s..d_{s+i-1} were accepted, i.e. equal to the target's tokens, so the
drafter's state for it is exactly the teacher-forced row s+i of the store (DESIGN.md §4.4).

``research`` mode reproduces the research benchmark instead: the drafter decodes its OWN answer once
(its own LM head, never re-synchronised) and a round's drafts are the window s..s+k-1 of that answer
read through the adapter + target LM head (the research code's window started one position early,
bug B5; here it starts at the first unverified position). When the answer runs out the target
decodes alone (``target steps``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from egpt_core.speculative.drafting import Draft, DraftHead
from egpt_core.speculative.sessions import DrafterSession, Lane, TargetSession, Timeline

MODES = ("resync", "research")


@dataclass
class PairInputs:
    """Model inputs of one pair, prepared before any timing starts."""

    drafter_prompt_ids: list[int]          # with the -200 <event> sentinel
    event_pixel_values: torch.Tensor | None  # [F, 3, h, w] CLIP pixel values (None: no drafter)
    target_prompt_ids: list[int]           # the processor's expanded ids
    video_pixel_values: torch.Tensor       # [F, 3, H, W]


@dataclass
class RoundRecord:
    """One verify forward: where it started, what was drafted and accepted, margins, cache lengths."""

    start: int
    drafted: int
    accepted: int
    new_tokens: int
    draft_tokens: list[int] = field(default_factory=list)
    draft_margins: list[float] = field(default_factory=list)
    target_margins: list[float] = field(default_factory=list)
    target_cache: int = 0
    drafter_cache: int = 0
    drafter_pending: int = 0
    hidden_in_prefill: bool = False


@dataclass
class Generation:
    """Output ids, rounds and the timeline of one generation (SD or baseline)."""

    output_ids: list[int]
    rounds: list[RoundRecord]
    timeline: Timeline
    timings: dict[str, float]
    drafter_own_ids: list[int] | None = None


def _run_phase(jobs: list[Callable[[], Any]], concurrent: bool) -> list[Any]:
    """Run the prefill-phase jobs concurrently (threads) or one after the other; errors propagate."""
    if not concurrent or len(jobs) == 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="egpt-prefill") as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]


class _ResyncDrafter:
    """Resync-mode drafter state: KV cache + pending tokens + the rows of the accepted prefix."""

    def __init__(self, session: DrafterSession | None, head: DraftHead, eos: int | None):
        self.session, self.head, self.eos = session, head, eos
        self.rows: list[torch.Tensor] = []      # drafter rows 0..: row t after the accepted g_0..g_{t-1}
        self.pending: list[int] = []            # accepted tokens not yet fed
        self.fed_this_round = 0

    def available(self, s: int) -> int:
        """How many drafts this source can make at position s (B1/L5F need a verified target row)."""
        return 0 if (self.head.uses_target_rows and s < 1) else 1 << 30

    def prefill(self, prompt_ids: list[int], features: torch.Tensor) -> None:
        self.rows = [self.session.prefill(prompt_ids, features)]

    def draft(self, s: int, k: int, target_rows: list[torch.Tensor], timeline: Timeline, lane: Lane) -> list[Draft]:
        """Drafts for positions s..s+k-1 (fewer if one is EOS)."""
        drafts: list[Draft] = []
        est_rows = list(target_rows[:s])
        if self.session is not None and self.pending:
            with timeline.span(lane, "drafter_forward"):
                self.rows += list(self.session.feed(self.pending))
            self.pending = []
        self.fed_this_round = 0
        for i in range(k):
            t = s + i
            with timeline.span(lane, "draft_head"):
                d = self.head.draft(t, self.rows, est_rows)
            drafts.append(d)
            if d.token == self.eos:
                break
            if i < k - 1:
                est_rows.append(d.row)
                if self.session is not None:
                    with timeline.span(lane, "drafter_forward"):
                        self.rows.append(self.session.feed([d.token])[0])
                    self.fed_this_round += 1
        return drafts

    def commit(self, s: int, accepted: int, new_tokens: list[int]) -> None:
        """Keep the cache and rows of the accepted prefix; the rest of ``new_tokens`` becomes pending."""
        if self.session is None:  # B1: no drafter model, nothing to keep in sync
            return
        valid_fed = min(accepted, self.fed_this_round)  # drafts d_s.. that were fed AND accepted
        del self.rows[s + 1 + valid_fed:]               # rows 0..s+valid_fed condition on accepted tokens only
        base = self.session.cache_len - self.fed_this_round  # prompt + g_0..g_{s-1}
        self.session.crop(base + valid_fed)
        self.pending = list(new_tokens[valid_fed:])
        if len(self.rows) + len(self.pending) != s + len(new_tokens) + 1:
            raise AssertionError(f"drafter out of sync at s={s}: {len(self.rows)} rows + {len(self.pending)} "
                                 f"pending != {s + len(new_tokens) + 1}")


class _ResearchDrafter(_ResyncDrafter):
    """Research-mode drafter: windows of the drafter's own, once-decoded answer."""

    def __init__(self, session: DrafterSession | None, head: DraftHead, eos: int | None):
        super().__init__(session, head, eos)
        self.own_ids: list[int] = []

    def available(self, s: int) -> int:
        if self.head.uses_target_rows and s < 1:
            return 0
        return max(0, len(self.own_ids) - s) if self.head.uses_drafter else 1 << 30

    def decode_own(self, max_new_tokens: int) -> None:
        """The drafter's own greedy answer (its own LM head) and its rows, once."""
        self.own_ids = []
        for t in range(max_new_tokens):
            tok = self.session.own_next(self.rows[t])
            self.own_ids.append(tok)
            if tok == self.eos or t == max_new_tokens - 1:
                break
            self.rows.append(self.session.feed([tok])[0])

    def draft(self, s: int, k: int, target_rows: list[torch.Tensor], timeline: Timeline, lane: Lane) -> list[Draft]:
        drafts: list[Draft] = []
        est_rows = list(target_rows[:s])
        for i in range(k):
            with timeline.span(lane, "draft_head"):
                d = self.head.draft(s + i, self.rows, est_rows)
            drafts.append(d)
            if d.token == self.eos:
                break
            est_rows.append(d.row)
        return drafts

    def commit(self, s: int, accepted: int, new_tokens: list[int]) -> None:  # nothing to roll back
        return None


def speculative_generate(
    target: TargetSession,
    drafter: DrafterSession | None,
    head: DraftHead,
    inputs: PairInputs,
    gamma: int,
    max_new_tokens: int,
    eos_id: int | None,
    mode: str = "resync",
    hide_prefill: bool = True,
) -> Generation:
    """Greedy speculative decoding of one pair with draft window ``gamma`` (see the module doc).

    Long on purpose (~90 lines): the prefill phase, the draft -> verify -> accept rounds and the
    timeline marks around each forward read top to bottom as one loop; split up, the timing
    instrumentation would be scattered across helpers that share half a dozen locals."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    if gamma < 1 or max_new_tokens < 1:
        raise ValueError(f"need gamma >= 1 and max_new_tokens >= 1, got {gamma}, {max_new_tokens}")
    if head.uses_drafter and drafter is None:
        raise ValueError("this draft head needs the drafter model")
    tl = Timeline()
    tlane = target.lane
    dlane = drafter.lane if drafter is not None else tlane
    state = (_ResearchDrafter if mode == "research" else _ResyncDrafter)(drafter if head.uses_drafter else None,
                                                                         head, eos_id)
    first: list[Draft] = []
    k0 = min(gamma, max_new_tokens, state.available(0)) if mode == "resync" else 0

    def drafter_job() -> None:
        with tl.span(dlane, "drafter_vision"):
            feats = drafter.encode_events(inputs.event_pixel_values)
        with tl.span(dlane, "drafter_prefill"):
            state.prefill(inputs.drafter_prompt_ids, feats)
        if mode == "research":
            with tl.span(dlane, "drafter_own_answer"):
                state.decode_own(max_new_tokens)
        elif k0 > 0:
            first.extend(state.draft(0, k0, [], tl, dlane))

    def target_job() -> None:
        with tl.span(tlane, "target_vision"):
            feats = target.encode_video(inputs.video_pixel_values)
        with tl.span(tlane, "target_prefill"):
            target.prefill(inputs.target_prompt_ids[:-1], feats)

    jobs = [drafter_job, target_job] if head.uses_drafter else [target_job]
    t_phase = tl.now_ms()
    _run_phase(jobs, concurrent=hide_prefill)
    prefill_wall = tl.now_ms() - t_phase
    phase_spans = len(tl.spans)

    out: list[int] = []
    rounds: list[RoundRecord] = []
    target_rows: list[torch.Tensor] = []
    pending = [inputs.target_prompt_ids[-1]]
    s = 0
    while s < max_new_tokens:
        hidden = s == 0 and mode == "resync" and k0 > 0
        if hidden:
            drafts = first
        else:
            k = min(gamma, max_new_tokens - s, state.available(s))
            drafts = state.draft(s, k, target_rows, tl, dlane) if k > 0 else []
        with tl.span(tlane, "verify"):
            ver = target.forward(pending + [d.token for d in drafts])
        a = 0
        while a < len(drafts) and drafts[a].token == ver.tokens[a]:
            a += 1
        new = [d.token for d in drafts[:a]] + [ver.tokens[a]]
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        new = new[: max_new_tokens - s]
        out += new
        done = (eos_id is not None and new[-1] == eos_id) or len(out) >= max_new_tokens
        rec = RoundRecord(start=s, drafted=len(drafts), accepted=min(a, len(new)), new_tokens=len(new),
                          draft_tokens=[d.token for d in drafts], draft_margins=[d.margin for d in drafts], target_margins=ver.margins[: len(drafts) + 1],
                          hidden_in_prefill=hidden)
        if not done:
            target.crop(target.cache_len - len(pending) - len(drafts) + len(new))
            target_rows += list(ver.hidden[: len(new)])
            state.commit(s, a, new)
            pending = [new[-1]]
        rec.target_cache = target.cache_len
        rec.drafter_cache = drafter.cache_len if (drafter is not None and head.uses_drafter) else 0
        rec.drafter_pending = len(state.pending)
        rounds.append(rec)
        s += len(new)
        if done:
            break

    timings = _sd_timings(tl, prefill_wall, phase_spans, dlane.name if head.uses_drafter else None, tlane.name)
    return Generation(out, rounds, tl, timings, drafter_own_ids=getattr(state, "own_ids", None))


def _sd_timings(tl: Timeline, prefill_wall: float, phase_spans: int, dlane: str | None, tlane: str) -> dict[str, float]:
    phase = tl.spans[:phase_spans]
    decode = tl.spans[phase_spans:]

    def total(spans, *labels):
        return sum(sp.ms for sp in spans if sp.label in labels)

    d_busy = sum(sp.ms for sp in phase if sp.lane == dlane) if dlane else 0.0
    t_busy = sum(sp.ms for sp in phase if sp.lane == tlane and sp.label.startswith("target"))
    overlap = max(0.0, d_busy + t_busy - prefill_wall) if dlane else 0.0
    end = max((sp.end_ms for sp in tl.spans), default=0.0)
    return {
        "drafter_vision_ms": total(phase, "drafter_vision"),
        "drafter_prefill_ms": total(phase, "drafter_prefill"),
        "hidden_drafting_ms": total(phase, "draft_head", "drafter_forward", "drafter_own_answer"),
        "target_vision_ms": total(phase, "target_vision"),
        "target_prefill_ms": total(phase, "target_prefill"),
        "prefill_phase_ms": prefill_wall,
        "overlap_ms": overlap,
        "hidden_fraction": (overlap / d_busy) if d_busy > 0 else 0.0,
        "drafter_forward_ms": total(decode, "drafter_forward"),
        "drafter_forwards": float(sum(1 for sp in decode if sp.label == "drafter_forward")),
        "draft_head_ms": total(decode, "draft_head"),
        "drafting_ms": total(decode, "drafter_forward", "draft_head"),
        "verify_ms": total(decode, "verify"),
        "verify_forwards": float(sum(1 for sp in decode if sp.label == "verify")),
        "total_ms": end,
    }


def target_greedy(target: TargetSession, inputs: PairInputs, max_new_tokens: int, eos_id: int | None) -> Generation:
    """The target alone: vision, prefill over the whole prompt (-> g_0), then one token per forward.

    This is both the lossless reference and the speedup baseline (same sessions, same kernels)."""
    tl = Timeline()
    lane = target.lane
    with tl.span(lane, "target_vision"):
        feats = target.encode_video(inputs.video_pixel_values)
    with tl.span(lane, "target_prefill"):
        first = target.prefill(inputs.target_prompt_ids, feats, with_logits=True)
    out = [first.tokens[0]]
    rounds = [RoundRecord(start=0, drafted=0, accepted=0, new_tokens=1, target_margins=first.margins,
                          target_cache=target.cache_len)]
    while len(out) < max_new_tokens and out[-1] != eos_id:
        with tl.span(lane, "decode"):
            ver = target.forward([out[-1]])
        out.append(ver.tokens[0])
        rounds.append(RoundRecord(start=len(out) - 1, drafted=0, accepted=0, new_tokens=1,
                                  target_margins=ver.margins, target_cache=target.cache_len))
    end = max(sp.end_ms for sp in tl.spans)
    timings = {"target_vision_ms": tl.total("target_vision"), "target_prefill_ms": tl.total("target_prefill"),
               "decode_ms": tl.total("decode"), "decode_steps": float(tl.count("decode")), "total_ms": end}
    return Generation(out, rounds, tl, timings)
