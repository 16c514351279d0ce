"""Event streams from EventGPT ``.npy`` dicts and DSEC-style HDF5 files, validated before use.

The EventGPT format is a pickle inside a ``.npy`` (an object array wrapping a dict). Pickles from
untrusted files are never handed to ``np.load(allow_pickle=True)``: the payload is read with
:class:`RestrictedUnpickler`, which can rebuild plain numpy arrays, scalars and builtin containers
and nothing else.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

from egpt_core.errors import BadInputError
from egpt_core.fsio import Location, open_input

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer

NPY_MAGIC = b"\x93NUMPY"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
EVENT_KEYS = ("x", "y", "t", "p")

# (module, name) -> the object a pickle may reference. numpy 1.x writes `numpy.core.*`, numpy 2.x
# `numpy._core.*`; both map to the running numpy's functions (no import by name ever happens).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
    ("collections", "OrderedDict"): OrderedDict,
    **{
        ("builtins", t.__name__): t
        for t in (dict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes, bytearray)
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays/scalars/dtypes and builtin containers only; refuses every other global."""

    def __init__(self, file: Any, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise BadInputError(self._path, f"refusing to unpickle {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise BadInputError(self._path, "refusing to unpickle a persistent id")


@dataclass(frozen=True, eq=False)
class EventStream:
    """One event recording: 1-D integer arrays of equal length E, in storage (time) order.

    ``t`` is in microseconds (``t_offset`` already added for DSEC), ``p`` is 0 (negative) or 1
    (positive). ``sensor_size`` is (height, width) when the file declares it, else None.
    ``ms_to_idx`` is DSEC's millisecond -> first-event-index table when present.
    """

    x: np.ndarray
    y: np.ndarray
    t: np.ndarray
    p: np.ndarray
    path: str
    sensor_size: tuple[int, int] | None = None
    ms_to_idx: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_events(where: str | Location, storage_options: dict[str, Any] | None = None) -> EventStream:
    """Read and validate an event file (.npy EventGPT dict / structured array, or DSEC HDF5; a Location,
    or a URL with its ``storage_options``)."""
    src = Location.of(where, storage_options)
    url = src.url
    fs, path, f = open_input(src)
    with f:
        head = f.read(8)
        f.seek(0)
        if not head:
            raise BadInputError(url, "empty file (0 bytes)")
        if head.startswith(NPY_MAGIC):
            fields, sensor_size, ms_to_idx = _read_npy(f, url), None, None
        elif head == HDF5_MAGIC or str(path).lower().endswith((".h5", ".hdf5")):
            fields, sensor_size, ms_to_idx = _read_hdf5(f, url)
        else:
            raise BadInputError(url, "not an event file (expected a .npy or HDF5 file)")
    x, y, t, p = _validate(fields, url)
    if ms_to_idx is not None:
        ms_to_idx = _validate_ms_to_idx(ms_to_idx, len(x), url)
    if sensor_size is not None:
        h, w = sensor_size
        if int(y.max()) >= h or int(x.max()) >= w:
            raise BadInputError(url, f"events outside the declared sensor size {h}x{w}")
    return EventStream(x=x, y=y, t=t, p=p, path=url, sensor_size=sensor_size, ms_to_idx=ms_to_idx)


def _read_npy(f: Any, url: str) -> dict[str, Any]:
    """The four event arrays of an EventGPT object-array dict or a structured (x, y, t, p) array."""
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        else:
            shape, _, dtype = npy_format.read_array_header_2_0(f)
    except (ValueError, EOFError, SyntaxError) as exc:
        raise BadInputError(url, f"bad .npy header: {exc}") from None

    if dtype.hasobject:
        if dtype != np.dtype(object):
            raise BadInputError(url, f"unsupported .npy dtype {dtype} (object fields inside a record)")
        try:
            payload = RestrictedUnpickler(f, url).load()
        except BadInputError:
            raise
        except (EOFError, pickle.UnpicklingError) as exc:
            raise BadInputError(url, f"truncated or corrupt pickle payload ({exc})") from None
        except Exception as exc:  # anything a hostile payload makes numpy raise (ValueError, MemoryError...)
            raise BadInputError(url, f"corrupt pickle payload: {type(exc).__name__}: {exc}") from None
        if isinstance(payload, np.ndarray) and payload.dtype == object and payload.size == 1:
            payload = payload.reshape(()).item()
        if not isinstance(payload, dict):
            raise BadInputError(
                url, f"expected a pickled dict of event arrays, found {type(payload).__name__}"
            )
        return payload

    if dtype.names is None:
        raise BadInputError(
            url, f"expected a dict or a structured array with fields x, y, t, p; found dtype {dtype}"
        )
    if len(shape) != 1:
        raise BadInputError(url, f"structured event array must be 1-D, found shape {shape}")
    f.seek(0)
    try:
        arr = npy_format.read_array(f, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise BadInputError(url, f"truncated .npy data ({exc})") from None
    return {name: arr[name] for name in arr.dtype.names}


def _read_hdf5(f: Any, url: str) -> tuple[dict[str, Any], tuple[int, int] | None, np.ndarray | None]:
    """DSEC layout: ``events/{x,y,p,t}``, optional ``ms_to_idx`` and ``t_offset`` (added to t)."""
    import h5py

    try:  # DSEC files are Blosc-compressed; the filters come with hdf5plugin when installed
        import hdf5plugin  # noqa: F401
    except ImportError:
        pass
    try:
        with h5py.File(f, "r") as h5:
            if "events" not in h5 or not isinstance(h5["events"], h5py.Group):
                raise BadInputError(url, "HDF5 file has no 'events' group (expected events/{x,y,p,t})")
            group = h5["events"]
            missing = [k for k in EVENT_KEYS if k not in group]
            if missing:
                raise BadInputError(url, f"HDF5 'events' group lacks {', '.join(missing)}")
            fields = {k: _h5_array(group[k], f"events/{k}", url) for k in EVENT_KEYS}
            ms_to_idx = _h5_array(h5["ms_to_idx"], "ms_to_idx", url) if "ms_to_idx" in h5 else None
            if "t_offset" in h5:
                t_offset = np.asarray(_h5_array(h5["t_offset"], "t_offset", url)).reshape(-1)
                if t_offset.size != 1 or t_offset.dtype.kind not in "iu":
                    raise BadInputError(
                        url, f"t_offset must be one integer, found {t_offset.dtype} x{t_offset.size}"
                    )
                if fields["t"].dtype.kind in "iu":
                    fields["t"] = fields["t"].astype(np.int64) + np.int64(t_offset[0])
            sensor_size = _h5_sensor_size(h5, url)
    except BadInputError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(url, f"unreadable HDF5 event file ({exc})") from None
    return fields, sensor_size, ms_to_idx


def _h5_array(obj: Any, name: str, url: str) -> np.ndarray:
    import h5py

    if not isinstance(obj, h5py.Dataset):
        raise BadInputError(url, f"'{name}' is not an HDF5 dataset")
    return obj[()]


def _h5_sensor_size(h5: Any, url: str) -> tuple[int, int] | None:
    """(height, width) from root or events-group attributes, when the file declares it."""
    for attrs in (h5.attrs, h5["events"].attrs):
        if "height" in attrs and "width" in attrs:
            h, w = int(attrs["height"]), int(attrs["width"])
            if h <= 0 or w <= 0:
                raise BadInputError(url, f"invalid sensor size attributes {h}x{w}")
            return h, w
    return None


def _validate(fields: dict[str, Any], url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    missing = [k for k in EVENT_KEYS if k not in fields]
    if missing:
        found = ", ".join(sorted(map(str, fields))) or "none"
        raise BadInputError(url, f"missing event keys {', '.join(missing)} (found: {found})")
    arrays = []
    for k in EVENT_KEYS:
        a = fields[k]
        if not isinstance(a, np.ndarray):
            raise BadInputError(url, f"'{k}' must be an integer array, found {type(a).__name__}")
        if a.dtype == np.bool_ and k == "p":
            a = a.astype(np.uint8)
        if a.ndim != 1:
            raise BadInputError(url, f"'{k}' must be 1-D, found shape {a.shape}")
        if a.dtype.kind not in "iu":
            raise BadInputError(url, f"'{k}' must be an integer array, found dtype {a.dtype}")
        arrays.append(a)
    x, y, t, p = arrays
    lengths = {k: len(a) for k, a in zip(EVENT_KEYS, arrays)}
    if len(set(lengths.values())) != 1:
        raise BadInputError(url, f"event arrays differ in length: {lengths}")
    if len(x) == 0:
        raise BadInputError(url, "empty event stream (0 events)")
    if (x.dtype.kind == "i" and int(x.min()) < 0) or (y.dtype.kind == "i" and int(y.min()) < 0):
        raise BadInputError(url, "negative x or y coordinates")
    if int(p.min()) < 0 or int(p.max()) > 1:
        raise BadInputError(url, f"polarity must be 0 or 1, found values in [{int(p.min())}, {int(p.max())}]")
    return x, y, t, p


def _validate_ms_to_idx(ms_to_idx: np.ndarray, n_events: int, url: str) -> np.ndarray:
    if ms_to_idx.ndim != 1 or ms_to_idx.dtype.kind not in "iu":
        raise BadInputError(
            url, f"ms_to_idx must be a 1-D integer array, found {ms_to_idx.dtype} {ms_to_idx.shape}"
        )
    if ms_to_idx.size and (
        np.any(np.diff(ms_to_idx.astype(np.int64)) < 0) or int(ms_to_idx.max()) > n_events
    ):
        raise BadInputError(url, "ms_to_idx is not a non-decreasing index into the events")
    return ms_to_idx


def events_to_npy_bytes(x: np.ndarray, y: np.ndarray, t: np.ndarray, p: np.ndarray, **meta: Any) -> bytes:
    """The EventGPT on-disk format: ``np.save`` of an object array wrapping {x, y, t, p, **meta}."""
    buf = io.BytesIO()
    np.save(buf, np.array({"x": x, "y": y, "t": t, "p": p, **meta}, dtype=object), allow_pickle=True)
    return buf.getvalue()
