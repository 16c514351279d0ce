"""`python -m benchmarks [--json] [--only NAME] [--device cuda]`: speed/size goals measured as ratios
in one run.

Each module ``benchmarks/bench_*.py`` exposes ``run() -> dict[name, {"ratio", "goal", "unit", ...}]``
where ``goal`` is a string like ">= 10" or "<= 0.4". Modules whose ``run`` takes a ``device`` argument
(the speculative-decoding benchmarks) get ``--device`` (default cpu; ``cuda`` = GPU, bf16).
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--only", action="append", default=[], help="run only benchmarks whose module name contains this")
    ap.add_argument("--device", default="cpu", help="device for benchmarks that take one (cpu | cuda | cuda:N)")
    args = ap.parse_args(argv)
    results: dict[str, dict] = {}
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    # the foundation benchmark goes first
    names.sort(key=lambda n: (n != "bench_render", n))
    for name in names:
        if args.only and not any(o in name for o in args.only):
            continue
        t0 = time.perf_counter()
        mod = importlib.import_module(f"benchmarks.{name}")
        kwargs = {"device": args.device} if "device" in inspect.signature(mod.run).parameters else {}
        for key, res in mod.run(**kwargs).items():
            res.setdefault("seconds", round(time.perf_counter() - t0, 2))
            res["met"] = _meets(res["ratio"], res.get("goal"))
            results[key] = res
        if not args.json:
            print(f"... {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'benchmark':34s} {'ratio':>10s} {'goal':>8s}  met  unit")
        for k, r in results.items():
            print(f"{k:34s} {r['ratio']:10.3f} {str(r.get('goal') or ''):>8s}  {str(r['met']):4s} {r.get('unit', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
