"""Square-root ALiBi: the only positional signal Step1 has (it has no RoPE).

The bias for head h is ``-slope_h * sqrt(i - j)`` for keys j <= i and -inf above the diagonal.
Standard (linear) ALiBi kernels cannot express the square root, so the bias is materialised and
handed to SDPA as an additive float mask.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> list[float]:
    """Per-head slopes by the ALiBi rule, including head counts that are not powers of two.

    With n = 2**floor(log2 H) the first n slopes are (2**(-8/n))**k, k = 1..n; the remaining H - n
    heads take every other slope of the 2n-head series, (2**(-4/n))**k for k = 1, 3, 5, ...
    The real models have 48 and 96 heads, so both branches matter.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    n = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / n)
    slopes = [base**k for k in range(1, n + 1)]
    if num_heads > n:
        extra = 2.0 ** (-4.0 / n)
        slopes += [extra**k for k in range(1, 2 * (num_heads - n), 2)]
    return slopes


def sqrt_alibi_bias(
    slopes: torch.Tensor,
    query_positions: torch.Tensor,
    key_length: int,
    key_padding_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention bias of shape (B or 1, H, Lq, key_length).

    Computed in float32 and cast once, so fp32 runs match the reference to rounding. Keys whose
    ``key_padding_mask`` is 0 are masked too, except the query's own position: a padding query then
    still attends to itself, which keeps its row finite (an all -inf row would give NaN, and NaN
    values leak into real rows through ``0 * NaN`` in the value product).
    """
    device = slopes.device
    key_positions = torch.arange(key_length, device=device)
    distance = query_positions.to(device)[:, None] - key_positions[None, :]
    causal = distance >= 0
    bias = -slopes.float()[:, None, None] * distance.clamp(min=0).float().sqrt()[None]
    bias = bias.masked_fill(~causal[None], float("-inf"))[None]
    if key_padding_mask is not None:
        keep = _pad_key_mask(key_padding_mask.to(device), key_length)[:, None, None, :]
        keep = keep | (distance == 0)[None, None]
        bias = bias.masked_fill(~keep, float("-inf"))
    return bias.to(dtype)


def _pad_key_mask(mask: torch.Tensor, key_length: int) -> torch.Tensor:
    """Fit a 2-D (B, M) keep-mask to the key length.

    A static cache reports more key slots than the mask covers; the extra slots lie in the future
    of every query, where the causal part of the bias already masks them.
    """
    mask = mask.bool()
    width = mask.shape[-1]
    if width == key_length:
        return mask
    if width > key_length:
        return mask[:, -key_length:]
    pad = mask.new_ones((mask.shape[0], key_length - width))
    return torch.cat([mask, pad], dim=-1)


def additive_from_4d(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a 4-D mask from transformers (bool keep-mask or additive float) into an additive one."""
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.tensor(float("-inf"), dtype=dtype, device=mask.device))
    return mask.to(dtype)
