"""The flows' parameters as the Prefect UI meets them (issue 17, items 2-4): every form field titled
and described, the common path first, no field the pipeline silently overrides, and parameters in
the UI's JSON-input shape accepted as the server passes them on."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _deployed_flows() -> dict[str, object]:
    """{entrypoint: flow} of every deployment in deployments/prefect.yaml."""
    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    flows = {}
    for d in doc["deployments"]:
        path, name = d["entrypoint"].split(":")
        flows[d["entrypoint"]] = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
    return flows


def _schema(flow) -> dict:
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(flow.fn).model_dump_for_openapi()


def _sections(schema: dict) -> dict[str, dict]:
    """{section: its properties}: the flow's own parameters and every model the form nests."""
    return {"(flow)": schema["properties"], **{name: d.get("properties", {}) for name, d in schema["definitions"].items()}}


@pytest.mark.parametrize("entrypoint", sorted(_deployed_flows()))
def test_every_form_field_has_a_title_and_a_description(entrypoint):
    schema = _schema(_deployed_flows()[entrypoint])
    untitled = [f"{section}.{name}" for section, props in _sections(schema).items() for name, p in props.items()
                if not p.get("title")]
    undescribed = [f"{section}.{name}" for section, props in _sections(schema).items() for name, p in props.items()
                   if not p.get("description")]
    assert not untitled, f"fields the UI would label 'Field': {untitled}"
    assert not undescribed, f"fields without a description (add description= to the Field): {undescribed}"
    class_named = [d["title"] for d in schema["definitions"].values() if d["title"].endswith("Config")]
    assert not class_named, f"sections the UI would label by class name: {class_named}"


@pytest.mark.parametrize("entrypoint", sorted(_deployed_flows()))
def test_rarely_changed_settings_come_last(entrypoint):
    for section, props in _sections(_schema(_deployed_flows()[entrypoint])).items():
        advanced = [str(p["title"]).startswith("Advanced:") for p in props.values()]
        assert advanced == sorted(advanced), f"{section}: an 'Advanced:' field before a common one: {list(props)}"


def test_common_path_is_at_the_top_of_the_pipeline_form():
    from flows.pipeline import pipeline

    schema = _schema(pipeline)
    assert list(schema["properties"]) == ["cfg", "extract_deployment"]
    assert list(schema["definitions"]["PipelineConfig"]["properties"])[:4] == ["extract", "adapters", "lora", "out"]
    assert list(schema["definitions"]["ExtractConfig"]["properties"])[:4] == ["dataset", "drafter", "target", "store"]
    assert list(schema["definitions"]["PipelineAdapterConfig"]["properties"])[0] == "adapter"
    assert list(schema["definitions"]["AdapterConfig"]["properties"])[0] == "level"


#: what the pipeline assigns to each adapter / L6 run itself, so these are not fields of its entries
ADAPTER_ASSIGNED = {"train", "val", "val_fraction", "seed", "out", "storage_options", "allow_mixed_models"}
LORA_ASSIGNED = {"val_fraction", "seed", "out", "storage_options"}


def test_pipeline_form_has_no_field_the_pipeline_overrides():
    from flows.pipeline import pipeline

    defs = _schema(pipeline)["definitions"]
    assert not ADAPTER_ASSIGNED & set(defs["PipelineAdapterConfig"]["properties"])
    assert not LORA_ASSIGNED & set(defs["PipelineLoraConfig"]["properties"])


def _pipeline(tmp_path, **update):
    from egpt_core.config import ExtractConfig, PipelineConfig

    extract = ExtractConfig(dataset="/data/ds", drafter="/models/egpt", target="/models/vl", store=str(tmp_path / "s"),
                            storage_options={"endpoint_url": "http://minio"})
    return PipelineConfig(extract=extract, out=str(tmp_path / "runs"), val_fraction=0.3, split_seed=7, **update)


def test_every_adapter_field_typed_in_the_form_is_what_runs(tmp_path):
    from egpt_core.config import AdapterConfig, PipelineAdapterConfig, TrainAdapterConfig
    from flows.plan import adapter_configs
    from tasks.refs import StoreRef

    typed = {"adapter": AdapterConfig(level="L2", num_blocks=2), "epochs": 7, "batch_size": 5, "lr": 0.02,
             "device": "cpu", "weight_decay": 0.2, "warmup_steps": 3, "min_lr": 1e-5, "grad_clip": 2.0,
             "early_stopping": 4, "data_cache_gb": 1.5}
    assert set(typed) == set(PipelineAdapterConfig.model_fields), "add the new field to this test"
    assert set(TrainAdapterConfig.model_fields) - set(typed) == ADAPTER_ASSIGNED
    cfg = _pipeline(tmp_path, adapters=[PipelineAdapterConfig(**typed)])
    stores = [StoreRef(url=cfg.extract.store, fingerprint="f" * 16, counts={"ok": 1}, shards=1, mode="shared_prefix", hidden_size=8,
                       lm_head=True)]
    [(name, run)] = adapter_configs(cfg, stores)
    assert name == "L2"
    assert {k: getattr(run, k) for k in typed} == typed  # nothing typed is overridden
    assert (run.train, run.val, run.val_fraction, run.seed) == ([cfg.extract.store], None, 0.3, 7)
    assert run.storage_options == cfg.extract.storage_options and run.out.startswith(f"{cfg.out}/adapters/L2-")


