"""Video-LLaVA (the target) through transformers' VideoLlavaForConditionalGeneration + processor.

Prompt ``USER: <video>\\n{question} ASSISTANT:``; 8 frames sampled uniformly over the clip with
`egpt_core.data.video.sample_frame_indices` (the one sampling function used everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from egpt_core.models.eventgpt import greedy_generation_kwargs, split_generation
from egpt_core.models.positions import gather_rows, tf_input_ids


def videollava_prompt(question: str) -> str:
    """The target's prompt (research extraction variant: a space before ``ASSISTANT:``)."""
    return f"USER: <video>\n{question} ASSISTANT:"


@dataclass
class PreparedVideo:
    """A video processed once (see :meth:`VideoLlavaTarget.prepare_video`)."""

    pixel_values: torch.Tensor  # [F, 3, H, W]
    frames: list  # the sampled frames (for the processor where its expansion must be learnt)


class VideoLlavaTarget:
    """Processing, AR generation and teacher-forced forwards of a Video-LLaVA checkpoint.

    Batch methods take per-pair prompt ids (the processor's expanded ids: one id per visual token)
    and per-pair video pixel values [F, 3, H, W]; they return [T_i, D] hidden rows per pair.
    """

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._token_runs: dict[tuple, tuple[int, list[int]] | bool] = {}  # pixel shape -> '<video>' expansion

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

    def prepare_video(self, frames: list) -> PreparedVideo:
        """Process one video once, for all the questions about it: pixel values [F, 3, H, W] by the
        processor's video processor (no tokenizer: safe to call from a decoding thread)."""
        pv = self.processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
        return PreparedVideo(pv, frames)

    def prepare_question(self, question: str, video: PreparedVideo) -> tuple[list[int], torch.Tensor]:
        """(expanded prompt ids, pixel values [F, 3, H, W]) of one question about a prepared video: the
        same as :meth:`prepare` on its frames without processing the video again.

        The ids that replace ``<video>`` depend only on the pixel values' shape; they are learnt from
        one full processor call per shape (and checked against it), then each question needs only the
        tokenizer. Where they cannot be learnt, every question goes through the processor."""
        key = tuple(video.pixel_values.shape)
        run = self._token_runs.get(key)
        if run is None:
            ids, pv = self.prepare(question, video.frames)
            self._token_runs[key] = self._learn_token_run(question, ids) if torch.equal(pv, video.pixel_values) else False
            return ids, pv
        if run is False:
            return self.prepare(question, video.frames)
        vid, tokens = run
        raw = self.tokenizer(videollava_prompt(question))["input_ids"]
        if raw.count(vid) != 1:
            return self.prepare(question, video.frames)  # the processor's own verdict on such a prompt
        k = raw.index(vid)
        return raw[:k] + tokens + raw[k + 1:], video.pixel_values

    def _learn_token_run(self, question: str, full: list[int]) -> tuple[int, list[int]] | bool:
        vid = self.tokenizer.convert_tokens_to_ids("<video>")
        raw = self.tokenizer(videollava_prompt(question))["input_ids"]
        if not isinstance(vid, int) or raw.count(vid) != 1:
            return False
        k, n = raw.index(vid), len(full) - len(raw) + 1
        tokens = full[k:k + n]
        if n < 1 or any(x != vid for x in tokens) or raw[:k] + tokens + raw[k + 1:] != full:
            return False
        return vid, tokens

    def lm_head_weight(self) -> torch.Tensor:
        """The LM head [V, D] (float32, CPU)."""
        return self.model.get_output_embeddings().weight.detach().float().cpu()

    def _batch(self, seqs: list[list[int]], videos: list[torch.Tensor], left: bool):
        """Padded ids and mask [B, S] (left or right padded), videos stacked [B, F, 3, H, W], pad starts."""
        s = max(len(x) for x in seqs)
        pad = self.tokenizer.pad_token_id
        starts = [s - len(x) if left else 0 for x in seqs]
        rows, masks = [], []
        for st, x in zip(starts, seqs):  # one tensor per batch, not one per row
            tail = s - st - len(x)
            rows.append([pad] * st + list(x) + [pad] * tail)
            masks.append([0] * st + [1] * len(x) + [0] * tail)
        ids = torch.tensor(rows, dtype=torch.long)
        mask = torch.tensor(masks, dtype=torch.long)
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
