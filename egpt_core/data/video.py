"""Video frames for the target model: THE one uniform sampling rule and a PyAV reader over fsspec."""

from __future__ import annotations

from typing import Any

import numpy as np

from egpt_core.errors import BadInputError
from egpt_core.fsio import open_input


def sample_frame_indices(n_total: int, n_frames: int = 8) -> list[int]:
    """``n_frames`` indices uniformly spread over 0..n_total-1 (floor of linspace; repeats when short)."""
    if n_total <= 0:
        raise ValueError(f"n_total must be positive, got {n_total}")
    if n_frames <= 0:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    return [int(i) for i in np.floor(np.linspace(0, n_total - 1, n_frames))]


def read_video_frames(url: str, n_frames: int = 8, storage_options: dict[str, Any] | None = None) -> list:
    """``n_frames`` RGB ``PIL.Image`` frames picked by :func:`sample_frame_indices` from all decoded frames.

    One decoding pass when the stream's reported frame count is right; when it reports 0 or a
    wrong count, a second pass picks by the decoded count. Only sampled frames are kept in memory.
    """
    if n_frames <= 0:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    reported, count, kept = _decode(url, storage_options, n_total=None, n_frames=n_frames)
    if count != reported:
        _, _, kept = _decode(url, storage_options, n_total=count, n_frames=n_frames)
    wanted = sample_frame_indices(count, n_frames)
    if any(i not in kept for i in wanted):
        raise BadInputError(url, "video changed between decoding passes")
    return [kept[i].copy() for i in wanted]


def _decode(
    url: str, storage_options: dict[str, Any] | None, n_total: int | None, n_frames: int
) -> tuple[int, int, dict[int, Any]]:
    """Decode every frame of the first video stream.

    Returns (reported frame count, decoded frame count, {index: RGB image}) where the kept indices
    are sampled from ``n_total`` (default: the reported count, when it is positive).
    """
    import av

    fs, path, f = open_input(url, storage_options)
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
                keep = set(sample_frame_indices(total, n_frames)) if total > 0 else set()
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
