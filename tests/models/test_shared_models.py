"""`shared_models`: inside the block a checkpoint is loaded once per set of arguments; outside it,
and after it closes, every call loads afresh."""

from __future__ import annotations

import shutil

import pytest

from egpt_core.config import ModelLoadConfig
from egpt_core.errors import ConfigError
from egpt_core.models.loading import load_eventgpt, load_videollava, shared_models

FP32 = ModelLoadConfig(dtype="float32", device="cpu")


def test_one_load_per_arguments_inside_the_block(fixtures_dir):
    path = str(fixtures_dir / "eventgpt")
    assert load_eventgpt(path, FP32) is not load_eventgpt(path, FP32)  # no block: a fresh load each time
    with shared_models():
        first = load_eventgpt(path, FP32)
        assert load_eventgpt(path, load=FP32, double_adaptor=False) is first  # same arguments, however passed
        assert load_eventgpt(path, FP32, double_adaptor=True) is not first  # other arguments: another model
        bf16 = load_eventgpt(path, ModelLoadConfig(dtype="bfloat16", device="cpu"))
        assert bf16 is not first and next(bf16.model.parameters()).dtype.is_floating_point
        target = load_videollava(str(fixtures_dir / "videollava"), FP32)
        with shared_models():  # nested: still the same models
            assert load_eventgpt(path, FP32) is first
            assert load_videollava(str(fixtures_dir / "videollava"), FP32) is target
        assert load_eventgpt(path, FP32) is first  # the inner block's exit released nothing
    assert load_eventgpt(path, FP32) is not first  # released when the outermost block exits


def test_a_failed_load_is_not_remembered(fixtures_dir, tmp_path):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama"}')
    with shared_models():
        for _ in range(2):  # raised each time: the failure is not cached as a result
            with pytest.raises(ConfigError, match="EventChat_llama"):
                load_eventgpt(str(bad), FP32)
        (bad / "config.json").unlink()
        shutil.copytree(fixtures_dir / "eventgpt", bad, dirs_exist_ok=True)
        assert load_eventgpt(str(bad), FP32).hidden_size > 0  # mended checkpoint: loaded, not the old error
