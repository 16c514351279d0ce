"""Credentials never enter configs, run files or logs (issue 13, items 12 and 13).

* Every config with `storage_options` refuses credentials in them, by name at any depth and by value
  (connection strings, URLs with a password), with a message that names where they are (never the
  value) and points to the environment's AWS chain or a Prefect Secret block.
* `redact()` masks by value too: an Azure `connection_string` with `AccountKey=`, URLs with userinfo,
  SAS signatures.
* Run files (an adapter run's config.json, an evaluation's metrics.json) hold no storage_options at
  all, and any URL in a config is written with its password masked.
"""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from egpt_core.config import EvalConfig, ExtractConfig, LoraTrainConfig, PipelineConfig, TrainAdapterConfig

ACCOUNT_KEY = "c2VjcmV0LWF6dXJlLWFjY291bnQta2V5LXZhbHVl"
AZURE = f"DefaultEndpointsProtocol=https;AccountName=egptdata;AccountKey={ACCOUNT_KEY};EndpointSuffix=core.windows.net"
PASSWORD = "hunter2-egpt-pw"

#: (storage_options, where the refusal must point) -- each one leaked before
CREDENTIALS = [
    ({"key": "AKIAEGPTEXAMPLE00001", "secret": "egpt-secret-value-0001", "endpoint_url": "http://minio"}, "key, secret"),
    ({"client_kwargs": {"aws_secret_access_key": "egpt-secret-value-0002"}}, "client_kwargs.aws_secret_access_key"),
    ({"connection_string": AZURE}, "connection_string"),
    ({"conn": AZURE}, "conn"),  # an innocuous name: caught by the value
    ({"client_kwargs": {"endpoint_url": f"https://egpt:{PASSWORD}@minio.internal"}}, "client_kwargs.endpoint_url"),
    ({"token": "ya29.egpt-oauth-token-value"}, "token"),
]


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _configs(storage_options: dict) -> list:
    """Build every config model that carries storage options (the value is checked when it is set)."""
    return [
        lambda: ExtractConfig(dataset="d", drafter="m", target="t", store="s", storage_options=storage_options),
        lambda: TrainAdapterConfig(train=["s"], storage_options=storage_options),
        lambda: LoraTrainConfig(store="s", drafter="m", storage_options=storage_options),
        lambda: EvalConfig(store="s", out="o", identity=True, storage_options=storage_options),
        lambda: PipelineConfig.model_validate({"extract": {"dataset": "d", "drafter": "m", "target": "t", "store": "s",
                                                           "storage_options": storage_options}}),
    ]


@pytest.mark.parametrize(("options", "where"), CREDENTIALS)
def test_configs_refuse_credentials_in_storage_options(options, where):
    secrets = [v for v in _strings(options) if v != "http://minio"]
    for build in _configs(options):
        with pytest.raises(ValidationError) as info:
            build()
        message = str(info.value)
        assert f"storage_options hold credentials ({where})" in message
        assert "AWS_ACCESS_KEY_ID" in message and "secret_block" in message
        assert not [s for s in secrets if s in message], message  # the value is never echoed


def test_non_secret_storage_options_are_accepted():
    options = {"endpoint_url": "https://minio.internal", "profile": "egpt", "secret_block": "egpt-s3", "anon": False,
               "client_kwargs": {"region_name": "eu-central-2"}, "config_kwargs": {"signature_version": "s3v4"},
               "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/egpt"}}
    cfg = ExtractConfig(dataset="d", drafter="m", target="t", store="s", storage_options=options)
    assert cfg.storage_options == options


def test_redact_masks_secret_values_whatever_their_name():
    from egpt_core.fsio import redact

    options = {"connection_string": AZURE, "conn": AZURE, "endpoint_url": f"https://egpt:{PASSWORD}@minio.internal/x",
               "sas_url": "https://egptdata.blob.core.windows.net/c?sv=2022-11-02&sig=c2lnbmF0dXJlLXZhbHVl&se=2027",
               "nested": [{"dsn": f"postgresql://prefect:{PASSWORD}@db:5432/prefect"}],
               "account_name": "egptdata", "endpoint": "https://minio.internal"}
    red = redact(options)
    text = json.dumps(red)
    for secret in (ACCOUNT_KEY, PASSWORD, "c2lnbmF0dXJlLXZhbHVl"):
        assert secret not in text
    assert red["conn"] == AZURE.replace(ACCOUNT_KEY, "***")  # the rest of the string stays readable
    assert red["endpoint_url"] == "https://egpt:***@minio.internal/x"
    assert red["account_name"] == "egptdata" and red["endpoint"] == "https://minio.internal"


def test_log_records_are_scrubbed_of_secret_values(caplog):
    """A connection string that reaches fsspec (e.g. from a Secret block) never appears in a log record."""
    from egpt_core.fsio import _remember_secrets

    _remember_secrets({"connection_string": AZURE, "endpoint_url": f"https://egpt:{PASSWORD}@minio.internal"})
    caplog.set_level(logging.DEBUG)
    logging.getLogger("adlfs.test").debug("connecting with %s to %s", AZURE, f"https://egpt:{PASSWORD}@minio.internal")
    assert caplog.records and ACCOUNT_KEY not in caplog.text and PASSWORD not in caplog.text


def test_config_record_has_no_storage_options_and_masks_passwords():
    from egpt_core.runfiles import config_record

    cfg = TrainAdapterConfig(train=[f"https://egpt:{PASSWORD}@data.internal/stores/a"], out="runs/a",
                             storage_options={"endpoint_url": "https://minio.internal"})
    record = config_record(cfg)
    assert "storage_options" not in record and "minio.internal" not in json.dumps(record)
    assert PASSWORD not in json.dumps(record) and record["train"] == ["https://egpt:***@data.internal/stores/a"]
    assert record["epochs"] == cfg.epochs  # the settings themselves are all there


def test_run_files_never_hold_storage_options(tmp_path):
    """An adapter run's config.json and an evaluation's metrics.json: no storage_options key, none of
    their values (the Azure case wrote the connection string unmasked into config.json)."""
    from egpt_core.adapters import train_adapter
    from egpt_core.adapters.synthetic import write_synthetic_pair_store
    from egpt_core.config import AdapterConfig
    from egpt_core.evaluation import evaluate

    options = {"auto_mkdir": True}  # a real (non-secret) option of the local filesystem
    store = str(tmp_path / "store")
    write_synthetic_pair_store(store, hidden_size=16, n_scenes=6, pairs_per_scene=3, shard_size=10)
    run = tmp_path / "run"
    train_adapter(TrainAdapterConfig(adapter=AdapterConfig(level="L1"), train=[store], out=str(run), epochs=1,
                                     batch_size=8, device="cpu", storage_options=options))
    evaluate(EvalConfig(store=store, out=str(tmp_path / "eval"), adapter_run=str(run), device="cpu",
                        storage_options=options))
    adapter_config = json.loads((run / "config.json").read_text())["config"]
    eval_config = json.loads((tmp_path / "eval" / "metrics.json").read_text())["inputs"]["config"]
    for record in (adapter_config, eval_config):
        assert "storage_options" not in record and "auto_mkdir" not in json.dumps(record)
    assert adapter_config["train"] == [store] and eval_config["adapter_run"] == str(run)
