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
