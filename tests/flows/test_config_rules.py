"""Cross-field rules live in the configs (issue 15.4): the flows' parameter validation refuses a bad
combination before any task starts (no GPU slot taken), naming the field; the same rules hold for
the command line (one line, exit 2)."""

from __future__ import annotations

import pytest
from prefect.exceptions import ParameterTypeError

EXTRACT = {"dataset": "/data/ds", "drafter": "/models/egpt", "target": "/models/vl", "store": "/stores/s"}


def _refused(flow, parameters: dict, *phrases: str) -> str:
    """Validate ``parameters`` as Prefect does before a flow run starts; the message names the field."""
    with pytest.raises(ParameterTypeError) as info:
        flow.validate_parameters(parameters)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, message
    return message


def test_evaluate_needs_exactly_one_prediction_source():
    from flows.evaluate import evaluate

    base = {"store": "/stores/s", "out": "/runs/e"}
    for bad in ({}, {"identity": True, "adapter_run": "/runs/a"}, {"lora": "/l6", "identity": True}):
        _refused(evaluate, {"cfg": {**base, **bad}}, "adapter_run, lora, identity", "exactly one prediction source")
    assert evaluate.validate_parameters({"cfg": {**base, "lora": "/l6"}})["cfg"].lora == "/l6"


def test_extract_group_index_must_lie_inside_the_fan_out():
    from flows.extract import extract

    _refused(extract, {"cfg": {**EXTRACT, "shard_groups": 2, "group_index": 2}}, "group_index", "shard_groups (2)")
    assert extract.validate_parameters({"cfg": {**EXTRACT, "shard_groups": 2, "group_index": 1}})["cfg"].group_index == 1


@pytest.mark.parametrize("source", [None, "/stores/s", "/stores/s/"])
def test_retf_needs_a_different_source_store(source):
    from flows.extract import extract
    from flows.pipeline import pipeline

    cfg = {**EXTRACT, "mode": "retf", **({"source_store": source} if source else {})}
    _refused(extract, {"cfg": cfg}, "source_store", "NEW store")
    _refused(pipeline, {"cfg": {"extract": cfg}}, "extract", "source_store")  # nested: named under its section
    ok = extract.validate_parameters({"cfg": {**cfg, "source_store": "/stores/other"}})["cfg"]
    assert ok.source_store == "/stores/other"


