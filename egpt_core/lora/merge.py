"""Merge an L6 LoRA into the drafter and write a plain EventGPT checkpoint.

The base is loaded in full precision (bf16/fp16/fp32 — never 4-bit: merging into NF4 weights would
need dequantise-merge-requantise and adds rounding), the adapter is merged with peft's
``merge_and_unload`` and the result is saved in the same on-disk format the loader reads:
``config.json`` (``model_type`` ``EventChat_llama``), safetensors weights without the visual tower,
the CLIP tower directory copied beside them (``mm_visual_tower`` names it) and the tokenizer — or,
for a base in the authors' layout (tower weights in the checkpoint), with the tower weights. So
``load_eventgpt(out_dir)`` loads it and ``egpt extract --mode retf --drafter OUT`` re-extracts rows.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from egpt_core import outdir
from egpt_core import runfiles as rf
from egpt_core.config import ModelLoadConfig
from egpt_core.errors import ConfigError
from egpt_core.fingerprint import dir_fingerprint, hash_json
from egpt_core.fsio import Location
from egpt_core.outdir import OutputDirError

EXPORT_FORMAT = "egpt-lora-merged/1"
EXPORT_KIND = "drafter-export"


def resolve_adapter_dir(lora: Location) -> Path:
    """A local peft adapter directory for ``lora`` (an adapter dir, or a run dir -> its best/)."""
    local = rf.local_dir(lora)
    if (local / "adapter_config.json").is_file():
        return local
    for sub in ("best", "adapter"):
        if (local / sub / "adapter_config.json").is_file():
            return local / sub
    raise ConfigError(f"{lora.url} is not a peft adapter directory (no adapter_config.json, no best/ or adapter/)")


def _base_dtype(base_dir: Path) -> str:
    raw = json.loads((base_dir / "config.json").read_text())
    dt = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
    return dt if dt in ("float32", "bfloat16", "float16") else "float32"


def _refuse_overlap(out_dir: Location, inputs: dict[str, Path]) -> None:
    """--out must not be (or lie inside, or contain) the base drafter or the LoRA it reads."""
    if not out_dir.is_local:
        return
    out = Path(out_dir.url.removeprefix("file://")).resolve()
    for what, path in inputs.items():
        p = path.resolve()
        if out == p or p in out.parents or out in p.parents:
            raise OutputDirError(f"--out {out_dir} overlaps the {what} ({path}) this export reads; choose "
                                 "another directory")


def export_drafter(lora_dir: str | Location, out_dir: str | Location, base: str | None = None,
                   dtype: str | None = None, storage_options: dict | None = None, clip_path: str | None = None,
                   overwrite: bool = False) -> str:
    """Merge the LoRA at ``lora_dir`` into ``base`` (default: the drafter it was trained on) -> ``out_dir``.

    ``lora_dir``, ``out_dir`` and ``base`` are Locations, or URLs reached with ``storage_options``.
    ``dtype`` defaults to the base checkpoint's dtype; ``clip_path`` (default: the one training used)
    overrides the base's ``mm_visual_tower``. A base that carries its own tower weights (the authors'
    layout) keeps them in the export. ``out_dir`` must be new, empty or an earlier export of the same
    LoRA, base and dtype (``overwrite=True``: an earlier export of anything); nothing egpt did not
    write is ever replaced (:mod:`egpt_core.outdir`). Returns ``out_dir``.
    """
    from egpt_core.models.loading import checkpoint_fingerprint, local_checkpoint

    lora, out = Location.of(lora_dir, storage_options), Location.of(out_dir, storage_options)
    adapter = resolve_adapter_dir(lora)
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    prov_path = adapter / "egpt_lora.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    base = base or prov.get("drafter") or acfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{lora.url}: no base drafter recorded; pass base")
    base_dir = local_checkpoint(Location.of(base, out.storage_options))
    dtype = dtype or _base_dtype(base_dir)
    _refuse_overlap(out, {"base drafter": base_dir, "LoRA": adapter})
    adapter_fp = dir_fingerprint(str(adapter), suffixes=(".json", ".safetensors"))
    identity = hash_json({"adapter": adapter_fp, "base": checkpoint_fingerprint(base_dir), "dtype": dtype})
    with outdir.claim_output(out, EXPORT_KIND, identity, replace=overwrite):
        _merge_and_write(adapter, str(base), base_dir, dtype, prov, lora.url, adapter_fp, out, clip_path)
    return out.url


def _merge_and_write(adapter: Path, base: str, base_dir: Path, dtype: str, prov: dict, lora_dir: str,
                     adapter_fp: str, out_dir: Location, clip_path: str | None) -> None:
    from peft import PeftModel

    from egpt_core.models import load_eventgpt
    from egpt_core.models.loading import TOWER_PREFIX

    double = bool((prov.get("events") or {}).get("double_feature_adaptor", False))
    drafter = load_eventgpt(str(base_dir), ModelLoadConfig(dtype=dtype, quant="none", device="cpu",
                                                           clip_path=clip_path or prov.get("clip_path")),
                            double_adaptor=double)
    with warnings.catch_warnings():  # peft still asks transformers 5 for is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(drafter.model, str(adapter), is_trainable=False)
        check_adapter_loaded(peft_model, adapter)
        merged = peft_model.merge_and_unload()
    merged.eval()

    raw_cfg = json.loads((base_dir / "config.json").read_text())
    tower = drafter.tower
    clip_src = tower.clip_dir
    # the copied CLIP directory, else the base's own tower name (a KNOWN_TOWERS entry)
    clip_name = clip_src.name if clip_src is not None else raw_cfg.get("mm_visual_tower")

    tmp = rf.staging_dir(out_dir.url)
    try:
        merged.config.clip_config = None  # the tower config comes from its directory / name, as in the base
        merged.config.mm_visual_tower = clip_name
        sd = {k: v.contiguous() for k, v in merged.state_dict().items()
              if tower.in_checkpoint or not k.startswith(TOWER_PREFIX)}
        merged.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        if clip_src is not None:
            shutil.copytree(clip_src, tmp / clip_name, dirs_exist_ok=True)
        drafter.tokenizer.save_pretrained(str(tmp))
        rf.write_json(str(tmp / "egpt_export.json"), {
            "format": EXPORT_FORMAT, "base": str(base), "lora": str(lora_dir),
            "adapter_fingerprint": adapter_fp,
            "dtype": dtype, "lora_provenance": prov,
        })
        del merged, peft_model
        rf.put_dir(tmp, out_dir, kind=EXPORT_KIND)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_adapter_loaded(peft_model, adapter: Path) -> None:
    """Every LoRA tensor of the model must equal the adapter file's (ConfigError naming the keys):
    a LoRA left at its initialisation (B = 0) would merge into a silent no-op."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from egpt_core.models.checkpoints import incomplete_message

    files = sorted(adapter.glob("adapter_model*.safetensors"))
    if not files:
        raise ConfigError(f"{adapter}: no adapter_model.safetensors (only safetensors adapters are read)")
    saved: dict = {}
    for f in files:
        saved.update(load_file(str(f)))
    loaded = get_peft_model_state_dict(peft_model)
    missing = set(loaded) - set(saved)
    unexpected = set(saved) - set(loaded)
    differing = {k for k in set(saved) & set(loaded)
                 if not torch.equal(loaded[k].detach().cpu().to(saved[k].dtype), saved[k])}
    msg = incomplete_message(adapter, missing, unexpected, {f"{k} (value not loaded)" for k in differing})
    if msg:
        raise ConfigError(msg)
