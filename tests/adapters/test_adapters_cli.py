"""`egpt train-adapter` sub-command (registered on a private parser: other areas stay out of it)."""

import argparse
import json

from egpt_core.adapters import commands
from egpt_core.cli import run_command


def _parser():
    p = argparse.ArgumentParser(prog="egpt")
    commands.register(p.add_subparsers(dest="command", required=True))
    return p


def _run(argv):
    args = _parser().parse_args(argv)
    return run_command(args)


def test_list_levels_prints_exact_counts(capsys):
    assert _run(["train-adapter", "--list-levels", "--hidden-size", "4096"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line[:2] in ("L1", "L2", "L3", "L4", "L5", "B1")}
    assert rows["L1"] == ["2,113,537", "2,113,537"]
    assert rows["L2"] == ["6,324,227", "6,324,227"]
    assert rows["L3"] == ["25,188,355", "25,188,355"]
    assert rows["L4"] == ["100,714,497", "100,714,497"]
    assert rows["L5"] == ["102,819,841", "119,609,346"]
    assert rows["B1"] == ["102,819,841", "119,609,346"]
    assert rows["L5F"] == ["169,936,897", "186,726,402"]


def test_train_adapter_command(synth_store, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"adapter": {"level": "L4", "num_heads": 4, "ffn_dim": 32}, "early_stopping": 3}))
    rc = _run(["train-adapter", "--level", "L2", "--train", synth_store["url"], "--out", str(tmp_path / "run"),
               "--epochs", "2", "--batch-size", "32", "--lr", "0.003", "--seed", "1", "--config", str(cfg_file)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epochs_run"] == 2 and result["run_url"] == str(tmp_path / "run")
    conf = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert conf["adapter"]["level"] == "L2" and conf["adapter"]["num_heads"] == 4  # flags override the file
    assert conf["batch_size"] == 32 and conf["seed"] == 1 and conf["early_stopping"] == 3


def test_train_adapter_command_config_errors(synth_store, tmp_path, capsys):
    rc = _run(["train-adapter", "--level", "L4", "--train", synth_store["url"], "--out", str(tmp_path / "r"),
               "--hidden-size", "4096"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "4096" in err and "32" in err
    assert _run(["train-adapter", "--level", "L1", "--out", str(tmp_path / "r")]) == 2
    assert "train: Field required" in capsys.readouterr().err  # TrainAdapterConfig.train (--train URL)


def test_train_adapter_command_prints_the_data_cache_decision_once_at_start(synth_store, tmp_path, capsys,
                                                                             monkeypatch):
    """Issue 18.1: `egpt train-adapter` says where the training data is kept and why (RAM copy or
    byte-range reads), one line before the first epoch, the same decision config.json records."""
    import egpt_core.memory

    monkeypatch.setattr(egpt_core.memory, "available_memory_bytes", lambda: 20_000)  # a node with 20 kB left
    rc = _run(["train-adapter", "--level", "L1", "--train", synth_store["url"], "--out", str(tmp_path / "run"),
               "--epochs", "2", "--batch-size", "32"])
    assert rc == 0
    lines = capsys.readouterr().err.splitlines()
    decided = [i for i, line in enumerate(lines) if "training data:" in line]
    cache = json.loads((tmp_path / "run" / "config.json").read_text())["data_cache"]
    assert len(decided) == 1 and cache["path"] == "byte-range", lines
    assert lines[decided[0]].endswith(f"training data: byte-range ({cache['reason']})")
    assert decided[0] < min(i for i, line in enumerate(lines) if "epoch 1/2" in line)
