"""Issue 15 item 3: functions take a place as a ``Location`` (or ``str | Location``), not as a loose
``(url, storage_options)`` pair.

Every egpt_core function with a ``storage_options`` parameter must also have a parameter typed with
``Location`` (the options then only complete a URL given instead of a Location), unless it is one of
the places CONTRACTS.md ("Store schema and storage locations") lists as loose on purpose. On the code
before this round 42 functions broke the rule (``load_eventgpt``, ``commit_epoch``, ``import_research``,
``load_scenes``, ``file_fingerprint``, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

EGPT_CORE = Path(__file__).resolve().parents[2] / "egpt_core"

#: loose on purpose (docs/CONTRACTS.md): fsio primitives; a bool flag of the CLI parser; scene readers
#: whose URLs live in the Scene record; L6's private feature cache passing the options to them
LOOSE_ON_PURPOSE = {
    "fsio.py:normalize_options", "fsio.py:url_to_fs",
    "cliargs.py:add_config_arguments",
    "extraction/features.py:scene_event_frames", "extraction/features.py:scene_input_fingerprint",
    "extraction/features.py:feature_key", "extraction/features.py:scene_features",
    "extraction/features.py:scene_feature_inputs",
    "extraction/inputs.py:scene_fingerprints", "extraction/inputs.py:input_fingerprints",
    "lora/train.py:__init__",
}


def test_no_loose_url_and_storage_options_pairs():
    loose = []
    for path in sorted(EGPT_CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            if "storage_options" not in {a.arg for a in params}:
                continue
            typed = " ".join(ast.unparse(a.annotation) for a in params if a.annotation is not None)
            where = f"{path.relative_to(EGPT_CORE).as_posix()}:{node.name}"
            if "Location" not in typed and where not in LOOSE_ON_PURPOSE:
                loose.append(f"{where} (line {node.lineno})")
    assert not loose, "take a Location (or str | Location) instead of a loose (url, storage_options) pair: " + \
        ", ".join(loose)