def test_every_lora_field_typed_in_the_form_is_what_runs(tmp_path):
    from egpt_core.config import LoraTrainConfig, ModelLoadConfig, PipelineLoraConfig
    from flows.plan import lora_config

    typed = {"store": "/stores/other", "drafter": "/models/egpt-v2", "dataset": "/data/ds2", "val_store": "/stores/val",
             "load": ModelLoadConfig(dtype="float32", quant="none", device="cpu"), "rank": 4, "alpha": 8, "epochs": 3,
             "lr": 5e-4, "dropout": 0.2, "mse_weight": 0.5, "cos_weight": 0.25, "ce_weight": 0.0, "micro_batch": 2,
             "grad_accum": 3, "weight_decay": 0.0, "warmup_steps": 1, "min_lr": 0.0, "grad_clip": 0.5,
             "early_stopping": 2, "gradient_checkpointing": False}
    assert set(typed) == set(PipelineLoraConfig.model_fields), "add the new field to this test"
    assert set(LoraTrainConfig.model_fields) - set(typed) == LORA_ASSIGNED
    cfg = _pipeline(tmp_path, lora=PipelineLoraConfig(**typed))
    run = lora_config(cfg, {"/stores/other": "f" * 16})
    assert {k: getattr(run, k) for k in typed} == typed
    assert (run.val_fraction, run.seed, run.storage_options) == (0.3, 7, cfg.extract.storage_options)
    assert run.out.startswith(f"{cfg.out}/lora/L6-")
    # left empty, the L6 store, drafter and dataset are the extraction's
    default = lora_config(_pipeline(tmp_path, lora=PipelineLoraConfig()), {})
    assert (default.store, default.drafter, default.dataset) == (cfg.extract.store, "/models/egpt", "/data/ds")


def test_stage_configs_with_pipeline_assigned_fields_are_refused():
    """What a user types is what runs: an `out` in an adapter entry is refused, not silently replaced."""
    from pydantic import ValidationError

    from egpt_core.config import PipelineAdapterConfig, PipelineLoraConfig, TrainAdapterConfig

    assert PipelineAdapterConfig.model_validate(TrainAdapterConfig.model_construct(epochs=3)).epochs == 3  # unset: fine
    for bad in ({"adapter": {"level": "L1"}, "out": "s3://b/mine"}, {"adapter": {"level": "L1"}, "train": ["s"]},
                {"adapter": {"level": "L1"}, "seed": 3}):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            PipelineAdapterConfig.model_validate(bad)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        PipelineLoraConfig.model_validate({"out": "runs/L6"})


def _ui_json(value) -> dict:
    """A section as the UI's "Use JSON Input" sends it."""
    return {"__prefect_kind": "json", "value": json.dumps(value, indent=2)}


