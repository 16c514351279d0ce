"""Run an extraction in a subprocess and SIGKILL it at a named point (used by test_kill_resume.py).

usage: python kill_runner.py CONFIG_JSON POINT
Points: features (mid-write of a feature file), mid-generate (3rd AR batch in flight),
tensor-write (mid-write of the 2nd tensor shard), before-manifest (2nd shard's files in place,
manifest not yet naming it), manifest-write (mid-write of the 3rd manifest update), lm-head
(mid-write of the LM head file).
"""

from __future__ import annotations

import os
import signal
import sys

from egpt_core import fsio
from egpt_core.config import ExtractConfig
from egpt_core.extraction import load_models, run_extraction
from egpt_core.store import manifest as mf
from egpt_core.store.writer import StoreWriter

calls: dict[str, int] = {}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def count(key: str) -> int:
    calls[key] = calls.get(key, 0) + 1
    return calls[key]


def main() -> None:
    cfg = ExtractConfig.model_validate_json(open(sys.argv[1]).read())
    point = sys.argv[2]
    original_tmp = mf.write_local_tmp

    def partial_then_die(path: str, data: bytes) -> str:
        kinds = {"features": "/features/", "tensor-write": "/tensors/", "manifest-write": "manifest.json",
                 "lm-head": "target_lm_head"}
        want = {"features": 1, "tensor-write": 2, "manifest-write": 3, "lm-head": 1}
        if point in kinds and kinds[point] in path and count(point) == want[point]:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(f"{path}.egpt-tmp-killed", "wb") as f:  # a torn temp file, as a crash leaves it
                f.write(data[: len(data) // 2])
            die()
        return original_tmp(path, data)

    mf.write_local_tmp = partial_then_die  # shard files and the LM head stage through it
    fsio.write_local_tmp = partial_then_die  # atomic writes (manifest, features) stage through fsio's
    if point == "before-manifest":
        def hook(self, name):
            if count(point) == 2:
                die()
        StoreWriter._before_manifest = hook
    drafter, target = load_models(cfg)
    if point == "mid-generate":  # the extraction's greedy loop over the target
        import egpt_core.extraction.run as run_mod

        gen = run_mod.greedy_generate

        def generate(*a, **k):
            if count(point) == 3:
                die()
            return gen(*a, **k)
        run_mod.greedy_generate = generate
    run_extraction(cfg, models=(drafter, target))
    print("completed without being killed")


if __name__ == "__main__":
    main()
