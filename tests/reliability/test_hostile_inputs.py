"""Hostile inputs end to end through `run_extraction` (DESIGN.md §6).

One extraction run over a copy of the fixtures dataset with one extra scene per hostile case
(interleaved with the good scenes): every bad pair is recorded as `failed` with a reason naming the
file and the problem, the good pairs' rows are bitwise those of a clean run, counts add up, and no
file appears outside the store. Further cases: a drafter whose weights hold a NaN, a questions file
with an empty question, a dataset record escaping the root, a store manifest naming paths outside
the store, an event image declaring 100000x100000 pixels.

The per-case table (input -> outcome) is printed at the end of the module (README figures).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import resource
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from egpt_core.config import EventRenderConfig, ExtractConfig, ModelLoadConfig
from egpt_core.errors import BadInputError, StoreError
from egpt_core.events.io import events_to_npy_bytes
from egpt_core.extraction import run_extraction
from egpt_core.store import StoreReader, StoreWriter
from egpt_core.store.writer import NON_FINITE

FP32 = ModelLoadConfig(dtype="float32", device="cpu")
N_Q = 2  # questions per scene == batch size: every batch is one scene in every run (bitwise comparable)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _cfg(dataset: Path | str, store: Path | str, **kw) -> ExtractConfig:
    fx = kw.pop("fx")
    base = dict(dataset=str(dataset), drafter=str(fx / "eventgpt"), target=str(fx / "videollava"), store=str(store),
                max_new_tokens=4, min_tokens=1, batch_size=N_Q, shard_size=2 * N_Q, max_questions=N_Q, load=FP32)
    base.update(kw)
    return ExtractConfig(**base)


def _snapshot(root: Path, exclude: list[Path]) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under root outside the excluded dirs."""
    ex = [str(p.resolve()) for p in exclude]
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if any(dirpath == e or dirpath.startswith(e + os.sep) for e in ex):
            dirnames[:] = []
            continue
        for f in filenames:
            p = os.path.join(dirpath, f)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def _assert_nothing_written_outside(before: dict, after: dict) -> None:
    new = sorted(set(after) - set(before))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    gone = sorted(set(before) - set(after))
    assert not new and not changed and not gone, {"new": new, "changed": changed, "removed": gone}


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels (tiny body: a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b"")


class _Evil:
    """Unpickling this runs `touch MARKER` (an arbitrary-code-execution payload)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _npy(obj: dict) -> bytes:
    """The EventGPT layout (np.save of an object array wrapping a dict) around any dict."""
    buf = io.BytesIO()
    np.save(buf, np.array(obj, dtype=object), allow_pickle=True)
    return buf.getvalue()


def _evil_npy(marker: Path) -> bytes:
    return _npy({"x": _Evil(marker), "y": np.zeros(3, np.int64)})


def _rows(url: str) -> dict[str, dict]:
    """pair_id -> its pairs-table row (minus placement columns) and its rows."""
    r = StoreReader(url)
    r.verify()
    table = {row["pair_id"]: row for row in r.pairs().drop_columns(["row_offset", "shard"]).to_pylist()}
    for p in r.iter_pairs():
        table[p.pair_id]["_drafter"], table[p.pair_id]["_target"] = p.drafter, p.target
    return table


# --------------------------------------------------------------------------------------------------
# the table of cases (printed once at the end of the module)
# --------------------------------------------------------------------------------------------------
def _report(request, text: str) -> None:
    """Write to the terminal even under output capture (the figures are for the README)."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None:
        print(text)
        return
    with capman.global_and_fixture_disabled():
        tr.write_line(text)


@pytest.fixture(scope="module")
def table(request):
    rows: list[tuple[str, str]] = []
    yield rows
    width = max((len(a) for a, _ in rows), default=10)
    lines = ["", "hostile input table (input -> outcome):"]
    lines += [f"  {a.ljust(width)}  ->  {b}" for a, b in rows]
    _report(request, "\n".join(lines))


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(drafter, target):
    return drafter, target


@pytest.fixture(scope="module")
def clean_store(fixtures_dir, models, tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("hostile_clean") / "store")
    s = run_extraction(_cfg(fixtures_dir / "dataset", url, fx=fixtures_dir), models=models)
    assert s.counts == {"ok": 4 * N_Q, "failed": 0, "skipped": 0}, s
    return url


