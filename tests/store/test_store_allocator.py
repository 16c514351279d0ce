"""Opening a store reader pins glibc's mmap threshold: big buffers freed by a loop (shards, batches)
go back to the OS instead of fragmenting the heap (the adapter stage's RSS crept up with the data)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from store_helpers import META, make_pairs

from egpt_core.store import StoreWriter

REPO = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch

    def rss():
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    if sys.argv[1] == "reader":
        from egpt_core.store import StoreReader
        assert len(list(StoreReader(sys.argv[2]).iter_pairs())) == 3
    x = torch.empty(2 << 20, dtype=torch.uint8)
    x.fill_(1)
    del x  # glibc: freeing an mmapped 2 MiB buffer raises a dynamic threshold to 2 MiB
    base = rss()
    keep, big = [], []
    for _ in range(200):  # 1 MiB buffers (a padded batch, a shard) with small objects between them
        t = torch.empty(1 << 20, dtype=torch.uint8)
        t.fill_(1)
        big.append(t)
        keep.append(torch.ones(64))
    big.clear()
    print((rss() - base) / 2**20)
""")


def _retained_mb(mode: str, url: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, url], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or sys.platform != "linux", reason="glibc/Linux only")
def test_reader_returns_freed_big_buffers_to_the_os(tmp_path):
    url = str(tmp_path / "s")
    StoreWriter(url, META).commit_shard(*make_pairs(3))
    plain = _retained_mb("plain", url)
    if plain < 100:  # not glibc's dynamic threshold (another allocator): nothing to show
        pytest.skip(f"this allocator does not fragment here ({plain:.0f} MiB retained)")
    assert _retained_mb("reader", url) < 20  # 200 MiB freed; a few MiB of small objects stay
