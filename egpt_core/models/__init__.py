"""EventGPT (drafter) and Video-LLaVA (target) model layer: loading, prompting, AR and TF passes.

Names are imported lazily so that `egpt --help` and light modules don't pay for transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_eventgpt": "egpt_core.models.loading",
    "load_videollava": "egpt_core.models.loading",
    "POSITION_CONVENTION": "egpt_core.models.positions",
    "gather_rows": "egpt_core.models.positions",
    "response_row_slice": "egpt_core.models.positions",
    "tf_input_ids": "egpt_core.models.positions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'egpt_core.models' has no attribute {name!r}")
