"""Transient storage faults (issue "Reliability", item 2), injected by ``flaky://`` (flaky_fs.py): the
local disk behind an object-store facade that fails a seeded fraction of reads and writes.

* With Prefect retries, the real ``extract`` flow on a ``flaky://`` store with 8 % of storage calls
  failing (also with half of the failing writes landing before the error: lost acks) completes, and
  the store is identical to a fault-free run's: every pair column, bitwise rows, counts, shard
  sha256s, fingerprint, LM head, cached features; no orphan or temporary file. The `evaluate` flow
  reading a flaky copy of the store completes with the fault-free metrics.
* With retries off, the flow fails with the injected fault in its message (no silent success), the
  store still verifies after each failure, and a fault-free rerun completes to the same store.
* Unit level: a fault at every single storage call of ``commit_shard`` (and seeded random bursts,
  with and without lost acks) never leaves a manifest naming a missing or partial shard, and never
  wedges the commit lock (a lock whose release, confirmation or create answer failed is not waited
  for); a transient read of a tensor shard is not reported as a corrupt store (StoreError, which
  the tasks do not retry).

Figures (faults injected, retries used) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import flaky_fs
import pytest
import torch
from store_checks import assert_consistent, assert_same_store, leftovers, snapshot

from egpt_core.config import ExtractConfig
from egpt_core.store import StoreReader, StoreWriter

RATE = 0.08  # of eligible storage calls


@pytest.fixture(autouse=True)
def store_retries(monkeypatch):
    """The tests below let each injected fault reach the store's own logic (commit, lock) and the
    task retries: store-level request retries (egpt_core/store/retrying.py) are off unless a test
    turns them on with ``store_retries(n)``."""
    from egpt_core.store import retrying

    monkeypatch.setattr(retrying, "ATTEMPTS", 1)
    monkeypatch.setattr(retrying, "retried", {})

    def set_attempts(n: int) -> dict:
        monkeypatch.setattr(retrying, "ATTEMPTS", n)
        return retrying.retried

    return set_attempts
N_PAIRS = 12  # fixtures: 4 scenes x 3 questions


def _cfg(fixtures_dir, store: str) -> ExtractConfig:
    from flows.demo import CPU_FP32

    return ExtractConfig(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                         target=str(fixtures_dir / "videollava"), store=store, load=CPU_FP32, max_new_tokens=8,
                         shard_size=3, batch_size=3)


@pytest.fixture
def task_retries(monkeypatch):
    """set(n): every task of the extract flow gets n retries with no delay. features/extract keep
    the product's retry_condition_fn (bad input / config / store errors are still not retried);
    summarize-store has no retries in the product (see the report) and none there by default."""
    from tasks.extract import compute_features, extract_group, summarize_store

    def set_retries(n: int) -> None:
        for t in (compute_features, extract_group, summarize_store):
            monkeypatch.setattr(t, "retries", n)
            monkeypatch.setattr(t, "retry_delay_seconds", [0.0])
            monkeypatch.setattr(t, "retry_jitter_factor", None)

    return set_retries


def _run_counts(flow_state) -> tuple[int, dict[str, int]]:
    """(flow run_count, {task run name: run_count}) read back from the API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.demo import task_states

    run_id = flow_state.state_details.flow_run_id
    task_states(run_id)  # waits until every task run is final
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return flow_run.run_count, {r.name: r.run_count for r in runs}


@pytest.fixture(scope="module")
def baseline_store(prefect_api, fixtures_dir, tmp_path_factory) -> str:
    """A fault-free run of the flow into a plain local store."""
    from flows.extract import extract

    store = str(tmp_path_factory.mktemp("baseline") / "store")
    state = extract(_cfg(fixtures_dir, store), return_state=True)
    assert state.is_completed(), state.message
    return store


@pytest.fixture(scope="module")
def baseline(baseline_store) -> dict:
    snap = snapshot(baseline_store)
    assert snap["counts"] == {"ok": N_PAIRS, "failed": 0, "skipped": 0}
    return snap


