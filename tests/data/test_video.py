"""Uniform frame sampling and the PyAV reader (good videos, odd containers, broken files)."""

from __future__ import annotations

import uuid

import av
import fsspec
import numpy as np
import pytest

from egpt_core.data.synthetic import synthetic_scene_frames
from egpt_core.data.video import read_video_frames, sample_frame_indices
from egpt_core.errors import BadInputError


def test_sample_frame_indices_values():
    assert sample_frame_indices(10, 8) == [0, 1, 2, 3, 5, 6, 7, 9]
    assert sample_frame_indices(20) == [0, 2, 5, 8, 10, 13, 16, 19]
    assert sample_frame_indices(8, 8) == list(range(8))
    assert sample_frame_indices(3, 8) == [0, 0, 0, 0, 1, 1, 1, 2]
    assert sample_frame_indices(1, 8) == [0] * 8
    assert sample_frame_indices(100, 1) == [0]
    for bad in (0, -5):
        with pytest.raises(ValueError):
            sample_frame_indices(bad, 8)


def _mp4(synthetic_root) -> str:
    return f"{synthetic_root}/mp4/zurich_city_00_a/000000.mp4"


def test_reads_eight_rgb_frames_at_the_sampled_positions(synthetic_root):
    frames = read_video_frames(_mp4(synthetic_root), n_frames=8)
    assert len(frames) == 8
    assert all(f.mode == "RGB" and f.size == (128, 96) for f in frames)
    raw = synthetic_scene_frames(seed=0, index=0, size=(96, 128), video_frames=10).astype(np.float32)
    for got, k in zip(frames, sample_frame_indices(10, 8)):
        err = {j: float(np.abs(np.asarray(got, np.float32) - raw[j]).mean()) for j in range(10)}
        assert min(err, key=err.get) == k  # the decoded frame is closest to the raw frame it should be
        assert err[k] < 6.0


def test_more_frames_than_the_video_has_repeats_frames(synthetic_root):
    frames = read_video_frames(_mp4(synthetic_root), n_frames=16)
    assert len(frames) == 16
    np.testing.assert_array_equal(np.asarray(frames[0]), np.asarray(frames[1]))  # indices 0, 0
    assert frames[0] is not frames[1]


def test_stream_without_frame_count_is_counted_by_decoding(tmp_path, synthetic_root):
    raw = synthetic_scene_frames(seed=0, index=1, size=(96, 128), video_frames=10)
    path = tmp_path / "clip.h264"  # raw H.264 elementary stream: the demuxer reports 0 frames
    with av.open(str(path), mode="w", format="h264") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for k, rgb in enumerate(raw):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = k
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    frames = read_video_frames(str(path), n_frames=4)
    assert len(frames) == 4
    for got, k in zip(frames, sample_frame_indices(10, 4)):
        assert np.abs(np.asarray(got, np.float32) - raw[k]).mean() < 6.0


def test_reads_through_fsspec_memory(synthetic_root):
    url = f"memory://egpt-test-{uuid.uuid4().hex}/clip.mp4"
    with fsspec.open(url, "wb") as f:
        f.write(open(_mp4(synthetic_root), "rb").read())
    local = read_video_frames(_mp4(synthetic_root), n_frames=3)
    remote = read_video_frames(url, n_frames=3)
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _audio_only_mp4(path) -> None:
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=8000)
        samples = np.zeros((1, 1024), dtype=np.float32)
        for k in range(3):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, k * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def test_broken_videos_are_bad_input(tmp_path, synthetic_root):
    good = open(_mp4(synthetic_root), "rb").read()
    cases = {
        "empty.mp4": (b"", "empty file"),
        "text.mp4": (b"this is not a video at all" * 20, "unreadable or truncated video"),
        "truncated.mp4": (good[: len(good) // 2], "unreadable or truncated video"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadInputError, match=words) as err:
            read_video_frames(str(path))
        assert str(path) in str(err.value)
    audio = tmp_path / "audio.mp4"
    _audio_only_mp4(audio)
    with pytest.raises(BadInputError, match="no video stream"):
        read_video_frames(str(audio))
    with pytest.raises(BadInputError, match="not found"):
        read_video_frames(str(tmp_path / "missing.mp4"))


def test_model_card_sampling_is_the_model_cards_arange():
    """`model_card` = Video-LLaVA-7B-hf's `np.arange(0, n, n / 8).astype(int)`; linspace stays the default."""
    for n in (1, 3, 7, 8, 9, 10, 13, 20, 97, 1000):
        assert sample_frame_indices(n, 8, "model_card") == np.arange(0, n, n / 8).astype(int).tolist(), n
        assert sample_frame_indices(n, 8) == sample_frame_indices(n, 8, "linspace")
    assert sample_frame_indices(20, 8, "model_card") == [0, 2, 5, 7, 10, 12, 15, 17]  # last frame not taken
    assert sample_frame_indices(20, 8, "linspace") == [0, 2, 5, 8, 10, 13, 16, 19]
    with pytest.raises(ValueError, match="unknown frame sampling"):
        sample_frame_indices(20, 8, "middle")


def test_reader_honours_the_strategy(synthetic_root):
    raw = synthetic_scene_frames(seed=0, index=0, size=(96, 128), video_frames=10).astype(np.float32)
    frames = read_video_frames(_mp4(synthetic_root), n_frames=8, strategy="model_card")
    picked = sample_frame_indices(10, 8, "model_card")
    assert picked != sample_frame_indices(10, 8)
    for got, k in zip(frames, picked):
        err = {j: float(np.abs(np.asarray(got, np.float32) - raw[j]).mean()) for j in range(10)}
        assert min(err, key=err.get) == k


def test_extract_config_frame_sampling_default_and_choice():
    from pydantic import ValidationError

    from egpt_core.config import ExtractConfig

    base = dict(dataset="d", drafter="e", target="v", store="s")
    assert ExtractConfig(**base).frame_sampling == "linspace"
    assert ExtractConfig(**base, frame_sampling="model_card").frame_sampling == "model_card"
    with pytest.raises(ValidationError):
        ExtractConfig(**base, frame_sampling="first8")
