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

from multibyte import cpu_features
from multibyte.mixers.rotary import apply_rotary, rotary_positions

EXPLICIT_MAX_LEN = 1024  # longest sequence for which `explicit_causal_attention` is used on CPU
EXPLICIT_MAX_LEN_FP32_AVX2 = 16  # the same for fp32 on a CPU whose widest vectors are AVX2
EXPLICIT_DECODE_KEYS = 2048  # longest static cache that one decoding query reads without SDPA
EXPLICIT_QUERY_BLOCK = 256  # queries per block of `explicit_causal_attention`


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v with the scores materialised.

    q, k, v: (B, H, L, head_dim) -> (B, H, L, head_dim). Same result as SDPA with is_causal=True.
    Queries go in blocks of EXPLICIT_QUERY_BLOCK: a block's queries score only the keys up to
    its own last position, so the masked upper triangle beyond each block's diagonal square is
    never computed (about (n + 1) / 2n of the L·L scores for n blocks); up to one block long it
    is the plain three ops.
    """
    L, hd = q.shape[-2], q.shape[-1]
    # The 1/sqrt(d) scale goes on the smaller of q (L·hd) and the scores (L·L); scale and mask
    # are applied in place (the matmul's backward needs q and k, not its output), so no second
    # scores tensor is allocated and written.
    scale_q = L > hd
    if scale_q:
        q = q * hd**-0.5
    outputs = []
    for start in range(0, L, EXPLICIT_QUERY_BLOCK):
        end = min(L, start + EXPLICIT_QUERY_BLOCK)
        scores = q[..., start:end, :] @ k[..., :end, :].transpose(-1, -2)  # (B, H, end - start, end)
        if not scale_q:
            scores.mul_(hd**-0.5)
        future = torch.ones(end - start, end, dtype=torch.bool, device=q.device).triu(diagonal=start + 1)
        weights = scores.masked_fill_(future, float("-inf")).softmax(dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        outputs.append(weights @ v[..., :end, :])  # (B, H, end - start, hd)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)


def segment_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor, window: int, dropout: float = 0.0
) -> torch.Tensor:
    """Causal attention inside segments: query i sees key j iff j <= i and segments[j] ==
    segments[i]. q, k, v (B, H, L, hd); segments (B, L) nondecreasing; every segment at most
    `window` long. Banded: the sequence is cut into blocks of `window` positions and a block's
    queries read only their own block and the one before (a segment can span no further), so
    the cost is O(L · 2·window), not O(L²)."""
    B, H, L, hd = q.shape
    W = max(1, window)
    n = -(-L // W)
    pad = n * W - L
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        segments = F.pad(segments, (0, pad), value=-1)  # padding matches no real segment...
        segments[:, L:] = -1 - torch.arange(pad, device=segments.device)  # ...nor each other
    blocks = lambda t: t.view(B, H, n, W, hd)  # noqa: E731
    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    before = lambda t: torch.cat([torch.zeros_like(t[:, :, :1]), t[:, :, :-1]], dim=2)  # noqa: E731
    keys = torch.cat([before(kb), kb], dim=3)  # (B, H, n, 2W, hd)
    values = torch.cat([before(vb), vb], dim=3)
    seg = segments.view(B, n, W)
    seg_before = torch.cat([torch.full_like(seg[:, :1], -(2**62)), seg[:, :-1]], dim=1)
    key_seg = torch.cat([seg_before, seg], dim=2)  # (B, n, 2W)
    query_pos = torch.arange(W, device=q.device)[:, None] + W  # positions inside [previous, own] block
    key_pos = torch.arange(2 * W, device=q.device)[None, :]
    allowed = (key_pos <= query_pos) & (key_seg[:, :, None, :] == seg[:, :, :, None])  # (B, n, W, 2W)
    scores = (qb @ keys.transpose(-1, -2)) * hd**-0.5  # (B, H, n, W, 2W)
    weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    y = (weights @ values).view(B, H, n * W, hd)
    return y[:, :, :L]


@dataclass
class KVCache:
    """Keys and values of every position seen so far, for one attention layer and B rows.

    Rows may hold different numbers of positions (`lengths`, on the device): a hierarchical model
    decodes rows whose patches end at different bytes. Two ways of reading it:
    - dynamic (the default): `bound`, a host integer >= every row's length, limits what attention
      reads, the fewest keys, fastest when every op runs eagerly; while `uniform` (all rows hold
      the same number of positions, as in plain batched sampling) writes are slices and one new
      query needs no mask at all;
    - static (after `make_static()`): attention reads the whole cache under a per-row mask and no
      host integer changes, so every step has the same shapes (torch.compile, CUDA graphs).
    One slot past `max_len` is scratch: a row that does not advance this step writes there or at
    its own next slot, which no query of that row reads before it is overwritten.
    """

    keys: torch.Tensor  # (B, H, max_len + 1, head_dim)
    values: torch.Tensor  # (B, H, max_len + 1, head_dim)
    lengths: torch.Tensor  # (B,) int64: positions filled per row
    bound: int = 0  # dynamic mode: an upper bound of lengths, on the host
    uniform: bool = True  # dynamic mode: every row holds `bound` positions
    static: bool = False

    @property
    def max_len(self) -> int:
        return self.keys.shape[2] - 1

    def make_static(self) -> None:
        self.static = True

    def reset(self, rows: Optional[torch.Tensor] = None) -> None:
        """Forget every position (of `rows` only, (B,) bool, when given). Stale entries beyond a
        row's length are never read, so this needs no memset."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths.masked_fill_(rows, 0)
        if not self.static:  # host-side bookkeeping of the dynamic mode (a compiled step has none)
            self.bound, self.uniform = (0, True) if rows is None else (self.bound, False)


