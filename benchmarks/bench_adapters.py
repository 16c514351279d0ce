"""Adapter training fed from a hidden-state store vs from tensors already in memory.

A synthetic bf16 store (D=256, 400 pairs over 40 scenes, 8 shards) feeds the trainer's own batch
pipeline (``iter_batches`` over ``StoreReader.dataset`` with every shard cached after first use,
global shuffle across shards, prefetch thread) into an L2 adapter; the same loop runs over the same
pairs pre-loaded as float32 tensors. Each measurement is a fresh pass of 2 epochs (the store-fed one
includes loading the shards); runs alternate and the median of each side is kept.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

D = 256
N_SCENES, PER_SCENE = 40, 10
EPOCHS, BATCH, REPEATS = 2, 32, 3


def _train_pass(dataset, n: int, level: str = "L2", epochs: int = EPOCHS, workers: int = 1) -> float:
    """Pairs per second of ``epochs`` training epochs over ``dataset`` (seeded, as the trainer does)."""
    from egpt_core.adapters.losses import combine_sums, loss_sums
    from egpt_core.adapters.modules import create_adapter
    from egpt_core.adapters.trainer import _Step, iter_batches
    from egpt_core.config import AdapterConfig
    from egpt_core.training.schedule import param_groups

    torch.manual_seed(0)
    adapter = create_adapter(AdapterConfig(level=level), D)
    step = _Step(adapter, level)
    opt = torch.optim.AdamW(param_groups(adapter.named_parameters(), 0.01), lr=1e-3)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()
        for batch in iter_batches(dataset, order, BATCH, workers=workers):
            aligned, _ = step(batch["drafter"], batch["target"], batch["mask"])
            loss = combine_sums(loss_sums(aligned, batch["target"], batch["mask"]), D)["total_loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            opt.step()
    return n * epochs / (time.perf_counter() - t0)


def run() -> dict:
    from egpt_core.adapters.synthetic import write_synthetic_pair_store
    from egpt_core.adapters.trainer import PairRandomAccess
    from egpt_core.store import StoreReader

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{tmp}/store"
        write_synthetic_pair_store(url, hidden_size=D, n_scenes=N_SCENES, pairs_per_scene=PER_SCENE, min_len=10,
                                   max_len=50, dtype="bfloat16", shard_size=50)
        reader = StoreReader(url)
        ids = reader.pair_ids("ok")
        n = len(ids)
        memory = [reader.dataset(pair_ids=ids, cache_shards=len(reader.shards))[i] for i in range(n)]
        _train_pass(memory, n, epochs=1)  # warm-up (allocator, kernels)
        store_tp, mem_tp, stream_tp = [], [], []
        for _ in range(REPEATS):
            fresh = StoreReader(url)  # nothing cached: shards load inside the timed pass
            store_tp.append(_train_pass(fresh.dataset(pair_ids=ids, cache_shards=len(fresh.shards)), n))
            mem_tp.append(_train_pass(memory, n))
            stream_tp.append(_train_pass(PairRandomAccess(StoreReader(url), ids), n, workers=8))
        s, m, r = statistics.median(store_tp), statistics.median(mem_tp), statistics.median(stream_tp)
    return {
        "adapter_store_fed_vs_memory": {
            "ratio": s / m,
            "goal": ">= 0.8",
            "unit": "training throughput (pairs/s) store-fed / in-memory, L2 adapter, D=256, 400 pairs",
            "store_pairs_per_s": round(s, 1),
            "memory_pairs_per_s": round(m, 1),
            "byte_range_streaming_ratio": round(r / m, 3),
        }
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
