"""Checkpoint directories as trainers write them: weight files, tensor names, strict loading.

A model directory holds its weights in one of the layouts transformers writes (and reads):

* ``model.safetensors`` (single file; the default of every recent Trainer);
* ``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors`` (sharded, e.g. a 7B
  model saved with the default ``max_shard_size``);
* ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` + shards (``save_safetensors=False``);
  read with ``torch.load(weights_only=True)`` only.

Strict loading: :func:`check_tensor_names` compares a checkpoint's tensor names and shapes with a
model's before any weight is read, and :func:`check_loading_info` re-checks transformers'
``output_loading_info`` after ``from_pretrained``; either raises :class:`ConfigError` naming the
checkpoint and the first offending keys. Nothing is ever left at its random initialisation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from egpt_core.errors import ConfigError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

#: how many offending keys an error message lists
SHOWN_KEYS = 8


def weight_files(ckpt: Path) -> list[Path]:
    """The weight files transformers would read from ``ckpt``, in its order of preference.

    ConfigError when the directory holds none, or an index names a shard that is missing.
    """
    for single, index in ((SAFE_SINGLE, SAFE_INDEX), (BIN_SINGLE, BIN_INDEX)):
        if (ckpt / single).is_file():
            return [ckpt / single]
        if (ckpt / index).is_file():
            try:
                weight_map = json.loads((ckpt / index).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{ckpt / index}: not a weight index ({exc})") from exc
            shards = sorted(set(weight_map.values()))
            bad = [s for s in shards if Path(str(s)).name != s or not (ckpt / s).is_file()]
            if bad:
                raise ConfigError(f"{ckpt / index} names shard(s) that are missing or outside the directory: "
                                  f"{bad[:SHOWN_KEYS]}")
            return [ckpt / s for s in shards]
    raise ConfigError(
        f"{ckpt}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")


def tensor_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name in ``ckpt``'s weights -> its shape, reading headers only (safetensors) or a
    memory-mapped ``torch.load(weights_only=True)`` (``.bin``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in weight_files(ckpt):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        shapes[k] = tuple(sf.get_slice(k).get_shape())
            except Exception as exc:  # safetensors raises its own error types
                raise ConfigError(f"{f}: not a readable safetensors file ({exc})") from exc
        else:
            shapes.update({k: tuple(v.shape) for k, v in _load_bin(f).items()})
    return shapes


def _load_bin(f: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{f}: refused: the pickle holds objects other than tensors "
                          f"(torch.load weights_only=True: {str(exc).strip().splitlines()[0]})") from exc
    except Exception as exc:
        raise ConfigError(f"{f}: not a readable torch weight file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{f}: not a state dict of tensors")
    return sd


def rename(key: str, key_mapping: Mapping[str, str] | None) -> str:
    """``key`` after the first matching ``key_mapping`` regex (transformers' ``key_mapping`` rule)."""
    for pattern, repl in (key_mapping or {}).items():
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _first(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def incomplete_message(ckpt: Path | str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                       mismatched: Iterable[str] = (), errors: Iterable[str] = ()) -> str | None:
    """One message naming the checkpoint and the first offending keys, or None when all is well."""
    missing, unexpected, mismatched, errors = (sorted(set(x)) for x in (missing, unexpected, mismatched, errors))
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) missing (would stay randomly initialised): {_first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s) the model has no place for: {_first(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} tensor(s) of the wrong shape: {_first(mismatched)}")
    if errors:
        parts.append("load errors: " + "; ".join(errors[:3]))
    if not parts:
        return None
    return f"checkpoint {ckpt} does not load completely: " + "; ".join(parts)


def check_tensor_names(ckpt: Path, ckpt_shapes: Mapping[str, tuple[int, ...]],
                       expected: Mapping[str, tuple[int, ...]], key_mapping: Mapping[str, str] | None = None,
                       optional_prefixes: tuple[str, ...] = ()) -> set[str]:
    """Compare a checkpoint's tensors (names after ``key_mapping``) with a model's state dict.

    Keys under an ``optional_prefixes`` entry may be absent *as a group* (e.g. a vision tower read
    from its own directory); a partial group is an error. Returns the optional prefixes that are
    absent. Raises ConfigError on anything missing, unexpected or of the wrong shape.
    """
    mapped: dict[str, tuple[int, ...]] = {}
    for k, shape in ckpt_shapes.items():
        mapped[rename(k, key_mapping)] = shape
    missing = set(expected) - set(mapped)
    absent_groups = set()
    for prefix in optional_prefixes:
        group = {k for k in expected if k.startswith(prefix)}
        if group and group <= missing:
            absent_groups.add(prefix)
            missing -= group
    unexpected = set(mapped) - set(expected)
    mismatched = {f"{k} {list(mapped[k])} (model {list(expected[k])})" for k in set(mapped) & set(expected)
                  if tuple(mapped[k]) != tuple(expected[k])}
    msg = incomplete_message(ckpt, missing, unexpected, mismatched)
    if msg:
        raise ConfigError(msg)
    return absent_groups


def check_loading_info(ckpt: Path | str, info: Mapping, allowed_missing_prefixes: tuple[str, ...] = ()) -> None:
    """Refuse what transformers' ``output_loading_info`` reports as missing/unexpected/mismatched."""
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(allowed_missing_prefixes or ("\0",))]
    mismatched = [f"{k} {list(a)} (model {list(b)})" for k, a, b in info.get("mismatched_keys", ())]
    msg = incomplete_message(ckpt, missing, info.get("unexpected_keys", ()), mismatched, info.get("error_msgs", ()))
    if msg:
        raise ConfigError(msg)


def model_tensor_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict names -> shapes of a (meta-device) model."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_tensor(ckpt: Path, names: Iterable[str]) -> torch.Tensor:
    """The first of ``names`` found in ``ckpt``'s weights, as stored (one tensor read, not the model)."""
    names = list(names)
    for f in weight_files(ckpt):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                keys = set(sf.keys())
                for n in names:
                    if n in keys:
                        return sf.get_tensor(n)
        else:
            sd = _load_bin(f)
            for n in names:
                if n in sd:
                    return sd[n].clone()
    raise ConfigError(f"{ckpt}: no tensor named {' or '.join(names)} in its weights")
