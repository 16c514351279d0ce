"""load_events: the real EventGPT recording, structured .npy, DSEC HDF5, and every kind of bad input."""

from __future__ import annotations

import io
import os
import pickle
import uuid
from pathlib import Path

import fsspec
import h5py
import numpy as np
import numpy.lib.format as npy_format
import pytest

from egpt_core.errors import BadInputError
from egpt_core.events.io import events_to_npy_bytes, load_events

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eventgpt_sample1.npy"
N_SAMPLE_EVENTS = 132_268


def _object_npy(payload_pickle: bytes) -> bytes:
    """A .npy whose header declares a 0-d object array, followed by ``payload_pickle``."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    return buf.getvalue() + payload_pickle


def _events(n: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.integers(0, 64, n).astype(np.uint16),
        "y": rng.integers(0, 48, n).astype(np.uint16),
        "t": np.sort(rng.integers(0, 10_000, n)).astype(np.int64),
        "p": rng.integers(0, 2, n).astype(np.uint8),
    }


# --------------------------------------------------------------------------------------------------
# good input
# --------------------------------------------------------------------------------------------------
def test_real_recording_loads_without_trusting_its_pickle():
    ev = load_events(str(SAMPLE))
    assert len(ev) == N_SAMPLE_EVENTS
    assert ev.x.dtype == np.uint16 and ev.y.dtype == np.uint16 and ev.t.dtype == np.uint16
    assert ev.p.dtype == np.uint8 and set(np.unique(ev.p)) == {0, 1}
    assert int(ev.x.max()) == 639 and int(ev.y.max()) == 479
    assert ev.path == str(SAMPLE) and ev.sensor_size is None
    # the same arrays numpy's own (trusting) loader produces from this known file
    reference = np.load(SAMPLE, allow_pickle=True).item()
    for k in "xytp":
        np.testing.assert_array_equal(getattr(ev, k), reference[k])


def test_npy_with_metadata_scalars_loads_from_memory_url():
    ev = _events()
    blob = events_to_npy_bytes(**ev, time_start=np.int64(5), num_events=50, image_indices_in_clip=[1, 2])
    url = f"memory://egpt-test-{uuid.uuid4().hex}/clip.npy"
    with fsspec.open(url, "wb") as f:
        f.write(blob)
    loaded = load_events(url)
    assert loaded.path == url
    for k in "xytp":
        np.testing.assert_array_equal(getattr(loaded, k), ev[k])


def test_structured_npy_without_pickle(tmp_path):
    ev = _events()
    arr = np.zeros(50, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "u1")])
    for k in "xytp":
        arr[k] = ev[k]
    path = tmp_path / "structured.npy"
    np.save(path, arr, allow_pickle=False)
    loaded = load_events(str(path))
    for k in "xytp":
        np.testing.assert_array_equal(getattr(loaded, k), ev[k])


def _write_dsec(
    path: Path, ev: dict, t_offset: int | None = 1_600_000_000, attrs: dict | None = None
) -> None:
    with h5py.File(path, "w") as h5:
        g = h5.create_group("events")
        for k in "xypt":
            g.create_dataset(k, data=ev[k])
        h5.create_dataset(
            "ms_to_idx", data=np.searchsorted(ev["t"], np.arange(0, 10_001, 1000)).astype(np.uint64)
        )
        if t_offset is not None:
            h5.create_dataset("t_offset", data=np.int64(t_offset))
        for k, v in (attrs or {}).items():
            h5.attrs[k] = v


def test_dsec_hdf5_round_trip_adds_t_offset(tmp_path):
    ev = _events()
    ev["t"] = ev["t"].astype(np.uint32)
    path = tmp_path / "events.h5"
    _write_dsec(path, ev, t_offset=1_600_000_000)
    loaded = load_events(str(path))
    np.testing.assert_array_equal(loaded.x, ev["x"])
    np.testing.assert_array_equal(loaded.y, ev["y"])
    np.testing.assert_array_equal(loaded.p, ev["p"])
    assert loaded.t.dtype == np.int64
    np.testing.assert_array_equal(loaded.t, ev["t"].astype(np.int64) + 1_600_000_000)
    assert loaded.ms_to_idx is not None and loaded.ms_to_idx[-1] == 50
    assert loaded.sensor_size is None


def test_dsec_hdf5_without_offset_with_sensor_size_from_memory_url(tmp_path):
    ev = _events()
    local = tmp_path / "events.hdf5"
    _write_dsec(local, ev, t_offset=None, attrs={"height": 48, "width": 64})
    url = f"memory://egpt-test-{uuid.uuid4().hex}/events.hdf5"
    with fsspec.open(url, "wb") as f:
        f.write(local.read_bytes())
    loaded = load_events(url)
    np.testing.assert_array_equal(loaded.t, ev["t"])
    assert loaded.sensor_size == (48, 64)


# --------------------------------------------------------------------------------------------------
# bad input: every case names the file
# --------------------------------------------------------------------------------------------------
def _bad_npy_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected words in the message)."""
    cases: dict[str, tuple[Path, bytes | None, str]] = {}
    sample = SAMPLE.read_bytes()
    ev = _events()
    cases["missing"] = (tmp_path / "nope.npy", None, "not found")
    cases["zero_bytes"] = (tmp_path / "empty.npy", b"", "empty file")
    cases["truncated"] = (tmp_path / "trunc.npy", sample[: len(sample) // 2], "truncated")
    cases["header_only"] = (tmp_path / "header.npy", sample[:60], "bad .npy header")
    cases["not_events"] = (tmp_path / "text.npy", b"hello, this is not numpy", "not an event file")
    cases["wrong_keys"] = (
        tmp_path / "keys.npy",
        events_to_npy_bytes(**{**ev, "x": ev["x"]}).replace(b"\x8c\x01x", b"\x8c\x01q"),
        "missing event keys x",
    )
    cases["float_x"] = (
        tmp_path / "float.npy",
        events_to_npy_bytes(**{**ev, "x": ev["x"].astype(np.float32)}),
        "'x' must be an integer array, found dtype float32",
    )
    cases["zero_events"] = (
        tmp_path / "zero.npy",
        events_to_npy_bytes(**{k: v[:0] for k, v in ev.items()}),
        "empty event stream",
    )
    cases["length_mismatch"] = (
        tmp_path / "len.npy",
        events_to_npy_bytes(**{**ev, "t": ev["t"][:-1]}),
        "differ in length",
    )
    cases["polarity_2"] = (
        tmp_path / "pol.npy",
        events_to_npy_bytes(**{**ev, "p": ev["p"] * 2}),
        "polarity must be 0 or 1",
    )
    cases["negative_x"] = (
        tmp_path / "neg.npy",
        events_to_npy_bytes(**{**ev, "x": -ev["x"].astype(np.int32) - 1}),
        "negative x or y",
    )
    cases["two_dim"] = (
        tmp_path / "2d.npy",
        events_to_npy_bytes(**{**ev, "y": ev["y"].reshape(5, 10)}),
        "must be 1-D",
    )
    cases["list_not_dict"] = (
        tmp_path / "list.npy",
        _object_npy(pickle.dumps([1, 2, 3])),
        "expected a pickled dict",
    )
    plain = io.BytesIO()
    np.save(plain, np.arange(10))
    cases["plain_int_array"] = (tmp_path / "plain.npy", plain.getvalue(), "structured array")
    structured = io.BytesIO()
    np.save(structured, np.zeros(4, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8")]))
    cases["structured_missing_p"] = (tmp_path / "nop.npy", structured.getvalue(), "missing event keys p")
    cases["structured_truncated"] = (tmp_path / "st_trunc.npy", structured.getvalue()[:-5], "truncated")
    out = {}
    for name, (path, data, words) in cases.items():
        if data is not None:
            path.write_bytes(data)
        out[name] = (path, words)
    return out


BAD_NPY = [
    "missing",
    "zero_bytes",
    "truncated",
    "header_only",
    "not_events",
    "wrong_keys",
    "float_x",
    "zero_events",
    "length_mismatch",
    "polarity_2",
    "negative_x",
    "two_dim",
    "list_not_dict",
    "plain_int_array",
    "structured_missing_p",
    "structured_truncated",
]


@pytest.mark.parametrize("case", BAD_NPY)
def test_bad_npy_raises_bad_input_naming_the_file(tmp_path, case):
    path, words = _bad_npy_cases(tmp_path)[case]
    with pytest.raises(BadInputError) as err:
        load_events(str(path))
    assert str(path) in str(err.value)
    assert words in str(err.value)
    assert err.value.path == str(path)


class _TouchMarker:
    """Unpickling this opens (creates) the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _ShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"x": _TouchMarker(marker)}, protocol=4)
    # the payload is live: an ordinary unpickler would run it
    pickle.loads(payload)["x"].close()
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.npy"
    path.write_bytes(_object_npy(payload))
    with pytest.raises(BadInputError, match=f"refusing to unpickle {open.__module__}.open") as err:
        load_events(str(path))
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "make_payload, refused",
    [
        (lambda marker: _ShellCommand(f"touch {marker}"), f"{os.system.__module__}.system"),
        (lambda marker: _Eval(), "builtins.eval"),
        (
            lambda marker: np.array({"x": _ShellCommand(f"touch {marker}")}, dtype=object),
            f"{os.system.__module__}.system",
        ),
    ],
    ids=["os_system", "eval", "nested_in_object_array"],
)
def test_code_execution_globals_are_refused(tmp_path, make_payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npy"
    path.write_bytes(_object_npy(pickle.dumps(make_payload(marker), protocol=3)))
    with pytest.raises(BadInputError, match=f"refusing to unpickle {refused}") as err:
        load_events(str(path))
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_hdf5_missing_key_wrong_dtype_and_truncation(tmp_path):
    ev = _events()
    no_p = tmp_path / "no_p.h5"
    with h5py.File(no_p, "w") as h5:
        for k in "xyt":
            h5.create_dataset(f"events/{k}", data=ev[k])
    float_t = tmp_path / "float_t.h5"
    _write_dsec(float_t, {**ev, "t": ev["t"].astype(np.float64)}, t_offset=None)
    no_group = tmp_path / "flat.h5"
    with h5py.File(no_group, "w") as h5:
        for k in "xytp":
            h5.create_dataset(k, data=ev[k])
    good = tmp_path / "good.h5"
    _write_dsec(good, ev)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:1500])

    for path, words in [
        (no_p, "lacks p"),
        (float_t, "'t' must be an integer array"),
        (no_group, "no 'events' group"),
        (truncated, "unreadable HDF5"),
    ]:
        with pytest.raises(BadInputError, match=words) as err:
            load_events(str(path))
        assert str(path) in str(err.value)
