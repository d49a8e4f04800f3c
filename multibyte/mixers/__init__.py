"""Sequence mixers: the pluggable part of every residual block.

A mixer maps (B, L, D) -> (B, L, D) causally. Each one also offers `allocate_state(batch, max_len,
device, dtype)` and accepts that state in `forward(x, state)` for incremental decoding.
"""

from torch import nn

from multibyte.config import StageConfig
from multibyte.mixers.attention import CausalSelfAttention, KVCache

__all__ = ["CausalSelfAttention", "KVCache", "build_mixer"]


def build_mixer(stack: StageConfig, dropout: float = 0.0) -> nn.Module:
    """The mixer named by `stack.mixer`, at width `stack.d_model`."""
    if stack.mixer == "attention":
        rotary_base = stack.rotary_base if stack.position == "rotary" else None
        return CausalSelfAttention(stack.d_model, stack.n_heads, dropout, rotary_base)
    if stack.mixer == "mamba":
        from multibyte.mixers.mamba import MambaMixer  # imported lazily: optional fused kernels

        return MambaMixer(
            stack.d_model,
            d_state=stack.d_state,
            d_conv=stack.d_conv,
            expand=stack.expand,
            dt_rank=stack.resolved_dt_rank,
            dt_min=stack.dt_min,
            dt_max=stack.dt_max,
            n_layers=stack.n_layers,  # out_proj shrinks by sqrt(n_layers), as for attention blocks
        )
    raise ValueError(f"unknown mixer {stack.mixer!r} (attention | mamba)")
