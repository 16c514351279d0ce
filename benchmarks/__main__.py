"""`python -m benchmarks [--json] [--only NAME] [--device DEV] [--shape SHAPE]`: speed/size goals
measured as ratios in one run.

Each module ``benchmarks/bench_*.py`` exposes ``run() -> dict[name, {"ratio", "goal", "unit", ...}]``
where ``goal`` is a string like ">= 10" or "<= 0.4" (or None for a plain figure). ``--device`` and
``--shape`` reach only the modules whose ``run`` takes a parameter of that name (bench_shapes); the
others run as before, on CPU. The speculative-decoding benchmarks (bench_speculative) take
``--device`` too (``cuda`` = GPU, bf16).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
import time

import benchmarks


def _meets(ratio: float, goal: str | None) -> bool | None:
    if not goal:
        return None
    op, val = goal.split()
    return ratio >= float(val) if op == ">=" else ratio <= float(val)


def _run(mod, options: dict) -> dict:
    """``mod.run`` with the options its signature names (others ignore --device/--shape)."""
    params = inspect.signature(mod.run).parameters
    return mod.run(**{k: v for k, v in options.items() if k in params and v is not None})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--only", action="append", default=[], help="run only benchmarks whose module name contains this")
    ap.add_argument("--device", default=None, help="device for benchmarks that take one (bench_shapes: e.g. cuda)")
    ap.add_argument("--shape", default=None, choices=["tiny", "small", "7b"],
                    help="model shape for bench_shapes (default: 7b with a CUDA --device, else skipped)")
    args = ap.parse_args(argv)
    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error(f"--device {args.device}: CUDA is not available on this machine")
    options = {"device": args.device, "shape": args.shape}
    results: dict[str, dict] = {}
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    # the foundation benchmark goes first
    names.sort(key=lambda n: (n != "bench_render", n))
    for name in names:
        if args.only and not any(o in name for o in args.only):
            continue
        t0 = time.perf_counter()
        mod = importlib.import_module(f"benchmarks.{name}")
        for key, res in _run(mod, options).items():
            res.setdefault("seconds", round(time.perf_counter() - t0, 2))
            res["met"] = _meets(res["ratio"], res.get("goal"))
            results[key] = res
        if not args.json:
            print(f"... {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'benchmark':38s} {'ratio':>10s} {'goal':>8s}  met  unit")
        for k, r in results.items():
            print(f"{k:38s} {r['ratio']:10.3f} {str(r.get('goal') or ''):>8s}  {str(r['met']):4s} {r.get('unit', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
