"""Cache keys keyed on fingerprints of what a task reads, plus a stage version (DESIGN.md §3.5).

Never `INPUTS` alone (two tasks with equal arguments would share a key), never tensors, never
storage options: a key is ``<stage>-<hash>`` of the stage's version and a small JSON document of
fingerprints (dataset files, checkpoints, store manifests) and the config's ``model_dump`` without
``storage_options``. Bump a stage's entry in STAGE_VERSIONS when its task changes what it writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy

from egpt_core.adapters.checkpoint import configured_weights
from egpt_core.config import ExtractConfig
from egpt_core.data.dataset import MANIFEST_NAME, questions_url
from egpt_core.errors import EgptError
from egpt_core.evaluation.evaluate import EVAL_VERSION
from egpt_core.extraction.features import FEATURES_VERSION
from egpt_core.extraction.run import EXTRACTION_VERSION, needs_drafter, needs_target
from egpt_core.fingerprint import dir_fingerprint, file_fingerprint, hash_json
from egpt_core.fsio import Location, join
from egpt_core.models.loading import checkpoint_fingerprint
from egpt_core.speculative.run import SPECULATE_VERSION
from egpt_core.store import StoreReader
from egpt_core.store.manifest import load_manifest
from egpt_core.store.retrying import with_retries

log = logging.getLogger(__name__)

#: Bump the task part when a task's behaviour changes; egpt_core's own versions are appended.
STAGE_VERSIONS = {
    "features": f"tasks-1/{FEATURES_VERSION}",
    "extract": f"tasks-1/{EXTRACTION_VERSION}",
    "train-adapter": "tasks-1",
    "train-lora": "tasks-1",
    "export-drafter": "tasks-1",
    "evaluate": f"tasks-1/{EVAL_VERSION}",
    "speculate": f"tasks-1/{SPECULATE_VERSION}",
}

#: what a cached result records beyond what its config computes (``semantic_settings()``): where its
#: files are, and how many epochs a run went (an extended run is the same run, not the same result)
RESULT_FIELDS = frozenset({"out", "epochs"})


@dataclass(kw_only=True)
class FingerprintPolicy(CachePolicy):
    """Key = stage + STAGE_VERSIONS[stage] + ``material(inputs)`` (fingerprints, config dump).

    If the material cannot be computed (a file is missing, a store is unreadable) the call is not
    cached (``None``) and the task itself reports the problem.

    ``outputs(inputs)`` names the files a cached result refers to. A cached result is reused only
    while they exist: when they are gone (someone deleted an evaluation) the key moves on to the next
    generation (``<key>-g1``, ``-g2``, ...), so the task runs again and the new result is what later
    runs find. Outputs are derived from the inputs, so the check costs one ``exists`` per file.
    """

    stage: str = ""
    material: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    outputs: Callable[[dict[str, Any]], list[Location]] | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        try:
            material = self.material(inputs) if self.material else {}
        except (OSError, ValueError, EgptError) as exc:
            log.warning("%s: not cached, cannot fingerprint its inputs (%s)", self.stage, exc)
            return None
        key = f"{self.stage}-{hash_json({'stage': self.stage, 'version': STAGE_VERSIONS[self.stage], **material})}"
        if self.outputs is None or task_ctx is None or getattr(task_ctx, "result_store", None) is None:
            return key
        return self._generation(key, task_ctx.result_store, self.outputs(inputs))

    def _generation(self, key: str, store, outputs: list[Location]) -> str:
        """The newest generation of ``key`` holding a cached result, or the next one when that
        result's output files are gone."""
        def name(g: int) -> str:
            return key if g == 0 else f"{key}-g{g}"

        g = 0
        while store.exists(name(g + 1)):
            g += 1
        if not store.exists(name(g)):
            return name(g)  # nothing cached yet
        missing = [out.url for out in outputs if not _exists(out)]
        if not missing:
            return name(g)
        log.warning("%s: the cached result's outputs are gone (%s); recomputing", self.stage, ", ".join(missing))
        return name(g + 1)


