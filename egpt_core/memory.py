"""How much of a node's memory one training process may fill with a RAM copy of its data.

The adapter trainer either loads the stores' tensor shards whole into RAM (fast, one copy **per
process**) or reads each pair's rows by byte range (any size; on local disks the OS page cache
serves those reads, and it is one copy shared by every process of the node). The default budget for
the RAM copy is derived from the memory actually available to this process (``MemAvailable``,
capped by the cgroup limit of a container or batch job) and split between the node's local ranks,
so 8 DDP ranks on one node never try to hold 8 copies that do not fit.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

#: share of the available memory the RAM copies of all local ranks may take together (the rest is
#: left to the model, activations, prefetched batches and the page cache)
RAM_SHARE = 0.5
_CGROUP = Path("/sys/fs/cgroup")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def _inactive_file(stat: Path, key: str) -> int:
    """Reclaimable page cache a cgroup is charged for (it counts as used but frees on demand)."""
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _limit_left(d: Path, v2: bool) -> int | None:
    """Limit minus non-reclaimable usage of one cgroup directory; None when it sets no limit."""
    names = (("memory.max", "memory.current", "inactive_file") if v2 else
             ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
    limit = _read_int(d / names[0])
    if limit is None or limit >= 1 << 60:  # "max" (v2) or a huge number (v1): no limit
        return None
    used = _read_int(d / names[1]) or 0
    return max(0, limit - used + _inactive_file(d / "memory.stat", names[2]))


def _cgroup_available(root: Path, proc_cgroup: Path) -> int | None:
    """The tightest memory limit left over this process's cgroup and its ancestors (v2, or v1's
    memory controller); None without a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    chains = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:  # v2 (unified)
            chains.append((root, path, True))
        elif "memory" in controllers.split(","):  # v1
            chains.append((root / "memory", path, False))
    left = []
    for base, path, v2 in chains:
        d = base / path.strip("/")
        if not d.is_dir():  # a cgroup namespace: our own cgroup is mounted at the root
            d = base
        while True:
            n = _limit_left(d, v2)
            if n is not None:
                left.append(n)
            if d == base or d == d.parent:
                break
            d = d.parent
    return min(left) if left else None


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = _CGROUP,
                           proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Memory this process can still use: the node's available memory, capped by what its cgroup
    (container, batch job) has left; None where neither can be read."""
    found = [b for b in (_meminfo_available(meminfo), _cgroup_available(cgroup_root, proc_cgroup)) if b is not None]
    return min(found) if found else None


@dataclass(frozen=True)
class DataCacheDecision:
    """Where a training process keeps its data: ``ram`` (whole shards) or ``byte-range`` reads."""

    path: str
    data_bytes: int
    budget_bytes: int | None
    available_bytes: int | None
    local_ranks: int
    reason: str

    @property
    def in_ram(self) -> bool:
        return self.path == "ram"

    def record(self) -> dict:
        """JSON-able, for run files (``config.json``) and benchmarks."""
        return asdict(self)


def _gb(n: int | float) -> str:
    """A byte count for people: GB, MB or kB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1e3:.1f} kB"


def decide_data_cache(data_bytes: int, cache_gb: float | None, local_ranks: int = 1,
                      available: int | None = None, remote: bool = False) -> DataCacheDecision:
    """RAM copy or byte-range reads for ``data_bytes`` of tensor shards.

    ``cache_gb`` set: that budget per process, as configured. ``None`` (default): ``RAM_SHARE`` of
    ``available`` (probed when not given) divided by the node's ``local_ranks``; unknown memory ->
    byte-range reads. ``remote``: the stores are on an object store (no shared page cache)."""
    ranks = max(1, int(local_ranks))
    if cache_gb is None and available is None:
        available = available_memory_bytes()
    streamed = ("each rank reads rows by byte range" + ("" if remote else
                "; the OS page cache holds one copy for all ranks of the node"))
    if cache_gb is not None:
        budget, how = int(cache_gb * 1e9), "data_cache_gb, configured per process"
    elif available is None:
        return DataCacheDecision("byte-range", data_bytes, None, None, ranks,
                                 f"available memory unknown: {streamed} (set data_cache_gb to cache in RAM)")
    else:
        budget = int(RAM_SHARE * available / ranks)
        how = f"{RAM_SHARE:g} x {_gb(available)} available / {ranks} local rank{'s' if ranks > 1 else ''}"
    if data_bytes <= budget:
        return DataCacheDecision("ram", data_bytes, budget, available, ranks,
                                 f"{_gb(data_bytes)} of tensor shards <= RAM budget {_gb(budget)} ({how}): "
                                 "whole shards held in RAM")
    return DataCacheDecision("byte-range", data_bytes, budget, available, ranks,
                             f"{_gb(data_bytes)} of tensor shards > RAM budget {_gb(budget)} ({how}): {streamed}")


# --------------------------------------------------------------------------------------------------
# allocator: big, short-lived buffers go back to the OS when freed
# --------------------------------------------------------------------------------------------------
#: buffers at least this large (whole shards, padded batches [B, S, D], decoded rows) are mmapped by
#: glibc and returned to the OS on free. glibc's default threshold (128 KiB) is *dynamic*: freeing one
#: mmapped buffer raises it to that buffer's size, after which same-sized buffers come from the heap,
#: whose holes are rarely returned -- RSS then creeps up with every shard and batch.
MMAP_THRESHOLD_BYTES = 256 << 10
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_MMAP_PINNED: bool | None = None


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (as ``MALLOC_MMAP_THRESHOLD_`` would), which turns off its dynamic
    adjustment, so large tensors freed by a long loop do not fragment the heap. Once per process;
    True when set (glibc), False elsewhere (other C libraries, or an explicit environment setting,
    which wins)."""
    global _MMAP_PINNED
    if _MMAP_PINNED is not None:
        return _MMAP_PINNED
    _MMAP_PINNED = False
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
            _MMAP_PINNED = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except OSError:
        pass
    return _MMAP_PINNED
