"""The position convention (DESIGN.md §3.2), in one place.

For a prompt of P tokens followed by generated tokens g_0..g_{T-1}, row t of a hidden-state matrix
is the final post-norm hidden state whose LM-head argmax predicts g_t: the state at input position
P-1+t. A teacher-forced pass therefore runs over prompt + g_0..g_{T-2} and takes positions
P-1 .. P+T-2. AR generation, TF extraction, L6 and evaluation all use these helpers.
"""

from __future__ import annotations

import torch

POSITION_CONVENTION = "row t = final post-norm hidden state at input position P-1+t (predicts g_t)"


def tf_input_ids(prompt_ids: list[int], response_ids: list[int]) -> list[int]:
    """Token ids a teacher-forced pass is fed: prompt + g_0..g_{T-2}."""
    return list(prompt_ids) + list(response_ids[:-1])


def response_row_slice(prompt_len: int, n_rows: int) -> slice:
    """Input positions whose states are rows 0..n_rows-1: P-1 .. P+T-2 (unpadded sequence)."""
    if prompt_len < 1:
        raise ValueError("prompt must hold at least one token")
    return slice(prompt_len - 1, prompt_len - 1 + n_rows)


def gather_rows(hidden: torch.Tensor, starts: list[int], prompt_lens: list[int], n_rows: list[int]) -> list[torch.Tensor]:
    """Rows per sequence from a padded TF output.

    hidden: [B, S, D]; starts[b] = index of sequence b's first real token (left padding offset);
    prompt_lens[b] = P_b (in model positions, i.e. after any feature expansion); returns
    [n_rows[b], D] per sequence.
    """
    out = []
    for b in range(hidden.shape[0]):
        sl = response_row_slice(prompt_lens[b], n_rows[b])
        out.append(hidden[b, starts[b] + sl.start : starts[b] + sl.stop])
    return out
