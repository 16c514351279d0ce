"""L6 export from a drafter in the authors' layout (tower weights inside, no CLIP directory) and the
strict check that an adapter's LoRA weights all arrive before merging."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from egpt_core.config import LoraTrainConfig, ModelLoadConfig
from egpt_core.errors import ConfigError
from egpt_core.lora import export_drafter
from egpt_core.lora.train import apply_lora
from egpt_core.models import load_eventgpt
from egpt_core.models.research_layout import write_research_eventgpt

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
FP32 = ModelLoadConfig(dtype="float32", quant="none", device="cpu")


@pytest.fixture(scope="module")
def research_base(fixtures_dir, tmp_path_factory):
    return write_research_eventgpt(fixtures_dir / "eventgpt", tmp_path_factory.mktemp("rb") / "base", "sharded")


@pytest.fixture(scope="module")
def adapter_dir(research_base, tmp_path_factory):
    """A LoRA on the research-layout drafter whose B matrices are non-zero (so merging changes weights)."""
    d = load_eventgpt(str(research_base), FP32)
    peft_model = apply_lora(d, LoraTrainConfig(store="unused", drafter=str(research_base), load=FP32, rank=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def test_export_from_research_base_keeps_its_tower(research_base, adapter_dir, tmp_path, drafter):
    out = export_drafter(str(adapter_dir), str(tmp_path / "merged"), base=str(research_base))
    m = load_eventgpt(out, FP32)
    assert m.tower.in_checkpoint and m.tower.clip_dir is None  # no CLIP directory anywhere
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["mm_visual_tower"].endswith("clip-vit-tiny")
    ref, got = drafter.model.state_dict(), m.model.state_dict()
    tower = [k for k in ref if k.startswith("model.visual_tower.")]
    assert tower and all(torch.equal(got[k], ref[k]) for k in tower)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[q], ref[q])  # the LoRA was merged
    assert type(m.tokenizer).__name__ == type(drafter.tokenizer).__name__ or m.tokenizer.get_vocab() == \
        drafter.tokenizer.get_vocab()


def test_adapter_with_a_missing_lora_tensor_is_refused(research_base, adapter_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    sd = load_file(str(bad / "adapter_model.safetensors"))
    victim = sorted(k for k in sd if "lora_B" in k)[0]
    del sd[victim]
    save_file(sd, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="missing"):
        export_drafter(str(bad), str(tmp_path / "out"), base=str(research_base))
    assert not (tmp_path / "out").exists()
