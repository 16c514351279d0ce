"""The files of a speculative run directory, and the ONE function that writes into it.

``write_sd_outputs`` is the only writer of a run directory (the run calls it once at the start with
``sd_run.json`` and once at the end with everything), always inside the run's claim on the
directory (:func:`egpt_core.outdir.claim_output`: a directory egpt did not write is refused, one run
owns it at a time).

Files: ``sd_pairs.parquet`` (one row per pair and γ), ``sd_metrics.json``, ``report.md``,
``sd_speedup.png``, ``sd_timing_breakdown.png``, ``sd_acceptance.png``, ``sd_prefill_timeline.png``,
``sd_run.json`` (status marker).
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from egpt_core.evaluation.metrics import json_safe
from egpt_core.fsio import Location

PAIRS_FILE = "sd_pairs.parquet"
METRICS_FILE = "sd_metrics.json"
REPORT_FILE = "report.md"


#: the run's status file, and the kind of output directory a speculative run is (egpt_core.outdir)
MARKER_FILE = "sd_run.json"
OUTPUT_KIND = "speculative"


def write_sd_outputs(out: Location, files: dict[str, bytes]) -> list[str]:
    """Write ``files`` (name -> bytes) into the run directory ``out`` (claimed by the caller), each
    atomically; returns their URLs."""
    written = []
    for name, data in files.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"output file name {name!r} must be a plain file name")
        dest = out.child(name)
        dest.write_atomic(data)
        written.append(dest.url)
    return written


def pairs_table(records: list[dict[str, Any]]) -> pa.Table:
    """sd_pairs rows -> an Arrow table (lists stay lists; missing keys become nulls)."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records])


def build_outputs(doc: dict[str, Any], records: list[dict[str, Any]], timeline: dict[str, Any]) -> dict[str, bytes]:
    """Every output file of a run, in memory."""
    from egpt_core.speculative.plots import render_plots
    from egpt_core.speculative.report import render_report

    buf = io.BytesIO()
    pq.write_table(pairs_table(records), buf)
    files = {
        PAIRS_FILE: buf.getvalue(),
        METRICS_FILE: json.dumps(json_safe(doc | {"timeline": timeline}), indent=2).encode(),
        REPORT_FILE: render_report(doc).encode(),
    }
    files.update(render_plots(doc, records, timeline))
    return files

