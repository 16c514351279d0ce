"""Import adapters trained by the research pipeline (``best_model.pt`` / ``final_model.pt``).

The research trainer (``pipeline/adapter_train/hidden_adapter.py``, reference §6.10) saves
``torch.save({"model_state_dict", "adapter_type", "config", "epoch", "optimizer_state_dict",
"metrics"})``. It is read with ``torch.load(weights_only=True)``: plain tensors and containers only.
The one class such a file names, L1's ``HiddenAdapterConfig`` dataclass, is read into an inert
stand-in (its fields only); any other class is refused.

Every level maps one-to-one onto the project's modules with equal shapes (names below), so the
imported adapter computes the research forward exactly. The L5 family is imported with
``separate_prediction_head=False`` (the research objective: one output for y[t] and y[t+1]).

=====  ==========================  =======================================================
level  research ``adapter_type``   research name -> project name
=====  ==========================  =======================================================
L1     (none) / ``L1_Bottleneck``  ``layers.i.{layer_norm,down_proj,up_proj,alpha_param}`` ->
                                   ``blocks.i.{norm,down,up,alpha}``; ``final_norm``
L2     ``L2_MultiLayerBottleneck`` ``blocks.i.{layer_norm,down_proj,up_proj,alpha_param}`` -> same
L3     ``L3_WideBottleneck``       ``blocks.i.{0,1,4}`` -> ``blocks.i.{down,norm,up}``; ``alphas.i`` ->
                                   ``blocks.i.alpha``; ``input_norm``, ``final_norm``
L4     ``L4_Attention``            ``layers.i.{attn_norm,ffn_norm}`` -> ``layers.i.{norm1,norm2}``;
                                   ``output_proj.{0,1}`` -> ``head.{norm,proj}``; ``attn``, ``ffn``, ``alpha``
L5/B1  ``L5_EAGLE``                as L4, plus ``output_norm``/``output_proj`` -> ``head.norm``/``head.proj``,
                                   ``input_norm``, ``pos_embed``
L5F    ``L5F_FusedEAGLE``          as L5, plus ``fusion_proj`` -> ``proj``, ``fusion_norm`` -> ``fuse_norm``,
                                   ``gate.0`` -> ``gate``
=====  ==========================  =======================================================
"""

from __future__ import annotations

import hashlib
import pickle
import re
import time
from pathlib import Path
from typing import Any

import torch

from egpt_core.config import AdapterConfig
from egpt_core.errors import ConfigError
from egpt_core.fsio import Location

IMPORT_FORMAT = "egpt-adapter-import/1"

#: the research ``adapter_type`` each level's checkpoint carries (L1's has none)
RESEARCH_TYPES: dict[str, tuple[str | None, ...]] = {
    "L1": (None, "L1_Bottleneck"), "L2": ("L2_MultiLayerBottleneck",), "L3": ("L3_WideBottleneck",),
    "L4": ("L4_Attention",), "L5": ("L5_EAGLE",), "B1": ("L5_EAGLE",), "L5F": ("L5F_FusedEAGLE",),
}

_LAYER = [(r"^layers\.(\d+)\.attn_norm\.", r"layers.\1.norm1."), (r"^layers\.(\d+)\.ffn_norm\.", r"layers.\1.norm2."),
          (r"^layers\.(\d+)\.(attn|ffn)\.", r"layers.\1.\2.")]
_EAGLE = [*_LAYER, (r"^output_norm\.", "head.norm."), (r"^output_proj\.", "head.proj."),
          (r"^(input_norm\.|pos_embed$|alpha$)", r"\1")]
_BOTTLENECK = [(r"\.layer_norm\.", ".norm."), (r"\.down_proj\.", ".down."), (r"\.up_proj\.", ".up."),
               (r"\.alpha_param$", ".alpha")]

