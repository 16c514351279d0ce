"""Trainer: convergence, scene split, resume bitwise, outputs, errors, data-parallel equivalence."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from egpt_core.adapters import apply_adapter, load_adapter, train_adapter
from egpt_core.config import AdapterConfig, TrainAdapterConfig
from egpt_core.errors import ConfigError
from egpt_core.store import StoreReader

SMALL = dict(num_heads=4, ffn_dim=64)


def _cfg(store, out, level="L1", **kw):
    adapter = dict(level=level, dropout=0.0, **SMALL)
    adapter.update(kw.pop("adapter", {}))
    base = dict(train=[store], out=str(out), epochs=30, batch_size=16, lr=3e-3, early_stopping=50, seed=0)
    base.update(kw)
    return TrainAdapterConfig(adapter=AdapterConfig(**adapter), **base)


@pytest.mark.parametrize("level", ["L1", "L2", "L3", "L4"])
def test_same_position_levels_reach_high_val_cos(synth_store, tmp_path, level):
    adapter = {"bottleneck_dim": 64} if level == "L3" else {}
    res = train_adapter(_cfg(synth_store["url"], tmp_path / level, level, adapter=adapter))
    assert res.metrics["val_cos_sim"] > 0.95, res.metrics
    assert res.n_train_pairs + res.n_val_pairs == 200  # failed pairs are not trained on
    assert res.metrics["val_accept_80"] > 0.9
    hist = json.loads((tmp_path / level / "history.json").read_text())
    assert [h["epoch"] for h in hist] == list(range(1, 31))
    assert all(h["val_pairs"] == res.n_val_pairs for h in hist)  # every val pair, every epoch (B2)


@pytest.mark.parametrize("level,separate", [("L5", True), ("B1", True), ("L5F", True), ("L5", False)])
def test_eagle_levels_lower_their_loss(synth_store, tmp_path, level, separate):
    cfg = _cfg(synth_store["url"], tmp_path / level, level, epochs=6,
               adapter={"separate_prediction_head": separate, "max_seq_len": 16})
    res = train_adapter(cfg)
    hist = json.loads((tmp_path / level / "history.json").read_text())
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert {"val_align_loss", "val_pred_loss", "val_next_cos_sim"} <= set(hist[0])
    module, acfg = load_adapter(res.run_url)
    assert acfg.level == level and acfg.separate_prediction_head is separate
    assert hasattr(module, "next_head") is separate


def test_max_seq_len_checked_before_training(synth_store, tmp_path):
    with pytest.raises(ConfigError, match="max_seq_len"):
        train_adapter(_cfg(synth_store["url"], tmp_path / "r", "L5", adapter={"max_seq_len": 4}))
    assert not (tmp_path / "r").exists()


def test_validation_split_is_by_scene(synth_store, tmp_path):
    train_adapter(_cfg(synth_store["url"], tmp_path / "r", "L1", epochs=1, val_fraction=0.2))
    conf = json.loads((tmp_path / "r" / "config.json").read_text())
    val_scenes = set(conf["val_scenes"])
    assert len(val_scenes) == 4 and conf["n_val_scenes"] == 4 and conf["n_train_scenes"] == 16
    pairs = StoreReader(synth_store["url"]).pairs(status="ok").to_pylist()
    per_scene = {}
    for p in pairs:
        per_scene.setdefault(p["scene_id"], 0)
        per_scene[p["scene_id"]] += 1
    assert conf["n_val_pairs"] == sum(per_scene[s] for s in val_scenes)  # whole scenes only
    assert conf["n_train_pairs"] == sum(n for s, n in per_scene.items() if s not in val_scenes)
    # the split is seeded: same seed, same scenes; another seed, other scenes
    train_adapter(_cfg(synth_store["url"], tmp_path / "r2", "L1", epochs=1, val_fraction=0.2))
    assert set(json.loads((tmp_path / "r2" / "config.json").read_text())["val_scenes"]) == val_scenes
    train_adapter(_cfg(synth_store["url"], tmp_path / "r3", "L1", epochs=1, val_fraction=0.2, seed=5))
    assert set(json.loads((tmp_path / "r3" / "config.json").read_text())["val_scenes"]) != val_scenes


def test_no_val_scene_in_train_batches(synth_store, tmp_path, monkeypatch):
    """The batches actually trained on never contain a validation scene."""
    from egpt_core.adapters import trainer

    calls = []  # (number of indices iterated, scenes seen)
    real = trainer.iter_batches

    def spy(dataset, order, *a, **kw):
        scenes = set()
        calls.append((len(order), scenes))
        for batch in real(dataset, order, *a, **kw):
            scenes.update(batch["scene_ids"])
            yield batch

    monkeypatch.setattr(trainer, "iter_batches", spy)
    res = train_adapter(_cfg(synth_store["url"], tmp_path / "r", "L1", epochs=2))
    conf = json.loads((tmp_path / "r" / "config.json").read_text())
    assert [n for n, _ in calls] == [res.n_train_pairs, res.n_val_pairs] * 2
    train_seen = calls[0][1] | calls[2][1]
    val_seen = calls[1][1] | calls[3][1]
    assert val_seen == set(conf["val_scenes"])
    assert train_seen == set(conf["val_scenes"]) ^ {f"scene{i:04d}" for i in range(20)}
    assert not (train_seen & val_seen)


def test_hidden_size_mismatch_names_both_sizes(synth_store, tmp_path):
    with pytest.raises(ConfigError) as exc:
        train_adapter(_cfg(synth_store["url"], tmp_path / "r", "L4", adapter={"hidden_size": 64}))
    assert "64" in str(exc.value) and "32" in str(exc.value)
    assert not (tmp_path / "r").exists()  # failed before anything was written or trained


def test_multiple_train_stores_and_val_store(small_stores, tmp_path):
    a, b, v = small_stores
    cfg = _cfg(a["url"], tmp_path / "r", "L2", epochs=2)
    cfg = cfg.model_copy(update={"train": [a["url"], b["url"]], "val": v["url"]})
    res = train_adapter(cfg)
    assert res.n_train_pairs == 35 and res.n_val_pairs == 10
    conf = json.loads((tmp_path / "r" / "config.json").read_text())
    assert set(conf["data_fingerprints"]) == {a["url"], b["url"], v["url"]}
    assert conf["data_fingerprints"][a["url"]] == StoreReader(a["url"]).fingerprint
    assert conf["scenes_in_train_and_val"] == 0


def _crash_after(k):
    def progress(frac, msg):
        if msg.startswith(f"epoch {k}/"):
            raise RuntimeError("simulated crash")
    return progress


@pytest.mark.parametrize("level", ["L4", "L5F"])
def test_crash_and_resume_is_bitwise_identical(synth_store, tmp_path, level):
    kw = dict(epochs=4, adapter={"dropout": 0.1, "max_seq_len": 16}, warmup_steps=5, early_stopping=50)
    full = train_adapter(_cfg(synth_store["url"], tmp_path / "full", level, **kw))

    crashed = _cfg(synth_store["url"], tmp_path / "crash", level, **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_adapter(crashed, progress=_crash_after(2))
    assert json.loads((tmp_path / "crash" / "config.json").read_text())["param_count"] == full.param_count
    assert len(json.loads((tmp_path / "crash" / "history.json").read_text())) == 2
    calls = []
    resumed = train_adapter(crashed, progress=lambda f, m: calls.append(m))
    assert [c.split()[1] for c in calls] == ["3/4", "4/4"]  # continued after epoch 2

    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "crash" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    h_full = json.loads((tmp_path / "full" / "history.json").read_text())
    h_res = json.loads((tmp_path / "crash" / "history.json").read_text())
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in h_full]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in h_res]
    assert resumed.best_val_loss == full.best_val_loss and resumed.epochs_run == 4

    # a finished run is returned as is; a different config in the same directory is refused
    again = train_adapter(crashed, progress=lambda f, m: pytest.fail("retrained a finished run"))
    assert again.best_val_loss == full.best_val_loss
    with pytest.raises(ConfigError, match="different configuration"):
        train_adapter(crashed.model_copy(update={"lr": 1e-4}))


def test_resume_false_starts_over_and_progress_fractions(synth_store, tmp_path):
    cfg = _cfg(synth_store["url"], tmp_path / "r", "L1", epochs=2)
    with pytest.raises(RuntimeError):
        train_adapter(cfg, progress=_crash_after(1))
    calls = []
    res = train_adapter(cfg, resume=False, progress=lambda f, m: calls.append((f, m)))
    assert [f for f, _ in calls] == [0.5, 1.0] and calls[0][1].startswith("epoch 1/2 val_loss")
    assert res.epochs_run == 2


def test_more_epochs_extend_a_finished_run(synth_store, tmp_path):
    """`epochs` is not part of a run's identity: a finished run asked for more epochs continues after
    its last committed epoch (it used to raise "different configuration"), and its first epochs are
    those of the shorter run."""
    kw = dict(adapter={"dropout": 0.1}, warmup_steps=2, early_stopping=50)
    short = _cfg(synth_store["url"], tmp_path / "r", "L2", epochs=2, **kw)
    first = train_adapter(short)
    h2 = json.loads((tmp_path / "r" / "history.json").read_text())
    calls = []
    longer = train_adapter(short.model_copy(update={"epochs": 3}), progress=lambda f, m: calls.append(m))
    assert first.epochs_run == 2 and longer.epochs_run == 3
    assert [c.split()[1] for c in calls] == ["3/3"]  # only the new epoch ran
    h3 = json.loads((tmp_path / "r" / "history.json").read_text())
    assert h3[:2] == h2 and h3[2]["epoch"] == 3
    assert json.loads((tmp_path / "r" / "checkpoint" / "commit.json").read_text())["epoch"] == 3


def test_outputs_and_load_adapter(synth_store, tmp_path):
    out = tmp_path / "r"
    res = train_adapter(_cfg(synth_store["url"], out, "L4", epochs=3, adapter={"dropout": 0.1}))
    names = set(os.listdir(out))
    assert {"config.json", "checkpoint", "history.json", "best.safetensors", "last.safetensors",
            "training_curves.png", "result.json"} <= names
    assert not [n for n in names if ".tmp" in n]
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    conf = json.loads((out / "config.json").read_text())
    assert conf["config"]["adapter"]["level"] == "L4" and len(conf["config_fingerprint"]) == 16
    assert conf["param_count"] == res.param_count
    hist = json.loads((out / "history.json").read_text())
    assert isinstance(hist, list) and {"val_accept_80", "val_accept_95", "train_cos_sim", "lr"} <= set(hist[0])
    module, acfg = load_adapter(str(out), which="best")
    assert not module.training and acfg.hidden_size == 32 and acfg.level == "L4"
    reader = StoreReader(synth_store["url"])
    from egpt_core.store import collate_pairs

    batch = collate_pairs([reader.dataset()[i] for i in range(4)])
    with torch.no_grad():
        y = apply_adapter(module, acfg, batch["drafter"], batch["target"], batch["mask"])
    assert y.shape == batch["target"].shape
    # optimizer state and RNG live in safetensors + JSON (no pickle anywhere), in the checkpoint
    record = json.loads((out / "checkpoint" / "commit.json").read_text())
    assert record["epoch"] == 3 and record["files"]["best_weights"]
    opt = load_file(out / "checkpoint" / record["files"]["train_state"])
    assert any(k.endswith(".exp_avg") for k in opt) and opt["rng.torch"].dtype == torch.uint8
    # best/last are byte copies of the committed weight files
    assert (out / "last.safetensors").read_bytes() == (out / "checkpoint" / record["files"]["last_weights"]).read_bytes()
    # no weight decay on norms / gates / biases
    assert [g["weight_decay"] for g in record["extra"]["optimizer"]["param_groups"]] == [0.01, 0.0]


def test_memory_url_and_streaming_mode_match_cached(synth_store, tmp_path):
    a = train_adapter(_cfg(synth_store["url"], "memory://adapter-tests/run", "L2", epochs=2,
                           adapter={"dropout": 0.1}))
    b = train_adapter(_cfg(synth_store["url"], tmp_path / "stream", "L2", epochs=2, data_cache_gb=0.0,
                           adapter={"dropout": 0.1}))
    assert a.best_val_loss == b.best_val_loss
    m1, _ = load_adapter("memory://adapter-tests/run", which="last")
    m2, _ = load_adapter(str(tmp_path / "stream"), which="last")
    for (k, v), (_, w) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(v, w), k
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["data_in_ram"] is False


DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from egpt_core.adapters import train_adapter
    from egpt_core.config import TrainAdapterConfig
    cfg = TrainAdapterConfig.model_validate_json(open(sys.argv[1]).read())
    res = train_adapter(cfg)
    import os
    if os.environ.get("RANK", "0") == "0":
        print("RESULT", json.dumps(res.model_dump()))
""")


