"""Causal multi-head self-attention with an optional static key/value cache.

Training and scoring call `forward(x)` with no state: one fused `scaled_dot_product_attention`
with `is_causal=True` (flash / memory-efficient kernels on GPU, the fused CPU kernel here).
Incremental decoding passes a `KVCache` allocated once for (batch, max_len): new keys and values
are written in place at the cache's current length, so nothing grows or reallocates per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


EXPLICIT_MAX_LEN = 1024  # longest sequence for which `explicit_causal_attention` is used on CPU


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v with the (L, L) scores materialised.

    q, k, v: (B, H, L, head_dim) -> (B, H, L, head_dim). Same result as SDPA with is_causal=True.
    """
    L = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, L, L)
    future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    return weights @ v


@dataclass
class KVCache:
    """Keys and values of every position seen so far, for one attention layer.

    Two ways of tracking how full it is:
    - dynamic (the default): `length`, a host integer; attention reads only keys[:, :, :length],
      the fewest keys, which is fastest when every op runs eagerly;
    - static (after `make_static()`): `position`, a 0-d int64 tensor on the cache's device;
      attention reads the whole cache under a mask, so every decoding step has the same shapes
      and reads no changing host integer, which torch.compile (one graph, no recompiles) and
      CUDA graphs need. `length` is not maintained in this mode.
    """

    keys: torch.Tensor  # (B, H, max_len, head_dim)
    values: torch.Tensor  # (B, H, max_len, head_dim)
    length: int = 0  # positions filled so far (dynamic mode)
    position: Optional[torch.Tensor] = None  # positions filled so far (static mode), 0-d int64

    def make_static(self) -> None:
        self.position = torch.zeros((), dtype=torch.long, device=self.keys.device)

    def reset(self) -> None:
        # Stale entries beyond the fill level are never read, so resetting needs no memset.
        self.length = 0
        if self.position is not None:
            self.position.zero_()


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def allocate_state(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch_size, self.n_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> torch.Tensor:
        B, L, D = x.shape
        # (B, L, 3D) -> three of (B, H, L, head_dim)
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        if state is None and self._explicit_is_faster(q):
            y = explicit_causal_attention(q, k, v, dropout)
        elif state is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = self._attend_with_cache(q, k, v, state)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, H, L, hd) -> (B, L, D)
        return self.out_proj(y)

    @staticmethod
    def _explicit_is_faster(q: torch.Tensor) -> bool:
        # Measured on an AVX-512-BF16 CPU (torch 2.14): the fused CPU flash kernel in bf16 is
        # 2-9x slower than three plain batched ops for short sequences (MEGABYTE's local model
        # runs thousands of P-byte sequences), and still slower at 1,024 positions; in fp32 and
        # on GPUs the fused kernel wins. Beyond ~1K positions the explicit (L, L) scores would
        # cost too much memory, so long sequences always take the fused kernel.
        return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= EXPLICIT_MAX_LEN

    @staticmethod
    def _attend_with_cache(q, k, v, cache: KVCache) -> torch.Tensor:
        if cache.position is not None:
            return CausalSelfAttention._attend_with_static_cache(q, k, v, cache)
        start, L = cache.length, q.shape[2]
        end = start + L
        if end > cache.keys.shape[2]:
            raise ValueError(f"KV cache holds {cache.keys.shape[2]} positions; asked to write up to {end}")
        cache.keys[:, :, start:end] = k.to(cache.keys.dtype)
        cache.values[:, :, start:end] = v.to(cache.values.dtype)
        cache.length = end
        keys, values = cache.keys[:, :, :end].to(q.dtype), cache.values[:, :, :end].to(q.dtype)
        if L == 1:
            # One new query sees every cached position: no mask needed.
            return F.scaled_dot_product_attention(q, keys, values)
        # Query i (absolute position start+i) may see keys 0..start+i.
        allowed = torch.ones(L, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)

    @staticmethod
    def _attend_with_static_cache(q, k, v, cache: KVCache) -> torch.Tensor:
        """The same attention with fixed shapes: positions come from a device tensor and every
        query reads the whole cache, masked beyond its own position (slots not yet written lie
        beyond every query's position, so what they hold never matters). Writing past the end
        fails inside index_copy_; callers check lengths on the host."""
        L, max_len = q.shape[2], cache.keys.shape[2]
        positions = cache.position + torch.arange(L, device=q.device)  # (L,) absolute positions of the new entries
        cache.keys.index_copy_(2, positions, k.to(cache.keys.dtype))
        cache.values.index_copy_(2, positions, v.to(cache.values.dtype))
        cache.position += L
        allowed = torch.arange(max_len, device=q.device) <= positions[:, None]  # (L, max_len)
        return F.scaled_dot_product_attention(q, cache.keys.to(q.dtype), cache.values.to(q.dtype), attn_mask=allowed)
