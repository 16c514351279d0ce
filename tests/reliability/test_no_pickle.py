"""No pickle is read from stores, checkpoints or adapters, and credentials never leak.

* Runtime trap: `pickle.Unpickler`, `pickle.load(s)`, `_pickle.load(s)`, `torch.load` and
  `numpy.load(allow_pickle=True)` raise (and are recorded) while a store is read every way, models
  and adapters are loaded, a complete extraction is re-run and adapter / L6 training resume.
* Static scan of egpt_core/, tasks/, flows/: every `torch.load(` passes weights_only=True; no
  `pickle.load(s)` call, no unrestricted `Unpickler`, no `np.load(allow_pickle=True)`.
* The restricted unpickler of event `.npy` files refuses `os.system` & co.; research import refuses
  a chunk (and an LM head file) holding an arbitrary object.
* Credentials: an extraction to S3 (moto) with a distinctive key/secret in the environment; every
  log record (root at DEBUG), stdout/stderr, `egpt inspect` output and every file in the store are
  free of both; `--storage-option key=...` is refused without echoing it.
"""

from __future__ import annotations

import _pickle
import ast
import io
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from egpt_core.config import (
    AdapterConfig,
    ExtractConfig,
    LoraTrainConfig,
    ModelLoadConfig,
    TrainAdapterConfig,
)
from egpt_core.errors import BadInputError, StoreError

FP32 = ModelLoadConfig(dtype="float32", quant="none", device="cpu")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


class _Evil:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# --------------------------------------------------------------------------------------------------
# the runtime trap
# --------------------------------------------------------------------------------------------------
class PickleTrap:
    """Replace every pickle entry point with one that records the call and raises."""

    def __init__(self, monkeypatch):
        self.mp, self.tripped = monkeypatch, []

    def _raiser(self, name):
        trap = self

        def refuse(*a, **k):
            trap.tripped.append(name)
            raise AssertionError(f"{name} called while pickle is forbidden")
        return refuse

    def __enter__(self):
        trap = self

        class NoUnpickler:
            def __init__(self, *a, **k):
                trap.tripped.append("pickle.Unpickler")
                raise AssertionError("pickle.Unpickler used while pickle is forbidden")

        for mod, name in ((pickle, "load"), (pickle, "loads"), (_pickle, "load"), (_pickle, "loads")):
            self.mp.setattr(mod, name, self._raiser(f"{mod.__name__}.{name}"))
        self.mp.setattr(pickle, "Unpickler", NoUnpickler)
        self.mp.setattr(_pickle, "Unpickler", NoUnpickler)
        self.mp.setattr(torch, "load", self._raiser("torch.load"))
        self.mp.setattr(torch.serialization, "load", self._raiser("torch.serialization.load"))
        real_np_load = np.load

        def np_load(*a, allow_pickle=False, **k):
            if allow_pickle:
                trap.tripped.append("numpy.load(allow_pickle=True)")
                raise AssertionError("numpy.load(allow_pickle=True) while pickle is forbidden")
            return real_np_load(*a, allow_pickle=False, **k)
        self.mp.setattr(np, "load", np_load)
        return self

    def __exit__(self, *exc):
        self.mp.undo()
        return False


def test_the_trap_catches_pickle_and_torch_load(monkeypatch, tmp_path):
    """The trap itself works (so a clean run below means something)."""
    torch.save({"w": torch.ones(2)}, tmp_path / "x.pt")
    blob = pickle.dumps({"a": 1})
    with PickleTrap(monkeypatch) as trap:
        for call in (lambda: torch.load(tmp_path / "x.pt", weights_only=True), lambda: pickle.loads(blob),
                     lambda: pickle.Unpickler(io.BytesIO(blob)).load(), lambda: np.load(io.BytesIO(), allow_pickle=True)):
            with pytest.raises(AssertionError):
                call()
    assert trap.tripped == ["torch.load", "pickle.loads", "pickle.Unpickler", "numpy.load(allow_pickle=True)"]
    assert pickle.loads(blob) == {"a": 1}  # restored


# --------------------------------------------------------------------------------------------------
# fixtures: a real store, a trained adapter, an interrupted adapter run, an L6 checkpoint
# --------------------------------------------------------------------------------------------------
def _extract_cfg(fx: Path, store: str, **kw) -> ExtractConfig:
    base = dict(dataset=str(fx / "dataset"), drafter=str(fx / "eventgpt"), target=str(fx / "videollava"), store=store,
                load=FP32, max_new_tokens=6, max_scenes=3, max_questions=2, shard_size=4, batch_size=2)
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="module")
def store(fixtures_dir, drafter, target, tmp_path_factory) -> str:
    from egpt_core.extraction import run_extraction

    url = str(tmp_path_factory.mktemp("nopickle") / "store")
    assert run_extraction(_extract_cfg(fixtures_dir, url), models=(drafter, target)).counts["ok"] == 6
    return url


