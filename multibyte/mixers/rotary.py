"""Rotary position embeddings (RoPE, Su et al. 2021) for the attention mixer.

Head channel pair (j, j + head_dim/2) of a query or key at position p is turned by the angle
p · base^(-2j/head_dim). A query-key score then depends on the two positions only through their
difference, so a stage needs no table of positions and no length limit. The angles are computed
from the positions on the fly (no cached table): the training pass, a prefill and a one-position
decoding step compute the same angle for the same position with the same fp32 operations, so
cached decoding reproduces the full pass.
"""

from __future__ import annotations

from typing import Optional

import torch


def rotary_frequencies(head_dim: int, base: float, device) -> torch.Tensor:
    """(head_dim / 2,) fp32 angular speeds of the channel pairs, fastest first."""
    return base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Turn (B, H, L, head_dim) queries or keys by their positions.

    positions: (L,) shared by every row, or (B, L) per row (a KV cache whose rows hold different
    numbers of positions; segments of a packed stream). Returns x's shape and dtype."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    angles = positions.to(torch.float32)[..., None] * rotary_frequencies(head_dim, base, x.device)  # (..., L, hd/2)
    if positions.dim() == 2:
        angles = angles[:, None]  # (B, 1, L, hd/2): the same for every head
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, L) nondecreasing segment ids -> (B, L) int64 index of each position inside its segment."""
    L = segments.shape[1]
    index = torch.arange(L, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    begin = torch.where(starts, index, 0).cummax(dim=1).values  # (B, L) first position of the segment
    return index - begin


def rotary_positions(
    L: int, device, cache_lengths: Optional[torch.Tensor] = None, segments: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Positions of L new entries: after the `cache_lengths` (B,) entries a KV cache holds per row
    ((B, L)), inside their `segments` ((B, L)), or 0..L-1 ((L,))."""
    if cache_lengths is not None:
        return cache_lengths[:, None] + torch.arange(L, device=device)
    if segments is not None:
        return segment_positions(segments)
    return torch.arange(L, device=device)