def _exists(where: Location) -> bool:
    try:
        return with_retries(where.fs).exists(where.path)
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# fingerprints of inputs
# --------------------------------------------------------------------------------------------------
def config_material(cfg) -> dict[str, Any]:
    """A config's settings as key material: what it computes (its ``NON_SEMANTIC`` fields, storage options
    always among them, left out) plus the ``RESULT_FIELDS`` it has."""
    recorded = (RESULT_FIELDS & set(type(cfg).model_fields)) - {"storage_options"}
    return {**cfg.semantic_settings(), **cfg.model_dump(mode="json", include=recorded)}


def dataset_fingerprint(cfg: ExtractConfig) -> str:
    """The dataset's manifest + questions files (which pairs exist; per-file content is the store's job)."""
    manifest = cfg.dataset if str(cfg.dataset).endswith(".json") else join(cfg.dataset, MANIFEST_NAME)
    questions = questions_url(cfg.dataset, cfg.questions)  # as plan_pairs reads it
    return hash_json([file_fingerprint(u, cfg.storage_options) for u in (manifest, questions)])


def model_fingerprint(where: str | Location, storage_options: dict | None = None) -> str:
    """A checkpoint directory's fingerprint (local: config + weights + tokenizer files); ``where`` a
    Location, or a URL with its ``storage_options``."""
    src = Location.of(where, storage_options)
    if src.is_local:
        return checkpoint_fingerprint(src.url.removeprefix("file://"))
    return dir_fingerprint(src)


def store_fingerprint(where: str | Location, storage_options: dict | None = None) -> str:
    """A committed store's manifest fingerprint (changes with every committed shard)."""
    return StoreReader(where, storage_options).fingerprint


def store_created(where: str | Location, storage_options: dict | None = None) -> str | None:
    """When the store at ``where`` (a Location, or a URL with its ``storage_options``) was created (its manifest's ``created``); None while it does not exist.

    An extraction's output is the store itself, so its cache entry is valid only for the store instance
    it wrote into: a deleted and recreated store gets a new key and is re-extracted. The flow bypasses
    the cache when the store is missing, but a dispatched shard group starts after its parent created
    the store (event features), so without this the group would be served from the cache into the new,
    empty store."""
    store = Location.of(where, storage_options)
    manifest = load_manifest(with_retries(store.fs), store.path, store.url)
    return None if manifest is None else manifest.get("created")


# --------------------------------------------------------------------------------------------------
# per-stage key material (argument names are the tasks')
# --------------------------------------------------------------------------------------------------
def features_material(inputs: dict[str, Any]) -> dict[str, Any]:
    cfg: ExtractConfig = inputs["cfg"]
    return {"dataset": dataset_fingerprint(cfg), "drafter": model_fingerprint(cfg.drafter, cfg.storage_options),
            "config": cfg.model_dump(mode="json", include={"store", "dataset", "drafter", "events", "load"}),
            "scenes": hash_json(sorted(inputs["scene_ids"]))}


def extract_material(inputs: dict[str, Any]) -> dict[str, Any]:
    cfg: ExtractConfig = inputs["cfg"]
    so = cfg.storage_options
    only = inputs.get("only_pairs")
    return {
        "dataset": dataset_fingerprint(cfg),
        "drafter": model_fingerprint(cfg.drafter, so) if needs_drafter(cfg) else None,
        "target": model_fingerprint(cfg.target, so) if needs_target(cfg) else None,
        "source_store": store_fingerprint(cfg.source_store, so) if cfg.mode == "retf" and cfg.source_store else None,
        "store_created": store_created(cfg.store, so),
        "config": config_material(cfg),
        "only_pairs": None if only is None else hash_json(sorted(only)),
    }