def test_two_process_gloo_ddp_matches_single_process(synth_store, tmp_path):
    kw = dict(epochs=2, batch_size=16, adapter={"dropout": 0.0})
    single = train_adapter(_cfg(synth_store["url"], tmp_path / "single", "L4", **kw))
    cfg = _cfg(synth_store["url"], tmp_path / "ddp", "L4", device="cpu", **kw)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    (tmp_path / "ddp_run.py").write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "ddp_run.py"), str(tmp_path / "cfg.json")],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    ddp = json.loads(line[len("RESULT "):])
    assert ddp["n_val_pairs"] == single.n_val_pairs and ddp["n_train_pairs"] == single.n_train_pairs
    assert ddp["best_val_loss"] == pytest.approx(single.best_val_loss, rel=1e-4)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    a, b = load_file(tmp_path / "single" / "last.safetensors"), load_file(tmp_path / "ddp" / "last.safetensors")
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.in_proj_bias"):
            # the key bias has an exactly-zero gradient (softmax is shift-invariant); Adam turns its
            # float-noise gradient into +-lr steps, so it is compared loosely and the rest tightly
            kb = slice(32, 64)
            assert torch.allclose(x[kb], y[kb], atol=1e-3), k
            x, y = torch.cat([x[:32], x[64:]]), torch.cat([y[:32], y[64:]])
        assert torch.allclose(x, y, atol=2e-6, rtol=1e-5), k
    h1 = json.loads((tmp_path / "single" / "history.json").read_text())
    h2 = json.loads((tmp_path / "ddp" / "history.json").read_text())
    for e1, e2 in zip(h1, h2):
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-4)
        assert e2["val_cos_sim"] == pytest.approx(e1["val_cos_sim"], rel=1e-4)
        assert e2["val_pairs"] == e1["val_pairs"]
