"""L6 streams its store (issue 16.2): shards are read, verified and decoded in background threads that
are closed after every pass, a damaged shard is refused from that thread naming it, no per-pair objects
are kept, the shard-window shuffle is a seeded function of (seed, epoch), and resume stays bitwise."""

from __future__ import annotations

import gc
import json
import threading
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from egpt_core.config import ExtractConfig, LoraTrainConfig, ModelLoadConfig
from egpt_core.errors import StoreError
from egpt_core.lora import train_lora
from egpt_core.lora.train import LoraSample
from egpt_core.store import StoreReader

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

FP32 = ModelLoadConfig(dtype="float32", quant="none", device="cpu")


def _lora_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lora-") and t.is_alive()]


@pytest.fixture(scope="module")
def sharded_store(fixtures_dir, drafter, target, tmp_path_factory) -> str:
    """All 4 scenes x 3 questions (12 pairs) in shards of 2 pairs: 6 shards."""
    from egpt_core.extraction import run_extraction

    url = str(tmp_path_factory.mktemp("lora_stream_store") / "S")
    cfg = ExtractConfig(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                        target=str(fixtures_dir / "videollava"), store=url, load=FP32, max_new_tokens=6, shard_size=2)
    assert run_extraction(cfg, models=(drafter, target)).counts["ok"] == 12
    assert len(StoreReader(url).shards) == 6
    return url


def _cfg(store: str, fixtures_dir: Path, out: Path, **kw) -> LoraTrainConfig:
    base = dict(store=store, drafter=str(fixtures_dir / "eventgpt"), out=str(out), load=FP32, rank=2, alpha=4,
                epochs=2, micro_batch=1, grad_accum=1, lr=5e-3, val_fraction=0.34, early_stopping=10,
                gradient_checkpointing=False)
    base.update(kw)
    return LoraTrainConfig(**base)


def _per_pair_containers(obj, pair_ids: set[str]) -> list[str]:
    """Attributes of ``obj`` that are Python containers of samples or pair ids."""
    def per_pair(e) -> bool:
        return isinstance(e, LoraSample) or (isinstance(e, str) and e in pair_ids)

    return [k for k, v in vars(obj).items()
            if isinstance(v, (list, tuple, set, dict)) and any(per_pair(e) for e in v)]


@pytest.fixture(scope="module")
def observed_run(sharded_store, fixtures_dir, tmp_path_factory):
    """A 2-epoch run; at every optimizer step: the live lora-* threads, live LoraSample objects and the
    recipe's per-pair containers."""
    seen: list[dict] = []
    pair_ids = set(StoreReader(sharded_store).pair_ids())

    def progress(frac, msg):
        if " step " not in msg:
            return
        gc.collect()
        recipe = [o for o in gc.get_objects() if type(o).__name__ == "_LoraRecipe"]
        seen.append({"msg": msg, "threads": _lora_threads(),
                     "samples": sum(type(o) is LoraSample for o in gc.get_objects()),
                     "containers": [c for r in recipe for c in _per_pair_containers(r, pair_ids)]})

    out = tmp_path_factory.mktemp("lora_stream_run") / "run"
    res = train_lora(_cfg(sharded_store, fixtures_dir, out), progress=progress)
    return res, seen, _lora_threads()


def test_training_reads_through_background_threads_and_closes_them(observed_run):
    res, seen, after = observed_run
    assert res.n_train_pairs == 9 and res.n_val_pairs == 3 and res.epochs_run == 2
    assert len(seen) == 18  # 9 steps per epoch
    # each epoch's first step ran while its micro-batches were built ahead in the background (7 more
    # to build, 2 queued at most)
    firsts = [s for s in seen if " step 1/" in s["msg"] or " step 10/" in s["msg"]]
    assert len(firsts) == 2 and all(any(n.startswith("lora-batches") for n in s["threads"]) for s in firsts), firsts
    # one pass at a time: the previous epoch's and validation's threads were joined
    assert all(len(s["threads"]) <= 2 for s in seen), [s["threads"] for s in seen]
    assert after == []  # nothing left running once the run returned


def test_no_per_pair_objects_are_kept(observed_run):
    """Memory flat in the number of pairs: at any step only the queued micro-batches' samples exist
    (micro_batch 1, queue 2: at most a handful), and the recipe holds no per-pair Python container."""
    _, seen, _ = observed_run
    assert max(s["samples"] for s in seen) <= 6, [s["samples"] for s in seen]  # 9 train pairs
    assert not any(s["containers"] for s in seen), seen[0]["containers"]


def test_an_exception_mid_epoch_stops_the_read_ahead(sharded_store, fixtures_dir, tmp_path):
    def crash(frac, msg):
        if msg.startswith("epoch 1/2 step 2/"):
            assert _lora_threads()  # the read-ahead is running
            raise RuntimeError("simulated failure in the training loop")

    with pytest.raises(RuntimeError, match="simulated failure"):
        train_lora(_cfg(sharded_store, fixtures_dir, tmp_path / "run"), progress=crash)
    assert _lora_threads() == []


def test_a_damaged_shard_is_refused_from_the_reader_thread_naming_it(sharded_store, fixtures_dir, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(sharded_store, store)
    sh = StoreReader(str(store)).shards[-1]
    path = store / sh["files"]["tensors"]
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin = 8 + n + json.loads(raw[8:8 + n])["target"]["data_offsets"][0]
    raw[begin + 3] ^= 0x80  # flip a sign bit of the target rows (16-bit store dtype)
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError) as exc:
        train_lora(_cfg(str(store), fixtures_dir, tmp_path / "run"))
    assert sh["files"]["tensors"] in str(exc.value) and "modified after commit" in str(exc.value), str(exc.value)
    frames = [f.name for f in traceback.extract_tb(exc.value.__traceback__)]
    assert "produce" in frames and "_load_shard" in frames, frames  # raised in the shard reader thread
    assert _lora_threads() == []