def _adapter_cfg(store: str, out: Path, epochs: int = 3) -> TrainAdapterConfig:
    return TrainAdapterConfig(adapter=AdapterConfig(level="L4", num_heads=4, ffn_dim=32, dropout=0.1), train=[store],
                              out=str(out), epochs=epochs, batch_size=4, lr=1e-3, early_stopping=50, device="cpu",
                              val_fraction=0.34)


@pytest.fixture(scope="module")
def adapter_runs(store, tmp_path_factory):
    """(a finished run, an interrupted run with a committed epoch-1 checkpoint)."""
    from egpt_core.adapters import train_adapter

    root = tmp_path_factory.mktemp("nopickle_adapters")
    train_adapter(_adapter_cfg(store, root / "done"))

    def crash(frac, msg):
        if msg.startswith("epoch 1/"):
            raise RuntimeError("simulated crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_adapter(_adapter_cfg(store, root / "crashed"), progress=crash)
    return root / "done", root / "crashed"


def _lora_cfg(store: str, fx: Path, out: Path, epochs: int) -> LoraTrainConfig:
    return LoraTrainConfig(store=store, drafter=str(fx / "eventgpt"), out=str(out), load=FP32, rank=2, alpha=4,
                           epochs=epochs, grad_accum=2, lr=5e-3, val_fraction=0.34, early_stopping=10)


@pytest.fixture(scope="module")
def lora_run(store, fixtures_dir, tmp_path_factory):
    """An L6 run that crashed in epoch 2 (a committed epoch-1 checkpoint)."""
    from egpt_core.lora import train_lora

    out = tmp_path_factory.mktemp("nopickle_lora") / "run"

    def crash(frac, msg):
        if msg.startswith("epoch 2/2 step"):
            raise RuntimeError("simulated crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_lora(_lora_cfg(store, fixtures_dir, out, epochs=2), progress=crash)
    return out


# --------------------------------------------------------------------------------------------------
# runtime: nothing trips the trap
# --------------------------------------------------------------------------------------------------
def test_reading_a_store_unpickles_nothing(store, monkeypatch):
    from egpt_core.store import StoreReader, collate_pairs

    with PickleTrap(monkeypatch) as trap:
        r = StoreReader(store)
        table = r.pairs()
        ids = r.pair_ids()
        rows = list(r.iter_pairs())
        shards = list(r.iter_shards())
        one = r.get(ids[-1])
        ds = r.dataset()
        batch = collate_pairs([ds[i] for i in range(len(ds))])
        head = r.lm_head()
        v = r.verify()
        feats = [f for f in Path(store, "features").glob("*.safetensors")]
        cached = r.get_features(feats[0].stem)
    assert trap.tripped == []
    assert table.num_rows == 6 and len(rows) == 6 and len(shards) == 2 and v["problems"] == []
    assert torch.equal(one.drafter, rows[-1].drafter) and batch["drafter"].shape[0] == 6
    assert head.dim() == 2 and cached["features"].dim() == 2


def test_loading_models_and_adapters_unpickles_nothing(fixtures_dir, adapter_runs, monkeypatch):
    from egpt_core.adapters import load_adapter
    from egpt_core.models import load_eventgpt, load_videollava

    done, _ = adapter_runs
    with PickleTrap(monkeypatch) as trap:
        d = load_eventgpt(str(fixtures_dir / "eventgpt"), FP32)
        t = load_videollava(str(fixtures_dir / "videollava"), FP32)
        best, cfg = load_adapter(str(done), "best")
        last, _ = load_adapter(str(done), "last")
    assert trap.tripped == []
    assert d.hidden_size == t.hidden_size and cfg.level == "L4"
    assert sum(p.numel() for p in best.parameters()) == sum(p.numel() for p in last.parameters()) > 0


def test_rerunning_a_complete_extraction_unpickles_nothing(fixtures_dir, store, drafter, target, monkeypatch):
    from egpt_core.extraction import run_extraction

    with PickleTrap(monkeypatch) as trap:
        s = run_extraction(_extract_cfg(fixtures_dir, store), models=(drafter, target))
    assert trap.tripped == [] and s.pairs_pending == 0


def test_resuming_adapter_training_unpickles_nothing(store, adapter_runs, monkeypatch):
    from egpt_core.adapters import train_adapter

    _, crashed = adapter_runs
    msgs = []
    with PickleTrap(monkeypatch) as trap:
        res = train_adapter(_adapter_cfg(store, crashed), progress=lambda f, m: msgs.append(m))
    assert trap.tripped == []
    assert msgs[0].startswith("epoch 2/3") and res.epochs_run == 3  # it did resume from the checkpoint


def test_resuming_lora_training_unpickles_nothing(store, fixtures_dir, lora_run, monkeypatch):
    from egpt_core.lora import train_lora

    with PickleTrap(monkeypatch) as trap:
        res = train_lora(_lora_cfg(store, fixtures_dir, lora_run, epochs=2))
    assert trap.tripped == []
    assert res.resumed_from_epoch == 1 and res.epochs_run == 2


# --------------------------------------------------------------------------------------------------
# static scan of the source
# --------------------------------------------------------------------------------------------------
def _sources() -> list[Path]:
    files = [p for d in ("egpt_core", "tasks", "flows") for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 30, files
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_static_scan_no_unsafe_deserialisation():
    problems, torch_loads, unpicklers = [], [], []
    for path in _sources():
        rel = path.relative_to(REPO)
        tree = ast.parse(path.read_text(), filename=str(rel))
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle", "cPickle", "dill",
                                                                    "cloudpickle", "joblib", "torch", "torch.serialization"):
                bad = {a.name for a in node.names} & {"load", "loads", "Unpickler", "read_pickle"}
                if bad:
                    problems.append(f"{where}: from {node.module} import {sorted(bad)}")
            if isinstance(node, ast.Import):
                bad = {a.name for a in node.names} & {"dill", "cloudpickle", "joblib", "cPickle", "shelve", "marshal"}
                if bad:
                    problems.append(f"{where}: import {sorted(bad)}")
            if isinstance(node, ast.ClassDef):
                if any(_dotted(b) in ("pickle.Unpickler", "_pickle.Unpickler", "Unpickler") for b in node.bases):
                    has_find_class = any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body)
                    unpicklers.append((str(rel), node.name, has_find_class))
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name in ("torch.load", "torch.serialization.load"):
                torch_loads.append(where)
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: {name}( without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "_pickle.load", "_pickle.loads", "pickle.Unpickler",
                          "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
                          "pd.read_pickle", "pandas.read_pickle", "marshal.loads", "shelve.open"):
                problems.append(f"{where}: {name}(")
            elif name in ("np.load", "numpy.load"):
                ap = kw.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{where}: {name}(allow_pickle=...)")
            elif name.endswith("read_array") and "allow_pickle" in kw:
                ap = kw["allow_pickle"]
                if not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{where}: {name}(allow_pickle=...)")
    assert problems == []
    assert len(torch_loads) >= 3, torch_loads  # the research import's loads were seen (the scan works)
    # the one Unpickler subclass is the restricted one, and it overrides find_class
    assert unpicklers == [("egpt_core/events/io.py", "RestrictedUnpickler", True)]


# --------------------------------------------------------------------------------------------------
# the restricted unpickler and the research import
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                         ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
                                         ("builtins", "open"), ("subprocess", "Popen"), ("numpy", "load"),
                                         ("torch", "load"), ("numpy.testing._private.utils", "runstring")])
