"""A small, seeded dataset in the research layout (reference §2.2) whose events match its video.

Each scene is a few coloured shapes (a rectangle and a disc) moving over a static gradient
background. Events are drawn where the brightness changes between consecutive RGB frames
(polarity = sign of the change, timestamps inside that frame interval), so the event stream,
the event images, the raw frames (`video/<seq>/<clip>/<k:06d>.png`) and the mp4 all show the same
motion. Same arguments -> byte-identical files (the mp4 is written bit-exact).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np

from egpt_core.events.io import EventStream, events_to_npy_bytes
from egpt_core.events.render import render_event_frames, save_frames_png
from egpt_core.fsio import Location

SEQUENCES = ("zurich_city_00_a", "interlaken_00_a", "thun_00_a")
FPS = 10
FRAME_US = 1_000_000 // FPS
#: Luma change (0..255 scale) below which a pixel emits no events.
EVENT_THRESHOLD = 8.0

#: The first questions of the research question list (reference §2.7), with their source counts.
RESEARCH_QUESTIONS: tuple[tuple[str, int], ...] = (
    ("What are the key elements in this scene?", 1675),
    ("Can you elaborate on the elements of the scene provided?", 1292),
    ("What is this scene about?", 1225),
    ("What is the layout of the road in the scene?", 1005),
    ("What type of vehicles are present in the scene and how are they positioned?", 827),
    ("What do you think is going on in this scene?", 680),
    ("What elements are present in the scene?", 654),
    ("What do you see happening in this scene?", 593),
    ("Describe the following scene.", 545),
    ("What types of vehicles are present in the scene and how are they positioned?", 543),
)


def scene_location(index: int) -> tuple[str, int]:
    """(sequence name, clip number) of scene ``index``: scenes go round-robin over SEQUENCES."""
    return SEQUENCES[index % len(SEQUENCES)], index // len(SEQUENCES)


def clip_start_us(clip_no: int, video_frames: int) -> int:
    """Timestamp (µs) of a clip's first frame: research clips overlap by half their duration."""
    return clip_no * video_frames * FRAME_US // 2


