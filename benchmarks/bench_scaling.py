"""Does cost stay flat as the work grows? Each stage on 1x and 8x the data, each run in a fresh process.

Per stage: peak RSS of the stage (goal: 8x / 1x <= 1.15) and wall time per pair (goal: 8x / 1x <=
1.10). The child process imports, loads models and opens nothing of the data before the
measurement starts; then it resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5, so
import-time peaks do not count), runs the stage, and reads the peak (``VmHWM``). Where the reset is
not allowed the figure is the process's ``ru_maxrss``. Besides the ratio each entry reports the
peak's growth over the RSS just before the stage (MB) at both sizes, and from them the bytes the
stage keeps per extra pair, extrapolated to a research-sized run (52K pairs).

Stages (tiny seeded models, CPU, one torch thread per process):

- ``extraction``: `run_extraction` on the demo settings (4 scenes x 3 questions = 12 pairs vs 96);
- ``adapter``: `train_adapter`, L4 (research sizes) at D=128, one epoch, on a synthetic store
  (200 vs 1600 pairs written through `StoreWriter`), default ``data_cache_gb`` (the store is kept in
  RAM when it fits: by design that grows) and ``adapter_streaming`` (``data_cache_gb=0``: byte-range
  reads per pair, what stores larger than the cache get);
- ``adapter_ddp2``: the same as a 2-process gloo DDP run (torchrun); RSS = sum of both ranks;
- ``lora``: `train_lora` one epoch on the extraction stores (demo L6 settings);
- ``evaluation``: `evaluate` (identity) on the synthetic stores, with a target LM head;
- ``research_import``: `import_research` of research-format chunks (100 pairs each) of the same sizes;
- ``verify``: `egpt inspect --verify` (`store_summary(verify=True)`) on the synthetic stores.

``python -m benchmarks --only scaling`` runs this group alone (a few minutes on two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCALE = 8
D = 128
SYNTH_SCENES, SYNTH_PER_SCENE = 20, 10  # 200 pairs at 1x
DATASET_SCENES, DATASET_QUESTIONS = 4, 3  # 12 pairs at 1x (the demo's settings, half its scenes)
RESEARCH_CHUNK = 100
LM_VOCAB = 1024
RESEARCH_SCALE_PAIRS = 52_000
RSS_GOAL, TIME_GOAL = "<= 1.15", "<= 1.1"


# --------------------------------------------------------------------------------------------------
# memory probes (Linux /proc; ru_maxrss elsewhere)
# --------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (VmHWM) to its current RSS; False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """This process's peak RSS since the last reset (VmHWM), else since start (ru_maxrss)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return (kb or 0) * 1024


def measure(work: Callable[[], int]) -> dict:
    """Run ``work`` (returns the number of pairs it handled) -> seconds, pairs, RSS before/peak."""
    import gc

    gc.collect()
    before = rss_bytes()
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    pairs = int(work())
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "pairs": pairs, "rss_before": before, "peak_rss": peak_rss_bytes(),
            "peak_reset": reset}


# --------------------------------------------------------------------------------------------------
# stages, as run inside the child: prepare (not measured) -> work (measured)
# --------------------------------------------------------------------------------------------------
def _stage_extraction(a: dict) -> Callable[[], int]:
    from egpt_core.config import ExtractConfig, ModelLoadConfig
    from egpt_core.extraction.run import load_models, run_extraction

    cfg = ExtractConfig(dataset=a["dataset"], drafter=a["eventgpt"], target=a["videollava"], store=a["store"],
                        load=ModelLoadConfig(dtype="float32", quant="none", device="cpu"), batch_size=4,
                        max_new_tokens=16, shard_size=6, store_dtype="float16")  # the demo's settings
    models = load_models(cfg)
    return lambda: run_extraction(cfg, models=models).pairs_processed


def _stage_adapter(a: dict) -> Callable[[], int]:
    from egpt_core.adapters import train_adapter
    from egpt_core.config import AdapterConfig, TrainAdapterConfig

    cfg = TrainAdapterConfig(adapter=AdapterConfig(level="L4"), train=[a["store"]], out=a["out"], epochs=1,
                             batch_size=64, device="cpu", data_cache_gb=a.get("data_cache_gb", 32.0))

    def work() -> int:
        res = train_adapter(cfg, resume=False)
        return res.n_train_pairs + res.n_val_pairs

    return work


