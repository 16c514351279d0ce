"""The extraction-overhead breakdown instruments the real extraction path (every section found)."""

from benchmarks.bench_overhead import _library_breakdown
from egpt_core.config import ExtractConfig, ModelLoadConfig


def test_library_breakdown_accounts_for_the_whole_run(fixtures_dir, tmp_path):
    cfg = ExtractConfig(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                        target=str(fixtures_dir / "videollava"), store=str(tmp_path / "store"),
                        load=ModelLoadConfig(dtype="float32", device="cpu"), batch_size=4, max_new_tokens=8,
                        shard_size=6, max_scenes=2)
    res = _library_breakdown(cfg)
    assert res["sections_not_found"] == []  # a renamed function in egpt_core would silently drop a section
    assert res["pairs"] == 6
    parts = res["outside_s_by_section"]
    assert {"generate", "teacher_forced", "event_features", "event_input_wait", "prompt_build", "video_wait",
            "tokenise", "detokenise", "store_commit_wait", "feature_cache_write", "other"} <= set(parts)
    # in the scene-input threads and the store-writer thread
    assert set(res["background_s_by_section"]) == {"video_processor", "video_decode", "store_commit",
                                                   "feature_cache_write", "event_render_and_clip_preprocessing"}
    assert all(v > 0 for v in res["background_s_by_section"].values())
    assert 0 < res["forward_s"] < res["wall_s"]
    # sections do not overlap each other or the forwards: what is left over is not negative
    assert parts["other"] >= -1e-3
    assert parts["store_commit_wait"] > 0  # (the last shard's commit is waited for)


def _cfg(fixtures_dir, store):
    return ExtractConfig(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                         target=str(fixtures_dir / "videollava"), store=str(store),
                         load=ModelLoadConfig(dtype="float32", device="cpu"), batch_size=4, max_new_tokens=8,
                         shard_size=6, max_scenes=2)


def test_flow_run_breakdown_instruments_the_real_flow(fixtures_dir, tmp_path, prefect_api):
    from benchmarks.bench_overhead import _flow_run
    from flows.extract import extract

    res = _flow_run(extract, _cfg(fixtures_dir, tmp_path / "store"))
    assert res["sections_not_found"] == [] and res["pairs"] == 6
    parts = res["outside_s_by_section"]
    assert {"features_and_extraction_tasks", "model_load", "cache_keys", "prefect_server_retry_waits",
            "prefect_and_other"} == set(parts)
    assert parts["model_load"] > 0 and parts["features_and_extraction_tasks"] > 0
    assert 0 < res["forward_s"] < res["wall_s"]
    assert abs(sum(parts.values()) - res["outside_s"]) < 0.01  # the sections add up to the time outside forwards


def test_fixed_and_per_pair_costs_come_from_the_two_sizes():
    from benchmarks.bench_overhead import _flow_summary

    def run(pairs, forward, outside, retry=0.0):
        return {"pairs": pairs, "forward_s": forward, "outside_s": outside + retry, "retry_wait_s": retry,
                "wall_s": forward + outside + retry}

    # outside = 2 s + 1 ms per pair, forwards 9 ms per pair; a retry wait is taken out, not spread per pair
    runs = {"1x": [run(320, 2.88, 2.32), run(320, 2.88, 2.32, retry=2.0)],
            "4x": [run(1280, 11.52, 3.28, retry=1.9), run(1280, 11.52, 3.28)]}
    got = _flow_summary(runs)
    assert abs(got["fixed_s"] - 2.0) < 1e-9
    assert abs(got["per_pair_outside_ms"] - 1.0) < 1e-9 and abs(got["per_pair_forward_ms"] - 9.0) < 1e-9
    assert abs(got["per_pair_fraction"] - 0.1) < 1e-9
    assert abs(got["demo_fraction_net_of_retry_waits"] - 2.32 / 5.2) < 1e-9
    assert got["demo_fraction"] > got["demo_fraction_net_of_retry_waits"]  # the gross figure keeps the wait


def test_retry_waits_count_the_clients_back_off_only():
    """A request the server refuses once (503, Retry-After) is counted with the wait before its retry;
    one answered at once adds nothing."""
    import http.server
    import threading

    from prefect.client.base import PrefectHttpxSyncClient

    from benchmarks.bench_overhead import PrefectRetryWait

    refused = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/flaky" and not refused:
                refused.append(self.path)
                self.send_response(503)
                self.send_header("Retry-After", "0.3")
            else:
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with PrefectHttpxSyncClient(base_url=f"http://127.0.0.1:{server.server_port}") as client:
            with PrefectRetryWait() as waits:
                assert client.get("/steady").status_code == 200
            assert (waits.seconds, waits.retried) == (0.0, [])
            with PrefectRetryWait() as waits:
                assert client.get("/flaky").status_code == 200
            assert refused == ["/flaky"] and waits.retried == ["GET /flaky"]
            assert waits.seconds > 0  # (the back-off, not the two requests' own time)
    finally:
        server.shutdown()
    from prefect.client import base

    assert base.PrefectHttpxSyncClient._send_with_retry.__qualname__.startswith("PrefectHttpxSyncClient")  # restored
