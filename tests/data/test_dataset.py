"""Scenes, questions and pairs from a research-layout dataset (local and memory://)."""

from __future__ import annotations

import hashlib
import json
import uuid

import fsspec
import pytest

from egpt_core.data.dataset import build_pairs, load_questions, load_scenes
from egpt_core.data.synthetic import RESEARCH_QUESTIONS
from egpt_core.errors import BadInputError


def _write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_load_scenes_resolves_paths_under_the_root(synthetic_root):
    scenes = load_scenes(str(synthetic_root))
    assert [s.scene_id for s in scenes] == [
        "zurich_city_00_a/000000",
        "interlaken_00_a/000000",
        "thun_00_a/000000",
        "zurich_city_00_a/000001",
    ]
    s = scenes[3]
    assert s.event_path == f"{synthetic_root}/event_npy/zurich_city_00_a/000001.npy"
    assert s.video_path == f"{synthetic_root}/mp4/zurich_city_00_a/000001.mp4"
    assert s.event_images == tuple(
        f"{synthetic_root}/event_image/zurich_city_00_a/000001_{k}.png" for k in range(5)
    )
    assert s.event_images_1f == (f"{synthetic_root}/event_image_1f/zurich_city_00_a/000001_0.png",)
    assert s.record["event_data"] == "zurich_city_00_a/000001.npy"
    fs = fsspec.filesystem("file")
    for scene in scenes:
        assert all(
            fs.exists(p)
            for p in (scene.event_path, scene.video_path, *scene.event_images, *scene.event_images_1f)
        )
    assert [s.scene_id for s in load_scenes(str(synthetic_root), max_scenes=2)] == [
        s.scene_id for s in scenes[:2]
    ]
    # the manifest file itself may be given instead of the root
    manifest = f"{synthetic_root}/EventGPT_Instruction_Subset.json"
    assert [s.event_path for s in load_scenes(manifest)] == [s.event_path for s in scenes]


def test_scene_id_fallbacks_and_records_with_missing_files(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    _write_json(
        root / "EventGPT_Instruction_Subset.json",
        [
            {"id": "a", "event_data": "seq/000007.npy"},
            {"id": "only-id"},
            {"id": "c", "video_data": "seq/000009", "mp4_data": "seq/other.mp4"},
            {"id": "d", "mp4_data": "seq/000010.mp4"},
        ],
    )
    scenes = load_scenes(str(root))  # none of these files exist: still returned
    assert [s.scene_id for s in scenes] == ["seq/000007", "only-id", "seq/000009", "d"]
    assert scenes[0].event_path == f"{root}/event_npy/seq/000007.npy" and scenes[0].video_path is None
    assert scenes[1].event_path is None and scenes[1].event_images == ()
    assert (
        scenes[2].video_path == f"{root}/mp4/seq/000009.mp4"
    )  # video_data wins, as in the research pipeline
    assert scenes[3].video_path == f"{root}/mp4/seq/000010.mp4"


def test_memory_url_dataset(synthetic_root):
    url = f"memory://egpt-test-{uuid.uuid4().hex}/ds"
    with fsspec.open(f"{url}/EventGPT_Instruction_Subset.json", "wb") as f:
        f.write((synthetic_root / "EventGPT_Instruction_Subset.json").read_bytes())
    scenes = load_scenes(url)
    assert scenes[0].event_path == f"{url}/event_npy/zurich_city_00_a/000000.npy"
    assert scenes[0].video_path.startswith("memory://")


@pytest.mark.parametrize(
    "content, words",
    [
        ('[{"id": 1,', "malformed JSON"),
        ('{"records": []}', "expected a JSON list of records"),
        ("[1, 2]", "record 0 is a int"),
        ('[{"video_data": "../../etc/passwd"}]', "escapes the dataset root"),
        ('[{"event_data": "/abs/000.npy"}]', "escapes the dataset root"),
        ('[{"video_data": "s/1"}, {"video_data": "s/1"}]', "duplicate scene id 's/1' (records 0 and 1)"),
        ('[{"split": "x"}]', "no video_data, event_data or id"),
        ('[{"id": "a", "event_image": "a.png"}]', "must be a list of paths"),
    ],
)
def test_malformed_manifest_is_bad_input(tmp_path, content, words):
    manifest = tmp_path / "EventGPT_Instruction_Subset.json"
    manifest.write_text(content)
    with pytest.raises(BadInputError) as err:
        load_scenes(str(tmp_path))
    assert str(manifest) in str(err.value) and words in str(err.value)


def test_missing_manifest_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="not found") as err:
        load_scenes(str(tmp_path / "nowhere"))
    assert "EventGPT_Instruction_Subset.json" in str(err.value)


def test_load_questions_formats(synthetic_root, tmp_path):
    assert load_questions(f"{synthetic_root}/questions.json") == [q for q, _ in RESEARCH_QUESTIONS[:3]]
    assert load_questions(f"{synthetic_root}/questions.json", max_questions=2) == [
        q for q, _ in RESEARCH_QUESTIONS[:2]
    ]
    plain = _write_json(
        tmp_path / "plain.json", ["Describe the following scene.", "What is this scene about?"]
    )
    assert load_questions(plain) == ["Describe the following scene.", "What is this scene about?"]


@pytest.mark.parametrize(
    "content, words",
    [
        ([{"question": "ok?", "count": 3}, {"question": "  ", "count": 2}], "question 1 is empty"),
        (["fine", ""], "question 1 is empty"),
        ([{"count": 4}], "question 0 must be a string"),
        (["same", "other", "same"], "question 2 repeats question 0"),
        ([], "no questions"),
        ({"question": "x"}, "expected a JSON list of questions"),
    ],
)
def test_bad_questions_name_the_file_and_index(tmp_path, content, words):
    path = _write_json(tmp_path / "q.json", content)
    with pytest.raises(BadInputError) as err:
        load_questions(path)
    assert path in str(err.value) and words in str(err.value)


def test_missing_or_malformed_questions_file(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_questions(str(tmp_path / "none.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('["a", ')
    with pytest.raises(BadInputError, match="malformed JSON") as err:
        load_questions(str(broken))
    assert str(broken) in str(err.value)


def test_pairs_are_ordered_and_ids_are_stable(synthetic_root):
    scenes = load_scenes(str(synthetic_root))
    questions = load_questions(f"{synthetic_root}/questions.json")
    pairs = build_pairs(scenes, questions)
    assert len(pairs) == 12
    assert [(p.scene.scene_id, p.question_idx) for p in pairs[:4]] == [
        ("zurich_city_00_a/000000", 0),
        ("zurich_city_00_a/000000", 1),
        ("zurich_city_00_a/000000", 2),
        ("interlaken_00_a/000000", 0),
    ]
    q = questions[1]
    assert pairs[1].question == q
    assert pairs[1].pair_id == f"zurich_city_00_a/000000|q{hashlib.sha1(q.encode()).hexdigest()[:8]}"
    assert len({p.pair_id for p in pairs}) == 12
    # adding scenes and questions (anywhere) never renumbers existing pairs
    more = build_pairs(list(reversed(scenes)) + scenes[:0], ["A new question?", *questions])
    assert {p.pair_id for p in pairs} <= {p.pair_id for p in more}
    by_id = {p.pair_id: p for p in more}
    assert all(by_id[p.pair_id].question == p.question for p in pairs)
