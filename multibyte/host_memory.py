"""How the host's allocator serves a training step on a CPU: `reuse_freed_memory`.

Free of Lightning and of the model, so that the trainer and the benchmarks share it.
"""

from __future__ import annotations

_REUSING_FREED_MEMORY = False


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A training step on CPU allocates and frees hundreds of activation tensors of tens of MB.
    By default glibc serves every block above 32 MiB with a fresh mmap and unmaps it on free, so
    each such tensor is first written through page faults that zero every 4 KiB page (at
    L 8192, B 4 that was a third of the step's CPU time, as system time). With mmap off and no
    trimming, freed blocks stay in the heap and the next step reuses them; the process keeps
    its peak size. Returns whether the allocator took the settings (False off glibc)."""
    global _REUSING_FREED_MEMORY
    if _REUSING_FREED_MEMORY:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
        _REUSING_FREED_MEMORY = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        _REUSING_FREED_MEMORY = False
    return _REUSING_FREED_MEMORY
