"""float8_e4m3fn stores: per-row scales next to the rows, transparent decoding on every read path,
the error bound, safetensors-only readability, and scales covered by the integrity checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from store_helpers import META, make_pairs

from egpt_core.errors import StoreError
from egpt_core.store import StoreReader, StoreWriter, collate_pairs
from egpt_core.store.fp8 import ROW_REL_ERROR, decode_rows, encode_rows

FP8_META = dict(META, dtype="float8_e4m3fn")


def _rows_with_outliers(n: int, seed: int = 0):
    """Pairs whose rows span ~6 decades, with outlier channels and an all-zero row."""
    recs, dr, tg = make_pairs(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(n):
        scale = 10.0 ** torch.empty(dr[i].shape[0], 1).uniform_(-3, 3, generator=g)
        dr[i] = dr[i] * scale
        dr[i][:, 3] *= 50.0
        tg[i] = tg[i] * scale.flip(0)
    dr[0][0] = 0.0
    return recs, dr, tg


def _check_bound(got: torch.Tensor, want: torch.Tensor) -> None:
    """|decoded - x| <= ROW_REL_ERROR * max|row| per row (+ the bf16 rounding of the decoded value)."""
    amax = want.abs().amax(dim=1, keepdim=True)
    err = (got.float() - want).abs()
    assert bool((err <= (ROW_REL_ERROR + 2.0 ** -8) * amax + 1e-30).all()), float((err / amax.clamp_min(1e-30)).max())


@pytest.fixture
def fp8_store(tmp_path):
    url = str(tmp_path / "fp8")
    recs, dr, tg = _rows_with_outliers(10)
    w = StoreWriter(url, FP8_META)
    w.commit_shard(recs[:6], dr[:6], tg[:6])
    w.commit_shard(recs[6:], dr[6:], tg[6:])
    return url, recs, dr, tg


def test_encode_decode_bound_and_zero_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g) * 10.0 ** torch.empty(64, 1).uniform_(-6, 6, generator=g)
    x[5] = 0.0
    q, s = encode_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (64,)
    assert s[5] == 1.0 and bool((decode_rows(q, s, torch.float32)[5] == 0).all())
    dec = decode_rows(q, s, torch.float32)
    err = (dec - x).abs() / x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    assert float(err.max()) <= ROW_REL_ERROR
    # the scale uses the whole fp8 range: each nonzero row's max decodes exactly
    nz = x.abs().amax(dim=1) > 0
    assert torch.allclose(dec.abs().amax(dim=1)[nz], x.abs().amax(dim=1)[nz], rtol=1e-6)


def test_round_trip_every_read_path_within_bound(fp8_store):
    url, recs, dr, tg = fp8_store
    r = StoreReader(url)
    assert r.stored_dtype == torch.float8_e4m3fn and r.dtype == torch.bfloat16
    by_id = {rec["pair_id"]: (d, t) for rec, d, t in zip(recs, dr, tg)}
    seen = 0
    for p in r.iter_pairs():  # whole-shard loads
        assert p.drafter.dtype == torch.bfloat16
        _check_bound(p.drafter, by_id[p.pair_id][0])
        _check_bound(p.target, by_id[p.pair_id][1])
        seen += 1
    assert seen == len(recs)
    for pid, (d, t) in by_id.items():  # byte-range reads (rows + scales)
        p = r.get(pid)
        _check_bound(p.drafter, d)
        _check_bound(p.target, t)
        ref = next(q for q in StoreReader(url).iter_pairs() if q.pair_id == pid)
        assert torch.equal(p.drafter, ref.drafter) and torch.equal(p.target, ref.target)
    ds = r.dataset()
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    assert batch["drafter"].dtype == torch.float32
    for b, pid in enumerate(batch["pair_ids"]):
        n = int(batch["lengths"][b])
        _check_bound(batch["drafter"][b, :n], by_id[pid][0])


def test_fp8_shard_is_plain_safetensors_and_half_of_bf16(fp8_store, tmp_path):
    url, recs, dr, tg = fp8_store
    sh = StoreReader(url).shards[0]
    loaded = st.load_file(str(Path(url) / sh["files"]["tensors"]))  # safetensors alone
    assert set(loaded) == {"drafter", "drafter_scale", "target", "target_scale", "offsets"}
    assert loaded["drafter"].dtype == torch.float8_e4m3fn and loaded["drafter_scale"].dtype == torch.float32
    rows = torch.cat(dr[:6])
    assert loaded["drafter"].shape == rows.shape and loaded["drafter_scale"].shape == (rows.shape[0],)
    _check_bound(loaded["drafter"].float() * loaded["drafter_scale"][:, None], rows)
    bf16 = StoreWriter(str(tmp_path / "bf16"), META).commit_shard(recs[:6], dr[:6], tg[:6])
    R, D = rows.shape
    header = 8 + int.from_bytes((Path(url) / sh["files"]["tensors"]).read_bytes()[:8], "little")
    # 1 byte per element + 4 bytes of scale per row per side, against 2 bytes per element in bf16
    assert sh["file_bytes"]["tensors"] - header == 2 * R * (D + 4) + 8 * (6 + 1)
    bf16_header = 8 + int.from_bytes((tmp_path / "bf16" / bf16.files["tensors"]).read_bytes()[:8], "little")
    assert bf16.file_bytes["tensors"] - bf16_header == 2 * R * 2 * D + 8 * (6 + 1)
    assert json.loads((Path(url) / "manifest.json").read_text())["meta"]["dtype"] == "float8_e4m3fn"


def test_nonfinite_rows_fail_the_pair_not_the_shard(tmp_path):
    recs, dr, tg = make_pairs(3)
    dr[1][0, 0] = math.inf
    info = StoreWriter(str(tmp_path / "s"), FP8_META).commit_shard(recs, dr, tg)
    assert info.counts == {"ok": 2, "failed": 1, "skipped": 0}


def _flip_scale_byte(url: str, shard: dict, key: str, row: int) -> None:
    path = Path(url) / shard["files"]["tensors"]
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    hdr = json.loads(data[8:8 + n])
    begin = hdr[key]["data_offsets"][0]
    pos = 8 + n + begin + 4 * row + 1
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("key", ["drafter_scale", "target_scale"])
def test_tampered_scale_is_caught_by_every_read_path(fp8_store, key):
    url, recs, _, _ = fp8_store
    sh = StoreReader(url).shards[1]
    _flip_scale_byte(url, sh, key, row=2)  # pair recs[6] holds rows 0.. of shard 1
    with pytest.raises(StoreError, match="not readable as committed"):
        list(StoreReader(url).iter_pairs())
    with pytest.raises(StoreError, match=recs[6]["pair_id"]):
        StoreReader(url).get(recs[6]["pair_id"])  # ranged read: the row digest covers the scales
    StoreReader(url).get(recs[0]["pair_id"])  # other shard: untouched
    problems = StoreReader(url).verify(raise_on_error=False)["problems"]
    assert len(problems) == 1 and sh["files"]["tensors"] in problems[0]


def test_fp8_store_refuses_a_bf16_writer_and_header_without_scales(fp8_store, tmp_path):
    from egpt_core.errors import ConfigError

    url, recs, dr, tg = fp8_store
    with pytest.raises(ConfigError):
        StoreWriter(url, META)  # a store's dtype is defining
    # a shard whose header lacks the scales is refused, not read as unscaled fp8
    sh = StoreReader(url).shards[0]
    path = Path(url) / sh["files"]["tensors"]
    loaded = st.load_file(str(path))
    bad = {k: v for k, v in loaded.items() if not k.endswith("_scale")}
    from egpt_core.store import manifest as mf

    path.write_bytes(mf.safetensors_bytes(bad))
    r = StoreReader(url)
    with pytest.raises(StoreError):
        list(r.iter_pairs())


def test_lm_head_of_an_fp8_store_is_not_fp8(tmp_path):
    w = StoreWriter(str(tmp_path / "s"), FP8_META)
    head = torch.randn(50, META["hidden_size"])
    info = w.write_lm_head(head, fingerprint="t")
    assert info["dtype"] == "bfloat16"
    assert torch.allclose(StoreReader(str(tmp_path / "s")).lm_head().float(), head, rtol=1e-2, atol=1e-2)