# hostile scenes: name -> (event bytes | None = missing file | "good", mp4 bytes | "good", file kind, problem)
def _hostile_cases(good_npy: bytes, marker: Path) -> dict[str, tuple]:
    return {
        "truncated_npy": (good_npy[: len(good_npy) // 2], "good", "npy", "truncated"),
        "wrong_keys_npy": (_npy({k: np.zeros(3, np.int64) for k in "abtp"}), "good", "npy", "missing event keys x, y"),
        "pickle_payload_npy": (_evil_npy(marker), "good", "npy", "refusing to unpickle"),
        "zero_events_npy": (events_to_npy_bytes(*(np.zeros(0, np.int64) for _ in range(4))), "good", "npy",
                            "empty event stream (0 events)"),
        "missing_npy": (None, "good", "npy", "file not found"),
        "empty_mp4": ("good", b"", "mp4", "empty file (0 bytes)"),
        "not_a_video_mp4": ("good", b"this is a text file, not an MPEG-4 container\n" * 40, "mp4",
                            "unreadable or truncated video"),
        "huge_coords_npy": (_far_events_npy(65535), "good", "npy", "needs a 65536x65536 canvas"),
    }


def _far_events_npy(coord: int) -> bytes:
    """Two events at (coord, coord): a few hundred bytes that ask for a coord^2-pixel canvas."""
    xy = np.array([coord, coord], np.uint16 if coord < 2**16 else np.int64)
    return events_to_npy_bytes(xy, xy.copy(), np.array([0, 1], np.int64), np.array([0, 1], np.uint8))


CASE_LABELS = {
    "truncated_npy": "event .npy cut in half",
    "wrong_keys_npy": "event .npy dict with keys a, b, t, p",
    "pickle_payload_npy": ".npy pickle whose unpickling runs os.system('touch MARKER')",
    "zero_events_npy": "event .npy with 0 events",
    "missing_npy": "event .npy named by the record but absent",
    "empty_mp4": "0-byte .mp4",
    "not_a_video_mp4": "text file named .mp4",
    "huge_coords_npy": "event .npy with 2 events at (65535, 65535) (a 32 GiB canvas)",
}


@pytest.fixture(scope="module")
def hostile(fixtures_dir, tmp_path_factory):
    """A copy of the fixtures dataset with one extra scene per hostile case, interleaved with the good ones."""
    root = tmp_path_factory.mktemp("hostile")
    ds = root / "dataset"
    shutil.copytree(fixtures_dir / "dataset", ds)
    marker = root / "PICKLE_PAYLOAD_RAN"
    records = json.loads((ds / "EventGPT_Instruction_Subset.json").read_text())
    good = records[0]
    good_npy = (ds / "event_npy" / good["event_data"]).read_bytes()
    good_mp4 = (ds / "mp4" / (good["video_data"] + ".mp4")).read_bytes()
    cases = _hostile_cases(good_npy, marker)

    # the payload is live: numpy's own loader (allow_pickle=True) runs it
    control = root / "control_marker"
    (root / "control.npy").write_bytes(_evil_npy(control))
    np.load(root / "control.npy", allow_pickle=True)
    assert control.exists(), "the pickle payload must be live for the test to mean anything"
    control.unlink()
    (root / "control.npy").unlink()

    hostile_records, files = [], {}
    for name, (ev, mp4, kind, problem) in cases.items():
        rec = {"id": name, "event_data": f"hostile/{name}.npy", "video_data": f"hostile/{name}",
               "conversations": good["conversations"]}
        npy_path, mp4_path = ds / "event_npy" / "hostile" / f"{name}.npy", ds / "mp4" / "hostile" / f"{name}.mp4"
        npy_path.parent.mkdir(parents=True, exist_ok=True)
        mp4_path.parent.mkdir(parents=True, exist_ok=True)
        if ev is not None:
            npy_path.write_bytes(good_npy if ev == "good" else ev)
        mp4_path.write_bytes(good_mp4 if mp4 == "good" else mp4)
        hostile_records.append(rec)
        files[name] = (npy_path if kind == "npy" else mp4_path, problem)
    # interleave: good, bad, good, bad, bad, good, bad, bad, good, bad, bad
    h = hostile_records
    mixed = [records[0], h[0], records[1], h[1], h[2], records[2], h[3], h[4], records[3], h[5], h[6], *h[7:]]
    (ds / "EventGPT_Instruction_Subset.json").write_text(json.dumps(mixed, indent=1))

    # a second manifest for the events.source='images' run: one good scene + an event image bomb
    bomb = ds / "event_image" / "hostile" / "bomb_0.png"
    bomb.parent.mkdir(parents=True, exist_ok=True)
    bomb.write_bytes(_png_declaring(100_000, 100_000))
    bomb_rec = {"id": "bomb", "video_data": "hostile/bomb", "event_image": ["hostile/bomb_0.png"],
                "conversations": good["conversations"]}
    shutil.copyfile(ds / "mp4" / (good["video_data"] + ".mp4"), ds / "mp4" / "hostile" / "bomb.mp4")
    (ds / "images_subset.json").write_text(json.dumps([records[0], bomb_rec], indent=1))
    return {"root": root, "dataset": ds, "marker": marker, "files": files, "bomb": bomb}


# --------------------------------------------------------------------------------------------------
# 1. one extraction run over every hostile scene
# --------------------------------------------------------------------------------------------------
def test_hostile_scenes_are_recorded_and_good_pairs_are_bitwise_clean(fixtures_dir, models, clean_store, hostile,
                                                                      tmp_path, table):
    store = tmp_path / "store"
    basetemp = tmp_path.parent
    before = _snapshot(basetemp, [store])
    summary = run_extraction(_cfg(hostile["dataset"], store, fx=fixtures_dir), models=models)
    after = _snapshot(basetemp, [store])

    assert not hostile["marker"].exists(), "the pickled payload ran"
    _assert_nothing_written_outside(before, after)

    got, want = _rows(str(store)), _rows(clean_store)
    n_bad = len(hostile["files"])
    # counts add up: every planned pair is in exactly one shard, with exactly one status
    assert summary.pairs_total == summary.pairs_processed == len(got) == (4 + n_bad) * N_Q
    assert summary.counts == {"ok": 4 * N_Q, "failed": n_bad * N_Q, "skipped": 0}
    man = StoreReader(str(store)).manifest
    assert man["counts"] == summary.counts and man["totals"]["pairs"] == len(got)
    assert sum(man["reasons"].values()) == n_bad * N_Q == sum(summary.reasons.values())

    # every bad pair: failed, reason names the file and the problem
    for name, (path, problem) in hostile["files"].items():
        recs = [r for r in got.values() if r["scene_id"] == f"hostile/{name}"]
        assert len(recs) == N_Q, name
        for r in recs:
            assert r["status"] == "failed", (name, r["status"], r["reason"])
            assert str(path) in r["reason"] and problem in r["reason"], (name, r["reason"])
            assert r["length"] == 0 and "_drafter" not in r
        table.append((CASE_LABELS[name], f"failed: {recs[0]['reason'].replace(str(hostile['dataset']) + '/', '')}"))

    # good pairs: identical records and bitwise identical rows to the clean run's
    assert set(want) <= set(got)
    for pid, w in want.items():
        g = got[pid]
        for k in w:
            if k.startswith("_"):
                assert torch.equal(g[k], w[k]), (pid, k)
            else:
                assert g[k] == w[k], (pid, k)
    table.append(("good scenes interleaved with the bad ones", f"{len(want)} pairs ok, rows bitwise == clean run"))
    table.append(("files outside the store after the run", "none created, changed or removed"))


# --------------------------------------------------------------------------------------------------
# 2. a drafter whose weights produce NaN
# --------------------------------------------------------------------------------------------------
def test_nan_weights_fail_every_pair_and_nothing_else_breaks(fixtures_dir, models, clean_store, tmp_path, table):
    from egpt_core.models import load_eventgpt

    ckpt = tmp_path / "eventgpt_nan"
    shutil.copytree(fixtures_dir / "eventgpt", ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")  # one weight: the final norm's first gain
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    nan_drafter = load_eventgpt(str(ckpt), FP32)
    _, target = models

    store = tmp_path / "store"
    cfg = _cfg(fixtures_dir / "dataset", store, fx=fixtures_dir, drafter=str(ckpt), max_scenes=2)
    summary = run_extraction(cfg, models=(nan_drafter, target))
    assert summary.counts == {"ok": 0, "failed": 2 * N_Q, "skipped": 0}
    assert summary.reasons == {NON_FINITE: 2 * N_Q}

    r = StoreReader(str(store))
    r.verify()
    assert list(r.iter_pairs()) == []
    assert torch.equal(r.lm_head(), StoreReader(clean_store).lm_head())  # the target side is unaffected
    clean = _rows(clean_store)
    for row in r.pairs().to_pylist():
        assert row["status"] == "failed" and row["reason"] == NON_FINITE and row["length"] == 0
        assert row["target_response_ids"] == clean[row["pair_id"]]["target_response_ids"]
    # a rerun finds every pair committed: no work, no change
    again = run_extraction(cfg, models=(nan_drafter, target))
    assert again.pairs_pending == 0 and StoreReader(str(store)).fingerprint == r.fingerprint
    table.append(("drafter checkpoint with model.norm.weight[0] = NaN",
                  f"all {2 * N_Q} pairs failed: '{NON_FINITE}'; LM head, target ids intact; rerun: no work"))


# --------------------------------------------------------------------------------------------------
# 3. refused before any model work
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["empty_question", "record_escapes_root", "symlink_escapes_root"])
def test_bad_questions_or_dataset_manifest_refused_before_model_work(case, fixtures_dir, tmp_path, monkeypatch, table):
    import egpt_core.extraction.run as run_mod

    def no_models(cfg):
        raise AssertionError("models were loaded for a run that should have been refused")

    monkeypatch.setattr(run_mod, "load_models", no_models)
    ds = tmp_path / "dataset"
    shutil.copytree(fixtures_dir / "dataset", ds)
    questions = None
    if case == "empty_question":
        questions = tmp_path / "questions.json"
        questions.write_text(json.dumps([{"question": "What is this scene about?", "count": 3},
                                         {"question": "   ", "count": 1}]))
        bad_file, problem = questions, "question 1 is empty"
        label = "questions file whose 2nd question is blank"
    elif case == "record_escapes_root":
        manifest = ds / "EventGPT_Instruction_Subset.json"
        recs = json.loads(manifest.read_text())
        recs[1]["event_data"] = "../../../../etc/passwd"
        manifest.write_text(json.dumps(recs))
        bad_file, problem = manifest, "escapes the dataset root"
        label = "dataset record with event_data '../../../../etc/passwd'"
    else:  # a file inside the dataset that is a symlink to a file outside it
        manifest = ds / "EventGPT_Instruction_Subset.json"
        rec = json.loads(manifest.read_text())[1]
        link = ds / "event_npy" / rec["event_data"]
        outside = tmp_path / "outside.npy"
        shutil.copyfile(link, outside)
        link.unlink()
        link.symlink_to(outside)
        bad_file, problem = manifest, f"resolves to {outside}, outside the dataset root"
        label = "event .npy that is a symlink to a file outside the dataset"
    store = tmp_path / "store"
    cfg = _cfg(ds, store, fx=fixtures_dir, questions=str(questions) if questions else None)
    with pytest.raises(BadInputError) as exc:
        run_extraction(cfg)
    assert exc.value.path == str(bad_file) and problem in exc.value.problem, str(exc.value)
    assert not store.exists()  # nothing written, no model loaded
    table.append((label, f"BadInputError before model work: {str(exc.value).replace(str(tmp_path) + '/', '')}"))


# --------------------------------------------------------------------------------------------------
# 4. a store manifest naming paths outside the store
# --------------------------------------------------------------------------------------------------
ESCAPES = [
    ("pairs", "pairs/../../outside/pairs.parquet", "contains '..'"),
    ("pairs", "{abs}/outside/pairs.parquet", "is an absolute path"),
    ("tensors", "../outside/tensors.safetensors", "contains '..'"),
    ("lm_head", "../outside/head.safetensors", "contains '..'"),
    ("lm_head", "{abs}/outside/head.safetensors", "is an absolute path"),
]


@pytest.mark.parametrize("kind,rel,problem", ESCAPES, ids=[f"{k}:{r.split('/')[0] or 'abs'}" for k, r, _ in ESCAPES])
def test_manifest_paths_escaping_the_store_are_refused(kind, rel, problem, clean_store, tmp_path, monkeypatch,
                                                       capsys, table):
    store = tmp_path / "store"
    shutil.copytree(clean_store, store)
    outside = tmp_path / "outside"  # honeypots: real store files placed where the manifest points
    outside.mkdir()
    sh0 = StoreReader(str(store)).shards[0]
    shutil.copyfile(store / sh0["files"]["pairs"], outside / "pairs.parquet")
    shutil.copyfile(store / sh0["files"]["tensors"], outside / "tensors.safetensors")
    shutil.copyfile(store / "target_lm_head.safetensors", outside / "head.safetensors")
    rel = rel.format(abs=str(tmp_path))
    man = json.loads((store / "manifest.json").read_text())
    if kind == "lm_head":
        man["lm_head"]["path"] = rel
    else:
        man["shards"][0]["files"][kind] = rel
    (store / "manifest.json").write_text(json.dumps(man))

    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **k):
        opened.append(os.path.abspath(os.fspath(file)) if isinstance(file, str | os.PathLike) else repr(file))
        return real_open(file, *a, **k)

    def spy_os_open(path, *a, **k):
        opened.append(os.path.abspath(os.fspath(path)))
        return real_os_open(path, *a, **k)

    before = _snapshot(tmp_path, [])
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    with pytest.raises(StoreError) as exc:
        StoreReader(str(store))
    with pytest.raises(StoreError):
        StoreWriter(str(store), {"hidden_size": 64, "dtype": "bfloat16"})
    from egpt_core.cli import main as egpt_main

    rc = egpt_main(["inspect", "--json", str(store)])
    monkeypatch.undo()
    err = capsys.readouterr()
    after = _snapshot(tmp_path, [])

    assert repr(rel) in str(exc.value) and problem in str(exc.value), str(exc.value)
    assert rc == 2 and "Refusing to read it" in err.err and err.out == ""
    outside_reads = [p for p in opened if p.startswith(f"{tmp_path}/") and not p.startswith(f"{store}/")]
    assert not outside_reads, outside_reads  # nothing under tmp_path but outside the store was opened
    assert any(p == f"{store}/manifest.json" for p in opened)  # the spy saw the reads
    _assert_nothing_written_outside(before, after)
    table.append((f"manifest {kind} path {rel.replace(str(tmp_path), '<tmp>')!r}",
                  f"StoreError ({problem}); reader, writer and `egpt inspect` refuse; nothing read/written outside"))


# --------------------------------------------------------------------------------------------------
# 5. an event image declaring 100000 x 100000 pixels (events.source='images')
# --------------------------------------------------------------------------------------------------
def test_event_image_declaring_a_huge_size_is_refused_without_decoding(fixtures_dir, models, hostile, tmp_path, table):
    store = tmp_path / "store"
    cfg = _cfg(hostile["dataset"] / "images_subset.json", store, fx=fixtures_dir,
               questions=str(hostile["dataset"] / "questions.json"),
               events=EventRenderConfig(source="images", n_frames=1))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    summary = run_extraction(cfg, models=models)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 512, f"peak RSS grew by {grown_mib:.0f} MiB: the image was decoded"
    assert summary.counts == {"ok": N_Q, "failed": N_Q, "skipped": 0}, summary
    rows = StoreReader(str(store)).pairs().to_pylist()
    bad = [r for r in rows if r["scene_id"] == "hostile/bomb"]
    assert len(bad) == N_Q
    for r in bad:
        assert r["status"] == "failed" and str(hostile["bomb"]) in r["reason"]
        assert "100000x100000" in r["reason"] or "decompression bomb" in r["reason"], r["reason"]
    assert all(r["status"] == "ok" for r in rows if r["scene_id"] != "hostile/bomb")
    table.append(("event PNG declaring 100000x100000 (source='images')",
                  f"failed: {bad[0]['reason'].replace(str(hostile['dataset']) + '/', '')}; "
                  f"peak RSS +{max(grown_mib, 0):.0f} MiB"))


# --------------------------------------------------------------------------------------------------
# 6. event coordinates of 2**40: `egpt render-events` fails with one line naming the file
# --------------------------------------------------------------------------------------------------
def test_render_events_with_coordinates_of_2_pow_40_fails_cleanly(tmp_path, capsys, table):
    from egpt_core.cli import main as egpt_main

    f = tmp_path / "far.npy"
    f.write_bytes(_far_events_npy(2**40))
    out = tmp_path / "frames"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc = egpt_main(["render-events", str(f), "--out", str(out)])
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    err = capsys.readouterr().err
    assert rc == 2 and str(f) in err and "canvas" in err and "Traceback" not in err, err
    assert grown_mib < 256 and not out.exists()
    table.append(("`egpt render-events` on 2 events at (2**40, 2**40)",
                  f"exit 1: {err.strip().replace(str(tmp_path) + '/', '')}"))


# --------------------------------------------------------------------------------------------------
# 7. questions the prompt format cannot carry, and prompts longer than the context: per pair
# --------------------------------------------------------------------------------------------------
def _questions(tmp_path: Path, questions: list[str]) -> Path:
    f = tmp_path / "questions.json"
    f.write_text(json.dumps([{"question": q, "count": 1} for q in questions]))
    return f


def test_questions_holding_model_placeholders_fail_per_pair(fixtures_dir, models, tmp_path, table):
    good = "What are the key elements in this scene?"
    bad = {"What is in the <image> here?": "<image>", "Describe the <video> please.": "<video>",
           "Where is the <event>?": "<event>"}
    store = tmp_path / "store"
    cfg = _cfg(fixtures_dir / "dataset", store, fx=fixtures_dir, max_scenes=1, max_questions=None,
               questions=str(_questions(tmp_path, [good, *bad])))
    summary = run_extraction(cfg, models=models)
    assert summary.counts == {"ok": 1, "failed": 3, "skipped": 0}, summary
    rows = {r["question"]: r for r in StoreReader(str(store)).pairs().to_pylist()}
    assert rows[good]["status"] == "ok" and rows[good]["length"] > 0
    for q, token in bad.items():
        r = rows[q]
        assert r["status"] == "failed" and repr(token) in r["reason"] and "placeholder" in r["reason"], r["reason"]
    table.append(("questions containing '<image>', '<video>', '<event>'",
                  f"each pair failed: {rows['What is in the <image> here?']['reason']}; the other question ok"))


def test_a_prompt_longer_than_the_context_fails_per_pair(fixtures_dir, models, tmp_path, table):
    good = "What are the key elements in this scene?"
    long = "Describe every detail of this scene, " + "including each object and its motion, " * 620
    assert len(long) > 23_000
    store = tmp_path / "store"
    cfg = _cfg(fixtures_dir / "dataset", store, fx=fixtures_dir, max_scenes=1, max_questions=None,
               questions=str(_questions(tmp_path, [good, long])))
    summary = run_extraction(cfg, models=models)
    assert summary.counts == {"ok": 1, "failed": 1, "skipped": 0}, summary
    rows = {r["question"]: r for r in StoreReader(str(store)).pairs().to_pylist()}
    assert rows[good]["status"] == "ok"
    reason = rows[long]["reason"]
    assert rows[long]["status"] == "failed" and "max_position_embeddings 1024" in reason, reason
    table.append((f"a {len(long):,}-character question (context 1024)", f"failed: {reason}"))


# --------------------------------------------------------------------------------------------------
# 8. symlinks that stay inside the dataset are fine
# --------------------------------------------------------------------------------------------------
def test_a_symlink_inside_the_dataset_is_accepted(fixtures_dir, tmp_path):
    from egpt_core.data import load_scenes

    ds = tmp_path / "dataset"
    shutil.copytree(fixtures_dir / "dataset", ds)
    recs = json.loads((ds / "EventGPT_Instruction_Subset.json").read_text())
    link = ds / "mp4" / (recs[1]["video_data"] + ".mp4")
    link.unlink()
    link.symlink_to(ds / "mp4" / (recs[0]["video_data"] + ".mp4"))
    assert len(load_scenes(str(ds))) == len(recs)
    (tmp_path / "alias").symlink_to(ds)  # the root itself may be reached through a link
    assert len(load_scenes(str(tmp_path / "alias"))) == len(recs)


# --------------------------------------------------------------------------------------------------
# 9. L6 reads target rows by byte ranges: altered rows are refused, naming the shard
# --------------------------------------------------------------------------------------------------
def test_l6_refuses_a_store_whose_target_rows_were_altered(fixtures_dir, clean_store, tmp_path, table):
    from egpt_core.config import LoraTrainConfig
    from egpt_core.lora import train_lora

    store = tmp_path / "store"
    shutil.copytree(clean_store, store)
    sh = StoreReader(str(store)).shards[0]
    path = store / sh["files"]["tensors"]
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin = 8 + n + json.loads(raw[8:8 + n])["target"]["data_offsets"][0]
    for i in range(begin + 1, begin + 64 * 2, 2):  # flip the sign of the first 64 target values (bf16)
        raw[i] ^= 0x80
    path.write_bytes(bytes(raw))
    cfg = LoraTrainConfig(store=str(store), drafter=str(fixtures_dir / "eventgpt"), out=str(tmp_path / "l6"),
                          dataset=str(fixtures_dir / "dataset"), load=FP32, epochs=1, grad_accum=2,
                          val_fraction=0.34)
    with pytest.raises(StoreError) as exc:
        train_lora(cfg)
    assert sh["files"]["tensors"] in str(exc.value) and "modified after commit" in str(exc.value), str(exc.value)
    table.append(("target rows of a shard sign-flipped, then `train-lora`",
                  f"StoreError: {str(exc.value).replace(str(store), '<store>')[:150]}..."))
