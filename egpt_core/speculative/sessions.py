"""KV-cached model sessions for the draft -> verify loop (one pair at a time, batch 1).

`TargetSession` wraps Video-LLaVA, `DrafterSession` wraps EventGPT. Each owns one transformers
`DynamicCache` and runs on a `Lane` (a device plus, on CUDA, its own stream), so the drafter's
light prefill can run concurrently with the target's heavy one. Rolling back after a rejected draft
is `DynamicCache.crop` (transformers 5: a negative count removes that many trailing positions), never
slicing of legacy key/value tuples (reference §12.3.9).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Cut ``cache`` back to its first ``length`` positions (no-op when it already has that many)."""
    have = cache.get_seq_length()
    if length > have:
        raise ValueError(f"cannot crop a cache of {have} positions to {length}")
    if length < have:
        cache.crop(length - have)


class Lane:
    """Where one model runs: a device and, on CUDA, a dedicated stream (``None`` on CPU).

    Every call of a session enters ``active()``; `sync()` waits for the lane's queued work, which the
    timers do before reading the clock so that asynchronous CUDA work is charged to the right span.
    """

    def __init__(self, name: str, device: torch.device | str):
        self.name = name
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield

    def sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


@dataclass
class Span:
    """One timed piece of work: lane, label, start/end in ms since the timeline's origin."""

    lane: str
    label: str
    start_ms: float
    end_ms: float

    @property
    def ms(self) -> float:
        return self.end_ms - self.start_ms


@dataclass
class Timeline:
    """Timed spans of one generation (thread safe); the origin is its creation time."""

    origin: float = field(default_factory=time.perf_counter)
    spans: list[Span] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def now_ms(self) -> float:
        return (time.perf_counter() - self.origin) * 1000.0

    @contextlib.contextmanager
    def span(self, lane: Lane, label: str) -> Iterator[None]:
        """Time the block on ``lane`` (synchronising the lane before and after on CUDA)."""
        lane.sync()
        start = self.now_ms()
        with lane.active():
            yield
        lane.sync()
        end = self.now_ms()
        with self._lock:
            self.spans.append(Span(lane.name, label, start, end))

    def total(self, label: str) -> float:
        """Summed ms of every span with this label."""
        return sum(s.ms for s in self.spans if s.label == label)

    def count(self, label: str) -> int:
        return sum(1 for s in self.spans if s.label == label)

    def busy(self, lane: str, labels: Sequence[str] | None = None) -> float:
        return sum(s.ms for s in self.spans if s.lane == lane and (labels is None or s.label in labels))

    def as_records(self) -> list[dict]:
        return [{"lane": s.lane, "label": s.label, "start_ms": round(s.start_ms, 3), "end_ms": round(s.end_ms, 3)}
                for s in sorted(self.spans, key=lambda s: s.start_ms)]


@dataclass
class VerifyOutput:
    """The target's greedy view of a fed block of n tokens: next-token ids, logit margins and rows."""

    tokens: list[int]          # argmax after each fed token (n)
    margins: list[float]       # top-1 minus top-2 logit per position (n)
    hidden: torch.Tensor       # [n, D] final post-norm hidden states (the rows, DESIGN.md §3.2)


def _greedy(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """logits [n, V] -> (argmax ids, top-1 - top-2 margins), one host transfer."""
    top = logits.float().topk(2, dim=-1)
    both = torch.cat([top.indices.to(top.values.dtype), top.values], dim=-1).cpu()
    ids = both[:, 0].long().tolist()
    margins = (both[:, 2] - both[:, 3]).tolist()
    return ids, margins


class _CachedSession:
    """A model on a lane with its KV cache (None before the first prefill): cached length, crop."""

    def __init__(self, model, lane: Lane):
        self.model = model
        self.lane = lane
        self.cache: DynamicCache | None = None

    @property
    def cache_len(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()

    def crop(self, length: int) -> None:
        crop_cache(self.cache, length)


class TargetSession(_CachedSession):
    """Video-LLaVA with a KV cache: vision tower, prefill, multi-token verify forwards, crop."""

    def __init__(self, target, lane: Lane):
        super().__init__(target.model, lane)
        self.target = target

    @torch.no_grad()
    def encode_video(self, pixel_values_videos: torch.Tensor):
        """pixel_values_videos [F, 3, H, W] -> the video tower + projector output (kept on the lane's device)."""
        dtype = self.model.get_input_embeddings().weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        pv = pixel_values_videos[None].to(self.lane.device, dtype=dtype)
        return self.model.model.get_video_features(pixel_values_videos=pv, return_dict=True)

    @torch.no_grad()
    def prefill(self, prompt_ids: Sequence[int], video_features, with_logits: bool = False) -> VerifyOutput | None:
        """Run the prompt (its ``<video>`` ids replaced by ``video_features``) into a fresh cache."""
        self.cache = DynamicCache(config=self.model.config.text_config)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.lane.device)
        out = self.model.model(input_ids=ids, mm_encoder_outputs={"video": video_features}, cache=self.cache,
                               use_cache=True)
        if not with_logits:
            return None
        hidden = out.last_hidden_state[0, -1:]
        tokens, margins = _greedy(self.model.lm_head(hidden))
        return VerifyOutput(tokens, margins, hidden)

    @torch.no_grad()
    def forward(self, token_ids: Sequence[int]) -> VerifyOutput:
        """Feed ``token_ids`` after the cached prefix (one forward) -> the target's next token after each."""
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.lane.device)
        out = self.model.model(input_ids=ids, cache=self.cache, use_cache=True)
        hidden = out.last_hidden_state[0]
        tokens, margins = _greedy(self.model.lm_head(hidden))
        return VerifyOutput(tokens, margins, hidden)


class DrafterSession(_CachedSession):
    """EventGPT with a KV cache: event features, prefill (features spliced at ``<event>``), feeding
    tokens one block at a time, crop. Rows are final post-norm hidden states [n, D]."""

    def __init__(self, drafter, lane: Lane):
        super().__init__(drafter.model, lane)
        self.drafter = drafter

    @torch.no_grad()
    def encode_events(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP pixel values [F, 3, h, w] -> pooled event features [F + S, D] on the lane's device."""
        return self.model.encode_event_frames(pixel_values.to(self.lane.device),
                                              double_adaptor=self.drafter.double_adaptor)

    @torch.no_grad()
    def prefill(self, prompt_ids: Sequence[int], features: torch.Tensor) -> torch.Tensor:
        """Prompt with the features spliced in, into a fresh cache -> the last row [D] (row 0)."""
        self.cache = DynamicCache(config=self.model.config)
        embeds = self.model.splice_embeddings(prompt_ids, features)[None]
        out = self.model.model(inputs_embeds=embeds, cache=self.cache, use_cache=True)
        return out.last_hidden_state[0, -1]

    @torch.no_grad()
    def feed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Feed ``token_ids`` after the cached prefix -> their rows [n, D]."""
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.lane.device)
        out = self.model.model(input_ids=ids, cache=self.cache, use_cache=True)
        return out.last_hidden_state[0]

    @torch.no_grad()
    def own_next(self, row: torch.Tensor) -> int:
        """The drafter's OWN greedy token for a row (its own LM head; research mode's own answer)."""
        return int(self.model.lm_head(row[None]).argmax(-1).item())
