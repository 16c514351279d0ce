"""What a pair's inputs are, checked before any model work (DESIGN.md §3.5, §6).

* Content fingerprints of each pair's inputs (event file or images, video, question). Every record
  carries one (``input_fingerprint``); a committed pair whose inputs now fingerprint differently is
  refused, so a different dataset with the same scene ids (or files changed since) is never mixed
  into a store, and never silently reported as "0 pending".
* Questions the prompt templates cannot carry (the models' own placeholders or control tokens), and
  prompts that do not fit the models' context: recorded per pair as ``failed`` with the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TypeVar

from egpt_core.config import EventRenderConfig
from egpt_core.data import Pair, Scene
from egpt_core.errors import BadInputError, ConfigError
from egpt_core.extraction.features import scene_input_fingerprint
from egpt_core.fingerprint import file_fingerprint

T = TypeVar("T")


def once_per_scene(cache: dict, scene_id: str, compute: Callable[[], T]) -> T:
    """``compute()`` once per scene (kept in ``cache``); a BadInputError is remembered too and re-raised
    for each pair of that scene."""
    if scene_id not in cache:
        try:
            cache[scene_id] = compute()
        except BadInputError as exc:
            cache[scene_id] = exc
    if isinstance(cache[scene_id], BadInputError):
        raise cache[scene_id]
    return cache[scene_id]


#: components of an input fingerprint, in order (``event=<hex>,video=<hex>,question=<hex>``)
COMPONENTS = ("event", "video", "question")
MISSING = "missing"
WHAT = {"event": "event input", "video": "video", "question": "question text"}


def _component(compute) -> str:
    try:
        return compute()
    except (BadInputError, FileNotFoundError):
        return MISSING
    except (IsADirectoryError, PermissionError):
        return "unreadable"  # a transient storage error propagates (the task retries it)


def scene_fingerprints(scene: Scene, render: EventRenderConfig, storage_options: dict | None) -> dict[str, str]:
    """{"event": ..., "video": ...} content fingerprints of a scene's input files ('missing' if absent)."""
    return {
        "event": _component(lambda: scene_input_fingerprint(scene, render, storage_options)),
        "video": _component(lambda: file_fingerprint(scene.video_path, storage_options))
        if scene.video_path else MISSING,
    }


def input_fingerprints(pairs: Iterable[Pair], render: EventRenderConfig,
                       storage_options: dict | None = None) -> dict[str, str]:
    """pair_id -> ``event=<fp>,video=<fp>,question=<fp>`` (files hashed once per scene)."""
    by_scene: dict[str, dict[str, str]] = {}
    out = {}
    for p in pairs:
        sid = p.scene.scene_id
        if sid not in by_scene:
            by_scene[sid] = scene_fingerprints(p.scene, render, storage_options)
        parts = dict(by_scene[sid], question=hashlib.sha256(p.question.encode("utf-8")).hexdigest()[:16])
        out[p.pair_id] = ",".join(f"{k}={parts[k]}" for k in COMPONENTS)
    return out


def parts(fp: str | None) -> dict[str, str]:
    """The components of an input fingerprint ({} for None or an unparseable value)."""
    out = {}
    for item in (fp or "").split(","):
        k, _, v = item.partition("=")
        if k in COMPONENTS and v:
            out[k] = v
    return out


def changed(old: str | None, new: str, only: tuple[str, ...] = COMPONENTS) -> list[str]:
    """Components (of ``only``) that differ between two input fingerprints."""
    a, b = parts(old), parts(new)
    return [k for k in only if a.get(k) != b.get(k)]


def _file_of(pair: Pair, component: str, render: EventRenderConfig) -> str:
    s = pair.scene
    if component == "event":
        if render.source == "events":
            return s.event_path or "(no event file)"
        return (list(s.event_images_1f or [])[:1] or list(s.event_images or [])[:1] or ["(no event images)"])[0]
    if component == "video":
        return s.video_path or "(no video)"
    return f"question {pair.question_idx}"


def check_committed_inputs(pairs: list[Pair], planned: dict[str, str], committed: dict[str, tuple[str, str | None]],
                           *, store: str, dataset: str, render: EventRenderConfig,
                           only: tuple[str, ...] = COMPONENTS, source: str | None = None) -> int:
    """Refuse (ConfigError) when a committed ``ok`` pair's inputs fingerprint differently now.

    ``committed``: pair_id -> (status, input fingerprint or None). Pairs committed without a
    fingerprint (stores written before it existed) cannot be checked; their number is returned.
    ``source``: the store is a retf source (its pairs are re-used, not extended).
    """
    bad, unchecked = [], 0
    for p in pairs:
        status, old = committed.get(p.pair_id, (None, None))
        if status != "ok":
            continue
        if not old:
            unchecked += 1
            continue
        diff = changed(old, planned[p.pair_id], only)
        if diff:
            bad.append((p, diff))
    if bad:
        p, diff = bad[0]
        what = " and ".join(f"its {WHAT[c]} ({_file_of(p, c, render)})" for c in diff)
        role = (f"retf source store {source} holds" if source else f"store {store} already holds")
        fix = ("Re-extract from the dataset the source store was extracted from, or extract this dataset into a "
               "new store first." if source else
               "A committed pair is never re-extracted in place: extract into a new store URL (or restore the "
               "original files).")
        raise ConfigError(
            f"{role} {len(bad)} pair(s) of dataset {dataset} extracted from different inputs: e.g. pair "
            f"{p.pair_id!r}: {what} changed since it was extracted. This dataset is not the one the store was "
            f"extracted from, or its files changed. {fix}"
        )
    return unchecked


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------
def reserved_strings(drafter, target) -> list[str]:
    """Strings a question must not contain: the prompt templates' placeholders and every special/added
    token of the tokenizers (they would be parsed as control tokens, not as the user's text)."""
    from egpt_core.models.eventgpt import EVENT_PLACEHOLDER

    out = {EVENT_PLACEHOLDER, "<image>", "<video>"}
    for model in (drafter, target):
        if model is None:
            continue
        proc = getattr(model, "processor", None)
        for attr in ("image_token", "video_token"):
            tok = getattr(proc, attr, None)
            if isinstance(tok, str) and tok:
                out.add(tok)
        tok = model.tokenizer
        out.update(t for t in getattr(tok, "all_special_tokens", []) if isinstance(t, str) and t)
        out.update(t for t in (getattr(tok, "get_added_vocab", dict)() or {}) if isinstance(t, str) and t)
    return sorted(out, key=lambda s: (-len(s), s))


def question_problem(question: str, reserved: list[str]) -> str | None:
    """Why ``question`` cannot be put into the prompts (None when it can)."""
    hits = [s for s in reserved if s in question]
    if hits:
        return (f"question contains {', '.join(repr(h) for h in hits[:3])}: a placeholder or control token of the "
                "models' prompt format, not text; remove it from the question")
    return None


def context_size(model) -> int | None:
    """max_position_embeddings of a drafter (Llama config) or target (its text config)."""
    cfg = getattr(model.model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def context_problem(side: str, prompt_positions: int, new_tokens: int, limit: int | None) -> str | None:
    """Why a prompt of ``prompt_positions`` model positions plus ``new_tokens`` does not fit ``limit``."""
    if limit is None or prompt_positions + new_tokens <= limit:
        return None
    return (f"{side} prompt of {prompt_positions} positions + {new_tokens} response tokens exceeds the {side}'s "
            f"context (max_position_embeddings {limit}); shorten the question")
