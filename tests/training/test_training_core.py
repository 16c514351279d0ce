"""egpt_core.training: one cosine/accept@tau for history and evaluation, the run-state rule, the
schedule and no-decay rule, and the checkpoint layout's commit rule (crash, tamper, old layouts)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from egpt_core.config import AdapterConfig, EvalConfig, LoraTrainConfig, TrainAdapterConfig
from egpt_core.errors import ConfigError, StoreError
from egpt_core.training import checkpoint as ck
from egpt_core.training.similarity import DEFAULT_TAUS, accept_key
from egpt_core.training.state import RunState

TAU_KEYS = {t: f"{t:.2f}" for t in DEFAULT_TAUS}


# --------------------------------------------------------------------------------------------------
# one cosine / accept@tau
# --------------------------------------------------------------------------------------------------
def _predictions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pred/target [3, 5, 16] and mask [3, 5]: ordinary rows, rows scaled towards zero (where a
    cosine's epsilon decides acceptance) and padding."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 5, 16, generator=g)
    pred = target + 0.4 * torch.randn(3, 5, 16, generator=g)
    pred[1, :3] = target[1, :3] * 1e-10  # same direction, vanishing norm
    pred[2, :2] = target[2, :2] * 1e-7
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 3:] = False
    return pred, target, mask


def test_history_accept_and_evaluation_accept_are_one_definition():
    """The adapter history (masked cosine + accept counts), the L6 history (loss_and_sums + summarize)
    and evaluation (MetricAccumulator) give the same accept@tau on the same predictions — also where
    the old adapter cosine (F.normalize, eps 1e-12) and evaluation's (eps 1e-8) disagreed."""
    from egpt_core.adapters.losses import accept_counts, masked_cos_per_position
    from egpt_core.evaluation.metrics import MetricAccumulator
    from egpt_core.lora.train import loss_and_sums, summarize

    pred, target, mask = _predictions()
    n = int(mask.sum())
    adapter = [float(c) / n for c in accept_counts(masked_cos_per_position(pred, target, mask), mask, DEFAULT_TAUS)]
    cfg = LoraTrainConfig(store="/s", drafter="/d", out="/o", ce_weight=0.0)
    _, sums = loss_and_sums(pred[mask], target[mask], torch.zeros(n, dtype=torch.long), None, cfg)
    lora = summarize({k: float(v) for k, v in sums.items()}, cfg, pred.shape[-1])
    acc = MetricAccumulator(taus=DEFAULT_TAUS)
    acc.update(pred, target, mask)
    evaluation = acc.result()["accept"]
    for i, tau in enumerate(DEFAULT_TAUS):
        assert float(adapter[i]) == lora[accept_key(tau)] == evaluation[TAU_KEYS[tau]], tau
    # the vanishing rows are judged by the one epsilon: not accepted
    assert float(adapter[0]) < (n - 3) / n


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory) -> str:
    from egpt_core.adapters.synthetic import write_synthetic_pair_store

    url = str(tmp_path_factory.mktemp("training_core") / "store")
    write_synthetic_pair_store(url, hidden_size=16, n_scenes=8, pairs_per_scene=4, shard_size=10)
    return url


def test_trained_adapter_history_accept_equals_its_evaluation(clean_store, tmp_path):
    """Evaluating a run's last weights on its validation scenes reproduces the history's val accept@tau."""
    from egpt_core.adapters import train_adapter
    from egpt_core.evaluation import evaluate

    cfg = TrainAdapterConfig(adapter=AdapterConfig(level="L1"), train=[clean_store], out=str(tmp_path / "run"),
                             epochs=15, batch_size=8, lr=1e-2, warmup_steps=0, val_fraction=0.25, seed=3,
                             early_stopping=50, device="cpu")
    train_adapter(cfg)
    last = json.loads((tmp_path / "run" / "history.json").read_text())[-1]
    res = evaluate(EvalConfig(store=clean_store, out=str(tmp_path / "eval"), adapter_run=cfg.out, adapter_which="last",
                              split="val", val_fraction=0.25, split_seed=3, device="cpu"))
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["inputs"]["split"]["val_scenes"] == 2 and doc["counts"]["n_positions"] == last["val_positions"]
    rates = [last[f"val_{accept_key(tau)}"] for tau in DEFAULT_TAUS]
    assert len(set(rates)) == len(rates) and 0.0 < min(rates) and max(rates) <= 1.0  # a telling case
    for tau, rate in zip(DEFAULT_TAUS, rates):
        assert rate == doc["accept"][TAU_KEYS[tau]] == res.metrics[f"accept@{TAU_KEYS[tau]}"], tau


# --------------------------------------------------------------------------------------------------
# run state, schedule, parameter groups
# --------------------------------------------------------------------------------------------------
def test_run_state_decides_best_patience_and_done():
    st = RunState(best_val_loss=1.0)  # a baseline (L6's untrained LoRA) to beat
    losses = [1.2, 0.8, 0.9, float("nan"), 0.85]
    improved = [st.after_epoch({"epoch": i + 1}, v, step=10 * (i + 1), early_stopping=3, epochs=9)
                for i, v in enumerate(losses[:4])]
    assert improved == [False, True, False, False] and (st.best_epoch, st.best_val_loss, st.bad_epochs) == (2, 0.8, 2)
    assert not st.finished(9) and st.step == 40
    assert not st.after_epoch({"epoch": 5}, losses[4], step=50, early_stopping=3, epochs=9)
    assert st.stopped_early and st.finished(9) and st.finished(100)  # early-stopped: more epochs don't reopen it
    again = RunState.from_json(json.loads(json.dumps(st.to_json())))
    assert again == st and again.best_entry() == {"epoch": 2}

    short = RunState()
    for e in (1, 2):
        short.after_epoch({"epoch": e}, 1.0 / e, step=e, early_stopping=1, epochs=2)
    assert short.finished(2) and not short.finished(3)  # asked for more epochs: continues


