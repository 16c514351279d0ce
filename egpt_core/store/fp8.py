"""FP8 (e4m3fn) hidden-state rows with one float32 scale per row.

A row ``x`` [D] is stored as ``q = fp8(x / s)`` with ``s = max|x| / 448`` (the largest finite e4m3fn
value), so every row uses the full fp8 range; an all-zero row gets ``s = 1``. Decoding is
``q.float() * s``. The relative error per element is at most 2^-4 of the element (3 mantissa bits,
round to nearest) plus subnormal flushing near zero, i.e. at most ``s * 2^-9`` absolute below the
normal range. Both tensors live in the shard's safetensors file (``<side>`` F8_E4M3 [R, D] and
``<side>_scale`` F32 [R]), so ``safetensors.torch.load_file`` alone reads them back.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448.0
#: bound of |decoded - x| / max|row| (half an ulp at the top binade, 2^-4 * 448 / 448 / 2, plus the
#: subnormal step 2^-9 / 448 relative to the row max): 2^-4 covers both with margin
ROW_REL_ERROR = 2.0 ** -4


def encode_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, D] (any float dtype, finite) -> (q [R, D] float8_e4m3fn, scale [R] float32)."""
    xf = x.detach().to("cpu", torch.float32)
    amax = xf.abs().amax(dim=1) if xf.numel() else torch.zeros(xf.shape[0])
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(torch.float32)
    q = (xf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.contiguous(), scale.contiguous()


def decode_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(q [R, D] float8_e4m3fn, scale [R] float32) -> rows [R, D] in ``dtype``."""
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)