def _stage_lora(a: dict) -> Callable[[], int]:
    from egpt_core.config import LoraTrainConfig, ModelLoadConfig
    from egpt_core.lora import train_lora

    cfg = LoraTrainConfig(store=a["store"], drafter=a["eventgpt"], dataset=a["dataset"], out=a["out"],
                          load=ModelLoadConfig(dtype="float32", quant="none", device="cpu"), rank=4, alpha=8,
                          epochs=1, grad_accum=2, gradient_checkpointing=False)  # the demo's L6 settings

    def work() -> int:
        res = train_lora(cfg, resume=False)
        return res.n_train_pairs + res.n_val_pairs

    return work


def _stage_evaluation(a: dict) -> Callable[[], int]:
    from egpt_core.config import EvalConfig
    from egpt_core.evaluation import evaluate

    cfg = EvalConfig(store=a["store"], identity=True, out=a["out"], device="cpu")
    return lambda: evaluate(cfg).n_pairs


def _stage_research_import(a: dict) -> Callable[[], int]:
    from egpt_core.store.research_import import import_research

    return lambda: import_research(a["dir"], a["store"], shard_size=256)["imported"]


def _stage_verify(a: dict) -> Callable[[], int]:
    from egpt_core.store.commands import store_summary

    def work() -> int:
        s = store_summary(a["store"], verify=True)
        if s["verify"]["problems"]:
            raise RuntimeError(f"verify found problems in {a['store']}: {s['verify']['problems']}")
        return s["pairs"]["total"]

    return work


STAGES: dict[str, Callable[[dict], Callable[[], int]]] = {
    "extraction": _stage_extraction, "adapter": _stage_adapter, "lora": _stage_lora,
    "evaluation": _stage_evaluation, "research_import": _stage_research_import, "verify": _stage_verify,
}


def child_main(stage: str, args: dict, result_dir: str) -> None:
    """Entry point of a measuring child process: writes ``result_dir/rank-<RANK>.json``."""
    import torch

    torch.set_num_threads(1)
    work = STAGES[stage](args)
    res = measure(work)
    rank = int(os.environ.get("RANK", "0"))
    res.update(stage=stage, rank=rank)
    (Path(result_dir) / f"rank-{rank}.json").write_text(json.dumps(res))