def synthetic_scene_frames(
    seed: int, index: int, size: tuple[int, int] = (96, 128), video_frames: int = 10
) -> np.ndarray:
    """RGB frames [F, H, W, 3] uint8 of scene ``index``: a rectangle and a disc moving over a gradient."""
    height, width = size
    rng = np.random.default_rng([seed, index, 1])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    ramp = 40.0 + 50.0 * (0.6 * xx / max(width - 1, 1) + 0.4 * yy / max(height - 1, 1))
    background = np.clip(ramp[..., None] * tint, 0, 255).astype(np.uint8)

    rect_h, rect_w = max(height // 5, 3), max(width // 4, 3)
    radius = max(min(height, width) // 8, 2)
    rect_colour = np.array([230, int(rng.integers(120, 220)), 40], dtype=np.uint8)
    disc_colour = np.array([60, int(rng.integers(170, 240)), 250], dtype=np.uint8)
    rect_start = rng.uniform([0, 0], [height - rect_h, width - rect_w])
    disc_start = rng.uniform([radius, radius], [height - radius, width - radius])
    rect_velocity = _velocity(rng, min(height, width))
    disc_velocity = _velocity(rng, min(height, width))

    frames = np.empty((video_frames, height, width, 3), dtype=np.uint8)
    for k in range(video_frames):
        frame = background.copy()
        ry = int(round(_bounce(rect_start[0] + rect_velocity[0] * k, 0, height - rect_h)))
        rx = int(round(_bounce(rect_start[1] + rect_velocity[1] * k, 0, width - rect_w)))
        frame[ry : ry + rect_h, rx : rx + rect_w] = rect_colour
        cy = _bounce(disc_start[0] + disc_velocity[0] * k, radius, height - radius)
        cx = _bounce(disc_start[1] + disc_velocity[1] * k, radius, width - radius)
        frame[(yy - round(cy)) ** 2 + (xx - round(cx)) ** 2 <= radius**2] = disc_colour
        frames[k] = frame
    return frames


def _velocity(rng: np.random.Generator, extent: int) -> np.ndarray:
    """Pixels per frame, 2..extent/8 in magnitude, random direction."""
    speed = rng.uniform(2.0, max(extent / 8.0, 3.0))
    angle = rng.uniform(0, 2 * np.pi)
    return np.array([speed * np.sin(angle), speed * np.cos(angle)])


def _bounce(position: float, low: float, high: float) -> float:
    """Reflect ``position`` into [low, high] (a shape bouncing off the borders)."""
    span = high - low
    if span <= 0:
        return low
    r = (position - low) % (2 * span)
    return low + (r if r <= span else 2 * span - r)


def luma(frames: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] uint8 -> [..., H, W] float32 brightness (BT.601)."""
    return frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def synthetic_scene_events(
    frames: np.ndarray, n_events: int, seed: int, index: int, t_start_us: int = 0
) -> dict[str, np.ndarray]:
    """``n_events`` events where brightness changes between consecutive frames, sorted by time.

    Pixels are drawn with probability proportional to |change| (above EVENT_THRESHOLD); polarity is
    1 where the pixel gets brighter; t lies inside the interval between the two frames (µs).
    """
    rng = np.random.default_rng([seed, index, 2])
    change = np.diff(luma(frames), axis=0)  # [F-1, H, W]
    weight = np.where(np.abs(change) > EVENT_THRESHOLD, np.abs(change), 0.0).astype(np.float64).ravel()
    if weight.sum() == 0:
        raise RuntimeError(f"synthetic scene {index} has no motion; choose another seed")
    flat = np.sort(rng.choice(weight.size, size=n_events, p=weight / weight.sum()))
    interval, y, x = np.unravel_index(flat, change.shape)
    t = t_start_us + interval.astype(np.int64) * FRAME_US + rng.integers(0, FRAME_US, size=n_events)
    order = np.argsort(t, kind="stable")
    return {
        "x": x[order].astype(np.uint16),
        "y": y[order].astype(np.uint16),
        "t": t[order].astype(np.int64),
        "p": (change.ravel()[flat[order]] > 0).astype(np.uint8),
    }


def _scene_uuid(seed: int, index: int) -> str:
    digest = hashlib.sha256(f"egpt-synthetic:{seed}:{index}".encode()).digest()[:16]
    return str(uuid.UUID(bytes=digest, version=4))


def write_synthetic_dataset(
    out_dir: str | Path,
    scenes: int = 4,
    questions: int = 3,
    seed: int = 0,
    size: tuple[int, int] = (96, 128),
    n_events: int = 4000,
    video_frames: int = 10,
) -> Path:
    """Write a research-layout dataset under ``out_dir`` (local) and return its root (one pass over
    the scenes, ~60 lines with the signature)."""
    height, width = size
    if scenes < 1 or not 1 <= questions <= len(RESEARCH_QUESTIONS):
        raise ValueError(f"need scenes >= 1 and 1 <= questions <= {len(RESEARCH_QUESTIONS)}")
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise ValueError(f"size must be even and at least 16x16 (yuv420p video), got {size}")
    if video_frames < 2 or n_events < 1:
        raise ValueError("need video_frames >= 2 and n_events >= 1")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    question_list = [q for q, _ in RESEARCH_QUESTIONS[:questions]]
    records = []
    for index in range(scenes):
        seq, clip_no = scene_location(index)
        clip = f"{clip_no:06d}"
        frames = synthetic_scene_frames(seed, index, size, video_frames)
        t_start = clip_start_us(clip_no, video_frames)
        ev = synthetic_scene_events(frames, n_events, seed, index, t_start_us=t_start)

        npy_path = root / "event_npy" / seq / f"{clip}.npy"
        npy_path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"time_start": t_start, "time_end": t_start + video_frames * FRAME_US, "num_events": n_events}
        Location(str(npy_path)).write_atomic(events_to_npy_bytes(ev["x"], ev["y"], ev["t"], ev["p"], **meta))

        stream = EventStream(x=ev["x"], y=ev["y"], t=ev["t"], p=ev["p"], path=str(npy_path), sensor_size=size)
        save_frames_png(
            render_event_frames(stream, 5, sensor_size=size), str(root / "event_image" / seq), clip
        )
        save_frames_png(
            render_event_frames(stream, 1, sensor_size=size), str(root / "event_image_1f" / seq), clip
        )
        _write_video_pngs(frames, root / "video" / seq / clip)
        write_mp4(frames, root / "mp4" / seq / f"{clip}.mp4")

        records.append(
            {
                "id": _scene_uuid(seed, index),
                "split": f"synthetic_seed{seed}",
                "event_data": f"{seq}/{clip}.npy",
                "video_data": f"{seq}/{clip}",
                "mp4_data": f"{seq}/{clip}.mp4",
                "event_image": [f"{seq}/{clip}_{k}.png" for k in range(5)],
                "event_image_1f": [f"{seq}/{clip}_0.png"],
                "conversations": [
                    {"from": "human", "value": f"<event>\n{question_list[index % questions]}"},
                    {"from": "gpt", "value": ""},
                ],
            }
        )
    Location(str(root / "EventGPT_Instruction_Subset.json")).write_atomic(json.dumps(records, indent=2) + "\n")
    questions_json = [{"question": q, "count": c} for q, c in RESEARCH_QUESTIONS[:questions]]
    Location(str(root / "questions.json")).write_atomic(json.dumps(questions_json, indent=2) + "\n")
    return root


def _write_video_pngs(frames: np.ndarray, clip_dir: Path) -> None:
    """The raw RGB frames of a clip as ``<clip_dir>/<k:06d>.png`` (the research `video/` folder)."""
    from PIL import Image

    clip_dir.mkdir(parents=True, exist_ok=True)
    for k, rgb in enumerate(frames):
        Image.fromarray(rgb).save(clip_dir / f"{k:06d}.png", format="PNG")


def write_mp4(frames: np.ndarray, path: Path, fps: int = FPS) -> str:
    """Encode [F, H, W, 3] uint8 frames as yuv420p H.264 (mpeg4 when libx264 is missing), bit-exact.

    Returns the codec used. Encoder version strings are left out so equal frames give equal bytes.
    """
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"crf": "28", "preset": "fast"} if codec == "libx264" else {"qscale": "4"}
    with av.open(str(path), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for k, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return codec