#: research state-dict name -> project name, as ordered (regex, replacement) rules per level
NAME_RULES: dict[str, list[tuple[str, str]]] = {
    "L1": [(r"^layers\.(\d+)\.", r"blocks.\1."), *_BOTTLENECK, (r"^final_norm\.", "final_norm.")],
    "L2": [(r"^blocks\.(\d+)\.", r"blocks.\1."), *_BOTTLENECK, (r"^final_norm\.", "final_norm.")],
    "L3": [(r"^blocks\.(\d+)\.0\.", r"blocks.\1.down."), (r"^blocks\.(\d+)\.1\.", r"blocks.\1.norm."),
           (r"^blocks\.(\d+)\.4\.", r"blocks.\1.up."), (r"^alphas\.(\d+)$", r"blocks.\1.alpha"),
           (r"^(input_norm|final_norm)\.", r"\1.")],
    "L4": [*_LAYER, (r"^output_proj\.0\.", "head.norm."), (r"^output_proj\.1\.", "head.proj."), (r"^alpha$", "alpha")],
    "L5": _EAGLE,
    "B1": _EAGLE,
    "L5F": [*_EAGLE, (r"^fusion_proj\.", "proj."), (r"^fusion_norm\.", "fuse_norm."), (r"^gate\.0\.", "gate.")],
}
_CHAINED = {"L1", "L2"}  # prefix rule, then the bottleneck renames on the result


class ResearchConfig:
    """Inert stand-in for the research ``HiddenAdapterConfig`` dataclass: holds its fields, nothing else."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_research_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a research ``best_model.pt``; ConfigError when it holds
    anything but tensors, plain containers and the research config dataclass."""
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"research adapter checkpoint {path} does not exist")
    try:
        unsafe = get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # not a zip checkpoint, truncated...
        raise ConfigError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    allowed = [g for g in unsafe if g.rsplit(".", 1)[-1] == "HiddenAdapterConfig"]
    refused = sorted(set(unsafe) - set(allowed))
    if refused:
        raise ConfigError(f"{path}: refused: it pickles {', '.join(refused[:5])} (only tensors, plain containers "
                          "and the research HiddenAdapterConfig are read)")
    try:
        with safe_globals([(ResearchConfig, g) for g in allowed]):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{path}: refused by torch.load(weights_only=True): "
                          f"{str(exc).strip().splitlines()[0]}") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_state_dict"), dict):
        raise ConfigError(f"{path}: not a research adapter checkpoint (no model_state_dict)")
    return ckpt


def research_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    cfg = ckpt.get("config")
    if isinstance(cfg, ResearchConfig):
        return cfg.as_dict()
    return dict(cfg) if isinstance(cfg, dict) else {}


def project_name(level: str, key: str) -> str:
    """The project's state-dict name of a research adapter tensor (unchanged when no rule applies)."""
    out = key
    for pattern, repl in NAME_RULES[level]:
        new, n = re.subn(pattern, repl, out)
        if n:
            out = new
            if level not in _CHAINED:
                return out
    return out


def _shape(sd: dict[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in sd:
        raise ConfigError(f"{path}: expected tensor {key!r} is missing (is this the level you named?)")
    return tuple(sd[key].shape)


def adapter_config_for(level: str, sd: dict[str, torch.Tensor], rcfg: dict[str, Any], path: Path) -> AdapterConfig:
    """The project AdapterConfig of a research checkpoint: sizes from the tensors, head count and
    switches from its config (checked against the tensors)."""
    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in sd if k.startswith(prefix)})

    if level in ("L1", "L2"):
        blocks = "layers." if level == "L1" else "blocks."
        r, d = _shape(sd, f"{blocks}0.down_proj.weight", path)
        n = count(blocks)
        if level == "L1" and n != 1:
            raise ConfigError(f"{path}: an L1 with {n} bottleneck layers is architecturally the project's L2; "
                              "the project's L1 has one block")
        if rcfg.get("use_gelu") is False or rcfg.get("use_layer_norm") is False:
            raise ConfigError(f"{path}: use_gelu/use_layer_norm off is not a project architecture")
        return AdapterConfig(level=level, hidden_size=d, bottleneck_dim=r, num_blocks=max(n, 1))
    if level == "L3":
        b, d = _shape(sd, "blocks.0.0.weight", path)
        return AdapterConfig(level="L3", hidden_size=d, bottleneck_dim=b, num_blocks=count("blocks."))
    ffn, d = _shape(sd, "layers.0.ffn.0.weight", path)
    heads = rcfg.get("num_heads")
    if not isinstance(heads, int) or heads < 1 or d % heads:
        raise ConfigError(f"{path}: the checkpoint's config gives no usable num_heads ({heads!r}) for hidden size {d}")
    for key in ("ffn_dim", "hidden_dim"):
        want = ffn if key == "ffn_dim" else d
        if key in rcfg and rcfg[key] != want:
            raise ConfigError(f"{path}: config {key}={rcfg[key]} but the tensors say {want}")
    if rcfg.get("use_token_embed"):
        raise ConfigError(f"{path}: use_token_embed=True (token fusion) is not supported: the research trainer "
                          "never fed it tokens and the project adapter has no such input")
    kw: dict[str, Any] = dict(level=level, hidden_size=d, num_heads=heads, ffn_dim=ffn, num_layers=count("layers."))
    if level != "L4":
        kw.update(max_seq_len=_shape(sd, "pos_embed", path)[1], separate_prediction_head=False)
    return AdapterConfig(**kw)


