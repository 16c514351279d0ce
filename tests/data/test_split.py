"""The one split by scene shared by adapter training, L6 and evaluation."""

from __future__ import annotations

import pytest

from egpt_core.data.split import split_scenes
from egpt_core.errors import ConfigError


def test_split_exact_disjoint_seeded_and_order_independent():
    scenes = [f"seq/{i:06d}" for i in range(20)]
    train, val = split_scenes(scenes, 0.2, seed=0)
    assert len(val) == 4 and not train & val and train | val == set(scenes)
    assert split_scenes(list(reversed(scenes)) + scenes[:3], 0.2, seed=0) == (train, val)
    assert split_scenes(scenes, 0.2, seed=1)[1] != val
    assert len(split_scenes(scenes[:2], 0.9, seed=0)[1]) == 1  # both sides non-empty
    with pytest.raises(ConfigError, match=">= 2 scenes"):
        split_scenes(["only"], 0.5, seed=0)


def test_evaluate_val_split_counts_only_held_out_scenes(tmp_path):
    from egpt_core.config import EvalConfig
    from egpt_core.evaluation import evaluate
    from tests.evaluation.eval_helpers import build_store

    url = str(tmp_path / "store")
    _, pairs = build_store(url, n_shards=4, per_shard=3)
    everything = evaluate(EvalConfig(store=url, out=str(tmp_path / "all"), identity=True))
    held_out = evaluate(EvalConfig(store=url, out=str(tmp_path / "val"), identity=True, split="val",
                                   val_fraction=0.5, split_seed=3))
    _, val_scenes = split_scenes([f"s{i}" for i in range(4)], 0.5, seed=3)
    assert everything.n_pairs == 12
    assert held_out.n_pairs == 3 * len(val_scenes) == 6
