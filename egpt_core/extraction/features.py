"""Stage 1: drafter event features, computed once per scene and cached under the store's `features/`.

Cache key = event file fingerprint + vision-tower fingerprint + render settings, so a changed
recording, CLIP tower, projector/adaptor or render setting recomputes; anything else is reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from egpt_core.config import EventRenderConfig
from egpt_core.data import Scene
from egpt_core.errors import BadInputError
from egpt_core.events import load_event_image, load_events, render_event_frames
from egpt_core.fingerprint import file_fingerprint, hash_json

FEATURES_VERSION = "features-v1"


def scene_event_frames(scene: Scene, render: EventRenderConfig, storage_options: dict | None = None) -> list:
    """Event frames [H, W, 3] uint8 for one scene, rendered from events or read from PNGs."""
    if render.source == "events":
        if not scene.event_path:
            raise BadInputError(scene.scene_id, "scene has no event stream (event_data)")
        events = load_events(scene.event_path, storage_options)
        return render_event_frames(events, render.n_frames, render.sensor_size)
    images = list(scene.event_images or [])
    one_frame = list(scene.event_images_1f or [])
    paths = one_frame[:1] if (render.n_frames == 1 and one_frame) else images[: render.n_frames]
    if not paths:
        raise BadInputError(scene.scene_id, "scene has no event images")
    return [load_event_image(p) for p in paths]


def scene_input_fingerprint(scene: Scene, render: EventRenderConfig, storage_options: dict | None = None) -> str:
    """Fingerprint of the files stage 1 reads for a scene."""
    if render.source == "events":
        if not scene.event_path:
            raise BadInputError(scene.scene_id, "scene has no event stream (event_data)")
        files = [scene.event_path]
    else:
        one_frame = list(scene.event_images_1f or [])
        files = one_frame[:1] if (render.n_frames == 1 and one_frame) else list(scene.event_images or [])[: render.n_frames]
        if not files:
            raise BadInputError(scene.scene_id, "scene has no event images")
    try:
        return hash_json([file_fingerprint(f, storage_options) for f in files])
    except FileNotFoundError as exc:
        raise BadInputError(files[0], "file not found") from exc


def feature_key(scene: Scene, drafter, render: EventRenderConfig, storage_options: dict | None = None) -> str:
    return hash_json({
        "v": FEATURES_VERSION,
        "events": scene_input_fingerprint(scene, render, storage_options),
        "vision": drafter.vision_fingerprint,
        "render": render.model_dump(mode="json"),
    })


@dataclass
class SceneFeatureInputs:
    """What a scene's features need besides the model forward: the cache key and either the cached
    features [F + S, D] or the drafter's preprocessed event frames (CLIP pixel values [F, 3, h, w])."""

    key: str
    cached: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None


def scene_feature_inputs(scene: Scene, drafter, render: EventRenderConfig, writer,
                         storage_options: dict | None = None) -> SceneFeatureInputs:
    """The cache lookup, event rendering and CLIP preprocessing of one scene (no model forward: safe to
    run in a background thread beside the model work)."""
    key = feature_key(scene, drafter, render, storage_options)
    cached = writer.get_features(key)
    if cached is not None:
        return SceneFeatureInputs(key, cached=cached["features"].float())
    frames = scene_event_frames(scene, render, storage_options)
    return SceneFeatureInputs(key, pixel_values=drafter.preprocess_frames(frames))


def encode_scene_features(drafter, inputs: SceneFeatureInputs) -> torch.Tensor:
    """Pooled event features [F + S, D] (float32, CPU) of preprocessed event frames: the second half of
    ``drafter.event_features`` (bitwise the same)."""
    return drafter.model.encode_event_frames(inputs.pixel_values, double_adaptor=drafter.double_adaptor).float().cpu()


def scene_features(scene: Scene, drafter, render: EventRenderConfig, writer, storage_options: dict | None = None,
                   stats: dict | None = None) -> torch.Tensor:
    """Pooled event features [F + S, D] (float32) for a scene: from the cache, else computed + cached."""
    key = feature_key(scene, drafter, render, storage_options)
    cached = writer.get_features(key)
    if cached is not None:
        if stats is not None:
            stats["features_cached"] = stats.get("features_cached", 0) + 1
        return cached["features"].float()
    frames = scene_event_frames(scene, render, storage_options)
    feats = drafter.event_features(frames)
    writer.put_features(key, {"features": feats.contiguous()})
    if stats is not None:
        stats["features_computed"] = stats.get("features_computed", 0) + 1
    return feats
