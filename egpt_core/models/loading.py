"""Loading checkpoints: fp32 / bf16 / fp16 or 4-bit NF4 (bitsandbytes), from local paths or URLs.

`load_eventgpt(path, load)` and `load_videollava(path, load)` are the only loaders: the tiny
fixtures and real 7B checkpoints go through the same code. A checkpoint given as a URL
(``s3://…``) is fetched once into a local cache directory keyed by its fingerprint.

Loading is strict (`egpt_core.models.checkpoints`): every tensor of the model must come from the
checkpoint (or, for EventGPT's tower, from its CLIP directory), or the load fails naming the keys.
EventGPT checkpoints are read in the project's layout and in the authors' own (XduSyL/EventGPT:
tower under ``model.visual_tower.visual_tower.vision_model.*``, ``tokenizer.model`` only).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BitsAndBytesConfig, CLIPImageProcessor, CLIPVisionModel

from egpt_core.config import ModelLoadConfig
from egpt_core.errors import ConfigError
from egpt_core.fingerprint import dir_fingerprint, hash_json
from egpt_core.fsio import Location
from egpt_core.models.checkpoints import (
    check_loading_info,
    check_tensor_names,
    model_tensor_shapes,
    read_tensor,
    rename,
    tensor_shapes,
)

#: modules kept in full precision under NF4 (the vision path and the LM head)
#: (transformers matches these as regexes from the start of the module path)
NF4_SKIP_MODULES = [r".*visual_tower", r".*visual_projector", r".*feature_adaptor", r".*lm_head",
                    r".*video_tower", r".*image_tower", r".*multi_modal_projector"]


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load-report tables: the loaders check ``output_loading_info`` themselves
    and raise on anything missing (the tower keys read from a CLIP directory are expected there)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_root() -> Path:
    """Local cache for fetched checkpoints (``EGPT_CACHE_DIR`` overrides; read by config layer only)."""
    from egpt_core.config import cache_dir

    return cache_dir()


def local_checkpoint(where: str | Location, storage_options: dict | None = None) -> Path:
    """A local directory for a checkpoint (a Location, or a URL with its ``storage_options``); remote
    ones are fetched once, keyed by fingerprint."""
    src = Location.of(where, storage_options)
    url = src.url
    if src.is_local:
        p = Path(str(url).removeprefix("file://"))
        if not p.is_dir():
            raise ConfigError(f"checkpoint directory {url} does not exist (set drafter/target to a local dir or URL)")
        return p
    fs, root = src.fs, src.path
    if not fs.isdir(root):
        raise ConfigError(f"checkpoint {url} not found on its filesystem")
    listing = {p: (fs.info(p).get("ETag") or fs.info(p).get("size")) for p in sorted(fs.find(root))}
    key = hash_json({"url": url, "files": listing})
    dest = cache_root() / "checkpoints" / key
    if dest.is_dir():
        return dest
    tmp = Path(tempfile.mkdtemp(dir=dest.parent.mkdir(parents=True, exist_ok=True) or dest.parent))
    for p in listing:
        rel = p[len(root.rstrip("/")) + 1 :]
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get(p, str(tmp / rel))
    try:
        tmp.rename(dest)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def checkpoint_fingerprint(path: str | Path) -> str:
    """config + weights + tokenizer/processor files of a local checkpoint dir (recursively)."""
    return dir_fingerprint(str(path), suffixes=(".json", ".safetensors", ".bin", ".model", ".txt"))


def _from_pretrained_kwargs(load: ModelLoadConfig, device: torch.device) -> dict:
    dtype = getattr(torch, load.dtype)
    kw: dict = {"dtype": dtype}
    if load.quant == "nf4":
        compute = dtype if dtype != torch.float32 else torch.bfloat16
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=NF4_SKIP_MODULES,
        )
        kw["device_map"] = {"": str(device) if device.type != "cuda" else device.index or 0}
    return kw


#: the authors' layout (``VisualTower`` wraps ``CLIPVisionModel``: ``model.visual_tower.visual_tower.
#: vision_model.*``), transformers 4.x CLIP names (``...visual_tower.vision_model.*``) and the project's
#: own (``model.visual_tower.*``) all land on the project's tower names (transformers' ``key_mapping``)
EVENTGPT_KEY_MAPPING = {r"^model\.visual_tower\.(?:visual_tower\.)?(?:vision_model\.)?": "model.visual_tower."}
TOWER_PREFIX = "model.visual_tower."

#: CLIP vision towers EventGPT checkpoints name in ``mm_visual_tower`` (matched on the last path
#: component), for checkpoints that carry the tower weights but whose CLIP directory is elsewhere.
#: Values override ``CLIPVisionConfig`` defaults; shapes are checked against the weights.
KNOWN_TOWERS: dict[str, dict] = {
    "clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    "clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
    # the tower of this project's tiny fixtures (`egpt fixtures`)
    "clip-vit-tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=32),
}
_CONFIG_DROP = ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype")


@dataclass
class TowerSource:
    """Where an EventGPT checkpoint's CLIP vision tower comes from.

    ``clip_dir`` (config + image preprocessing, and the weights when the checkpoint has none) or None
    when the checkpoint carries the weights and the config is a :data:`KNOWN_TOWERS` entry;
    ``in_checkpoint``: the checkpoint's own tower weights are used.
    """

    clip_dir: Path | None
    in_checkpoint: bool
    vision_config: dict


def _clip_candidates(ckpt: Path, name: str | None, clip_dir: str | None) -> list[Path]:
    if clip_dir:
        return [Path(clip_dir)]
    if not name:
        return []
    return [Path(name), ckpt / name, ckpt.parent / name, ckpt / "checkpoints" / Path(name).name]


def _find_clip_dir(ckpt: Path, name: str | None, clip_dir: str | None) -> Path:
    """The local CLIP directory: ``clip_dir`` if given, else found from ``mm_visual_tower``."""
    candidates = _clip_candidates(ckpt, name, clip_dir)
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    if clip_dir:
        raise ConfigError(f"clip_path {clip_dir!r} has no config.json: pass the CLIP vision tower directory")
    raise ConfigError(
        f"CLIP tower {name!r} for {ckpt} not found locally (tried {[str(c) for c in candidates]}) and the "
        "checkpoint carries no tower weights; pass the CLIP directory with --clip-dir (load.clip_path) — "
        "nothing is downloaded"
    )


def _clip_config_from_dir(clip: Path) -> dict:
    raw = json.loads((clip / "config.json").read_text())
    raw = raw.get("vision_config", raw)
    return {k: v for k, v in raw.items() if k not in _CONFIG_DROP}


def _known_tower(ckpt: Path, name: str | None, shapes: dict[str, tuple[int, ...]]) -> dict:
    key = Path(str(name or "")).name
    if key not in KNOWN_TOWERS:
        raise ConfigError(
            f"{ckpt} carries its vision tower weights but mm_visual_tower {name!r} is not a tower this loader "
            f"knows ({', '.join(KNOWN_TOWERS)}) and no CLIP directory was found: pass --clip-dir "
            "(load.clip_path) with the tower's config.json and preprocessor_config.json")
    cfg = dict(KNOWN_TOWERS[key])
    tower = {rename(k, EVENTGPT_KEY_MAPPING)[len(TOWER_PREFIX):]: s for k, s in shapes.items()
             if rename(k, EVENTGPT_KEY_MAPPING).startswith(TOWER_PREFIX)}
    n_pos = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
    want = {"embeddings.position_embedding.weight": (n_pos, cfg["hidden_size"]),
            "encoder.layers.0.mlp.fc1.weight": (cfg["intermediate_size"], cfg["hidden_size"]),
            "embeddings.patch_embedding.weight": (cfg["hidden_size"], 3, cfg["patch_size"], cfg["patch_size"])}
    layers = {int(k.split(".")[2]) for k in tower if k.startswith("encoder.layers.")}
    if any(tuple(tower.get(k, ())) != v for k, v in want.items()) or layers != set(range(cfg["num_hidden_layers"])):
        raise ConfigError(f"{ckpt}: the tower weights do not have the shapes of {key} (mm_visual_tower); pass "
                          "--clip-dir (load.clip_path) with the tower's own config.json")
    return cfg


def resolve_tower(ckpt: Path, raw_config: dict, shapes: dict[str, tuple[int, ...]],
                  clip_path: str | None = None) -> TowerSource:
    """Decide where the tower's config, preprocessing and weights come from (nothing is loaded).

    The checkpoint's own tower weights win when it has them (the authors' trainer saves them); the
    CLIP directory (``clip_path``, else found from ``mm_visual_tower``) then only supplies config and
    preprocessing, and is optional for :data:`KNOWN_TOWERS`.
    """
    name = raw_config.get("mm_visual_tower")
    in_ckpt = any(rename(k, EVENTGPT_KEY_MAPPING).startswith(TOWER_PREFIX) for k in shapes)
    try:
        clip = _find_clip_dir(ckpt, name, clip_path)
    except ConfigError:
        if clip_path or not in_ckpt:
            raise
        return TowerSource(None, True, _known_tower(ckpt, name, shapes))
    return TowerSource(clip, in_ckpt, _clip_config_from_dir(clip))


def eventgpt_fingerprint(ckpt: Path, tower: TowerSource, double_adaptor: bool) -> str:
    """What `load_eventgpt(...).fingerprint` records: checkpoint files + CLIP directory (if used)."""
    return hash_json({"ckpt": checkpoint_fingerprint(ckpt),
                      "clip": checkpoint_fingerprint(tower.clip_dir) if tower.clip_dir else None,
                      "double_adaptor": double_adaptor})


def drafter_fingerprint(path: str | Location, clip_path: str | None = None, double_adaptor: bool = False,
                        storage_options: dict | None = None) -> str:
    """`load_eventgpt(path, ...).fingerprint` computed from the files, without loading the model."""
    ckpt = local_checkpoint(path, storage_options)
    raw = json.loads((ckpt / "config.json").read_text())
    tower = resolve_tower(ckpt, raw, tensor_shapes(ckpt), clip_path)
    return eventgpt_fingerprint(ckpt, tower, double_adaptor)


def _image_processor(ckpt: Path, tower: TowerSource) -> CLIPImageProcessor:
    """The CLIP preprocessing: the CLIP directory's, else the checkpoint's, else CLIP's standard one at
    the tower's image size (identical to ``openai/clip-vit-large-patch14-336``'s at 336)."""
    for d in (tower.clip_dir, ckpt):
        if d is not None and (d / "preprocessor_config.json").is_file():
            return CLIPImageProcessor.from_pretrained(str(d))
    size = int(tower.vision_config.get("image_size", 224))
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _forget_key_mapping(model) -> None:
    """transformers reverses a load's ``key_mapping`` when the model is saved again; ours is a
    many-to-one regex (several layouts -> one) with no inverse, so a loaded drafter saves in the
    project's own layout instead (what `export-drafter` writes)."""
    convs = getattr(model, "_weight_conversions", None)
    if convs:
        ours = set(EVENTGPT_KEY_MAPPING)
        model._weight_conversions = [c for c in convs if not ours & set(getattr(c, "source_patterns", ()) or ())]