def convert_state_dict(level: str, sd: dict[str, torch.Tensor], module: torch.nn.Module,
                       path: Path) -> dict[str, torch.Tensor]:
    """Research tensors under project names; ConfigError unless they cover ``module`` exactly."""
    from egpt_core.models.checkpoints import incomplete_message

    out = {project_name(level, k): v for k, v in sd.items()}
    if len(out) != len(sd):
        raise ConfigError(f"{path}: two research tensors map onto one project name")
    expected = module.state_dict()
    mismatched = {f"{k} {list(out[k].shape)} (project {list(expected[k].shape)})"
                  for k in set(out) & set(expected) if out[k].shape != expected[k].shape}
    msg = incomplete_message(path, set(expected) - set(out), set(out) - set(expected), mismatched)
    if msg:
        raise ConfigError(msg + f" (imported as {level})")
    return {k: out[k].detach().to(expected[k].dtype).contiguous() for k in expected}


def import_research_adapter(path: str | Path, out: str | Location, level: str, storage_options: dict | None = None,
                            which: str = "best") -> dict[str, Any]:
    """Convert a research ``best_model.pt`` into an adapter run directory at ``out`` (a Location, or a URL
    with its ``storage_options``): ``best.safetensors`` by default, ``last`` for a ``final_model.pt``, +
    ``config.json``; returns the config.json record."""
    from egpt_core.adapters.checkpoint import save_adapter_weights
    from egpt_core.adapters.modules import LEVELS, count_parameters, create_adapter

    path, run = Path(path), Location.of(out, storage_options)
    if level not in LEVELS:
        raise ConfigError(f"unknown adapter level {level!r}; expected one of {', '.join(LEVELS)}")
    if which not in ("best", "last"):
        raise ConfigError(f"which={which!r}: expected 'best' or 'last'")
    ckpt = load_research_checkpoint(path)
    kind = ckpt.get("adapter_type")
    if kind not in RESEARCH_TYPES[level]:
        raise ConfigError(f"{path}: adapter_type {kind!r} is not a research {level} "
                          f"(expected {' or '.join(str(t) for t in RESEARCH_TYPES[level])})")
    sd = {k: v for k, v in ckpt["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    rcfg = research_config(ckpt)
    acfg = adapter_config_for(level, sd, rcfg, path)
    module = create_adapter(acfg)
    module.load_state_dict(convert_state_dict(level, sd, module, path), strict=True)
    epoch = int(ckpt.get("epoch") or 0)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    save_adapter_weights(run.child(f"{which}.safetensors"), module, acfg, int(acfg.hidden_size), epoch,
                         extra={"source": IMPORT_FORMAT, "source_sha256": digest})
    metrics = ckpt.get("metrics") if isinstance(ckpt.get("metrics"), dict) else {}
    record = {
        "task": "import_adapter", "format": IMPORT_FORMAT, "source": str(path), "source_sha256": digest,
        "level": level, "hidden_size": acfg.hidden_size, "param_count": count_parameters(module),
        "adapter_config": acfg.model_dump(mode="json"), "weights": f"{which}.safetensors",
        "research": {"adapter_type": kind, "config": _jsonable(rcfg), "epoch": epoch, "metrics": _jsonable(metrics)},
        "imported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    run.child("config.json").write_json(record)
    return record


def _jsonable(obj: Any) -> Any:
    """Plain JSON values (non-finite floats -> None, so the record is valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    return str(obj)


__all__ = ["NAME_RULES", "RESEARCH_TYPES", "ResearchConfig", "adapter_config_for", "convert_state_dict",
           "import_research_adapter", "load_research_checkpoint", "project_name"]
