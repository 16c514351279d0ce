"""EventGPT (the drafter) on transformers' Llama and CLIP classes.

Event path (reference §3.2): event frames -> CLIP preprocessing -> CLIP vision last hidden state
[F, S, C] (CLS kept, before post-LN) -> 2-layer MLP projector (GELU) [F, S, D] -> feature adaptor
(applied exactly once) -> spatio-temporal pooling [F + S, D] -> spliced into the Llama input
embeddings at the ``<event>`` placeholder (sentinel id -200 in the prompt ids).

Checkpoint directories use the real EventGPT names: config ``model_type`` ``EventChat_llama`` with
``mm_visual_tower`` / ``event_feature_adaptor``; weights ``model.visual_tower.*``,
``model.visual_projector.*``, ``model.feature_adaptor.*``. The CLIP tower is read from a local
directory named by ``mm_visual_tower``; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from egpt_core.models.positions import gather_rows, tf_input_ids

EVENT_TOKEN_INDEX = -200
EVENT_PLACEHOLDER = "<event>"
EVENTGPT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def eventgpt_prompt(question: str) -> str:
    """The ``eventgpt_v1`` conversation prompt for one question (reference §2.8)."""
    return f"{EVENTGPT_SYSTEM} USER: <ev_start>{EVENT_PLACEHOLDER}<ev_end>\n{question} ASSISTANT:"


def tokenize_event_prompt(tokenizer, prompt: str) -> list[int]:
    """Split on ``<event>``, tokenise each piece, keep BOS only on the first, put -200 between."""
    pieces = prompt.split(EVENT_PLACEHOLDER)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        piece_ids = tokenizer(piece).input_ids
        if i > 0:
            if piece_ids and piece_ids[0] == tokenizer.bos_token_id:
                piece_ids = piece_ids[1:]
            ids.append(EVENT_TOKEN_INDEX)
        ids.extend(piece_ids)
    return ids


class EventChatConfig(LlamaConfig):
    """Llama config plus EventGPT's multimodal keys."""

    model_type = "EventChat_llama"

    def __init__(
        self,
        mm_visual_tower: str | None = None,
        mm_hidden_size: int = 1024,
        event_feature_adaptor: bool = True,
        mm_projector_type: str = "mlp2x_gelu",
        clip_config: dict | None = None,
        **kwargs,
    ):
        self.mm_visual_tower = mm_visual_tower
        self.mm_hidden_size = mm_hidden_size
        self.event_feature_adaptor = event_feature_adaptor
        self.mm_projector_type = mm_projector_type
        self.clip_config = clip_config
        super().__init__(**kwargs)


class EventChatLlamaForCausalLM(LlamaForCausalLM):
    """Llama decoder whose inner model carries the visual tower, projector and feature adaptor."""

    config_class = EventChatConfig

    def __init__(self, config: EventChatConfig):
        super().__init__(config)
        if config.clip_config is not None:
            self.model.visual_tower = CLIPVisionModel(CLIPVisionConfig(**config.clip_config))
            self.model.visual_tower.requires_grad_(False)
        d = config.hidden_size
        self.model.visual_projector = nn.Sequential(
            nn.Linear(config.mm_hidden_size, d), nn.GELU(), nn.Linear(d, d)
        )
        if config.event_feature_adaptor:
            self.model.feature_adaptor = nn.Linear(d, d)
        self.post_init()

    # -------------------------------------------------------------------------------------------
    # event features
    # -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_event_frames(self, pixel_values: torch.Tensor, double_adaptor: bool = False) -> torch.Tensor:
        """pixel_values [F, 3, H, W] -> pooled event features [F + S, D] (adaptor applied once)."""
        inner = self.model
        vt = inner.visual_tower
        pv = pixel_values.to(device=vt.device, dtype=next(vt.parameters()).dtype)
        frames = vt(pixel_values=pv).last_hidden_state  # [F, S, C], before post-LN, CLS kept
        proj_dtype = inner.visual_projector[0].weight.dtype
        if proj_dtype not in (torch.float32, torch.float16, torch.bfloat16):  # quantised projector
            proj_dtype = self.dtype
        feats = inner.visual_projector(frames.to(proj_dtype))  # [F, S, D]
        if getattr(inner, "feature_adaptor", None) is not None:
            feats = inner.feature_adaptor(feats)
        pooled = spatio_temporal_pool(feats)  # [F + S, D]
        if double_adaptor and getattr(inner, "feature_adaptor", None) is not None:
            pooled = inner.feature_adaptor(pooled)  # research compatibility (bug B1)
        return pooled

    # -------------------------------------------------------------------------------------------
    # splicing
    # -------------------------------------------------------------------------------------------
    def splice_embeddings(
        self, ids: Sequence[int], features: torch.Tensor
    ) -> torch.Tensor:
        """Token ids with one -200 sentinel + features [N, D] -> input embeddings [len-1+N, D]."""
        emb = self.get_input_embeddings()
        ids_t = torch.tensor(list(ids), dtype=torch.long, device=emb.weight.device)
        pos = (ids_t == EVENT_TOKEN_INDEX).nonzero().flatten().tolist()
        if len(pos) != 1:
            raise ValueError(f"expected exactly one <event> sentinel in the prompt ids, found {len(pos)}")
        p = pos[0]
        text = emb(ids_t.clamp(min=0))
        return torch.cat([text[:p], features.to(text.dtype).to(text.device), text[p + 1 :]], dim=0)

    def expanded_len(self, ids: Sequence[int], n_features: int) -> int:
        """Model positions of a prompt after the sentinel expands into n_features rows."""
        return len(ids) - 1 + n_features


