"""Dataset manifests: scenes from `EventGPT_Instruction_Subset.json`, the question list, and pairs.

Layout (reference §2.2): paths in a record are relative to `event_npy/`, `event_image/`,
`event_image_1f/` and `mp4/` under the dataset root; they become absolute URLs here. A record whose
files are missing is still returned (the failure is recorded per pair later); a manifest that is
not valid JSON, or whose records are malformed, is bad input as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from egpt_core.errors import BadInputError
from egpt_core.fsio import Location, is_local, join

MANIFEST_NAME = "EventGPT_Instruction_Subset.json"
QUESTIONS_NAME = "questions.json"


@dataclass(frozen=True, eq=False)
class Scene:
    """One event clip + its RGB video. Paths are absolute URLs (None when the record has none)."""

    scene_id: str
    event_path: str | None
    event_images: tuple[str, ...]
    video_path: str | None
    record: dict[str, Any]
    event_images_1f: tuple[str, ...] = field(default=())


@dataclass(frozen=True, eq=False)
class Pair:
    """(scene, question); ``pair_id`` depends only on the scene id and the question text."""

    pair_id: str
    scene: Scene
    question_idx: int
    question: str


def pair_id_for(scene_id: str, question: str) -> str:
    return f"{scene_id}|q{hashlib.sha1(question.encode('utf-8')).hexdigest()[:8]}"


def read_json(where: str | Location, storage_options: dict[str, Any] | None = None) -> Any:
    """Parse a JSON file (a Location, or a URL with its ``storage_options``); missing, undecodable or
    malformed -> BadInputError naming the file."""
    src = Location.of(where, storage_options)
    url, fs, path = src.url, src.fs, src.path
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise BadInputError(url, "file not found") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise BadInputError(url, f"cannot open: {exc}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadInputError(url, f"not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(url, f"malformed JSON: {exc}") from None


def dataset_root(dataset_url: str) -> str:
    """The dataset's root directory: ``dataset_url`` itself, or the directory of a manifest file
    given directly (``--dataset .../EventGPT_Instruction_Subset.json``)."""
    if str(dataset_url).endswith(".json"):
        return posixpath.dirname(str(dataset_url)) or "."
    return str(dataset_url).rstrip("/")


def questions_url(dataset_url: str, questions: str | None = None) -> str:
    """The questions file: ``questions`` when given, else ``questions.json`` in the dataset root."""
    return questions or join(dataset_root(dataset_url), QUESTIONS_NAME)


def load_scenes(
    dataset: str | Location, storage_options: dict[str, Any] | None = None, max_scenes: int | None = None
) -> list[Scene]:
    """Scenes of a dataset root (or of the manifest file itself; a Location, or a URL with its
    ``storage_options``), in manifest order."""
    src = Location.of(dataset, storage_options)
    dataset_url = src.url
    root = dataset_root(dataset_url)
    manifest_url = dataset_url if dataset_url.endswith(".json") else join(root, MANIFEST_NAME)
    records = read_json(Location(manifest_url, src.storage_options))
    if not isinstance(records, list):
        raise BadInputError(manifest_url, f"expected a JSON list of records, found {type(records).__name__}")
    if max_scenes is not None:
        records = records[:max_scenes]
    scenes: list[Scene] = []
    first_index: dict[str, int] = {}
    real_root = _local_real_root(root)
    for i, record in enumerate(records):
        scene = _scene_from_record(record, i, root, manifest_url)
        if real_root is not None:
            _check_inside_root(scene, i, real_root, manifest_url)
        if scene.scene_id in first_index:
            raise BadInputError(
                manifest_url,
                f"duplicate scene id {scene.scene_id!r} (records {first_index[scene.scene_id]} and {i})",
            )
        first_index[scene.scene_id] = i
        scenes.append(scene)
    return scenes


def _scene_from_record(record: Any, i: int, root: str, manifest_url: str) -> Scene:
    if not isinstance(record, dict):
        raise BadInputError(manifest_url, f"record {i} is a {type(record).__name__}, expected an object")

    def rel(key: str) -> str | None:
        value = record.get(key)
        if value is None or value == "":
            return None
        return _relative_path(value, f"record {i} '{key}'", manifest_url)

    def rel_list(key: str) -> tuple[str, ...]:
        values = record.get(key) or []
        if not isinstance(values, list):
            raise BadInputError(manifest_url, f"record {i} '{key}' must be a list of paths")
        return tuple(_relative_path(v, f"record {i} '{key}'", manifest_url) for v in values)

    event_data, video_data, mp4_data = rel("event_data"), rel("video_data"), rel("mp4_data")
    if video_data:
        scene_id = video_data
    elif event_data:
        scene_id = posixpath.splitext(event_data)[0]
    elif record.get("id") not in (None, ""):
        scene_id = str(record["id"])
    else:
        raise BadInputError(manifest_url, f"record {i} has no video_data, event_data or id to name the scene")

    if video_data:  # what the research pipeline feeds Video-LLaVA: mp4/<video_data>.mp4
        video_path = join(root, "mp4", video_data + ".mp4")
    elif mp4_data:
        video_path = join(root, "mp4", mp4_data)
    else:
        video_path = None
    return Scene(
        scene_id=scene_id,
        event_path=join(root, "event_npy", event_data) if event_data else None,
        event_images=tuple(join(root, "event_image", p) for p in rel_list("event_image")),
        video_path=video_path,
        record=record,
        event_images_1f=tuple(join(root, "event_image_1f", p) for p in rel_list("event_image_1f")),
    )


def _local_real_root(root: str) -> str | None:
    """The dataset root with every symlink resolved, for local datasets (None for object stores,
    which have no symlinks)."""
    if not is_local(root):
        return None
    return os.path.realpath(str(root).removeprefix("file://") or ".")


def _check_inside_root(scene: Scene, i: int, real_root: str, manifest_url: str) -> None:
    """Refuse a record whose files resolve (through symlinks) outside the dataset root."""
    paths = [("event_data", scene.event_path), ("video_data", scene.video_path),
             *(("event_image", p) for p in scene.event_images), *(("event_image_1f", p) for p in scene.event_images_1f)]
    for key, url in paths:
        if not url:
            continue
        real = os.path.realpath(str(url).removeprefix("file://"))
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise BadInputError(
                manifest_url,
                f"record {i} '{key}': {url} resolves to {real}, outside the dataset root {real_root} (a symbolic "
                "link); refusing to read it. Copy the file into the dataset, or point the dataset setting at a "
                "root that contains it.",
            )


def _relative_path(value: Any, what: str, manifest_url: str) -> str:
    """A record path must stay inside the dataset root."""
    if not isinstance(value, str) or not value.strip():
        raise BadInputError(manifest_url, f"{what} must be a non-empty path string, found {value!r}")
    parts = value.replace("\\", "/").split("/")
    if value.startswith("/") or "://" in value or ".." in parts:
        raise BadInputError(manifest_url, f"{what} = {value!r} escapes the dataset root")
    return value


def load_questions(
    where: str | Location, storage_options: dict[str, Any] | None = None, max_questions: int | None = None
) -> list[str]:
    """Questions from a JSON list of {"question", "count"} objects or of strings (first N when given);
    ``where`` a Location, or a URL with its ``storage_options``."""
    src = Location.of(where, storage_options)
    url = src.url
    items = read_json(src)
    if not isinstance(items, list):
        raise BadInputError(url, f"expected a JSON list of questions, found {type(items).__name__}")
    questions: list[str] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        question = item.get("question") if isinstance(item, dict) else item
        if not isinstance(question, str):
            raise BadInputError(url, f"question {i} must be a string or an object with a 'question' string")
        if not question.strip():
            raise BadInputError(url, f"question {i} is empty")
        if question in seen:  # equal texts would give equal pair ids
            raise BadInputError(url, f"question {i} repeats question {seen[question]}: {question!r}")
        seen[question] = i
        questions.append(question)
    if not questions:
        raise BadInputError(url, "no questions in the file")
    return questions[:max_questions] if max_questions is not None else questions


def build_pairs(scenes: list[Scene], questions: list[str]) -> list[Pair]:
    """Every (scene, question), scene order outer, questions inner."""
    return [
        Pair(pair_id=pair_id_for(scene.scene_id, q), scene=scene, question_idx=qi, question=q)
        for scene in scenes
        for qi, q in enumerate(questions)
    ]