def test_restricted_unpickler_refuses_globals(module, name):
    from egpt_core.events.io import RestrictedUnpickler

    up = RestrictedUnpickler(io.BytesIO(b""), "events.npy")
    with pytest.raises(BadInputError, match=f"refusing to unpickle {module}.{name}"):
        up.find_class(module, name)
    assert up.find_class("numpy", "ndarray") is np.ndarray  # what event files need still works


def test_event_npy_with_code_execution_payload_is_refused(tmp_path):
    from egpt_core.events import load_events

    marker = tmp_path / "ran"
    buf = io.BytesIO()
    np.save(buf, np.array({"x": _Evil(marker)}, dtype=object), allow_pickle=True)
    (tmp_path / "e.npy").write_bytes(buf.getvalue())
    with pytest.raises(BadInputError, match="refusing to unpickle posix.system|refusing to unpickle os.system"):
        load_events(str(tmp_path / "e.npy"))
    assert not marker.exists()
    np.load(tmp_path / "e.npy", allow_pickle=True)  # control: the payload is live
    assert marker.exists()


def _research_dir(root: Path, metadata: list, extra: dict | None = None) -> Path:
    d = root / "research"
    (d / "chunks").mkdir(parents=True)
    n, S, D = len(metadata), 4, 8
    chunk = {"egpt_hidden": torch.randn(n, S, D), "vl_hidden": torch.randn(n, S, D),
             "seq_lens": torch.full((n,), 3, dtype=torch.int64), "metadata": metadata, **(extra or {})}
    torch.save(chunk, d / "chunks" / "chunk_000000.pt")
    (d / "index.json").write_text(json.dumps({"chunks": [{"path": "chunk_000000.pt"}], "config": {"hidden_dim": D}}))
    return d


