"""Video-LLaVA (the target) through transformers' VideoLlavaForConditionalGeneration + processor.

Prompt ``USER: <video>\\n{question} ASSISTANT:``; 8 frames sampled uniformly over the clip with
`egpt_core.data.video.sample_frame_indices` (the one sampling function used everywhere).
"""

from __future__ import annotations

import torch

from egpt_core.models.eventgpt import greedy_generation_kwargs, split_generation
from egpt_core.models.positions import gather_rows, tf_input_ids


def videollava_prompt(question: str) -> str:
    """The target's prompt (research extraction variant: a space before ``ASSISTANT:``)."""
    return f"USER: <video>\n{question} ASSISTANT:"


class VideoLlavaTarget:
    """Processing, AR generation and teacher-forced forwards of a Video-LLaVA checkpoint.

    Batch methods take per-pair prompt ids (the processor's expanded ids: one id per visual token)
    and per-pair video pixel values [F, 3, H, W]; they return [T_i, D] hidden rows per pair.
    """

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def prepare(self, question: str, frames: list) -> tuple[list[int], torch.Tensor]:
        """(expanded prompt ids, pixel_values_videos [F, 3, H, W]) for one pair."""
        enc = self.processor(text=videollava_prompt(question), videos=[frames], return_tensors="pt")
        return enc["input_ids"][0].tolist(), enc["pixel_values_videos"][0]

    def lm_head_weight(self) -> torch.Tensor:
        """The LM head [V, D] (float32, CPU)."""
        return self.model.get_output_embeddings().weight.detach().float().cpu()

    def _batch(self, seqs: list[list[int]], videos: list[torch.Tensor], left: bool):
        s = max(len(x) for x in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), s), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), s), dtype=torch.long)
        starts = []
        for i, x in enumerate(seqs):
            st = s - len(x) if left else 0
            ids[i, st : st + len(x)] = torch.tensor(x)
            mask[i, st : st + len(x)] = 1
            starts.append(st)
        dtype = self.model.get_input_embeddings().weight.dtype
        pv = torch.stack(videos).to(self.device, dtype=dtype if dtype.is_floating_point else torch.float32)
        return ids.to(self.device), mask.to(self.device), pv, starts

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], videos: list[torch.Tensor], max_new_tokens: int
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy AR generation, left padded: per pair ids through EOS and rows [T, D] (float32)."""
        ids, mask, pv, _ = self._batch(prompt_ids, videos, left=True)
        out = self.model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=pv,
                                  **greedy_generation_kwargs(self.tokenizer, max_new_tokens))
        return split_generation(out.sequences, out.hidden_states, self.tokenizer.eos_token_id)

    @torch.no_grad()
    def teacher_forced(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], videos: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """One forward over prompt + g_0..g_{T-2} per pair (right padded) -> rows [T, D] (float32)."""
        seqs = [tf_input_ids(p, r) for p, r in zip(prompt_ids, response_ids)]
        ids, mask, pv, starts = self._batch(seqs, videos, left=False)
        out = self.model(
            input_ids=ids, attention_mask=mask, pixel_values_videos=pv, use_cache=False, output_hidden_states=True
        )
        hidden = out.hidden_states[-1]
        rows = gather_rows(hidden, starts, [len(p) for p in prompt_ids], [len(r) for r in response_ids])
        return [r.float().cpu() for r in rows]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