def _index(shard_sizes: list[int]):
    from egpt_core.lora.data import PairIndex

    shard = np.concatenate([np.full(k, i, dtype=np.int32) for i, k in enumerate(shard_sizes)])
    row = np.concatenate([np.arange(k, dtype=np.int32) for k in shard_sizes])
    return PairIndex(None, 0, shard, row, np.zeros(len(shard), dtype=np.int32), ("s",))


def test_epoch_order_is_a_seeded_shard_window_shuffle():
    from egpt_core.lora.data import epoch_plan, store_order_plan

    idx = _index([5, 3, 4, 6, 2, 5, 1])
    plan = epoch_plan(idx, seed=3, epoch=2, window=3)
    order = np.concatenate([p for _, p in plan])
    assert sorted(order.tolist()) == list(range(len(idx)))  # every pair exactly once
    assert [len(s) for s, _ in plan] == [3, 3, 1] and sorted(sum((s for s, _ in plan), [])) == list(range(7))
    for shards, positions in plan:  # a window's pairs come only from its shards
        assert set(idx.shard[positions].tolist()) == set(shards)
    again = epoch_plan(idx, seed=3, epoch=2, window=3)
    assert [s for s, _ in again] == [s for s, _ in plan] and all(np.array_equal(a, b) for (_, a), (_, b) in zip(again, plan))
    other = np.concatenate([p for _, p in epoch_plan(idx, seed=3, epoch=3, window=3)])
    assert not np.array_equal(order, other)
    full = epoch_plan(idx, seed=3, epoch=2, window=7)  # store within one window: a full permutation
    assert len(full) == 1 and sorted(full[0][1].tolist()) == list(range(len(idx)))
    assert np.array_equal(np.concatenate([p for _, p in store_order_plan(idx)]), np.arange(len(idx)))


def test_resume_over_several_shard_windows_is_bitwise_identical(sharded_store, fixtures_dir, tmp_path, monkeypatch):
    """6 shards in windows of 2 (so the shard-level shuffle is exercised): a run that crashed in epoch 3
    and resumed ends with the weights and history of an uninterrupted run."""
    from egpt_core.lora import data as lora_data

    monkeypatch.setattr(lora_data, "SHUFFLE_WINDOW_SHARDS", 2)
    orders: list[list[str]] = []
    real_stream = lora_data.stream

    def recording_stream(index, plan, *a, **kw):
        if any(len(s) > 1 for s, _ in plan):  # a training epoch (validation: one shard a window)
            orders.append([int(index.shard[p]) for _, ps in plan for p in ps])
        return real_stream(index, plan, *a, **kw)

    monkeypatch.setattr("egpt_core.lora.train.stream", recording_stream)
    full = _cfg(sharded_store, fixtures_dir, tmp_path / "full", epochs=3, grad_accum=2)
    train_lora(full)
    assert len(orders) == 3 and orders[0] != orders[1]  # epochs differ

    def crash(frac, msg):
        if msg.startswith("epoch 3/3 step"):
            raise RuntimeError("simulated crash")

    cfg = full.model_copy(update={"out": str(tmp_path / "resumed")})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_lora(cfg, progress=crash)
    res = train_lora(cfg)
    assert res.resumed_from_epoch == 2 and res.epochs_run == 3
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def strip(h):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in h]

    assert strip(json.loads((tmp_path / "full" / "history.json").read_text())) == \
        strip(json.loads((tmp_path / "resumed" / "history.json").read_text()))


def test_streamed_micro_batches_carry_the_pairs_rows_and_token_ids(sharded_store, drafter):
    """Every pair once per pass, with the target rows and token ids random access reads for it; another
    rank's micro-batches are not built."""
    from contextlib import closing

    from egpt_core.lora.data import epoch_plan, scan_store, stream

    reader = StoreReader(sharded_store)
    index = scan_store(reader, 0, drafter.model.get_input_embeddings().num_embeddings, {}, drafter)
    assert len(index) == 12 and len(index.scenes()) == 4
    with closing(stream(index, epoch_plan(index, 0, 1, window=2), 5)) as batches:
        got = list(batches)
    assert [len(b.samples) for b in got] == [5, 5, 2]
    seen = []
    for b in got:
        rows = 0
        for s in b.samples:
            ref = reader.get(s.pair_id)
            assert torch.equal(b.target[rows:rows + s.length], ref.target[: s.length].float())
            assert s.target_ids == ref.target_response_ids[: s.length] and s.fed_ids == ref.drafter_response_ids[: s.length]
            assert s.prompt_ids == ref.drafter_prompt_ids and s.scene_id == ref.scene_id
            rows += s.length
            seen.append(s.pair_id)
        assert rows == b.target.shape[0] == b.target_ids.shape[0]
        assert b.target_ids.tolist() == [t for s in b.samples for t in s.target_ids]
    assert sorted(seen) == sorted(reader.pair_ids())
    with closing(stream(index, epoch_plan(index, 0, 1, window=2), 5, use=lambda k: k == 1)) as batches:
        share = list(batches)
    assert share[0] is None and share[2] is None and [s.pair_id for s in share[1].samples] == seen[5:10]