def attend_with_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, run: Optional[torch.Tensor]) -> torch.Tensor:
    """Append L new positions per row to `cache` and attend causally over everything it holds.

    q, k, v: (B, H, L, hd). `run` (B,) bool: rows that really advance (None: all); the others'
    outputs are meaningless and their lengths unchanged."""
    B, H, L, _ = q.shape
    start = cache.lengths  # (B,)
    if not cache.static and cache.uniform and run is None:
        s, end = cache.bound, cache.bound + L
        if end > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; asked to write up to {end}")
        cache.keys[:, :, s:end] = k.to(cache.keys.dtype)
        cache.values[:, :, s:end] = v.to(cache.values.dtype)
        cache.lengths.add_(L)
        cache.bound = end
        keys, values = cache.keys[:, :, :end].to(q.dtype), cache.values[:, :, :end].to(q.dtype)
        if L == 1:
            return F.scaled_dot_product_attention(q, keys, values)  # one query sees every key
        allowed = torch.ones(L, end, dtype=torch.bool, device=q.device).tril(diagonal=s)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
    # Per-row positions: scatter the new entries at start[b] + i, clamped into the scratch slot.
    offsets = torch.arange(L, device=q.device)
    positions = (start[:, None] + offsets).clamp(max=cache.max_len)  # (B, L)
    rows = torch.arange(B, device=q.device)[:, None, None]
    heads = torch.arange(H, device=q.device)[None, :, None]
    cache.keys[rows, heads, positions[:, None, :]] = k.to(cache.keys.dtype)
    cache.values[rows, heads, positions[:, None, :]] = v.to(cache.values.dtype)
    if cache.static:
        width = cache.max_len + 1
    else:
        if cache.bound + L > cache.max_len:
            cache.bound = cache.max_len
        else:
            cache.bound += L
        width = cache.bound
        cache.uniform = cache.uniform and run is None
    key_positions = torch.arange(width, device=q.device)
    allowed = key_positions[None, None, :] <= (start[:, None, None] + offsets[None, :, None])  # (B, L, width)
    if run is None:
        cache.lengths.add_(L)
    else:
        cache.lengths.add_(run.long() * L)
    keys, values = cache.keys[:, :, :width].to(q.dtype), cache.values[:, :, :width].to(q.dtype)
    if cache.static and L == 1 and width <= EXPLICIT_DECODE_KEYS:
        # One query per row on a static cache of up to a few thousand keys (a compiled decoding
        # step's inner stages, and the outer stage of an image-sized sequence): written out, so
        # that Inductor fuses scores, mask, softmax and the weighted sum into a few loops; the
        # CPU flash-attention kernel's fixed cost per call and per masked block is not amortised
        # by one query. Over a long cache the fused kernel reads the keys faster.
        scores = (q * keys).sum(-1, dtype=torch.float32) * q.shape[-1] ** -0.5  # (B, H, width)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        return (weights[..., None] * values.float()).sum(2, keepdim=True).to(q.dtype)  # (B, H, 1, hd)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None])


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, rotary_base: Optional[float] = None) -> None:
        super().__init__()
        self.rotary_base = rotary_base  # RoPE on queries and keys (multibyte/mixers/rotary.py); None: off
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def allocate_state(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch_size, self.n_heads, max_len + 1, self.head_dim)
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def forward(
        self,
        x: torch.Tensor,
        state: KVCache | None = None,
        run: Optional[torch.Tensor] = None,
        segments: Optional[torch.Tensor] = None,
        window: int = 0,
    ) -> torch.Tensor:
        """(B, L, D) -> (B, L, D). With a cache, continue the rows it holds (`run`: see
        `attend_with_cache`). With `segments` (B, L), attend within segments of at most
        `window` positions only (`segment_causal_attention`)."""
        B, L, D = x.shape
        # (B, L, 3D) -> three of (B, H, L, head_dim)
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary_base is not None:  # positions: after the cache's entries, inside segments, or 0..L-1
            positions = rotary_positions(L, x.device, None if state is None else state.lengths, segments)
            q, k = apply_rotary(q, positions, self.rotary_base), apply_rotary(k, positions, self.rotary_base)
        dropout = self.dropout if self.training else 0.0
        if segments is not None:
            y = segment_causal_attention(q, k, v, segments, window, dropout)
        elif state is None and self._explicit_is_faster(q):
            y = explicit_causal_attention(q, k, v, dropout)
        elif state is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = attend_with_cache(q, k, v, state, run)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, H, L, hd) -> (B, L, D)
        return self.out_proj(y)

    @staticmethod
    def _explicit_is_faster(q: torch.Tensor) -> bool:
        # Measured with torch 2.14, forward + backward: on an AVX-512-BF16 CPU the fused CPU
        # flash kernel in bf16 is slower than three plain batched ops for short sequences
        # (MEGABYTE's local model runs thousands of P-byte sequences), and still slower at 1,024
        # positions, while in fp32 the fused kernel wins there; on an AVX2-only CPU the plain ops
        # also win in fp32 up to 16 positions (even at 32, slower from 64). On GPUs the fused
        # kernel wins. Beyond ~1K positions the explicit (L, L) scores would cost too much
        # memory, so long sequences always take the fused kernel.
        if q.device.type != "cpu":
            return False
        if q.dtype == torch.bfloat16:
            return q.shape[-2] <= EXPLICIT_MAX_LEN
        return q.dtype == torch.float32 and q.shape[-2] <= EXPLICIT_MAX_LEN_FP32_AVX2 and cpu_features.vector_capability() == "AVX2"