@pytest.mark.parametrize("lost_ack", [0.0, 0.5], ids=["fail-before", "half-lost-acks"])
def test_flow_with_retries_completes_identically_under_faults(prefect_api, baseline, fixtures_dir, tmp_path,
                                                              task_retries, lost_ack):
    """8 % of storage calls fail; with half-lost-acks half the failing writes land first."""
    from flows.extract import extract

    task_retries(30)
    url = flaky_fs.url(tmp_path / "store")
    t0 = time.perf_counter()
    with flaky_fs.faults(rate=RATE, seed=2024, lost_ack=lost_ack) as plan:
        # flow retries cover the two store reads in the flow body itself (store_exists); every task
        # retry resumes after the last committed shard
        state = extract.with_options(retries=10, retry_delay_seconds=0)(_cfg(fixtures_dir, url), return_state=True)
    seconds = time.perf_counter() - t0
    assert state.is_completed(), state.message
    flow_runs, task_runs = _run_counts(state)
    task_retries_used = sum(n - 1 for n in task_runs.values())
    print(f"\n[storage faults, retries on] rate {RATE:.0%}, lost acks {lost_ack:.0%}: {plan.summary()}; flow runs {flow_runs}, "
          f"task retries {task_retries_used} {task_runs}; {seconds:.1f}s")
    assert plan.injected >= 5, "the seed must actually exercise the retries"
    assert task_retries_used + flow_runs - 1 >= 1
    assert state.result().counts == {"ok": N_PAIRS, "failed": 0, "skipped": 0}
    got = snapshot(url)
    assert_same_store(got, baseline)
    assert leftovers(url) == []


@pytest.mark.parametrize("lost_ack", [0.0, 0.5], ids=["fail-before", "half-lost-acks"])
def test_store_level_retries_absorb_faults_without_a_task_retry(prefect_api, baseline, fixtures_dir, tmp_path,
                                                                task_retries, store_retries, monkeypatch, lost_ack):
    """The same 8 % faults with store-level request retries on and NO task or flow retries: the run
    completes with the identical store, each task runs once (the models are loaded once), and without
    lost acknowledgements each fault costs exactly one more storage request."""
    import egpt_core.extraction.run as run_mod
    import tasks.extract
    from flows.extract import extract

    task_retries(0)
    # "one more request per fault" compares two runs request for request: the store writes and scene
    # inputs stay in the extraction's thread so both runs make the same calls in the same order (with
    # the background threads, a feature file may or may not be written before its existence check)
    monkeypatch.setattr(run_mod, "BACKGROUND_WRITES", False)
    monkeypatch.setattr(run_mod, "VIDEO_WORKERS", 0)
    loads = []
    real_load = tasks.extract.run_extraction

    def counting(cfg, *args, **kwargs):
        loads.append(cfg.group_index)
        return real_load(cfg, *args, **kwargs)

    monkeypatch.setattr(tasks.extract, "run_extraction", counting)
    retried = store_retries(4)
    url = flaky_fs.url(tmp_path / "clean" / "store")
    with flaky_fs.faults(rate=0.0) as clean:
        assert extract(_cfg(fixtures_dir, url), return_state=True).is_completed()
    loads.clear()
    url = flaky_fs.url(tmp_path / "store")
    with flaky_fs.faults(rate=RATE, seed=2024, lost_ack=lost_ack) as plan:
        state = extract(_cfg(fixtures_dir, url), return_state=True)
    assert state.is_completed(), state.message
    flow_runs, task_runs = _run_counts(state)
    assert flow_runs == 1 and all(n == 1 for n in task_runs.values()), task_runs
    assert loads == [None]  # one extraction task, its models loaded once
    assert plan.injected >= 3, plan.summary()
    if not lost_ack:  # every fault absorbed by one retry of the request
        assert sum(retried.values()) == plan.injected, (plan.log, retried)
        assert sum(plan.calls.values()) == sum(clean.calls.values()) + plan.injected
    else:  # a lost answer on the lock object may instead be absorbed by the lock's own protocol
        on_lock = sum(1 for _, path in plan.log if path.endswith("/_lock"))
        assert plan.injected - on_lock <= sum(retried.values()) <= plan.injected, (plan.log, retried)
    print(f"\n[storage faults, store-level retries, no task retries] lost acks {lost_ack:.0%}: {plan.summary()}; "
          f"requests {sum(clean.calls.values())} fault-free vs {sum(plan.calls.values())}; retried {retried}; "
          f"task runs {task_runs}")
    assert_same_store(snapshot(url), baseline)
    assert leftovers(url) == []


#: (label, fault plan, pairs committed when the run stops or None when it depends on the seed)
NO_RETRY_CASES = [
    ("random 3%, seed 11", {"rate": 0.03, "seed": 11}, None),
    ("random 3%, seed 14", {"rate": 0.03, "seed": 14}, None),
    ("2nd shard's tensors PUT", {"ops": {"pipe_file"}, "match": "/tensors/", "fail_calls": {2}}, 3),
    ("2nd shard's pairs PUT", {"ops": {"pipe_file"}, "match": "/pairs/", "fail_calls": {2}}, 3),
    # manifest PUTs: store creation, LM head, shard 1, shard 2, shard 3
    ("manifest PUT naming the 3rd shard", {"ops": {"pipe_file"}, "match": "manifest.json", "fail_calls": {5}}, 6),
]


