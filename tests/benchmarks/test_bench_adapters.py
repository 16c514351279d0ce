"""The contended store-fed benchmark's competing process is bounded: it ends by itself, and stopping it
early kills it."""

from benchmarks.bench_adapters import start_competitor, stop_competitor


def test_competitor_ends_by_itself():
    proc = start_competitor(max_s=0.5)
    assert proc.wait(timeout=60) == 0


def test_competitor_is_stopped():
    proc = start_competitor(max_s=600)
    assert proc.poll() is None  # busy
    stop_competitor(proc)
    assert proc.poll() is not None
