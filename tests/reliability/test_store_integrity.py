"""A store changed after commit is refused by every reader, on both read paths (issue 13, items 4-5).

The manifest records each committed file's sha256; readers check it over the bytes they fetch
(whole-shard loads: training with the RAM cache, evaluation) and byte-range readers check the
manifest-anchored tensor header and per-pair row digests (training over stores larger than
``data_cache_gb``, L6, retf). Cases: the sign of drafter rows flipped in a tensor shard, a pairs
parquet rewritten with other token ids, the LM head altered, and a tensor header whose drafter
offsets point at the target's data (with and without the manifest's digests updated to match).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from egpt_core.adapters import train_adapter
from egpt_core.adapters.synthetic import write_synthetic_pair_store
from egpt_core.cli import main as egpt_main
from egpt_core.config import AdapterConfig, EvalConfig, TrainAdapterConfig
from egpt_core.errors import StoreError
from egpt_core.evaluation import evaluate
from egpt_core.store import StoreReader, StoreWriter
from egpt_core.store.manifest import sha256_hex

D = 16


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """6 scenes x 4 pairs (bf16, 3 shards) + an LM head."""
    root = tmp_path_factory.mktemp("integrity") / "store"
    write_synthetic_pair_store(str(root), hidden_size=D, n_scenes=6, pairs_per_scene=4, shard_size=8, dtype="bfloat16",
                               min_len=4, max_len=9)
    g = torch.Generator().manual_seed(0)
    StoreWriter(str(root), {}).write_lm_head(torch.randn(1024, D, generator=g), "target-fp")
    r = StoreReader(str(root))
    assert len(r.shards) == 3 and r.verify()["problems"] == []
    return root


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(pristine, dst)
    return dst


def _train(store: Path, out: Path, cached: bool):
    cfg = TrainAdapterConfig(adapter=AdapterConfig(level="L1", dropout=0.0), train=[str(store)], out=str(out),
                             epochs=2, batch_size=8, seed=0, data_cache_gb=32.0 if cached else 0.0)
    return train_adapter(cfg)


def _evaluate(store: Path, out: Path):
    return evaluate(EvalConfig(store=str(store), out=str(out), identity=True, device="cpu"))


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n])


def _flip_drafter_signs(store: Path, shard: dict, n_rows: int) -> None:
    """Flip the sign bit of every value of the first ``n_rows`` drafter rows (bf16, little-endian)."""
    path = store / shard["files"]["tensors"]
    raw = bytearray(path.read_bytes())
    n, hdr = _header(path)
    begin = 8 + n + hdr["drafter"]["data_offsets"][0]
    for i in range(begin + 1, begin + n_rows * D * 2, 2):
        raw[i] ^= 0x80
    path.write_bytes(bytes(raw))


def _every_reader_refuses(store: Path, tmp_path: Path, names: str) -> list[str]:
    """Training (RAM cache and byte ranges), evaluation, random access and `inspect --verify` all refuse;
    each message names ``names`` (the damaged file). Returns the messages."""
    msgs = []
    for cached in (True, False):
        with pytest.raises(StoreError) as exc:
            _train(store, tmp_path / f"run-{cached}", cached)
        msgs.append(str(exc.value))
    with pytest.raises(StoreError) as exc:
        _evaluate(store, tmp_path / "eval")
    msgs.append(str(exc.value))
    r = StoreReader(str(store))
    with pytest.raises(StoreError) as exc:
        for pid in r.pair_ids():
            r.get(pid)
    msgs.append(str(exc.value))
    for m in msgs:
        assert names in m and "modified after commit" in m, m
    assert egpt_main(["inspect", "--verify", str(store)]) == 1
    return msgs


def test_flipped_drafter_rows_are_refused_by_every_reader(store, tmp_path, capsys):
    r = StoreReader(str(store))
    sh = r.shards[1]
    fingerprint = r.fingerprint
    _flip_drafter_signs(store, sh, n_rows=20)
    assert StoreReader(str(store)).fingerprint == fingerprint  # the manifest cannot tell by itself
    msgs = _every_reader_refuses(store, tmp_path, sh["files"]["tensors"])
    assert "sha256" in msgs[0]
    assert "the rows of pair" in msgs[1]  # byte ranges: the pair whose rows changed is named
    assert sh["files"]["tensors"] in capsys.readouterr().out  # inspect --verify lists it


def test_a_rewritten_pairs_parquet_is_refused_by_every_reader(store, tmp_path):
    r = StoreReader(str(store))
    sh = r.shards[0]
    path = store / sh["files"]["pairs"]
    table = pq.read_table(path)
    ids = table.column("target_response_ids").to_pylist()
    ids[0] = [7] * len(ids[0])  # other token ids, same shapes: every structural check still passes
    col = table.column_names.index("target_response_ids")
    table = table.set_column(col, "target_response_ids", pa.array(ids, table.schema.field(col).type))
    pq.write_table(table, path, compression="zstd")
    _every_reader_refuses(store, tmp_path, sh["files"]["pairs"])


def test_an_altered_lm_head_is_refused(store, tmp_path):
    path = store / "target_lm_head.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x80  # the sign of one weight
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="target_lm_head.safetensors") as exc:
        _evaluate(store, tmp_path / "eval")
    assert "modified after commit" in str(exc.value)
    with pytest.raises(StoreError, match="target_lm_head.safetensors"):
        StoreReader(str(store)).lm_head()


def _point_drafter_at_target(store: Path, sh: dict) -> None:
    """Rewrite the tensor header so the drafter's data_offsets are the target's (file size unchanged)."""
    path = store / sh["files"]["tensors"]
    raw = path.read_bytes()
    n, hdr = _header(path)
    hdr["drafter"]["data_offsets"] = list(hdr["target"]["data_offsets"])
    new = json.dumps(hdr, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n:])


@pytest.mark.parametrize("manifest", ["untouched", "digests updated"])
def test_a_header_pointing_drafter_at_target_data_is_refused_on_both_read_paths(store, tmp_path, manifest):
    r = StoreReader(str(store))
    sh = r.shards[2]
    _point_drafter_at_target(store, sh)
    if manifest == "digests updated":  # a writer bug or a careful attacker: the manifest agrees with the file
        path = store / sh["files"]["tensors"]
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        m = json.loads((store / "manifest.json").read_text())
        entry = next(s for s in m["shards"] if s["name"] == sh["name"])
        entry["sha256"]["tensors"], entry["sha256"]["header"] = sha256_hex(raw), sha256_hex(raw[:8 + n])
        (store / "manifest.json").write_text(json.dumps(m))
        assert StoreReader(str(store)).verify()["problems"] == []  # every digest matches
    msgs = []
    for cached in (True, False):  # RAM-cached shards, and byte ranges (store over data_cache_gb)
        with pytest.raises(StoreError) as exc:
            _train(store, tmp_path / f"run-{cached}", cached)
        msgs.append(str(exc.value))
    assert all(sh["files"]["tensors"] in m for m in msgs), msgs
    if manifest == "digests updated":  # one validation: both paths give the same reason
        assert all("'drafter' and 'target' overlap" in m for m in msgs), msgs
    else:
        assert all("modified after commit" in m for m in msgs), msgs


def test_untouched_store_trains_and_evaluates_on_both_paths(store, tmp_path):
    """Control: the same calls succeed on the unmodified copy, with the same result on both paths."""
    a = _train(store, tmp_path / "cached", cached=True)
    b = _train(store, tmp_path / "ranges", cached=False)
    assert a.n_train_pairs == b.n_train_pairs == 24 - a.n_val_pairs
    assert a.metrics["val_cos_sim"] == pytest.approx(b.metrics["val_cos_sim"], abs=1e-6)
    res = _evaluate(store, tmp_path / "eval")
    assert res is not None
