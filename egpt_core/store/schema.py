"""The store's on-disk contract as pydantic models (CONTRACTS.md "Store schema").

``manifest.json`` is validated through :class:`StoreManifest` by
:func:`egpt_core.store.manifest.parse_manifest`: every field a reader relies on has one name and one
type here, so no reader guesses a key. Unknown fields are kept (``extra="allow"``): a store written
by a newer minor version, or fields a writer adds later, still open. The models describe; they never
rewrite a manifest (the store fingerprint hashes ``meta`` exactly as written).

Pairs tables hold one :class:`PairRecord` per pair (the Parquet schema is
:data:`egpt_core.store.manifest.PAIR_SCHEMA`); extraction builds records with it and the writer
normalises what it is given through it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: element types a store's hidden states may have (``meta.dtype``, ``lm_head.dtype``); the writer
#: decides which it can write (``manifest.canonical_dtype``), the schema which a reader may meet.
STORE_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")
StoreDtype = Literal["bfloat16", "float16", "float32", "float8_e4m3fn"]

Count = Annotated[int, Field(ge=0, strict=True)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Open(BaseModel):
    """Fields readers rely on are validated; anything else is kept as written."""

    model_config = ConfigDict(extra="allow", frozen=True)


class ModelRef(_Open):
    """One model a store's rows came from (``meta.models.drafter`` / ``.target``)."""

    path: str | None = None
    fingerprint: str | None = None


class StoreMeta(_Open):
    """``manifest.meta``: what defines a store (DEFINING_FIELDS) and how it was made.

    Only ``hidden_size`` and ``dtype`` are required; stores written before the other fields existed
    lack them (None here).
    """

    hidden_size: Annotated[int, Field(gt=0, strict=True)]
    dtype: StoreDtype
    mode: str | None = None
    position_convention: str | None = None
    compat_key: str | None = None
    compat_settings: dict[str, Any] | None = None
    #: side ('drafter' | 'target') -> model fingerprint; the defining record of the model pair
    model_fingerprints: dict[str, str] | None = None
    config_fingerprint: str | None = None
    #: side -> what the writer recorded of that model; extraction writes :class:`ModelRef` objects
    #: (path + fingerprint), other writers (imports, tests) may record any JSON value
    models: dict[str, ModelRef | Any] | None = None
    #: extraction settings (ExtractConfig): generation, event rendering, video frames
    generation: dict[str, Any] | None = None
    events: dict[str, Any] | None = None
    n_video_frames: int | None = None
    frame_sampling: str | None = None
    #: the dataset the pairs came from (canonical URL) and, for retf stores, the source store
    dataset: str | None = None
    #: research imports: a fingerprint of the imported chunks (extraction's is manifest.dataset_fingerprint)
    dataset_fingerprint: str | None = None
    source_store: str | None = None
    notes: Any = None

    def model_fingerprint(self, side: str) -> str | None:
        """The fingerprint of the ``side`` model ('drafter' | 'target'): ``model_fingerprints`` when the
        store records it, else ``models.<side>.fingerprint`` (stores written before it). The one
        accessor for it: readers never look the keys up themselves."""
        if self.model_fingerprints and self.model_fingerprints.get(side):
            return self.model_fingerprints[side]
        ref = (self.models or {}).get(side)
        return ref.fingerprint if isinstance(ref, ModelRef) else None


class ShardFiles(_Open):
    """Paths of a shard's two files, relative to the store root (checked to stay inside it)."""

    pairs: str
    tensors: str


class ShardDigests(_Open):
    """sha256 of a shard's files; ``header`` (of the safetensors header) is absent in old stores."""

    pairs: Sha256
    tensors: Sha256
    header: Sha256 | None = None


class ShardEntry(_Open):
    """One committed shard as the manifest records it (``manifest.shards[i]``)."""

    name: str
    pairs: Count
    rows: Count
    tokens: Count
    bytes: Count
    files: ShardFiles
    sha256: ShardDigests
    counts: dict[str, Count]
    file_bytes: dict[str, Count] | None = None
    reasons: dict[str, Count] = Field(default_factory=dict)
    meta_fingerprint: str = ""
    #: XOR-sha256 of (pair_id, input_fingerprint) over the shard's pairs; None when one is unknown
    inputs_digest: str | None = None


class VocabInfo(_Open):
    """``lm_head.vocab``: the target tokenizer's tokens in id order, stored beside the LM head."""

    path: str
    size: Count
    sha256: Sha256


class LmHeadInfo(_Open):
    """``manifest.lm_head``: the target's LM head [V, D] stored in the store."""

    path: str
    shape: Annotated[list[Count], Field(min_length=2, max_length=2)]
    dtype: StoreDtype
    target_fingerprint: str
    bytes: Count
    sha256: Sha256
    vocab: VocabInfo | None = None


