"""`egpt inspect` and `egpt import-research`."""

from __future__ import annotations

import argparse
import json

from egpt_core.cliargs import add_storage_option_argument, parse_storage_options
from egpt_core.fsio import Location

__all__ = ["parse_storage_options", "register", "store_summary"]


def store_summary(url: str | Location, storage_options: dict | None = None, verify: bool = False) -> dict:
    """What `egpt inspect` reports, as a plain dict (manifest only, plus an optional verify)."""
    from egpt_core.store.reader import StoreReader

    r = StoreReader(url, storage_options)
    m, meta = r.info, r.info.meta
    out = {
        "url": r.url,
        "schema_version": m.schema_version,
        "fingerprint": m.fingerprint,
        "pairs": {**m.counts, "total": m.totals.pairs},
        "reasons": dict(m.reasons),
        "shards": len(m.shards),
        "rows": m.totals.rows,
        "tokens": m.totals.tokens,
        "bytes": m.totals.bytes,
        "dtype": meta.dtype,
        "hidden_size": meta.hidden_size,
        "mode": meta.mode,
        "position_convention": meta.position_convention,
        "compat_key": meta.compat_key,
        "models": r.meta.get("models"),  # as recorded (paths and fingerprints)
        "model_fingerprints": meta.model_fingerprints,
        "dataset_fingerprint": m.dataset_fingerprint or meta.dataset_fingerprint,
        "config_fingerprint": meta.config_fingerprint,
        "notes": meta.notes,
        "lm_head": m.lm_head.model_dump(exclude_none=True) if m.lm_head is not None else None,
        "created": m.created,
        "updated": m.updated,
    }
    if verify:
        out["verify"] = r.verify(raise_on_error=False)
    return out


def _human(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.1f} {unit}" if unit != "B" else f"{int(x)} B"
        x /= 1024
    return str(n)


def cmd_inspect(args: argparse.Namespace) -> int:
    s = store_summary(args.url, parse_storage_options(args.storage_option), verify=args.verify)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
    else:
        p = s["pairs"]
        lines = [
            f"store        {s['url']}",
            f"fingerprint  {s['fingerprint']}  (schema v{s['schema_version']})",
            f"pairs        {p['total']}: ok {p['ok']}, failed {p['failed']}, skipped {p['skipped']}",
        ]
        for reason, n in sorted(s["reasons"].items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {n:>8d}  {reason}")
        lines += [
            f"shards       {s['shards']}",
            f"rows         {s['rows']}   tokens {s['tokens']}",
            f"bytes        {s['bytes']} ({_human(s['bytes'])})",
            f"dtype        {s['dtype']}   hidden size {s['hidden_size']}",
            f"mode         {s['mode']}",
            f"models       {json.dumps(s['models'])}",
            f"fingerprints model {json.dumps(s['model_fingerprints'])} dataset {s['dataset_fingerprint']} "
            f"config {s['config_fingerprint']}",
            f"lm head      {'none' if not s['lm_head'] else str(s['lm_head']['shape']) + ' ' + s['lm_head']['dtype']}",
            f"updated      {s['updated']}",
        ]
        if s.get("notes"):
            lines.append(f"notes        {s['notes']}")
        if "verify" in s:
            v = s["verify"]
            lines.append(f"verify       {v['files']} files, " + ("OK" if not v["problems"] else "; ".join(v["problems"])))
        print("\n".join(lines))
    if "verify" in s and s["verify"]["problems"]:
        return 1
    return 0


def cmd_import_research(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from egpt_core.store.research_import import import_research

    bar = tqdm(total=1000, desc="import-research", disable=args.quiet,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
    state = {"n": 0}

    def progress(frac: float, msg: str) -> None:
        n = int(round(frac * 1000))
        if n > state["n"]:
            bar.update(n - state["n"])
            state["n"] = n
        bar.set_postfix_str(msg)

    try:
        summary = import_research(
            args.dir, args.url, parse_storage_options(args.storage_option), shard_size=args.shard_size,
            dtype=args.dtype, lm_head_url=args.lm_head, progress=progress,
        )
    finally:
        bar.close()
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="summarise a hidden-state store (manifest only)")
    p.add_argument("url", help="store URL (path, file://, memory://, s3://)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 (reads all data)")
    add_storage_option_argument(p)
    p.set_defaults(func=cmd_inspect)

    q = subparsers.add_parser("import-research", help="import research chunk_*.pt hidden states into a store")
    q.add_argument("dir", help="research directory holding index.json and chunks/")
    q.add_argument("url", help="store URL to create or extend")
    q.add_argument("--shard-size", type=int, default=256, help="pairs per store shard (default 256)")
    q.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="store dtype")
    q.add_argument("--lm-head", default=None, help="research vl_lm_head.pt to store as the target LM head")
    add_storage_option_argument(q)
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_import_research)