def test_train_adapter_needs_a_train_store_in_the_form_and_in_the_flow():
    """`train` is required with at least one store: the deployment's JSON schema says so (the
    server refuses the form), and the flow's validation refuses it too."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from flows.train import train_adapter

    for bad in ({}, {"train": []}):
        _refused(train_adapter, {"cfg": {"adapter": {"level": "L1"}, **bad}}, "train")
    schema = parameter_schema(train_adapter.fn).model_dump_for_openapi()
    assert validate({"cfg": {"train": []}}, schema, raise_on_error=False, ignore_required=False)
    assert not validate({"cfg": {"train": ["/stores/s"]}}, schema, raise_on_error=False, ignore_required=False)


def test_non_semantic_fields_are_declared_on_each_config_and_never_hold_credentials():
    """Every stage config says which fields do not change what it computes; storage options are
    always among them, so they never reach a fingerprint, run id or cache key."""
    from egpt_core import config as c

    for model in (c.ExtractConfig, c.TrainAdapterConfig, c.PipelineAdapterConfig, c.LoraTrainConfig,
                  c.PipelineLoraConfig, c.EvalConfig, c.SpeculateConfig):
        assert "storage_options" in model.NON_SEMANTIC, model
        assert model.NON_SEMANTIC <= set(model.model_fields) | {"storage_options", "out"}, model
    # extending a run (more epochs) is the same run in both trainers
    assert "epochs" in c.TrainAdapterConfig.NON_SEMANTIC and "epochs" in c.LoraTrainConfig.NON_SEMANTIC
    a = c.TrainAdapterConfig(train=["/s"], epochs=3, storage_options={"anon": True}, device="cpu", out="/r1")
    b = a.model_copy(update={"epochs": 9, "storage_options": {}, "device": "auto", "out": "/r2"})
    assert a.semantic_settings() == b.semantic_settings()
    assert a.semantic_settings() != a.model_copy(update={"lr": 0.5}).semantic_settings()


def test_run_fingerprints_plan_ids_and_cache_keys_read_non_semantic(tmp_path):
    """One declaration decides the trainers' resume fingerprint, the pipeline's run directories and
    the cache key: more epochs keep the run and its directory but not the cached result."""
    from egpt_core import runfiles as rf
    from egpt_core.config import ExtractConfig, PipelineAdapterConfig, PipelineConfig, TrainAdapterConfig
    from flows.plan import adapter_configs
    from tasks.caching import config_material
    from tasks.refs import StoreRef

    cfg = TrainAdapterConfig(train=["/s"], epochs=3)
    longer = cfg.model_copy(update={"epochs": 6})
    assert rf.config_fingerprint(cfg) == rf.config_fingerprint(longer)
    assert rf.config_fingerprint(cfg) != rf.config_fingerprint(cfg.model_copy(update={"seed": 1}))
    assert config_material(cfg) != config_material(longer)  # a cached 3-epoch result is not a 6-epoch one
    assert config_material(cfg) != config_material(cfg.model_copy(update={"out": "/elsewhere"}))
    assert "storage_options" not in config_material(cfg.model_copy(update={"storage_options": {"anon": True}}))

    def run_dir(epochs: int) -> str:
        p = PipelineConfig(extract=ExtractConfig(**EXTRACT), adapters=[PipelineAdapterConfig(epochs=epochs)],
                           out=str(tmp_path))
        store = StoreRef(url="/stores/s", fingerprint="f" * 16, hidden_size=8, counts={"ok": 4}, shards=1, lm_head=True)
        return adapter_configs(p, [store])[0][1].out

    assert run_dir(3) == run_dir(6)


@pytest.mark.parametrize("argv, phrase", [
    (["evaluate", "--store", "/nowhere", "--out", "OUT"], "adapter_run, lora, identity: set exactly one"),
    (["train-lora", "--drafter", "/models/egpt", "--out", "OUT"], "store: Field required"),
    (["train-lora", "--store", "/s", "--drafter", "/d", "--out", "OUT", "--storage-option", "bad"], "KEY=VALUE"),
    (["train-lora", "--store", "/s", "--drafter", "/d", "--out", "OUT", "--rank", "0"], "rank: Input should be"),
    (["train-adapter", "--level", "L1", "--out", "OUT"], "train: Field required"),
    (["extract", "--dataset", "/d", "--drafter", "/a", "--target", "/t", "--store", "/s", "--mode", "retf"],
     "source_store: retf mode writes a NEW store"),
    (["speculate", "--target", "/t", "--out", "OUT", "--storage-option", "key=AKIA0000000000000000"],
     "--storage-option"),
])
def test_bad_command_line_input_is_one_line_and_exit_2(argv, phrase, tmp_path, capsys):
    from egpt_core.cli import main

    out = tmp_path / "out"
    assert main([str(out) if a == "OUT" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"egpt {argv[0]}: error: ") and phrase in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_config_file_and_flags_merge_through_the_shared_parser(tmp_path):
    """--config may be partial (flags fill in), flags override it, a nested section keeps its
    default's explicit settings (L6 loads NF4), --storage-option merges into the file's."""
    import argparse
    import json

    from egpt_core.cliargs import add_config_arguments, config_from_args
    from egpt_core.config import LoraTrainConfig

    f = tmp_path / "l6.json"
    f.write_text(json.dumps({"store": "/s", "rank": 4, "storage_options": {"endpoint_url": "http://x"}}))
    p = argparse.ArgumentParser()
    add_config_arguments(p, LoraTrainConfig)
    args = p.parse_args(["--config", str(f), "--storage-option", "anon=true"])
    cfg = config_from_args(args, LoraTrainConfig, {"drafter": "/d", "rank": 8, "lr": None},
                           {"load": {"dtype": "float32", "quant": None}})
    assert (cfg.store, cfg.drafter, cfg.rank, cfg.lr) == ("/s", "/d", 8, LoraTrainConfig.model_fields["lr"].default)
    assert cfg.load.quant == "nf4" and cfg.load.dtype == "float32"
    assert cfg.storage_options == {"endpoint_url": "http://x", "anon": True}
