"""What this CPU can do, for the code paths that choose a kernel or a precision by it.

Kept free of Lightning and of the model so that benchmarks, the sampler and the attention
mixer can ask without importing the training stack.
"""

from __future__ import annotations

from functools import cache

import torch


@cache
def vector_capability() -> str:
    """The vector instructions PyTorch's CPU kernels use here: "AVX2", "AVX512", "DEFAULT", ..."""
    return torch.backends.cpu.get_cpu_capability()


def has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles). Without either
    (AVX2-only x86, most laptops), PyTorch's bf16 matmuls convert to fp32 in software and run
    several times slower than fp32 ones, so bf16 saves nothing there but memory."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
