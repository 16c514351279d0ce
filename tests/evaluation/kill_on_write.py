"""Run ``egpt evaluate`` and die (os._exit, as kill -9 would) half-way through writing one output file.

argv: <file name prefix to die on> <egpt evaluate arguments...>. Every local write goes through the
builtin ``open``, whichever layer calls it (fsspec's local files, egpt's atomic writes): the write
whose file name starts with the prefix writes half its bytes, syncs them to disk and exits.
"""

from __future__ import annotations

import argparse
import builtins
import os
import sys

_real_open = builtins.open
_prefix = sys.argv[1]


class _DiesMidWrite:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        os.fsync(self._f.fileno())
        os._exit(9)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _open(file, mode="r", *args, **kwargs):
    f = _real_open(file, mode, *args, **kwargs)
    if "w" in str(mode) and os.path.basename(str(file)).startswith(_prefix):
        return _DiesMidWrite(f)
    return f


builtins.open = _open

from egpt_core.evaluation.commands import register  # noqa: E402

parser = argparse.ArgumentParser(prog="egpt")
register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(["evaluate", *sys.argv[2:]])
sys.exit(args.func(args))
