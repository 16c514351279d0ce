"""render_event_frames against a per-event loop; PNG writing; refusing bad or huge event images."""

from __future__ import annotations

import struct
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from egpt_core.errors import BadInputError
from egpt_core.events.io import EventStream, load_events
from egpt_core.events.render import (
    MAX_IMAGE_PIXELS,
    load_event_image,
    render_event_frames,
    save_frames_png,
    slice_bounds,
)

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eventgpt_sample1.npy"
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def loop_reference(x, y, p, n_frames, sensor_size=None):
    """The research per-event loop: equal-count slices, white canvas, later events overwrite."""
    e = len(x)
    step = e // n_frames
    frames = []
    for k in range(n_frames):
        start, stop = k * step, ((k + 1) * step if k < n_frames - 1 else e)
        if sensor_size:
            h, w = sensor_size
        else:
            h, w = int(max(y[start:stop])) + 1, int(max(x[start:stop])) + 1
        img = np.full((h, w, 3), 255, dtype=np.uint8)
        for xi, yi, pi in zip(x[start:stop].tolist(), y[start:stop].tolist(), p[start:stop].tolist()):
            img[yi, xi] = RED if pi == 1 else BLUE
        frames.append(img)
    return frames


def colour_counts(img: np.ndarray) -> dict[tuple[int, int, int], int]:
    packed = img.reshape(-1, 3).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.uint32)
    codes, counts = np.unique(packed, return_counts=True)
    return {(int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255): int(n) for c, n in zip(codes, counts)}


def stream(x, y, p, path="mem.npy") -> EventStream:
    x, y, p = (np.asarray(a) for a in (x, y, p))
    return EventStream(
        x=x.astype(np.uint16), y=y.astype(np.uint16), t=np.arange(len(x)), p=p.astype(np.uint8), path=path
    )


@pytest.fixture(scope="module")
def sample() -> EventStream:
    return load_events(str(SAMPLE))


@pytest.mark.parametrize("n_frames", [1, 5])
def test_real_recording_matches_the_per_event_loop(sample, n_frames):
    frames = render_event_frames(sample, n_frames)
    reference = loop_reference(sample.x, sample.y, sample.p, n_frames)
    assert len(frames) == n_frames
    for got, want in zip(frames, reference):
        assert got.dtype == np.uint8 and got.shape == want.shape
        assert colour_counts(got) == colour_counts(want)
        np.testing.assert_array_equal(got, want)
        assert set(colour_counts(got)) == {RED, BLUE, WHITE}
    if n_frames == 1:
        assert frames[0].shape == (480, 640, 3)
        counts = colour_counts(frames[0])
        # every touched pixel is red or blue; far fewer pixels than events (overwrites happened)
        assert counts[RED] + counts[BLUE] == len(np.unique(sample.y.astype(int) * 640 + sample.x))
        assert counts[RED] + counts[BLUE] < len(sample)


def test_later_events_overwrite_earlier_ones_in_storage_order():
    # pixel (0,0): negative then positive -> red; pixel (1,0): positive then negative -> blue.
    # The research vectorised order ("positives, then negatives") would make (0,0) blue.
    frame = render_event_frames(stream([0, 1, 0, 1, 3], [0, 0, 0, 0, 2], [0, 1, 1, 0, 1]), 1)[0]
    assert frame.shape == (3, 4, 3)
    assert tuple(frame[0, 0]) == RED
    assert tuple(frame[0, 1]) == BLUE
    assert tuple(frame[2, 3]) == RED
    assert tuple(frame[1, 1]) == WHITE
    assert colour_counts(frame) == {RED: 2, BLUE: 1, WHITE: 9}


def test_equal_count_slices_and_data_dependent_canvas():
    assert slice_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert slice_bounds(3, 5) == [(0, 0), (0, 0), (0, 0), (0, 0), (0, 3)]
    with pytest.raises(ValueError):
        slice_bounds(10, 0)
    # first slice stays in a 2x4 corner, second reaches 6x8: canvases differ per slice
    ev = stream([0, 3, 1, 7, 2, 5], [0, 1, 1, 5, 0, 2], [1, 0, 1, 1, 0, 0])
    frames = render_event_frames(ev, 2)
    assert [f.shape for f in frames] == [(2, 4, 3), (6, 8, 3)]
    for got, want in zip(frames, loop_reference(ev.x, ev.y, ev.p, 2)):
        np.testing.assert_array_equal(got, want)


def test_sensor_size_canvas(sample):
    frames = render_event_frames(sample, 5, sensor_size=(500, 700))
    reference = loop_reference(sample.x, sample.y, sample.p, 5, sensor_size=(500, 700))
    for got, want in zip(frames, reference):
        assert got.shape == (500, 700, 3)
        np.testing.assert_array_equal(got, want)
    # fewer events than frames: the empty slices are white canvases of the sensor size
    few = render_event_frames(stream([1, 2], [1, 1], [1, 0]), 3, sensor_size=(4, 4))
    assert [colour_counts(f) for f in few[:2]] == [{WHITE: 16}, {WHITE: 16}]
    assert colour_counts(few[2]) == {RED: 1, BLUE: 1, WHITE: 14}


def test_events_outside_the_sensor_are_bad_input(sample):
    with pytest.raises(BadInputError, match="outside the sensor size 480x600") as err:
        render_event_frames(sample, 1, sensor_size=(480, 600))
    assert str(SAMPLE) in str(err.value)


def test_png_round_trip_local_and_memory(tmp_path, sample):
    frames = render_event_frames(sample, 5)
    paths = save_frames_png(frames, str(tmp_path / "out"), "000123")
    assert paths == [str(tmp_path / "out" / f"000123_{k}.png") for k in range(5)]
    for path, frame in zip(paths, frames):
        np.testing.assert_array_equal(load_event_image(path), frame)
    url = f"memory://egpt-test-{uuid.uuid4().hex}/imgs"
    mem_paths = save_frames_png(frames[:1], url, "clip")
    assert mem_paths == [f"{url}/clip_0.png"]
    np.testing.assert_array_equal(load_event_image(mem_paths[0]), frames[0])


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but whose data is tiny (a decompression bomb shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_huge_declared_image_is_refused_before_decoding(tmp_path):
    side = int(MAX_IMAGE_PIXELS**0.5) + 100  # over our limit, under Pillow's own bomb limit
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_declaring(side, side))
    with pytest.raises(BadInputError, match="declares .* refusing to decode") as err:
        load_event_image(str(huge))
    assert str(huge) in str(err.value)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_declaring(100_000, 100_000))  # Pillow itself refuses this one
    with pytest.raises(BadInputError) as err:
        load_event_image(str(bomb))
    assert str(bomb) in str(err.value)


def test_truncated_missing_and_non_images(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    for path, words in [
        (truncated, "truncated or corrupt"),
        (text, "not a readable image"),
        (tmp_path / "missing.png", "not found"),
    ]:
        with pytest.raises(BadInputError, match=words) as err:
            load_event_image(str(path))
        assert str(path) in str(err.value)