@pytest.mark.parametrize(("label", "plan_args", "committed"), NO_RETRY_CASES, ids=[c[0] for c in NO_RETRY_CASES])
def test_without_retries_a_fault_fails_the_run_and_the_store_stays_consistent(prefect_api, baseline, fixtures_dir,
                                                                              tmp_path, task_retries, label,
                                                                              plan_args, committed, monkeypatch):
    import egpt_core.extraction.run as run_mod
    from flows.extract import extract

    task_retries(0)
    if "seed" in plan_args:  # one seeded stream serves every thread's calls: the seeded cases meet the same
        # calls in the same order only with the store writes and scene inputs in the extraction's thread
        monkeypatch.setattr(run_mod, "BACKGROUND_WRITES", False)
        monkeypatch.setattr(run_mod, "VIDEO_WORKERS", 0)
    url = flaky_fs.url(tmp_path / "store")
    cfg = _cfg(fixtures_dir, url)
    with flaky_fs.faults(**plan_args) as plan:
        state = extract(cfg, return_state=True)
    assert plan.injected >= 1
    assert state.is_failed(), f"{label}: a run with an injected fault and no retries ended {state.name}"
    fatal = re.search(rf"{flaky_fs.MESSAGE} #(\d+) \((\w+) (\S+)\)", state.message or "")
    assert fatal, f"the failed run's message does not name the injected fault: {state.message!r}"
    _, task_runs = _run_counts(state)
    assert all(n == 1 for n in task_runs.values()), task_runs
    n_committed = 0
    if (tmp_path / "store" / "manifest.json").exists():
        n_committed = sum(assert_consistent(url)["counts"].values())  # verifies; shards whole; no duplicates
    if committed is not None:
        assert n_committed == committed
    print(f"\n[storage faults, retries off] {label}: run Failed at fault #{fatal[1]} ({fatal[2]} "
          f"{fatal[3].rsplit('/store/', 1)[-1]}), {plan.injected} injected, {n_committed} of {N_PAIRS} pairs "
          "committed, store verified")

    state = extract(cfg, return_state=True)  # faults gone: a plain rerun resumes and completes
    assert state.is_completed(), state.message
    assert_same_store(snapshot(url), baseline)
    assert leftovers(url) == []


def _eval_summary(out: str) -> dict:
    doc = json.loads((Path(out) / "metrics.json").read_text())
    return {"summary": doc["summary"], "counts": doc["counts"]}


def test_evaluate_flow_with_retries_reads_a_flaky_store(prefect_api, baseline_store, tmp_path, monkeypatch):
    """Stage 4 reads whole shards (cat_file), the LM head and pairs tables from a flaky:// copy of the
    baseline store: with retries it completes with the metrics of a fault-free evaluation."""
    from egpt_core.config import EvalConfig
    from flows.evaluate import evaluate
    from tasks.evaluate import evaluate_task

    monkeypatch.setattr(evaluate_task, "retries", 30)
    monkeypatch.setattr(evaluate_task, "retry_delay_seconds", [0.0])
    monkeypatch.setattr(evaluate_task, "retry_jitter_factor", None)
    copy = tmp_path / "store"
    shutil.copytree(baseline_store, copy)
    want = evaluate(EvalConfig(store=baseline_store, out=str(tmp_path / "eval-local"), identity=True, device="cpu"),
                    return_state=True)
    assert want.is_completed(), want.message
    with flaky_fs.faults(rate=RATE, seed=7, ops=flaky_fs.READ_OPS, match="/store/") as plan:
        got = evaluate(EvalConfig(store=flaky_fs.url(copy), out=str(tmp_path / "eval-flaky"), identity=True,
                                  device="cpu"), return_state=True)
    assert got.is_completed(), got.message
    _, task_runs = _run_counts(got)
    print(f"\n[storage faults, evaluate] rate {RATE:.0%} of store reads: {plan.summary()}; task runs {task_runs}")
    assert plan.injected >= 1
    assert _eval_summary(str(tmp_path / "eval-flaky")) == _eval_summary(str(tmp_path / "eval-local"))


# --------------------------------------------------------------------------------------------------
# unit level: commit_shard under faults
# --------------------------------------------------------------------------------------------------
D = 8
META = {"hidden_size": D, "dtype": "float16"}


