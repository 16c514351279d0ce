"""The synthetic dataset: research layout, determinism, and events that match the video's motion."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from egpt_core.data.dataset import load_questions, load_scenes
from egpt_core.data.synthetic import (
    EVENT_THRESHOLD,
    FRAME_US,
    RESEARCH_QUESTIONS,
    clip_start_us,
    luma,
    write_synthetic_dataset,
)
from egpt_core.data.video import read_video_frames
from egpt_core.events.io import load_events
from egpt_core.events.render import load_event_image, render_event_frames


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_give_identical_bytes(tmp_path, synthetic_root):
    again = write_synthetic_dataset(tmp_path / "again", scenes=4, questions=3, seed=0)
    first, second = _files(synthetic_root), _files(again)
    assert first.keys() == second.keys()
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []  # .npy, .json, .png and (bit-exact encoder) .mp4
    other = _files(write_synthetic_dataset(tmp_path / "other", scenes=4, questions=3, seed=1))
    npys = [n for n in first if n.endswith(".npy")]
    assert all(first[n] != other[n] for n in npys)


def test_research_layout_and_records(synthetic_root):
    records = json.loads((synthetic_root / "EventGPT_Instruction_Subset.json").read_text())
    assert len(records) == 4
    assert len({r["id"] for r in records}) == 4
    assert {r["event_data"].split("/")[0] for r in records} == {
        "zurich_city_00_a",
        "interlaken_00_a",
        "thun_00_a",
    }
    r = records[3]
    assert r["event_data"] == "zurich_city_00_a/000001.npy"
    assert r["video_data"] == "zurich_city_00_a/000001"
    assert r["mp4_data"] == "zurich_city_00_a/000001.mp4"
    assert r["event_image"] == [f"zurich_city_00_a/000001_{k}.png" for k in range(5)]
    assert r["event_image_1f"] == ["zurich_city_00_a/000001_0.png"]
    assert r["conversations"][0]["from"] == "human" and r["conversations"][0]["value"].startswith("<event>\n")
    assert r["conversations"][1] == {"from": "gpt", "value": ""}
    for rec in records:
        seq_clip = rec["video_data"]
        assert (synthetic_root / "event_npy" / rec["event_data"]).is_file()
        assert (synthetic_root / "mp4" / rec["mp4_data"]).is_file()
        assert all((synthetic_root / "event_image" / p).is_file() for p in rec["event_image"])
        assert (synthetic_root / "event_image_1f" / rec["event_image_1f"][0]).is_file()
        assert len(list((synthetic_root / "video" / seq_clip).glob("*.png"))) == 10
    questions = json.loads((synthetic_root / "questions.json").read_text())
    assert questions == [{"question": q, "count": c} for q, c in RESEARCH_QUESTIONS[:3]]
    assert load_questions(str(synthetic_root / "questions.json")) == [q for q, _ in RESEARCH_QUESTIONS[:3]]


def test_event_files_and_images_agree(synthetic_root):
    for scene in load_scenes(str(synthetic_root)):
        ev = load_events(scene.event_path)
        assert len(ev) == 4000
        assert (
            ev.x.dtype == np.uint16
            and ev.y.dtype == np.uint16
            and ev.t.dtype == np.int64
            and ev.p.dtype == np.uint8
        )
        assert np.all(np.diff(ev.t) >= 0)
        assert int(ev.x.max()) < 128 and int(ev.y.max()) < 96 and set(np.unique(ev.p)) == {0, 1}
        for path, frame in zip(scene.event_images, render_event_frames(ev, 5, sensor_size=(96, 128))):
            np.testing.assert_array_equal(load_event_image(path), frame)
        np.testing.assert_array_equal(
            load_event_image(scene.event_images_1f[0]), render_event_frames(ev, 1, sensor_size=(96, 128))[0]
        )


def _raw_frames(root, scene) -> np.ndarray:
    clip_dir = root / "video" / scene.record["video_data"]
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(clip_dir.glob("*.png"))])


def test_events_sit_where_the_video_changes(synthetic_root):
    for scene in load_scenes(str(synthetic_root)):
        raw = _raw_frames(synthetic_root, scene)
        ev = load_events(scene.event_path)
        change = np.diff(luma(raw), axis=0)  # [9, H, W]
        clip_no = int(scene.record["video_data"].split("/")[1])
        interval = (ev.t - clip_start_us(clip_no, video_frames=10)) // FRAME_US  # frame k -> k+1
        assert interval.min() >= 0 and interval.max() <= 8
        at_event = change[interval, ev.y.astype(int), ev.x.astype(int)]
        assert np.all(np.abs(at_event) > EVENT_THRESHOLD)  # every event sits on a brightness change
        assert np.all((at_event > 0) == (ev.p == 1))  # with the polarity of that change
        # and the decoded mp4 shows the motion too: frame differences are larger where events are
        video = np.stack(
            [np.asarray(f, np.float32) for f in read_video_frames(scene.video_path, n_frames=10)]
        )
        motion = np.abs(np.diff(luma(video), axis=0)).sum(axis=0)
        has_events = np.zeros(motion.shape, bool)
        has_events[ev.y, ev.x] = True
        assert np.median(motion[has_events]) > 20 * np.median(motion[~has_events])
        assert motion[has_events].mean() > 3 * motion[~has_events].mean()  # (codec noise blurs edges)
