"""Test-only deployment entrypoint (tests/flows/test_fanout.py): the product's `extract` flow, plus a
fault armed by the deployment's job variables.

When EGPT_TEST_DIE_GROUP names the shard group of this flow run and the file EGPT_TEST_DIE_MARKER
does not exist yet, the flow-run process creates the marker and SIGKILLs itself while committing
the group's second shard: the first shard is committed, the second one's files are in place but
the manifest does not name them, and the process holds the store's commit lock and a `gpu` slot.
That is a GPU node dying mid-group. The marker makes it happen once.

When EGPT_TEST_HANG_GROUP names the group instead, the flow-run process writes EGPT_TEST_HANG_MARKER
(its pid) and hangs inside the group's GPU section (slot held) until something kills it: the test
then kills the whole node, worker included (test_node_loss.py).
"""

from __future__ import annotations

import os
import signal
import time

import tasks.extract
from egpt_core.store import StoreWriter
from flows.extract import extract  # noqa: F401  (the flow this entrypoint names)


def _arm() -> None:
    group, marker = os.environ.get("EGPT_TEST_DIE_GROUP"), os.environ.get("EGPT_TEST_DIE_MARKER")
    if not group or not marker:
        return
    real_run_extraction = tasks.extract.run_extraction

    def run_extraction(cfg, *args, **kwargs):
        if cfg.group_index == int(group) and not os.path.exists(marker):
            placed: list[str] = []

            def before_manifest(self, name: str) -> None:
                placed.append(name)
                if len(placed) == 2:
                    with open(marker, "x") as f:
                        f.write(f"{os.getpid()} {name}\n")
                    os.kill(os.getpid(), signal.SIGKILL)

            StoreWriter._before_manifest = before_manifest
        return real_run_extraction(cfg, *args, **kwargs)

    tasks.extract.run_extraction = run_extraction


def _arm_hang() -> None:
    group, marker = os.environ.get("EGPT_TEST_HANG_GROUP"), os.environ.get("EGPT_TEST_HANG_MARKER")
    if not group or not marker:
        return
    real_run_extraction = tasks.extract.run_extraction

    def run_extraction(cfg, *args, **kwargs):
        if cfg.group_index == int(group):
            with open(marker, "w") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(3600)
        return real_run_extraction(cfg, *args, **kwargs)

    tasks.extract.run_extraction = run_extraction


_arm()
_arm_hang()