def spatio_temporal_pool(x: torch.Tensor) -> torch.Tensor:
    """[F, S, C] -> [F + S, C]: per-frame means over tokens, then per-token means over frames."""
    temporal = x.mean(dim=1)
    spatial = x.mean(dim=0)
    return torch.cat([temporal, spatial], dim=0)


def _pad_embeds(rows: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pad [L_i, D] rows into [B, S, D] + attention mask [B, S]; returns each row's start offset."""
    s = max(r.shape[0] for r in rows)
    d = rows[0].shape[1]
    out = rows[0].new_zeros((len(rows), s, d))
    mask = torch.zeros((len(rows), s), dtype=torch.long, device=rows[0].device)
    starts = []
    for i, r in enumerate(rows):
        st = s - r.shape[0] if left else 0
        out[i, st : st + r.shape[0]] = r
        mask[i, st : st + r.shape[0]] = 1
        starts.append(st)
    return out, mask, starts


class EventGPTDrafter:
    """Prompting, AR generation and teacher-forced forwards of an EventGPT checkpoint.

    All batch methods take per-pair prompt ids (with the -200 sentinel) and per-pair pooled event
    features [N, D]; they return one [T_i, D] hidden-state matrix per pair (position convention).
    """

    def __init__(self, model: EventChatLlamaForCausalLM, tokenizer, image_processor, double_adaptor: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.double_adaptor = double_adaptor

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def prompt_ids(self, question: str) -> list[int]:
        return tokenize_event_prompt(self.tokenizer, eventgpt_prompt(question))

    def preprocess_frames(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Event frames [H, W, 3] uint8 -> CLIP pixel values [F, 3, h, w]."""
        return self.image_processor(images=list(frames), return_tensors="pt")["pixel_values"]

    def event_features(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Event frames -> pooled features [F + S, D] on CPU, float32."""
        pv = self.preprocess_frames(frames)
        return self.model.encode_event_frames(pv, double_adaptor=self.double_adaptor).float().cpu()

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], features: list[torch.Tensor], max_new_tokens: int
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy AR generation, batched with left padding.

        Returns per pair the generated ids (through EOS, if produced) and hidden rows [T, D] (float32).
        """
        embeds = [self.model.splice_embeddings(p, f) for p, f in zip(prompt_ids, features)]
        inputs, mask, _ = _pad_embeds(embeds, left=True)
        out = self.model.generate(inputs_embeds=inputs, attention_mask=mask,
                                  **greedy_generation_kwargs(self.tokenizer, max_new_tokens))
        return split_generation(out.sequences, out.hidden_states, self.tokenizer.eos_token_id)

    @torch.no_grad()
    def teacher_forced(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], features: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """One forward over prompt + g_0..g_{T-2} per pair -> rows [T, D] (float32)."""
        hidden, starts, plens = self.tf_hidden(prompt_ids, response_ids, features)
        rows = gather_rows(hidden, starts, plens, [len(r) for r in response_ids])
        return [r.float() for r in rows]

    def tf_hidden(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[int], list[int]]:
        """Grad-enabled TF forward: last hidden state [B, S, D] (right padded), starts, prompt lens."""
        embeds, plens = [], []
        for p, r, f in zip(prompt_ids, response_ids, features):
            embeds.append(self.model.splice_embeddings(tf_input_ids(p, r), f))
            plens.append(self.model.expanded_len(p, f.shape[0]))
        inputs, mask, starts = _pad_embeds(embeds, left=False)
        out = self.model.model(inputs_embeds=inputs, attention_mask=mask, use_cache=False)
        return out.last_hidden_state, starts, plens

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def greedy_generation_kwargs(tokenizer, max_new_tokens: int) -> dict:
    """HF generate settings shared by both models: greedy, per-step hidden states, dict output."""
    return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, output_hidden_states=True,
                return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id)


def split_generation(
    sequences: torch.Tensor, step_hidden: tuple, eos_id: int | None
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """HF generate output -> per-pair ids through the first EOS and their hidden rows [T, D].

    step_hidden[t][-1] is the last layer (post final norm) at step t; its last position predicts g_t.
    """
    rows = torch.stack([h[-1][:, -1, :] for h in step_hidden], dim=1).float().cpu()  # [B, steps, D]
    seqs = sequences[:, -rows.shape[1] :].cpu().tolist()
    ids_out, rows_out = [], []
    for b, seq in enumerate(seqs):
        t = len(seq)
        if eos_id is not None and eos_id in seq:
            t = seq.index(eos_id) + 1
        ids_out.append(seq[:t])
        rows_out.append(rows[b, :t].clone())
    return ids_out, rows_out