def test_research_import_refuses_a_chunk_holding_an_arbitrary_object(tmp_path):
    from egpt_core.store.research_import import import_research

    marker = tmp_path / "ran"
    d = _research_dir(tmp_path, [{"sample_idx": 0, "question": "q?", "payload": _Evil(marker)}])
    with pytest.raises(StoreError, match="refused to load"):
        import_research(str(d), str(tmp_path / "store"))
    assert not marker.exists()
    assert not (tmp_path / "store" / "manifest.json").exists()  # nothing imported
    torch.load(d / "chunks" / "chunk_000000.pt", weights_only=False)  # control: the payload is live
    assert marker.exists()


def test_research_import_refuses_an_lm_head_file_holding_an_arbitrary_object(tmp_path):
    from egpt_core.store.research_import import import_research

    marker = tmp_path / "ran"
    d = _research_dir(tmp_path, [{"sample_idx": 0, "question": "q?"}])
    torch.save({"lm_head_weight": torch.randn(16, 8), "x": _Evil(marker)}, tmp_path / "vl_lm_head.pt")
    with pytest.raises(StoreError, match="refused to load"):
        import_research(str(d), str(tmp_path / "store"), lm_head_url=str(tmp_path / "vl_lm_head.pt"))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# credentials never leak
# --------------------------------------------------------------------------------------------------
KEY = "AKIAEGPTRELIAB1L1TY7"
SECRET = "egpt-reliability-S3CRET-7f3a9c0de"


def test_credentials_never_logged_printed_or_stored(fixtures_dir, drafter, target, s3_server, s3_bucket, caplog,
                                                    capfd, monkeypatch):
    import s3fs

    from egpt_core.cli import main as egpt_main
    from egpt_core.extraction import run_extraction
    from egpt_core.fsio import url_to_fs
    from egpt_core.store import StoreReader

    # the credentials come the standard way (environment); storage_options only say where S3 is
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    s3fs.S3FileSystem.clear_instance_cache()  # clients made with the session's credentials must not be reused
    opts = dict(s3_server)
    url = f"{s3_bucket}/stores/creds"
    caplog.set_level(logging.DEBUG)  # root: every library's DEBUG records too (botocore logs request headers)
    summary = run_extraction(_extract_cfg(fixtures_dir, url, storage_options=opts, max_scenes=2),
                             models=(drafter, target))
    r = StoreReader(url, opts)
    assert r.counts["ok"] == 4 and r.verify()["problems"] == []
    # botocore logged its signed request headers: the access key id inside them was scrubbed
    assert any("Credential=***" in rec.getMessage() for rec in caplog.records)
    cli = ["--storage-option", f"endpoint_url={s3_server['endpoint_url']}"]
    assert egpt_main(["inspect", "--json", "--verify", url, *cli]) == 0
    assert egpt_main(["inspect", url, *cli]) == 0
    assert egpt_main(["inspect", "--json", f"{s3_bucket}/no-such-store", *cli]) == 2  # an error path too
    # credentials on a command line are refused (shell history, `ps`), without echoing them
    assert egpt_main(["inspect", url, "--storage-option", f"key={KEY}", "--storage-option", f"secret={SECRET}",
                      *cli]) == 2
    out = capfd.readouterr()
    assert "--storage-option hold credentials (key, secret)" in out.err and "AWS_ACCESS_KEY_ID" in out.err
    start = out.out.index("{\n")  # the first command's JSON object
    inspected = json.loads(out.out[start: out.out.index("\n}\n", start) + 3])
    assert inspected["pairs"]["ok"] == 4 and inspected["verify"]["problems"] == []

    fs, root = url_to_fs(url, opts)
    files = fs.find(root)
    assert any(f.endswith("manifest.json") for f in files) and any(f.endswith(".parquet") for f in files)
    assert len(caplog.records) > 0
    texts = {
        "logs": caplog.text + "\n".join(f"{rec.name} {rec.getMessage()} {rec.args!r}" for rec in caplog.records),
        "stdout": out.out, "stderr": out.err, "summary": repr(summary), "manifest": json.dumps(r.manifest),
    }
    for name, text in texts.items():
        for secret in (KEY, SECRET):
            assert secret not in text, f"{secret[:6]}... appears in {name}"
    for f in files:  # every file of the store, JSON or binary
        blob = fs.cat_file(f)
        for secret in (KEY, SECRET):
            assert secret.encode() not in blob, f"{secret[:6]}... appears in {f}"
