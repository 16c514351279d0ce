"""FP8 hidden-state storage: size against the research format, and what it changes in the metrics.

* ``store_bytes_fp8_vs_research``: bytes per pair of a ``float8_e4m3fn`` store (rows + one float32
  scale per row, parquet, manifest) over the research format (one padded fp32 ``torch.save`` chunk +
  index.json), the same 200 synthetic pairs as ``store_bytes_vs_research_format`` (D = 256, lengths
  11..50). Goal <= 0.17 (bf16 stores: ~0.31).
* ``fp8_metric_drift``: the same pairs written to a bfloat16 and to a float8_e4m3fn store and
  evaluated (drafter rows as the prediction, the target LM head in the store); max |delta| over
  cos_pooled, accept@0.90 and token top-1 between the two. Goal <= 0.005 absolute. The rows mimic
  LLM hidden states: per-channel scales with a few outlier channels (x20), target rows with a
  drafter that agrees at cos ~0.9, and target token ids = the LM head's argmax on the target rows.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_store import N_PAIRS, SHARD, _dir_bytes, _pairs, _write_research
from benchmarks.bench_store import D as STORE_D

DRIFT_D, DRIFT_V, DRIFT_PAIRS, DRIFT_SHARD = 256, 512, 400, 50
DRIFT_KEYS = ("cos_pooled", "accept@0.90", "token_top1")


def drift_pairs(n: int = DRIFT_PAIRS, d: int = DRIFT_D, v: int = DRIFT_V, seed: int = 0):
    """(lm_head [V, D], records, drafter rows, target rows): hidden-state-like synthetic pairs."""
    g = torch.Generator().manual_seed(seed)
    channel = torch.rand(d, generator=g) * 1.5 + 0.25
    channel[torch.randperm(d, generator=g)[:4]] *= 20.0  # outlier channels, as LLM hidden states have
    head = torch.randn(v, d, generator=g) / channel  # the head undoes the channel scales
    recs, dr, tg = [], [], []
    for i in range(n):
        L = int(torch.randint(10, 51, (1,), generator=g))
        t = torch.randn(L, d, generator=g) * channel
        noise = torch.randn(L, d, generator=g) * channel * float(torch.empty(1).uniform_(0.3, 0.6, generator=g))
        dd = t + noise
        ids = (t @ head.T).argmax(-1).tolist()
        recs.append({"pair_id": f"scene{i // 10:04d}|q{i % 10}", "scene_id": f"scene{i // 10:04d}",
                     "question_idx": i % 10, "status": "ok", "length": L,
                     "target_response_ids": ids, "drafter_response_ids": ids})
        dr.append(dd)
        tg.append(t)
    return head, recs, dr, tg


def write_store(url: str, dtype: str, head, recs, dr, tg, shard: int = DRIFT_SHARD) -> None:
    from egpt_core.store import StoreWriter

    w = StoreWriter(url, {"hidden_size": int(dr[0].shape[1]), "dtype": dtype, "mode": "shared_prefix"})
    for i in range(0, len(recs), shard):
        w.commit_shard(recs[i:i + shard], dr[i:i + shard], tg[i:i + shard])
    if head is not None:
        w.write_lm_head(head, fingerprint="bench-head", dtype="float32")


def metric_drift(tmp: Path, n: int = DRIFT_PAIRS) -> dict:
    """Evaluate the same pairs from a bf16 and an fp8 store; per-metric values and |delta|."""
    from egpt_core.config import EvalConfig
    from egpt_core.evaluation import evaluate

    head, recs, dr, tg = drift_pairs(n)
    out = {}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        write_store(str(tmp / dtype), dtype, head, recs, dr, tg)
        res = evaluate(EvalConfig(store=str(tmp / dtype), out=str(tmp / f"eval-{dtype}"), identity=True,
                                  batch_size=32))
        out[dtype] = {k: float(res.metrics[k]) for k in DRIFT_KEYS}
    delta = {k: abs(out["float8_e4m3fn"][k] - out["bfloat16"][k]) for k in DRIFT_KEYS}
    return {"bf16": out["bfloat16"], "fp8": out["float8_e4m3fn"], "delta": delta,
            "positions": int(sum(r["length"] for r in recs))}


def run() -> dict:
    recs, dr, tg = _pairs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for dtype in ("float8_e4m3fn", "bfloat16"):
            write_store(str(tmp / f"store-{dtype}"), dtype, None, recs, dr, tg, shard=SHARD)
        _write_research(tmp / "research", recs, dr, tg)
        fp8 = _dir_bytes(tmp / "store-float8_e4m3fn") / N_PAIRS
        bf16 = _dir_bytes(tmp / "store-bfloat16") / N_PAIRS
        theirs = _dir_bytes(tmp / "research") / N_PAIRS
        drift = metric_drift(tmp)
    worst = max(drift["delta"].values())
    return {
        "store_bytes_fp8_vs_research": {
            "ratio": round(fp8 / theirs, 4), "goal": "<= 0.17", "unit": "x (bytes per pair)",
            "fp8_bytes_per_pair": round(fp8), "bf16_bytes_per_pair": round(bf16),
            "research_bytes_per_pair": round(theirs), "fp8_vs_bf16": round(fp8 / bf16, 4),
            "pairs": N_PAIRS, "hidden_size": STORE_D,
        },
        "fp8_metric_drift": {
            "ratio": round(worst, 6), "goal": "<= 0.005",
            "unit": "max |delta| of cos_pooled, accept@0.90, token_top1 (fp8 vs bf16 store, same pairs)",
            "delta": {k: round(v, 6) for k, v in drift["delta"].items()},
            "bf16": {k: round(v, 5) for k, v in drift["bf16"].items()},
            "fp8": {k: round(v, 5) for k, v in drift["fp8"].items()},
            "pairs": DRIFT_PAIRS, "positions": drift["positions"], "hidden_size": DRIFT_D,
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
