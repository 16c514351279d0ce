"""Video frames for the target model: THE one frame-sampling function and a PyAV reader over fsspec.

Two named strategies (``FrameSampling``), both uniform over the clip:

* ``linspace`` (default, the research scripts' rule): ``floor(linspace(0, n-1, k))`` — first and last
  frame included.
* ``model_card`` (the Video-LLaVA-7B-hf model card's example): ``arange(0, n, n/k)`` cast to int —
  starts at frame 0 and stops one stride before the end (the last frame is not sampled).

For n = 20 frames and k = 8 they pick [0, 2, 5, 8, 10, 13, 16, 19] vs [0, 2, 5, 7, 10, 12, 15, 17]. The
research targets were extracted with ``linspace``; keep it to reproduce them, pick ``model_card`` to
match what Video-LLaVA's authors show.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np

from egpt_core.errors import BadInputError
from egpt_core.fsio import Location, open_input

FrameSampling = Literal["linspace", "model_card"]
FRAME_SAMPLINGS: tuple[str, ...] = get_args(FrameSampling)


def sample_frame_indices(n_total: int, n_frames: int = 8, strategy: FrameSampling = "linspace") -> list[int]:
    """``n_frames`` indices spread over 0..n_total-1 by ``strategy`` (repeats when the clip is short)."""
    if n_total <= 0:
        raise ValueError(f"n_total must be positive, got {n_total}")
    if n_frames <= 0:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    if strategy == "linspace":
        return [int(i) for i in np.floor(np.linspace(0, n_total - 1, n_frames))]
    if strategy == "model_card":
        return [int(i) for i in np.arange(0, n_total, n_total / n_frames).astype(int)[:n_frames]]
    raise ValueError(f"unknown frame sampling {strategy!r}; expected one of {FRAME_SAMPLINGS}")


def read_video_frames(where: str | Location, n_frames: int = 8, storage_options: dict[str, Any] | None = None,
                      strategy: FrameSampling = "linspace") -> list:
    """``n_frames`` RGB ``PIL.Image`` frames picked by :func:`sample_frame_indices` from all decoded frames.

    One decoding pass when the stream's reported frame count is right; when it reports 0 or a
    wrong count, a second pass picks by the decoded count. Only sampled frames are kept in memory.
    """
    if n_frames <= 0:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    src = Location.of(where, storage_options)
    url = src.url
    reported, count, kept = _decode(src, n_total=None, n_frames=n_frames, strategy=strategy)
    if count != reported:
        _, _, kept = _decode(src, n_total=count, n_frames=n_frames, strategy=strategy)
    wanted = sample_frame_indices(count, n_frames, strategy)
    if any(i not in kept for i in wanted):
        raise BadInputError(url, "video changed between decoding passes")
    return [kept[i].copy() for i in wanted]


def _decode(
    src: Location, n_total: int | None, n_frames: int, strategy: FrameSampling = "linspace",
) -> tuple[int, int, dict[int, Any]]:
    """Decode every frame of the first video stream.

    Returns (reported frame count, decoded frame count, {index: RGB image}) where the kept indices
    are sampled from ``n_total`` (default: the reported count, when it is positive).
    """
    import av

    url = src.url
    fs, path, f = open_input(src)
    kept: dict[int, Any] = {}
    count = 0
    with f:
        if fs.size(path) == 0:
            raise BadInputError(url, "empty file (0 bytes)")
        try:
            with av.open(f, mode="r") as container:
                if not container.streams.video:
                    raise BadInputError(url, "no video stream")
                reported = int(container.streams.video[0].frames or 0)
                total = n_total if n_total is not None else reported
                keep = set(sample_frame_indices(total, n_frames, strategy)) if total > 0 else set()
                for frame in container.decode(video=0):
                    if count in keep:
                        kept[count] = frame.to_image()  # RGB
                    count += 1
        except BadInputError:
            raise
        except (av.error.FFmpegError, EOFError, OSError, ValueError) as exc:
            raise BadInputError(url, f"unreadable or truncated video ({type(exc).__name__}: {exc})") from None
    if count == 0:
        raise BadInputError(url, "no decodable video frames")
    return reported, count, kept
