"""`egpt import-adapter`: research best_model.pt -> adapter run directory, same outputs, no pickle."""

from __future__ import annotations

import json

import pytest
import torch

from egpt_core.adapters import apply_adapter, load_adapter
from egpt_core.adapters.research_import import import_research_adapter, load_research_checkpoint
from egpt_core.errors import ConfigError
from tests.adapters.research_arch import EAGLEStyleAdapter, build, save_like_research

LEVELS = ["L1", "L2", "L3", "L4", "L5", "B1", "L5F"]
D, S = 32, 7


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    drafter = torch.randn(3, S, D, generator=g)
    target = torch.randn(3, S, D, generator=g)
    mask = torch.ones(3, S, dtype=torch.bool)
    mask[1, 5:] = False  # padded rows: the key-padding mask must act the same way
    mask[2, 3:] = False
    return drafter, target, mask


def _research_output(level, module, drafter, target, mask):
    with torch.no_grad():
        if level == "L5F":
            return module(drafter, target, attention_mask=mask.long())
        return module(target if level == "B1" else drafter, attention_mask=mask.long())


@pytest.mark.parametrize("level", LEVELS)
def test_imported_adapter_reproduces_research_outputs(level, tmp_path):
    research = build(level, D)
    save_like_research(research, tmp_path / "best_model.pt")
    record = import_research_adapter(tmp_path / "best_model.pt", str(tmp_path / "run"), level)
    module, cfg = load_adapter(str(tmp_path / "run"))  # the normal run-directory reader
    assert cfg.level == level and record["level"] == level and cfg.hidden_size == D
    if level in ("L5", "B1", "L5F"):
        assert cfg.separate_prediction_head is False  # the research objective
    drafter, target, mask = _inputs()
    want = _research_output(level, research, drafter, target, mask)
    with torch.no_grad():
        got = apply_adapter(module, cfg, drafter, target, mask)
    valid = mask[..., None].expand_as(want)
    assert torch.allclose(got[valid], want[valid], atol=1e-6, rtol=0), (got - want)[valid].abs().max()
    assert record["param_count"] == sum(p.numel() for p in research.parameters())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["research"]["epoch"] == 7 and saved["research"]["metrics"]["loss"] == 1.25


def test_l1_config_dataclass_read_without_unpickling_code(tmp_path):
    save_like_research(build("L1", D), tmp_path / "l1.pt")
    ckpt = load_research_checkpoint(tmp_path / "l1.pt")
    assert ckpt["config"].as_dict()["bottleneck_dim"] == 8
    assert type(ckpt["config"]).__module__ == "egpt_core.adapters.research_import"  # the inert stand-in


class _Evil:
    def __reduce__(self):
        import os

        return os.system, ("touch /tmp/egpt-import-adapter-pwned",)


def test_pickled_code_is_refused_and_never_run(tmp_path):
    import os

    marker = "/tmp/egpt-import-adapter-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    ckpt = dict(build("L4", D).checkpoint(), epoch=1, metrics={"x": _Evil()})
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="refused"):
        import_research_adapter(tmp_path / "evil.pt", str(tmp_path / "run"), "L4")
    assert not os.path.exists(marker)
    assert not (tmp_path / "run").exists()


def test_wrong_level_and_renamed_tensor_are_refused(tmp_path):
    save_like_research(build("L4", D), tmp_path / "l4.pt")
    with pytest.raises(ConfigError, match="adapter_type 'L4_Attention' is not a research L5"):
        import_research_adapter(tmp_path / "l4.pt", str(tmp_path / "a"), "L5")
    ckpt = torch.load(tmp_path / "l4.pt", weights_only=True)
    sd = ckpt["model_state_dict"]
    sd["layers.0.ffn.3.weights"] = sd.pop("layers.0.ffn.3.weight")
    torch.save(ckpt, tmp_path / "renamed.pt")
    with pytest.raises(ConfigError, match=r"missing.*layers\.0\.ffn\.3\.weight.*unexpected.*ffn\.3\.weights"):
        import_research_adapter(tmp_path / "renamed.pt", str(tmp_path / "b"), "L4")


def test_token_fusion_checkpoint_is_refused_not_silently_dropped(tmp_path):
    mod = EAGLEStyleAdapter(D, num_heads=4, ffn_dim=48, max_seq_len=16, use_token_embed=True, vocab_size=20)
    save_like_research(mod, tmp_path / "tok.pt")
    with pytest.raises(ConfigError, match="use_token_embed"):
        import_research_adapter(tmp_path / "tok.pt", str(tmp_path / "r"), "L5")


def test_cli_import_then_evaluate(tmp_path, capsys):
    """The imported run directory is an ordinary adapter run: `egpt evaluate --adapter` reads it."""
    from egpt_core.cli import main

    research = build("L4", D)
    save_like_research(research, tmp_path / "best_model.pt")
    assert main(["import-adapter", str(tmp_path / "best_model.pt"), str(tmp_path / "run"), "--level", "L4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["level"] == "L4" and out["hidden_size"] == D
    store = _tiny_store(tmp_path / "store")
    assert main(["evaluate", "--store", store, "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "ev"),
                 "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["inputs"]["adapter_level"] == "L4"
    # a second import into a directory holding a trained run is refused
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"task": "train_adapter"}))
    assert main(["import-adapter", str(tmp_path / "best_model.pt"), str(tmp_path / "other"), "--level", "L4"]) == 2


def _tiny_store(path) -> str:
    """A committed store of D-wide synthetic pairs (no LM head: hidden-state metrics only)."""
    from egpt_core.store import StoreWriter

    g = torch.Generator().manual_seed(3)
    w = StoreWriter(str(path), {"hidden_size": D, "dtype": "float32", "mode": "shared_prefix"})
    recs, dr, tg = [], [], []
    for i in range(6):
        n = 3 + i % 4
        recs.append({"pair_id": f"p{i}", "scene_id": f"s{i // 2}", "question_idx": i % 2, "status": "ok", "length": n})
        dr.append(torch.randn(n, D, generator=g))
        tg.append(torch.randn(n, D, generator=g))
    w.commit_shard(recs, dr, tg)
    return str(path)
