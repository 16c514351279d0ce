"""Event rendering: the vectorised renderer vs the research per-event loop, on the real recording."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.timing import best_time
from egpt_core.events.io import load_events
from egpt_core.events.render import render_event_frames, slice_bounds

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eventgpt_sample1.npy"
FRAME_COUNTS = (1, 5)
REPEATS = 3


def render_loop_reference(x: np.ndarray, y: np.ndarray, p: np.ndarray, n_frames: int) -> list[np.ndarray]:
    """The research loop (`common.generate_event_image`): one Python iteration per event."""
    frames = []
    for start, stop in slice_bounds(len(x), n_frames):
        xs, ys, ps = x[start:stop], y[start:stop], p[start:stop]
        img = np.full((int(ys.max()) + 1, int(xs.max()) + 1, 3), 255, dtype=np.uint8)
        for i in range(len(xs)):
            img[ys[i], xs[i]] = (255, 0, 0) if ps[i] == 1 else (0, 0, 255)
        frames.append(img)
    return frames




def run() -> dict:
    events = load_events(str(SAMPLE))
    loop_s = vectorised_s = 0.0
    for n in FRAME_COUNTS:
        fast = render_event_frames(events, n)
        slow = render_loop_reference(events.x, events.y, events.p, n)
        if any(not np.array_equal(a, b) for a, b in zip(fast, slow)) or len(fast) != len(slow):
            raise AssertionError(f"vectorised and loop renders differ ({n} frames)")
        vectorised_s += best_time(lambda n=n: render_event_frames(events, n), REPEATS * 5)
        loop_s += best_time(lambda n=n: render_loop_reference(events.x, events.y, events.p, n), REPEATS)
    return {
        "render_vectorised_vs_loop": {
            "ratio": loop_s / vectorised_s,
            "goal": ">= 10",
            "unit": "x faster (real recording, 1 and 5 frames)",
            "events": len(events),
            "loop_ms": round(loop_s * 1000, 1),
            "vectorised_ms": round(vectorised_s * 1000, 2),
        }
    }


if __name__ == "__main__":
    print(run())
