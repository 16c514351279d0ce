"""Stage 3b — L6: LoRA on the drafter's decoder (q/k/v/o), trained teacher-forced against the
target's rows; `export_drafter` merges it into a plain EventGPT checkpoint."""

from egpt_core.lora.merge import export_drafter
from egpt_core.lora.train import DECODER_ATTN_REGEX, LoraResult, train_lora

__all__ = ["DECODER_ATTN_REGEX", "LoraResult", "export_drafter", "train_lora"]