def _shard(first: int, n: int = 3) -> tuple[list[dict], list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(first)
    recs, ds, ts = [], [], []
    for i in range(first, first + n):
        length = 2 + i % 3
        recs.append({"pair_id": f"pair-{i:03d}", "scene_id": f"scene-{i // 3}", "question_idx": i % 3, "length": length})
        ds.append(torch.randn(length, D, generator=g))
        ts.append(torch.randn(length, D, generator=g))
    return recs, ds, ts


SHARDS = [_shard(0), _shard(3), _shard(6)]


def _writer(url: str) -> StoreWriter:
    return StoreWriter(url, META, lock_timeout_s=5)  # a wedged lock fails in 5 s, not after 600 s


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    url = flaky_fs.url(tmp_path_factory.mktemp("ref") / "store")
    flaky_fs.configure()
    w = _writer(url)
    for s in SHARDS:
        w.commit_shard(*s)
    return snapshot(url)


def _commit_calls() -> int:
    """Storage calls one commit_shard makes on an existing store (the fault points to enumerate)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        url = flaky_fs.url(f"{d}/store")
        flaky_fs.configure()
        w = _writer(url)
        w.commit_shard(*SHARDS[0])
        plan = flaky_fs.configure()
        w.commit_shard(*SHARDS[1])
        return sum(plan.calls.values())


def test_a_fault_at_any_storage_call_of_a_commit_never_exposes_a_partial_shard(tmp_path, reference):
    n_calls = _commit_calls()
    assert n_calls >= 8
    outcomes = {"raised": 0, "absorbed": 0}
    for k in range(1, n_calls + 1):
        url = flaky_fs.url(tmp_path / f"store-{k}")
        flaky_fs.configure()
        w = _writer(url)
        w.commit_shard(*SHARDS[0])
        with flaky_fs.faults(fail_calls={k}) as plan:
            try:
                w.commit_shard(*SHARDS[1])
                outcomes["absorbed"] += 1  # lock bookkeeping retries a transient error itself
            except flaky_fs.InjectedFault:
                outcomes["raised"] += 1
        assert plan.injected == 1, k
        m = assert_consistent(url)  # the manifest names whole shards only: shard 1, maybe shard 2
        assert len(m["shards"]) in (1, 2), k
        t0 = time.monotonic()
        for s in SHARDS[1:]:  # the same writer (same process) goes on: the lock is not wedged
            w.commit_shard(*s)
        assert time.monotonic() - t0 < 5, f"fault at call {k}: the next commit waited for the lock"
        assert_same_store(snapshot(url), reference)
    print(f"\n[commit_shard] a fault at each of its {n_calls} storage calls: {outcomes['raised']} raised, "
          f"{outcomes['absorbed']} absorbed; every store verified and equals the fault-free store")


@pytest.mark.parametrize("lost_ack", [0.0, 0.5], ids=["fail-before", "half-lost-acks"])
@pytest.mark.parametrize("seed", range(8))
def test_random_fault_bursts_during_commits(tmp_path, reference, seed, lost_ack):
    """Seeded bursts (10 % of calls; with half-lost-acks half the failing writes land first)."""
    url = flaky_fs.url(tmp_path / "store")
    attempts = 0
    with flaky_fs.faults(rate=0.1, seed=seed, max_consecutive=3, lost_ack=lost_ack) as plan:
        for s in SHARDS:
            while True:
                attempts += 1
                assert attempts < 300
                try:
                    _writer(url).commit_shard(*s)  # a new writer per attempt, like a task retry
                    break
                except flaky_fs.InjectedFault:
                    pass
                finally:
                    rate, plan.rate = plan.rate, 0.0
                    if (tmp_path / "store" / "manifest.json").exists():
                        assert_consistent(url)
                    plan.rate = rate
    assert plan.injected >= 1
    print(f"\n[commit bursts seed {seed}, lost acks {lost_ack:.0%}] {plan.summary()}; {attempts} commit attempts for {len(SHARDS)} shards")
    assert_same_store(snapshot(url), reference)
    assert leftovers(url) == []


@pytest.mark.parametrize("op", ["rm_file", "cat_file"])
def test_a_lock_that_cannot_be_released_or_confirmed_is_not_waited_for(tmp_path, reference, op):
    """Four failures in a row on the lock object (past the lock's own retries): releasing (rm_file)
    or confirming a fresh lock (cat_file) fails; the next commit in this process breaks the
    abandoned lock at once instead of waiting stale_s (600 s) for itself."""
    url = flaky_fs.url(tmp_path / "store")
    flaky_fs.configure()
    w = _writer(url)
    w.commit_shard(*SHARDS[0])
    with flaky_fs.faults(rate=1.0, ops={op}, match="/_lock", max_consecutive=4) as plan:
        try:
            w.commit_shard(*SHARDS[1])
        except flaky_fs.InjectedFault:
            assert op == "cat_file"
    assert plan.injected == 4
    assert (tmp_path / "store" / "_lock").exists()  # left behind
    assert_consistent(url)
    t0 = time.monotonic()
    for s in SHARDS[1:]:
        w.commit_shard(*s)
    assert time.monotonic() - t0 < 2
    assert_same_store(snapshot(url), reference)
    assert leftovers(url) == []


def test_a_lock_whose_create_answer_was_lost_is_ours(tmp_path, reference):
    """The conditional PUT creating the lock lands but its answer is lost: the writer sees an error,
    finds the lock present, and must recognise its own token rather than wait stale_s for itself."""
    url = flaky_fs.url(tmp_path / "store")
    flaky_fs.configure()
    w = _writer(url)
    w.commit_shard(*SHARDS[0])
    t0 = time.monotonic()
    with flaky_fs.faults(ops={"pipe_file"}, match="/_lock", fail_calls={1}, lost_ack=1.0) as plan:
        w.commit_shard(*SHARDS[1])
    assert plan.injected == 1 and time.monotonic() - t0 < 2
    w.commit_shard(*SHARDS[2])
    assert_same_store(snapshot(url), reference)
    assert leftovers(url) == []


def test_a_transient_read_error_is_not_reported_as_a_corrupt_shard(tmp_path):
    """Whole-shard reads (training, evaluation) raise the transient error itself, which the tasks'
    retry_condition_fn retries; only an unreadable file is a StoreError (not retried)."""
    from egpt_core.errors import StoreError

    url = flaky_fs.url(tmp_path / "store")
    flaky_fs.configure()
    _writer(url).commit_shard(*SHARDS[0])
    reader = StoreReader(url)
    with flaky_fs.faults(ops={"cat_file"}, match="/tensors/", fail_calls={1}):
        with pytest.raises(flaky_fs.InjectedFault):
            list(reader.iter_shards())
    assert len(list(reader.iter_shards())) == 1  # the retry reads it
    [tensors] = (tmp_path / "store" / "tensors").iterdir()
    tensors.write_bytes(b"\xff" * 64)
    with pytest.raises(StoreError, match="is not readable"):
        list(StoreReader(url).iter_shards())


def test_store_level_retries_read_through_transient_faults(tmp_path, store_retries):
    """The same transient shard read as above, with store-level retries on: the read succeeds with one
    more request; a fault that outlasts the attempts still propagates as itself (the task retries it)."""
    url = flaky_fs.url(tmp_path / "store")
    flaky_fs.configure()
    _writer(url).commit_shard(*SHARDS[0])
    retried = store_retries(4)
    reader = StoreReader(url)
    with flaky_fs.faults(ops={"cat_file"}, match="/tensors/", fail_calls={1}) as plan:
        assert len(list(reader.iter_shards())) == 1
    assert plan.injected == 1 and retried == {"GET": 1} and plan.calls["cat_file"] == 2
    with flaky_fs.faults(rate=1.0, ops={"cat_file"}, match="/tensors/", max_consecutive=10) as plan:
        with pytest.raises(flaky_fs.InjectedFault):
            list(StoreReader(url).iter_shards())
    assert plan.injected == 4  # the attempts, then the error itself


def test_flaky_faults_are_transient_and_seeded(tmp_path):
    path = tmp_path / "obj"
    url = flaky_fs.url(path)
    fs, p = flaky_fs.FlakyFileSystem(), flaky_fs.FlakyFileSystem._strip_protocol(url)
    fs.pipe_file(p, b"x")
    logs = []
    for _ in range(2):
        with flaky_fs.faults(rate=0.5, seed=5) as plan:
            for _ in range(200):
                for _attempt in range(3):  # never more than max_consecutive=2 failures in a row
                    try:
                        assert fs.cat_file(p) == b"x"
                        break
                    except flaky_fs.InjectedFault as exc:
                        assert isinstance(exc, ConnectionError) and not isinstance(exc, FileNotFoundError)
                else:
                    raise AssertionError("a read failed three times in a row")
        logs.append(list(plan.log))
    assert logs[0] == logs[1]  # seeded
    assert 0.35 < plan.injected / sum(plan.calls.values()) < 0.5  # the rate, less the capped streaks
    with pytest.raises(FileExistsError):
        fs.pipe_file(p, b"y", mode="create")  # the lock's create-if-absent
    assert fs.cat_file(p) == b"x"
