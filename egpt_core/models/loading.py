"""Loading checkpoints: fp32 / bf16 / fp16 or 4-bit NF4 (bitsandbytes), from local paths or URLs.

`load_eventgpt(path, load)` and `load_videollava(path, load)` are the only loaders: the tiny
fixtures and real 7B checkpoints go through the same code. A checkpoint given as a URL
(``s3://…``) is fetched once into a local cache directory keyed by its fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, BitsAndBytesConfig, CLIPImageProcessor, CLIPVisionModel

from egpt_core.config import ModelLoadConfig
from egpt_core.errors import ConfigError
from egpt_core.fingerprint import dir_fingerprint, hash_json
from egpt_core.fsio import is_local, url_to_fs

#: modules kept in full precision under NF4 (the vision path and the LM head)
#: (transformers matches these as regexes from the start of the module path)
NF4_SKIP_MODULES = [r".*visual_tower", r".*visual_projector", r".*feature_adaptor", r".*lm_head",
                    r".*video_tower", r".*image_tower", r".*multi_modal_projector"]


@contextlib.contextmanager
def _quiet_transformers():
    """Silence load-report tables (e.g. the CLIP keys that are loaded from the tower dir afterwards)."""
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


def local_checkpoint(url: str, storage_options: dict | None = None) -> Path:
    """A local directory for a checkpoint URL; remote ones are fetched once, keyed by fingerprint."""
    if is_local(url):
        p = Path(str(url).removeprefix("file://"))
        if not p.is_dir():
            raise ConfigError(f"checkpoint directory {url} does not exist (set drafter/target to a local dir or URL)")
        return p
    fs, root = url_to_fs(url, storage_options)
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


def _weight_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            keys.update(sf.keys())
    return keys


def _find_clip_dir(ckpt: Path, name: str | None, clip_dir: str | None) -> Path:
    candidates = []
    if clip_dir:
        candidates.append(Path(clip_dir))
    if name:
        candidates += [Path(name), ckpt / name, ckpt.parent / name, ckpt / "checkpoints" / Path(name).name]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise ConfigError(
        f"CLIP tower {name!r} for {ckpt} not found locally (tried {[str(c) for c in candidates]}); "
        "put it beside the checkpoint or pass clip_dir — nothing is downloaded"
    )


def load_eventgpt(path: str, load: ModelLoadConfig | None = None, clip_dir: str | None = None,
                  double_adaptor: bool = False, storage_options: dict | None = None):
    """Load an EventGPT checkpoint directory -> `EventGPTDrafter` (model, tokenizer, CLIP processor)."""
    from egpt_core.models.eventgpt import EventChatConfig, EventChatLlamaForCausalLM, EventGPTDrafter

    load = load or ModelLoadConfig()
    ckpt = local_checkpoint(path, storage_options)
    raw = json.loads((ckpt / "config.json").read_text())
    if raw.get("model_type") != "EventChat_llama":
        raise ConfigError(f"{ckpt}/config.json: model_type {raw.get('model_type')!r}, expected 'EventChat_llama'")
    clip_path = _find_clip_dir(ckpt, raw.get("mm_visual_tower"), clip_dir)
    clip_cfg = json.loads((clip_path / "config.json").read_text())
    clip_cfg = clip_cfg.get("vision_config", clip_cfg)
    config = EventChatConfig.from_pretrained(str(ckpt))
    config.clip_config = {k: v for k, v in clip_cfg.items() if k not in ("architectures", "transformers_version",
                                                                        "model_type", "dtype", "torch_dtype")}
    device = resolve_device(load.device)
    with _quiet_transformers():
        model = EventChatLlamaForCausalLM.from_pretrained(str(ckpt), config=config,
                                                          **_from_pretrained_kwargs(load, device))
        if not any(k.startswith("model.visual_tower.") for k in _weight_keys(ckpt)):
            clip = CLIPVisionModel.from_pretrained(str(clip_path), dtype=getattr(torch, load.dtype))
            model.model.visual_tower.load_state_dict(clip.state_dict(), strict=True)
            del clip
    if load.quant != "nf4":
        model.to(device)
    model.eval()
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        image_processor = CLIPImageProcessor.from_pretrained(str(clip_path))
    drafter = EventGPTDrafter(model, tokenizer, image_processor, double_adaptor=double_adaptor)
    drafter.fingerprint = hash_json({"ckpt": checkpoint_fingerprint(ckpt), "clip": checkpoint_fingerprint(clip_path),
                                     "double_adaptor": double_adaptor})
    drafter.vision_fingerprint = hash_json({"clip": checkpoint_fingerprint(clip_path), "double": double_adaptor,
                                            "proj": _tensor_digest(model.model.visual_projector),
                                            "adaptor": _tensor_digest(getattr(model.model, "feature_adaptor", None))})
    drafter.path = str(path)
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


def load_videollava(path: str, load: ModelLoadConfig | None = None, storage_options: dict | None = None):
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
        model = VideoLlavaForConditionalGeneration.from_pretrained(str(ckpt), **_from_pretrained_kwargs(load, device))
    if load.quant != "nf4":
        model.to(device)
    with _quiet_transformers():
        processor = VideoLlavaProcessor.from_pretrained(str(ckpt))
    processor.tokenizer.padding_side = "left"
    target = VideoLlavaTarget(model, processor)
    target.fingerprint = checkpoint_fingerprint(ckpt)
    target.path = str(path)
    return target
