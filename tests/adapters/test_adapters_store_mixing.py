"""`train-adapter` over several stores: one model pair unless mixing is explicitly allowed, and each
pair used once however often its store is named (issue 13, item 9)."""

import pytest

from egpt_core.adapters import train_adapter
from egpt_core.adapters.commands import build_config, register
from egpt_core.adapters.synthetic import write_synthetic_pair_store
from egpt_core.config import AdapterConfig, TrainAdapterConfig
from egpt_core.errors import ConfigError

D = 32
PAIR_A = {"model_fingerprints": {"drafter": "drafter-A", "target": "target-T"}}
PAIR_B = {"model_fingerprints": {"drafter": "drafter-B", "target": "target-T"}}


def _cfg(train, out, **kw):
    return TrainAdapterConfig(adapter=AdapterConfig(level="L1", dropout=0.0), train=train, out=str(out), epochs=2,
                              batch_size=8, early_stopping=50, seed=0, **kw)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixing")
    a = write_synthetic_pair_store(str(root / "a"), hidden_size=D, n_scenes=4, pairs_per_scene=5, seed=1,
                                   scene_prefix="a", meta=PAIR_A)
    a2 = write_synthetic_pair_store(str(root / "a2"), hidden_size=D, n_scenes=3, pairs_per_scene=5, seed=2,
                                    scene_prefix="c", meta=PAIR_A)
    b = write_synthetic_pair_store(str(root / "b"), hidden_size=D, n_scenes=3, pairs_per_scene=5, seed=3,
                                   scene_prefix="b", meta=PAIR_B)
    return a, a2, b


def test_stores_of_different_model_pairs_are_refused_unless_allowed(stores, tmp_path):
    a, a2, b = stores
    with pytest.raises(ConfigError) as exc:
        train_adapter(_cfg([a["url"], b["url"]], tmp_path / "mixed"))
    msg = str(exc.value)
    assert "drafter-A" in msg and "drafter-B" in msg and b["url"] in msg and "allow_mixed_models" in msg
    assert not (tmp_path / "mixed").exists()  # refused before any training
    with pytest.raises(ConfigError, match="different model pairs"):  # a val store of another pair, too
        train_adapter(_cfg([a["url"]], tmp_path / "val", val=b["url"]))
    # the same model pair in two stores is fine; mixing is possible when asked for
    same = train_adapter(_cfg([a["url"], a2["url"]], tmp_path / "same"))
    assert same.n_train_pairs + same.n_val_pairs == 35
    mixed = train_adapter(_cfg([a["url"], b["url"]], tmp_path / "allowed", allow_mixed_models=True))
    assert mixed.n_train_pairs + mixed.n_val_pairs == 35


def test_a_store_named_twice_is_used_once(stores, tmp_path):
    a, a2, _ = stores
    once = train_adapter(_cfg([a["url"], a2["url"]], tmp_path / "once"))
    twice = train_adapter(_cfg([a["url"], a2["url"], a["url"]], tmp_path / "twice"))
    assert (twice.n_train_pairs, twice.n_val_pairs) == (once.n_train_pairs, once.n_val_pairs)
    drop = {"seconds"}
    assert {k: v for k, v in twice.metrics.items() if k not in drop} == \
        {k: v for k, v in once.metrics.items() if k not in drop}  # the same pairs, the same training


def test_cli_flag_sets_allow_mixed_models():
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train-adapter", "--level", "L1", "--train", "s1", "--train", "s2",
                              "--allow-mixed-models"])
    assert build_config(args).allow_mixed_models is True
    args = parser.parse_args(["train-adapter", "--level", "L1", "--train", "s1"])
    assert build_config(args).allow_mixed_models is False
