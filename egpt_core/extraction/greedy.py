"""The target's greedy AR generation as a plain loop over its forward (no ``generate`` machinery).

transformers' ``generate`` spends a fixed Python cost per step outside the model (input preparation,
keyword bookkeeping, logits processors, stopping criteria) that is a visible share of extraction
time on small models. This loop makes the calls ``generate`` makes for greedy decoding, with the same
inputs, so its tokens and hidden rows are bitwise those of :meth:`VideoLlavaTarget.generate`
(a test compares both):

* prefill: the video encoded once (``get_video_features``, passed as ``mm_encoder_outputs``), prompt
  ids left padded, position ids from the attention mask (cumsum - 1, 0 on padding), the mask dropped
  when it has no padding, a ``DynamicCache`` of the text config, ``logits_to_keep=1``;
* each step: the argmax of the last position's logits (generate upcasts them to float32 first, which
  is exact and keeps their order and ties); a finished sequence is fed the pad token; the mask grows by one column; the position is the last one + 1;
* a sequence finishes at EOS; the loop stops when every sequence has finished or after
  ``max_new_tokens`` tokens.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from egpt_core.models.eventgpt import split_generation


@torch.no_grad()
def greedy_generate(target, prompt_ids: list[list[int]], videos: list[torch.Tensor], max_new_tokens: int
                    ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy AR generation of a :class:`VideoLlavaTarget`, left padded: per pair the generated ids
    (through EOS) and hidden rows [T, D] (float32); the same as ``target.generate``."""
    model = target.model
    ids, mask, pixel_values, _ = target._batch(prompt_ids, videos, left=True)
    eos = target.tokenizer.eos_token_id
    pad = target.tokenizer.pad_token_id
    if pad is None:
        pad = eos
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    attention = None if bool((mask == 1).all()) else mask
    video = model.model.get_video_features(pixel_values_videos=pixel_values, return_dict=True)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    common = dict(cache=cache, output_hidden_states=True, logits_to_keep=1, use_cache=True, return_dict=True)
    out = model(input_ids=ids, position_ids=positions, attention_mask=attention,
                mm_encoder_outputs={"video": video}, **common)
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    steps, hidden = [], []
    for step in range(max_new_tokens):
        hidden.append((out.hidden_states[-1],))
        # argmax of the logits as they are: the float32 copy generate takes first changes no comparison
        nxt = torch.argmax(out.logits[:, -1], dim=-1)
        if eos is not None:
            nxt = nxt.masked_fill_(~unfinished, pad)  # a finished sequence is fed the pad token
            unfinished &= nxt != eos
        steps.append(nxt)
        if step + 1 == max_new_tokens or (eos is not None and not bool(unfinished.any())):
            break
        positions = positions[:, -1:] + 1
        if attention is not None:
            attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=-1)
        out = model(input_ids=nxt[:, None], position_ids=positions, attention_mask=attention, **common)
    return split_generation(torch.stack(steps, dim=1), hidden, eos)