def test_parameters_in_the_ui_json_shape_reach_the_flow_without_prefect_markers(tmp_path):
    """The UI's JSON mode nests its own placeholders inside the JSON text; the server parses the text
    but passes the placeholders inside it on (`hydrate` is the server's function). The flow must
    receive plain values: an untouched dict field is unset, a filled one parsed."""
    from prefect.utilities.schema_tools.hydration import hydrate

    from flows.pipeline import pipeline

    form = {"extract": {"dataset": "/data/ds", "drafter": "/models/egpt", "target": "/models/vl",
                        "store": "s3://bucket/store", "storage_options": {"__prefect_kind": "json"},
                        "load": _ui_json({"dtype": "float32", "quant": "none", "device": "cpu"}),
                        "events": {"__prefect_kind": "none", "value": {"n_frames": 2}}},
            "adapters": [{"adapter": {"level": "L1"}, "epochs": 3}, {"__prefect_kind": "json"}],
            "lora": None, "timing": {"__prefect_kind": "json"}, "out": "s3://bucket/runs"}
    sent = {"cfg": _ui_json(form), "extract_deployment": None}
    hydrated = hydrate(sent)
    assert hydrated["cfg"]["extract"]["storage_options"] == {"__prefect_kind": "json"}  # what the server passes on
    cfg = pipeline.validate_parameters(hydrated)["cfg"]
    assert cfg.extract.storage_options == {} and cfg.timing is None and cfg.lora is None
    assert cfg.extract.load.dtype == "float32" and cfg.extract.events.n_frames == 2
    assert [a.adapter.level for a in cfg.adapters] == ["L1"] and cfg.adapters[0].epochs == 3
    # a filled JSON-mode storage_options arrives as its text: parsed
    form["extract"]["storage_options"] = _ui_json({"endpoint_url": "http://127.0.0.1:9", "secret_block": "egpt-s3"})
    cfg = pipeline.validate_parameters(hydrate({"cfg": _ui_json(form)}))["cfg"]
    assert cfg.extract.storage_options == {"endpoint_url": "http://127.0.0.1:9", "secret_block": "egpt-s3"}
    # placeholders the flow cannot resolve are refused by name
    form["extract"]["store"] = {"__prefect_kind": "workspace_variable", "variable_name": "store"}
    with pytest.raises(Exception, match="unresolved Prefect UI placeholder __prefect_kind='workspace_variable'"):
        pipeline.validate_parameters(hydrate({"cfg": _ui_json(form)}))


def _null_branches(node, where: str = "") -> list[str]:
    """Where a schema (any depth) has a bare null type: the v2 UI draws each as 'Property is type "None"'."""
    found = []
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "null" or (isinstance(kind, list) and "null" in kind):
            found.append(where or "/")
        for key, value in node.items():
            found += _null_branches(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _null_branches(value, f"{where}/{i}")
    return found


@pytest.mark.parametrize("entrypoint", sorted(_deployed_flows()))
def test_no_form_field_renders_as_a_bare_null_branch(entrypoint):
    """Issue 17.4: every optional field left empty printed 'Property is type "None"' (16 in the pipeline's
    form): a plain optional value is its non-null type, a section's "empty" tab a `const: null`."""
    schema = _schema(_deployed_flows()[entrypoint])
    assert not _null_branches(schema), _null_branches(schema)
    for section, props in _sections(schema).items():  # the UI prefills a default: a null one must be valid
        for name, p in props.items():
            if "default" in p and p["default"] is None:
                assert {"const": None, "title": "None"} in p.get("anyOf", []), f"{section}.{name}: {p}"


def _deployment_parameters() -> dict[str, dict]:
    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    return {f"{d['entrypoint']}|{d['name']}": d.get("parameters", {}) for d in doc["deployments"]}


def _none_default_paths(value, path: tuple = ()) -> list[tuple]:
    """Paths of every field (flow parameter or model field, any depth) whose default is None."""
    from pydantic import BaseModel

    paths = []
    if isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            if field.default is None and not field.is_required():
                paths.append((*path, name))
            paths += _none_default_paths(getattr(value, name), (*path, name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            paths += _none_default_paths(item, (*path, i))
    return paths


def _dumped(params: dict) -> dict:
    from pydantic import BaseModel

    return {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in params.items()}


def _at(doc, path: tuple):
    for key in path:
        doc = getattr(doc, key) if not isinstance(doc, (dict, list)) else doc[key]
    return doc


@pytest.mark.parametrize("deployment", sorted(_deployment_parameters()))
def test_every_optional_field_still_accepts_none_on_the_server_and_in_the_flow(deployment):
    """What the form leaves out stays valid: an explicit null (API users, `prefect deployment run --param`)
    and the UI's placeholder for an empty section pass the server's schema check (`validate`, as
    `create_flow_run` calls it with enforce_parameter_schema) and reach the flow as None."""
    import inspect

    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate
    from prefect.utilities.schema_tools.validation import validate

    entrypoint = deployment.split("|")[0]
    flow = _deployed_flows()[entrypoint]
    schema = _schema(flow)
    validated = flow.validate_parameters(_deployment_parameters()[deployment])
    base = _dumped(validated)
    top = [(name,) for name, p in inspect.signature(flow.fn).parameters.items() if p.default is None]
    paths = top + [(name, *rest) for name, v in validated.items() for (*rest,) in _none_default_paths(v)]
    assert paths, "no optional field to check"
    for path in paths:
        for sent in (None, {"__prefect_kind": "json"}):  # explicit null; the UI's empty "None" tab
            doc = json.loads(json.dumps(base))
            _at(doc, path[:-1])[path[-1]] = sent
            doc = hydrate(doc, HydrationContext(raise_on_error=True))
            validate(doc, schema, raise_on_error=True)
            assert _at(flow.validate_parameters(doc), path) is None, path