class Totals(_Open):
    pairs: Count
    rows: Count
    tokens: Count
    bytes: Count


class StoreManifest(_Open):
    """``manifest.json``, the commit point of a store (DESIGN.md §3.4).

    ``fingerprint`` is the store fingerprint (changes with meta, committed shards, LM head);
    ``dataset_fingerprint`` the combined input fingerprint of the pairs (None when unknown).
    """

    format: Literal["egpt-hidden-state-store"]
    schema_version: Annotated[int, Field(ge=1, strict=True)]
    fingerprint: str
    meta: StoreMeta
    shards: list[ShardEntry]
    counts: dict[str, Count]
    totals: Totals
    reasons: dict[str, Count] = Field(default_factory=dict)
    lm_head: LmHeadInfo | None = None
    dataset_fingerprint: str | None = None
    created: str | None = None
    updated: str | None = None


class PairRecord(BaseModel):
    """One pair's row of a pairs table (without ``row_offset``/``shard``, which the writer assigns).

    ``status`` 'ok' pairs have ``length`` >= 1 rows of hidden states; 'failed'/'skipped' ones have a
    ``reason`` and no rows. Token id lists are int32 on disk.
    """

    model_config = ConfigDict(extra="forbid")

    pair_id: Annotated[str, Field(min_length=1)]
    scene_id: str = ""
    question_idx: int = -1
    question: str = ""
    status: Literal["ok", "failed", "skipped"] = "ok"
    reason: str | None = None
    drafter_prompt_ids: list[int] = Field(default_factory=list)
    target_prompt_ids: list[int] = Field(default_factory=list)
    drafter_response_ids: list[int] = Field(default_factory=list)
    target_response_ids: list[int] = Field(default_factory=list)
    drafter_text: str = ""
    target_text: str = ""
    length: Annotated[int, Field(ge=0)] = 0
    #: content fingerprint of the pair's inputs; None for imports / synthetic pairs / old stores
    input_fingerprint: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _lenient_scalars(cls, data: Any) -> Any:
        """Text fields accept None / non-strings (stored as text), ``question_idx`` None means -1,
        an empty ``input_fingerprint`` means none."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key in ("scene_id", "question", "drafter_text", "target_text"):
            if key in out:
                out[key] = str(out[key] or "")
        if out.get("question_idx", 0) is None:
            out["question_idx"] = -1
        if "length" in out and out["length"] is None:
            out["length"] = 0
        if out.get("reason") is not None:
            out["reason"] = str(out["reason"])
        if "input_fingerprint" in out:
            out["input_fingerprint"] = str(out["input_fingerprint"]) if out["input_fingerprint"] else None
        return out

    @model_validator(mode="after")
    def _reason_for_non_ok(self) -> PairRecord:
        if self.status != "ok" and not self.reason:
            self.reason = "unspecified"
        return self

    @field_validator("drafter_prompt_ids", "target_prompt_ids", "drafter_response_ids", "target_response_ids",
                     mode="before")
    @classmethod
    def _ids_to_list(cls, v: Any) -> Any:
        if v is None:
            return []
        return v.tolist() if hasattr(v, "tolist") else v

    @field_validator("drafter_prompt_ids", "target_prompt_ids", "drafter_response_ids", "target_response_ids")
    @classmethod
    def _int32(cls, v: list[int]) -> list[int]:
        if v and (min(v) < -(2**31) or max(v) > 2**31 - 1):
            raise ValueError("holds ids outside int32")
        return v

    def to_row(self) -> dict[str, Any]:
        """The record as the writer's ``commit_shard`` takes it (a plain dict)."""
        return self.model_dump()


def describe_error(exc: ValidationError, root: dict | None = None) -> str:
    """One line per problem of a pydantic error: ``field.path: message (got value)``; a shard is named
    by its name (``shards[<name>]``) when ``root`` is the manifest being validated."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = list(err.get("loc", ()))
        words = []
        for i, item in enumerate(loc):
            if isinstance(item, int):
                name = None
                if root is not None and loc[:i] == ["shards"]:
                    shards = root.get("shards")
                    if isinstance(shards, list) and item < len(shards) and isinstance(shards[item], dict):
                        name = shards[item].get("name")
                words.append(f"[{name!r}]" if isinstance(name, str) else f"[{item}]")
            else:
                words.append(("." if words else "") + str(item))
        where = "".join(words) or "(top level)"
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) or err.get("type") == "missing" else f" (got {got!r:.80})"
        parts.append(f"{where}: {err.get('msg', 'invalid')}{shown}")
    return "; ".join(parts)