# --------------------------------------------------------------------------------------------------
# the parent: data, children, table
# --------------------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _child(cmd: list[str], stage: str, args: dict, what: str, timeout: float) -> list[dict]:
    """Run a child command (one process or a torchrun job) -> the result of every rank."""
    with tempfile.TemporaryDirectory(prefix="egpt-scaling-result-") as out:
        proc = subprocess.run([*cmd, "-m", "benchmarks.bench_scaling", "--child", stage, json.dumps(args), out],
                              capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(REPO))
        results = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank-*.json"))]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"scaling child {what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return results


def run_child(stage: str, args: dict, timeout: float = 900) -> dict:
    """One measurement in a fresh interpreter."""
    return _child([sys.executable], stage, args, stage, timeout)[0]


def run_ddp_child(stage: str, args: dict, nproc: int = 2, timeout: float = 900) -> dict:
    """One measurement as an ``nproc``-process torchrun (gloo) job: peak RSS summed over ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    ranks = _child(cmd, stage, args, f"{stage} (torchrun x{nproc})", timeout)
    if len(ranks) != nproc:
        raise RuntimeError(f"expected {nproc} rank results, got {len(ranks)}")
    return {"seconds": max(r["seconds"] for r in ranks), "pairs": ranks[0]["pairs"],
            "rss_before": sum(r["rss_before"] for r in ranks), "peak_rss": sum(r["peak_rss"] for r in ranks),
            "peak_reset": all(r["peak_reset"] for r in ranks), "ranks": len(ranks)}


def write_research_chunks(root: Path, n_pairs: int, d: int = D, chunk: int = RESEARCH_CHUNK, seed: int = 0) -> Path:
    """A research-format directory (index.json + chunks/chunk_<start>.pt of padded fp32 [n, 50, D])."""
    import torch

    (root / "chunks").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for start in range(0, n_pairs, chunk):
        n = min(chunk, n_pairs - start)
        lens = torch.randint(11, 51, (n,), generator=g)
        eg, vl = torch.randn(n, 50, d, generator=g), torch.randn(n, 50, d, generator=g)
        meta = [{"sample_idx": (start + i) // 10, "question_idx": (start + i) % 10,
                 "question": f"research question {(start + i) % 10}?", "egpt_text": "a road with cars",
                 "vl_text": "a street with vehicles", "seq_len": int(lens[i])} for i in range(n)]
        name = f"chunk_{start:06d}.pt"
        torch.save({"egpt_hidden": eg, "vl_hidden": vl, "seq_lens": lens, "metadata": meta}, root / "chunks" / name)
        entries.append({"path": name, "start_idx": start, "n_samples": n})
    (root / "index.json").write_text(json.dumps({
        "total_samples": n_pairs, "chunk_size": chunk, "chunks": entries,
        "config": {"split": "train", "duration": "1s", "quant": "4bit", "max_questions": 10, "max_new_tokens": 50,
                   "hidden_dim": d}}))
    return root


def _synthetic_store(url: str, scale: int) -> str:
    import torch

    from egpt_core.adapters.synthetic import write_synthetic_pair_store
    from egpt_core.store import StoreWriter

    write_synthetic_pair_store(url, hidden_size=D, n_scenes=SYNTH_SCENES * scale, pairs_per_scene=SYNTH_PER_SCENE,
                               min_len=11, max_len=50, dtype="bfloat16", shard_size=64)
    head = torch.randn(LM_VOCAB, D, generator=torch.Generator().manual_seed(7))
    StoreWriter(url, {}).write_lm_head(head, "synthetic-lm-head")
    return url


def prepare_data(root: Path, scales: tuple[int, ...]) -> dict:
    """Models once; per scale a dataset, a synthetic store (with LM head) and a research directory."""
    from egpt_core.data import write_synthetic_dataset
    from egpt_core.models.tiny import write_tiny_models

    models = write_tiny_models(root / "models")
    data: dict = {"eventgpt": str(models["eventgpt"]), "videollava": str(models["videollava"])}
    for k in scales:
        data[k] = {
            "dataset": str(write_synthetic_dataset(root / f"dataset-{k}x", scenes=DATASET_SCENES * k,
                                                   questions=DATASET_QUESTIONS, seed=0)),
            "synthetic": _synthetic_store(str(root / f"synthetic-{k}x"), k),
            "research": str(write_research_chunks(root / f"research-{k}x", SYNTH_SCENES * SYNTH_PER_SCENE * k)),
        }
    return data


def _stage_args(stage: str, data: dict, k: int, root: Path) -> dict:
    d = data[k]
    out = str(root / "runs" / f"{stage}-{k}x")
    models = {"eventgpt": data["eventgpt"], "videollava": data["videollava"]}
    ext_store = str(root / f"extracted-{k}x")
    return {
        "extraction": dict(models, dataset=d["dataset"], store=ext_store),
        "adapter": dict(store=d["synthetic"], out=out),
        "adapter_streaming": dict(store=d["synthetic"], out=out, data_cache_gb=0.0),
        "adapter_ddp2": dict(store=d["synthetic"], out=out),
        "lora": dict(models, dataset=d["dataset"], store=ext_store, out=out),
        "evaluation": dict(store=d["synthetic"], out=out),
        "research_import": dict(dir=d["research"], store=str(root / f"imported-{k}x")),
        "verify": dict(store=d["synthetic"]),
    }[stage]


#: stages that read a store written beforehand (its size is reported beside their RSS)
INPUT_STORE_STAGES = ("adapter", "adapter_streaming", "adapter_ddp2", "evaluation", "verify")


def _store_bytes(url: str) -> int:
    from egpt_core.store import StoreReader

    return int(StoreReader(url).manifest["totals"]["bytes"])


#: row order; lora runs on the extraction stage's stores
ROWS = ("extraction", "adapter", "adapter_streaming", "adapter_ddp2", "lora", "evaluation", "research_import",
        "verify")


def _row(stage: str, small: dict, big: dict, k: int, store_mb: list[float] | None = None) -> dict:
    t_small, t_big = small["seconds"] / small["pairs"], big["seconds"] / big["pairs"]
    grow_small = max(0, small["peak_rss"] - small["rss_before"])
    grow_big = max(0, big["peak_rss"] - big["rss_before"])
    extra = max(big["pairs"] - small["pairs"], 1)
    per_pair = max(0.0, (grow_big - grow_small) / extra)
    # t = fixed + pairs * marginal, through both points: how much of 1x is per-run cost
    marginal = (big["seconds"] - small["seconds"]) / extra
    mb = 1 / 2**20
    return {
        f"scaling_{stage}_rss": {
            "ratio": round(big["peak_rss"] / small["peak_rss"], 3), "goal": RSS_GOAL,
            "unit": f"x peak RSS, {k}x / 1x the pairs ({small['pairs']} -> {big['pairs']})"
                    + (" summed over 2 ranks" if stage == "adapter_ddp2" else ""),
            "peak_mb": [round(small["peak_rss"] * mb, 1), round(big["peak_rss"] * mb, 1)],
            "growth_mb": [round(grow_small * mb, 1), round(grow_big * mb, 1)],
            "bytes_per_extra_pair": round(per_pair),
            "growth_mb_at_52k_pairs": round((grow_small + per_pair * (RESEARCH_SCALE_PAIRS - small["pairs"])) * mb),
            "peak_reset": small["peak_reset"] and big["peak_reset"],
            **({"input_store_mb": store_mb} if store_mb else {}),
        },
        f"scaling_{stage}_time_per_pair": {
            "ratio": round(t_big / t_small, 3), "goal": TIME_GOAL,
            "unit": f"x wall time per pair, {k}x / 1x",
            "ms_per_pair": [round(1e3 * t_small, 3), round(1e3 * t_big, 3)],
            "seconds": [round(small["seconds"], 2), round(big["seconds"], 2)],
            "marginal_ms_per_pair": round(1e3 * marginal, 3),
            "fixed_s": round(small["seconds"] - small["pairs"] * marginal, 2),
        },
    }


def run(stages: tuple[str, ...] | list[str] | None = None, scale: int = SCALE) -> dict:
    """Every stage (or ``stages``) at 1x and ``scale``x; returns two entries per stage."""
    stages = tuple(stages or ROWS)
    if scale < 2:
        raise ValueError(f"scale must be at least 2 (it is compared with 1x), got {scale}")
    unknown = set(stages) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown scaling stages {sorted(unknown)}; choose from {ROWS}")
    scales = (1, scale)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="egpt-bench-scaling-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data = prepare_data(root, scales)
        print(f"... scaling data written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for stage in ROWS:
            if stage not in stages and not (stage == "extraction" and "lora" in stages):
                continue
            got, store_mb = {}, []
            for k in scales:
                args = _stage_args(stage, data, k, root)
                if stage in INPUT_STORE_STAGES:
                    store_mb.append(round(_store_bytes(args["store"]) / 2**20, 1))
                if stage == "adapter_ddp2":
                    got[k] = run_ddp_child("adapter", args)
                else:
                    got[k] = run_child(stage.removesuffix("_streaming"), args)
            if stage in stages:
                out.update(_row(stage, got[1], got[scale], scale, store_mb or None))
            print(f"... scaling {stage}: {got[1]['pairs']} -> {got[scale]['pairs']} pairs in "
                  f"{got[1]['seconds']:.1f} / {got[scale]['seconds']:.1f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_scaling")
    ap.add_argument("--child", nargs=3, metavar=("STAGE", "ARGS_JSON", "RESULT_DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--stages", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--scale", type=int, default=SCALE)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]), args.child[2])
        return 0
    print(json.dumps(run([s for s in args.stages.split(",") if s], args.scale), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
