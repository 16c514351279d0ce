"""`python -m benchmarks`: --device/--shape reach only the modules whose run() takes them."""

import json
import types

from benchmarks.__main__ import _run, main


def test_options_reach_only_modules_that_take_them():
    seen = {}

    def plain_run():
        return {"x": {"ratio": 1.0}}

    def shaped_run(device: str = "cpu", shape: str | None = None):
        seen.update(device=device, shape=shape)
        return {}

    options = {"device": "cuda", "shape": "7b"}
    assert _run(types.SimpleNamespace(run=plain_run), options) == {"x": {"ratio": 1.0}}
    _run(types.SimpleNamespace(run=shaped_run), options)
    assert seen == {"device": "cuda", "shape": "7b"}
    _run(types.SimpleNamespace(run=shaped_run), {"device": None, "shape": None})  # unset options keep defaults
    assert seen == {"device": "cpu", "shape": None}


def test_shape_group_is_skipped_on_cpu_without_a_shape(capsys):
    assert main(["--only", "bench_shapes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {}


def test_cuda_device_without_cuda_is_refused_before_any_benchmark_runs(capsys, monkeypatch):
    import pytest
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda", "--only", "bench_render"])
    assert exc.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