#: models loaded inside an open `shared_models` block, by loader and arguments (None: no block open)
_SHARED: dict[str, object] | None = None
_SHARED_DEPTH = 0
_SHARED_LOCK = threading.RLock()


@contextlib.contextmanager
def shared_models() -> Iterator[None]:
    """While open, `load_eventgpt` and `load_videollava` return the model an earlier call with the
    same arguments loaded instead of reading the checkpoint again: one extract flow run loads the
    drafter once for its features task and its extraction task (at 7B, ~14 GB read once, not twice).
    For read-only use (feature encoding, extraction); every model is released when the outermost
    block exits. A failed load is not remembered (a retry loads again)."""
    global _SHARED, _SHARED_DEPTH
    with _SHARED_LOCK:
        _SHARED_DEPTH += 1
        if _SHARED is None:
            _SHARED = {}
    try:
        yield
    finally:
        with _SHARED_LOCK:
            _SHARED_DEPTH -= 1
            if _SHARED_DEPTH == 0:
                _SHARED = None


def _argument_key(value: object) -> object:
    if isinstance(value, Location):
        return {"url": value.url, "storage_options": value.storage_options}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return repr(value) if not isinstance(value, (str, int, float, bool, type(None), dict, list, tuple)) else value


def _shared(kind: str) -> Callable[[Callable], Callable]:
    """Decorate a loader so that, inside `shared_models`, equal arguments return the loaded model."""

    def decorate(load: Callable) -> Callable:
        signature = inspect.signature(load)

        @functools.wraps(load)
        def shared_load(*args, **kwargs):
            if _SHARED is None:
                return load(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            key = kind + ":" + hash_json({k: _argument_key(v) for k, v in bound.arguments.items()})
            with _SHARED_LOCK:  # (one load at a time inside a block: the flow's tasks run one after another)
                shared = _SHARED
                if shared is None:  # the block closed meanwhile
                    return load(*args, **kwargs)
                if key not in shared:
                    shared[key] = load(*args, **kwargs)
                return shared[key]

        return shared_load

    return decorate


@_shared("eventgpt")
def load_eventgpt(path: str | Location, load: ModelLoadConfig | None = None, clip_dir: str | None = None,
                  double_adaptor: bool = False, storage_options: dict | None = None):
    """Load an EventGPT checkpoint directory -> `EventGPTDrafter` (model, tokenizer, CLIP processor).

    Accepts the project's layout (tower in its own CLIP directory) and the authors' (tower weights
    under ``model.visual_tower.visual_tower.vision_model.*``), safetensors (single or sharded) or
    ``.bin``. Every weight must arrive: a missing, unexpected or mis-shaped tensor is a ConfigError
    raised before any weight is read (and re-checked after loading). ``clip_dir`` (default
    ``load.clip_path``) overrides ``mm_visual_tower``. The loading steps and their checks read in
    order (~63 lines with this docstring).
    """
    from egpt_core.models.eventgpt import EventChatConfig, EventChatLlamaForCausalLM, EventGPTDrafter
    from egpt_core.models.vocab import load_tokenizer

    load = load or ModelLoadConfig()
    clip_dir = clip_dir or load.clip_path
    ckpt = local_checkpoint(path, storage_options)
    raw = json.loads((ckpt / "config.json").read_text())
    if raw.get("model_type") != "EventChat_llama":
        raise ConfigError(f"{ckpt}/config.json: model_type {raw.get('model_type')!r}, expected 'EventChat_llama'")
    shapes = tensor_shapes(ckpt)
    tower = resolve_tower(ckpt, raw, shapes, clip_dir)
    config = EventChatConfig.from_pretrained(str(ckpt))
    config.clip_config = dict(tower.vision_config)
    if "mm_hidden_size" not in raw:  # the authors' code hard-codes it: the tower's width
        config.mm_hidden_size = int(tower.vision_config.get("hidden_size", config.mm_hidden_size))
    with torch.device("meta"):
        expected = model_tensor_shapes(EventChatLlamaForCausalLM(config))
    check_tensor_names(ckpt, shapes, expected, EVENTGPT_KEY_MAPPING,
                       optional_prefixes=() if tower.in_checkpoint else (TOWER_PREFIX,))
    device = resolve_device(load.device)
    with _quiet_transformers():
        model, info = EventChatLlamaForCausalLM.from_pretrained(
            str(ckpt), config=config, key_mapping=EVENTGPT_KEY_MAPPING, output_loading_info=True,
            **_from_pretrained_kwargs(load, device))
        check_loading_info(ckpt, info, allowed_missing_prefixes=() if tower.in_checkpoint else (TOWER_PREFIX,))
        _forget_key_mapping(model)
        if not tower.in_checkpoint:
            clip, clip_info = CLIPVisionModel.from_pretrained(str(tower.clip_dir), dtype=getattr(torch, load.dtype),
                                                              output_loading_info=True)
            check_loading_info(tower.clip_dir, clip_info)
            model.model.visual_tower.load_state_dict(clip.state_dict(), strict=True)
            del clip
    if load.quant != "nf4":
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(ckpt)
    with _quiet_transformers():
        image_processor = _image_processor(ckpt, tower)
    drafter = EventGPTDrafter(model, tokenizer, image_processor, double_adaptor=double_adaptor)
    drafter.fingerprint = eventgpt_fingerprint(ckpt, tower, double_adaptor)
    adaptor = _tensor_digest(getattr(model.model, "feature_adaptor", None))
    if tower.in_checkpoint:
        drafter.vision_fingerprint = hash_json({"tower": _tensor_digest(model.model.visual_tower),
                                                "preprocess": image_processor.to_dict(), "double": double_adaptor,
                                                "proj": _tensor_digest(model.model.visual_projector),
                                                "adaptor": adaptor})
    else:
        drafter.vision_fingerprint = hash_json({"clip": checkpoint_fingerprint(tower.clip_dir), "double": double_adaptor,
                                                "proj": _tensor_digest(model.model.visual_projector),
                                                "adaptor": adaptor})
    drafter.path = str(path)
    drafter.tower = tower
    return drafter


def _tensor_digest(module) -> str:
    if module is None:
        return "none"
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CheckpointIdentity:
    """What a store's metadata records about a model, read from its files without loading it."""

    path: str
    fingerprint: str
    hidden_size: int


def videollava_identity(path: str | Location, storage_options: dict | None = None) -> CheckpointIdentity:
    """`load_videollava(path).fingerprint` and hidden size from the checkpoint's files (no weights loaded)."""
    ckpt = local_checkpoint(path, storage_options)
    raw = json.loads((ckpt / "config.json").read_text())
    if raw.get("model_type") != "video_llava":
        raise ConfigError(f"{ckpt}/config.json: model_type {raw.get('model_type')!r}, expected 'video_llava'")
    try:
        hidden = int(raw["text_config"]["hidden_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{ckpt}/config.json: no text_config.hidden_size ({exc})") from exc
    return CheckpointIdentity(str(path), checkpoint_fingerprint(ckpt), hidden)


@_shared("videollava")
def load_videollava(path: str | Location, load: ModelLoadConfig | None = None,
                    storage_options: dict | None = None):
    """Load a Video-LLaVA checkpoint directory -> `VideoLlavaTarget` (model + processor)."""
    from transformers import VideoLlavaForConditionalGeneration, VideoLlavaProcessor

    from egpt_core.models.videollava import VideoLlavaTarget

    load = load or ModelLoadConfig()
    ckpt = local_checkpoint(path, storage_options)
    raw = json.loads((ckpt / "config.json").read_text())
    if raw.get("model_type") != "video_llava":
        raise ConfigError(f"{ckpt}/config.json: model_type {raw.get('model_type')!r}, expected 'video_llava'")
    device = resolve_device(load.device)
    with _quiet_transformers():
        model, info = VideoLlavaForConditionalGeneration.from_pretrained(
            str(ckpt), output_loading_info=True, **_from_pretrained_kwargs(load, device))
    check_loading_info(ckpt, info)
    if load.quant != "nf4":
        model.to(device)
    with _quiet_transformers():
        processor = VideoLlavaProcessor.from_pretrained(str(ckpt))
    if not (ckpt / "tokenizer.json").is_file():  # a SentencePiece-only checkpoint: checked conversion
        from egpt_core.models.vocab import load_tokenizer

        processor.tokenizer = load_tokenizer(ckpt)
    processor.tokenizer.padding_side = "left"
    target = VideoLlavaTarget(model, processor)
    target.fingerprint = checkpoint_fingerprint(ckpt)
    target.path = str(path)
    return target


#: where Video-LLaVA checkpoints keep the LM head (transformers 5 layout, then the -hf checkpoints' own)
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")


def checkpoint_lm_head(path: str | Location, storage_options: dict | None = None) -> torch.Tensor:
    """A Video-LLaVA checkpoint's LM head ``[V, D]`` as stored in its files, in float32 (exact for
    fp16/bf16/fp32 checkpoints): not the copy of a model loaded in bf16 or NF4."""
    return read_tensor(local_checkpoint(path, storage_options), LM_HEAD_NAMES).float()