def train_adapter_material(inputs: dict[str, Any]) -> dict[str, Any]:
    cfg = inputs["cfg"]
    stores = list(cfg.train) + ([cfg.val] if cfg.val else [])
    return {"stores": {u: store_fingerprint(u, cfg.storage_options) for u in stores}, "config": config_material(cfg)}


def train_lora_material(inputs: dict[str, Any]) -> dict[str, Any]:
    cfg = inputs["cfg"]
    so = cfg.storage_options
    stores = [cfg.store] + ([cfg.val_store] if cfg.val_store else [])
    return {"stores": {u: store_fingerprint(u, so) for u in stores}, "drafter": model_fingerprint(cfg.drafter, so),
            "config": config_material(cfg)}


def export_drafter_material(inputs: dict[str, Any]) -> dict[str, Any]:
    return {"lora": dir_fingerprint(inputs["lora_dir"], inputs.get("storage_options")), "out": inputs["out_dir"]}


def evaluate_material(inputs: dict[str, Any]) -> dict[str, Any]:
    cfg = inputs["cfg"]
    so = cfg.storage_options
    prediction = None
    if cfg.adapter_run:
        prediction = file_fingerprint(configured_weights(cfg))
    elif cfg.lora:
        prediction = dir_fingerprint(cfg.lora, so)
    extra = {"extra_stores": [store_fingerprint(u, so) for u in cfg.extra_stores]} if cfg.extra_stores else {}
    return {"store": store_fingerprint(cfg.store, so), **extra, "prediction": prediction,
            "timing_file": file_fingerprint(cfg.timing_file, so) if cfg.timing_file else None,
            "config": config_material(cfg)}



def speculate_material(inputs: dict[str, Any]) -> dict[str, Any]:
    """Drafter, adapter run (its weights), LoRA, target, the pairs (store manifest or dataset files),
    and the settings (γ list, mode, max_new_tokens, split, load...)."""
    cfg = inputs["cfg"]
    so = cfg.storage_options
    adapter = None
    if cfg.adapter_run:
        adapter = file_fingerprint(configured_weights(cfg))
    dataset = None
    if cfg.dataset:  # which scenes exist (+ the questions, unless the store names the pairs)
        files = [cfg.dataset if str(cfg.dataset).endswith(".json") else join(cfg.dataset, MANIFEST_NAME)]
        if not cfg.store:
            files.append(questions_url(cfg.dataset, cfg.questions))
        dataset = hash_json([file_fingerprint(u, so) for u in files])
    return {
        "target": model_fingerprint(cfg.target, so),
        "drafter": model_fingerprint(cfg.drafter, so) if cfg.drafter and not cfg.target_only else None,
        "adapter": adapter,
        "lora": dir_fingerprint(cfg.lora, so) if cfg.lora else None,
        "store": store_fingerprint(cfg.store, so) if cfg.store else None,
        "dataset": dataset,
        "config": config_material(cfg),
    }


# --------------------------------------------------------------------------------------------------
# the files each cached result refers to (argument names are the tasks')
# --------------------------------------------------------------------------------------------------
def train_adapter_outputs(inputs: dict[str, Any]) -> list[Location]:
    run = inputs["cfg"].location(inputs["cfg"].out)
    return [run.child("best.safetensors"), run.child("result.json")]


def train_lora_outputs(inputs: dict[str, Any]) -> list[Location]:
    run = inputs["cfg"].location(inputs["cfg"].out)
    return [run.child("best", "adapter_config.json"), run.child("metrics.json")]


def export_drafter_outputs(inputs: dict[str, Any]) -> list[Location]:
    out = Location(inputs["out_dir"], inputs.get("storage_options") or None)
    return [out.child("config.json"), out.child("egpt_export.json")]


def evaluate_outputs(inputs: dict[str, Any]) -> list[Location]:
    return [inputs["cfg"].location(inputs["cfg"].out).child("metrics.json")]
