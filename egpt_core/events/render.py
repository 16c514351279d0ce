"""Event stream -> event frames (reference §2.5), PNG writing, and safe event-image reading.

A frame is a white canvas with each event pixel painted red (p=1) or blue (p=0); the last event at
a pixel, in storage order, decides its colour (the research per-event loop's semantics).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from egpt_core.errors import BadInputError
from egpt_core.events.io import EventStream
from egpt_core.fsio import Location

WHITE = 255
RED = (255, 0, 0)
BLUE = (0, 0, 255)
#: Event images declaring more pixels than this are refused before decoding (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000
#: Largest event-frame canvas (height * width) rendered: a few events at huge coordinates must not
#: allocate gigabytes (8000 x 8000; the largest event sensors are around 1280 x 960).
MAX_CANVAS_PIXELS = 64_000_000


def check_canvas(height: int, width: int, path: str, what: str) -> None:
    """BadInputError naming ``path`` when a ``height`` x ``width`` canvas exceeds MAX_CANVAS_PIXELS."""
    if height * width > MAX_CANVAS_PIXELS:
        raise BadInputError(
            path,
            f"{what} needs a {height}x{width} canvas, more than the {MAX_CANVAS_PIXELS:,}-pixel limit; "
            "the coordinates are corrupt or the sensor is larger than any supported one",
        )


def slice_bounds(n_events: int, n_frames: int) -> list[tuple[int, int]]:
    """Equal-count slices in storage order: k*floor(E/n) .. (k+1)*floor(E/n); the last takes the rest."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    step = n_events // n_frames
    return [(k * step, (k + 1) * step if k < n_frames - 1 else n_events) for k in range(n_frames)]


def render_event_frames(
    events: EventStream, n_frames: int, sensor_size: tuple[int, int] | None = None
) -> list[np.ndarray]:
    """``n_frames`` event frames, each [H, W, 3] uint8, from equal-count slices of ``events``.

    Canvas: ``sensor_size`` (H, W) when given (events outside it are bad input); otherwise per
    slice H = max(y)+1, W = max(x)+1 (research behaviour). A slice with no events (fewer events
    than frames) gets a white canvas of the sensor size or, without one, of the whole stream's extent.
    """
    x, y = np.asarray(events.x), np.asarray(events.y)
    p = np.asarray(events.p).astype(np.uint8, copy=False)
    if len(x) and (int(x.min()) < 0 or int(y.min()) < 0):
        raise BadInputError(events.path, "negative x or y coordinates")
    if sensor_size is not None:
        height, width = int(sensor_size[0]), int(sensor_size[1])
        if height <= 0 or width <= 0:
            raise ValueError(f"sensor_size must be positive (height, width), got {sensor_size}")
        check_canvas(height, width, events.path, f"the sensor size {height}x{width}")
        if len(x) and (int(x.max()) >= width or int(y.max()) >= height):
            raise BadInputError(
                events.path,
                f"events outside the sensor size {height}x{width} "
                f"(max x={int(x.max())}, max y={int(y.max())})",
            )
    elif len(x):  # data-dependent canvas: bounded before anything is allocated
        check_canvas(int(y.max()) + 1, int(x.max()) + 1, events.path,
                     f"events up to x={int(x.max())}, y={int(y.max())} (no sensor size declared or configured)")
    x = x.astype(np.intp, copy=False)  # bounded above; uint64 coordinates would not add to intp indices
    frames = []
    for start, stop in slice_bounds(len(x), n_frames):
        xs, ys, ps = x[start:stop], y[start:stop], p[start:stop]
        if sensor_size is not None:
            h, w = height, width
        elif len(xs):
            h, w = int(ys.max()) + 1, int(xs.max()) + 1
        elif len(x):
            h, w = int(y.max()) + 1, int(x.max()) + 1
        else:
            raise BadInputError(events.path, "empty event stream (0 events) and no sensor size")
        frames.append(_paint(xs, ys, ps, h, w))
    return frames


def _paint(x: np.ndarray, y: np.ndarray, p: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, 3] uint8: white, each touched pixel coloured by the polarity of its LAST event.

    ``np.maximum.at`` gives every pixel the index of its last event (-1 if none); indexing the
    polarities extended by a sentinel 2 at position -1 turns that into a per-pixel state
    0 = negative, 1 = positive, 2 = untouched, from which the three colour planes follow.
    """
    pixel = y.astype(np.intp)  # widen before multiplying: uint16 * width would wrap around
    pixel *= width
    pixel += x
    last_event = np.full(height * width, -1, dtype=np.intp)
    np.maximum.at(last_event, pixel, np.arange(len(pixel), dtype=np.intp))
    del pixel
    state = np.append(p, np.uint8(2))[last_event]
    del last_event
    # red = not negative, green = untouched, blue = not positive
    planes = np.stack([state != 0, state == 2, state != 1], axis=-1).view(np.uint8) * np.uint8(WHITE)
    return planes.reshape(height, width, 3)


def save_frames_png(
    frames: list[np.ndarray], out_dir: str | Location, stem: str, storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Write ``<out_dir>/<stem>_<k>.png`` for each frame [H, W, 3] uint8 (``out_dir`` a Location, or any
    fsspec URL with its ``storage_options``), each atomically; returns their URLs."""
    from PIL import Image

    out = Location.of(out_dir, storage_options)
    out.makedirs()
    written = []
    for k, frame in enumerate(frames):
        dest = out.child(f"{stem}_{k}.png")
        with dest.open("wb") as f:  # buffered; the file is replaced whole on close
            Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)).save(f, format="PNG")
        written.append(dest.url)
    return written


def load_event_image(where: str | Location, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """A pre-rendered event image (a Location, or a URL with its ``storage_options``) as [H, W, 3] uint8
    RGB; refuses images declaring > MAX_IMAGE_PIXELS."""
    from PIL import Image, UnidentifiedImageError

    src = Location.of(where, storage_options)
    url, fs, path = src.url, src.fs, src.path
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise BadInputError(url, "file not found") from None
    with f:
        try:
            with Image.open(f) as im:  # reads the header only
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise BadInputError(
                        url,
                        f"image declares {width}x{height} pixels (> {MAX_IMAGE_PIXELS:,}); refusing to decode",
                    )
                rgb = im.convert("RGB")  # decodes
        except BadInputError:
            raise
        except Image.DecompressionBombError as exc:
            raise BadInputError(url, f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise BadInputError(url, "not a readable image") from None
        except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
            raise BadInputError(url, f"truncated or corrupt image ({exc})") from None
    return np.asarray(rgb, dtype=np.uint8)