def test_schedule_and_the_one_no_decay_rule():
    from torch import nn

    from egpt_core.training.schedule import param_groups, warmup_cosine_lr

    assert warmup_cosine_lr(0, 10, 2, 1.0, 0.0) == 0.5 and warmup_cosine_lr(2, 10, 2, 1.0, 0.0) == 1.0
    assert warmup_cosine_lr(10, 10, 2, 1.0, 0.1) == pytest.approx(0.1) == warmup_cosine_lr(50, 10, 2, 1.0, 0.1)
    m = nn.Module()
    m.proj = nn.Linear(4, 4)
    m.norm = nn.LayerNorm(4)
    m.pos_embed = nn.Parameter(torch.zeros(8, 4))
    m.alpha = nn.Parameter(torch.zeros(1, 1))
    m.lora_A = nn.Linear(4, 2, bias=False)
    decay, no_decay = param_groups(m.named_parameters(), 0.1)
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(decay) == {id(m.proj.weight), id(m.lora_A.weight)}
    assert ids(no_decay) == {id(m.proj.bias), id(m.norm.weight), id(m.norm.bias), id(m.pos_embed), id(m.alpha)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


# --------------------------------------------------------------------------------------------------
# the checkpoint layout
# --------------------------------------------------------------------------------------------------
def _commit(run: str, epoch: int, best: bool, **kw):
    w = {"w": torch.full((3,), float(epoch))}
    return ck.commit_epoch(run, "test-run", epoch, weights=w, weights_metadata={"format": "t"},
                           train_tensors={"rng.torch": torch.arange(4, dtype=torch.uint8) + epoch},
                           state={"epoch": epoch}, extra={"k": epoch}, best=best, **kw)


def test_crash_between_weights_and_commit_keeps_the_finished_epochs(tmp_path, monkeypatch):
    from egpt_core import runfiles as rf

    run = str(tmp_path / "run")
    _commit(run, 1, best=True)
    _commit(run, 2, best=False)
    real = rf.write_json

    def crash_on_commit(url, obj, storage_options=None):
        if str(url).endswith("/commit.json"):
            raise RuntimeError("killed before the commit record")
        real(url, obj, storage_options)

    monkeypatch.setattr(rf, "write_json", crash_on_commit)
    with pytest.raises(RuntimeError, match="killed"):
        _commit(run, 3, best=True)
    monkeypatch.setattr(rf, "write_json", real)
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoint").iterdir())
    assert len([f for f in files if f.startswith("epoch-0003-")]) == 2  # epoch 3's files landed ...

    got = ck.load_committed(run, "test-run")  # ... but epoch 2 stays the committed one, intact
    assert got.epoch == 2 and got.state == {"epoch": 2} and torch.equal(got.weights["w"], torch.full((3,), 2.0))
    assert torch.equal(got.train_tensors["rng.torch"], torch.arange(4, dtype=torch.uint8) + 2)
    from safetensors.torch import load

    assert torch.equal(load(got.weights_bytes("best"))["w"], torch.full((3,), 1.0))  # best: epoch 1, kept

    _commit(run, 3, best=False)  # the resumed run commits epoch 3: only named files remain
    left = sorted(p.name for p in (tmp_path / "run" / "checkpoint").iterdir())
    assert {f.split("-")[1] for f in left if f.startswith("epoch-")} == {"0001", "0003"} and "commit.json" in left


def test_altered_or_foreign_checkpoints_fail_loudly(tmp_path):
    run = str(tmp_path / "run")
    assert ck.load_committed(run, "test-run") is None
    record = _commit(run, 1, best=True).record
    with pytest.raises(ConfigError, match="not a 'adapter-run'"):
        ck.load_committed(run, "adapter-run")
    weights = tmp_path / "run" / "checkpoint" / record["files"]["last_weights"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=weights.name):
        ck.load_committed(run, "test-run")
    weights.unlink()
    with pytest.raises(StoreError, match="missing"):
        ck.load_committed(run, "test-run")


@pytest.mark.parametrize("legacy", ["last_state.json", "checkpoint/state.json"])
def test_a_checkpoint_of_the_previous_layout_is_refused_with_a_clear_message(tmp_path, legacy):
    path = tmp_path / "run" / legacy
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"epoch": 2}))
    with pytest.raises(ConfigError, match="older layout.*--no-resume"):
        ck.load_committed(str(tmp_path / "run"), "adapter-run")
    (tmp_path / "run" / "last_optim.safetensors").write_bytes(b"old")
    ck.clear(str(tmp_path / "run"))  # a fresh start (--no-resume) removes the old checkpoint files
    assert not path.exists() and not (tmp_path / "run" / "last_optim.safetensors").exists()
    assert ck.load_committed(str(tmp_path / "run"), "adapter-run") is None


def test_non_finite_best_loss_round_trips():
    st = RunState()
    assert st.to_json()["best_val_loss"] is None and math.isinf(RunState.from_json(st.to_json()).best_val_loss)
