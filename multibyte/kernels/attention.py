"""`NativeAttentionStep`: an attention stack's one-position decoding step as one native call.

The reference is `multibyte.model.Stack.forward(x, states)` with x of one position: RMSNorm,
`CausalSelfAttention` on its `KVCache` (rotary or not), the tanh-GELU feed-forward, the final
norm. `attention_step.c` computes the same in fp32 over the weights and caches in place (no
copies), and moves every block's cache lengths on by one; the caller keeps the caches' host
bookkeeping (`KVCache.bound`). It agrees with the reference to rounding (~1e-6), not bit for
bit, so it is used where that is enough (sampling) and never where two runs must agree exactly
(the compressor).
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

import multibyte.kernels as kernels
from multibyte.kernels import NativeStackStep, load_stack_step, matrix_for_kernel, usable
from multibyte.mixers.attention import CausalSelfAttention, KVCache
from multibyte.mixers.rotary import rotary_frequencies

_pointer = ctypes.c_void_p


class _Block(ctypes.Structure):
    _fields_ = [(name, _pointer) for name in ("mixer_norm", "qkv", "out_proj", "ff_norm", "up", "down", "keys", "values", "lengths")]


class _Stack(ctypes.Structure):
    _fields_ = [
        ("d_model", ctypes.c_int64),
        ("n_heads", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("n_blocks", ctypes.c_int64),
        ("slots", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("frequencies", _pointer),
        ("final_norm", _pointer),
        ("blocks", ctypes.POINTER(_Block)),
    ]


class NativeAttentionStep(NativeStackStep):
    """`attention_step.c` bound to an attention stack and its KV caches."""

    def __init__(self, library: ctypes.CDLL, stack: _Stack, keep: list, states: list[KVCache], batch_size: int, weight_format: str = "float32") -> None:
        super().__init__(library, "attention", stack, keep, batch_size, weight_format)
        self.states = states

    def _advanced(self) -> None:
        for state in self.states:  # the host's bound on every row's length (lengths moved on in C)
            state.bound += 1

    @classmethod
    def bind(cls, stack: torch.nn.Module, states: list, weight_format: str = "float32") -> Optional["NativeAttentionStep"]:
        """The native step of `stack` (a `multibyte.model.Stack`) on `states` (its per-block
        decoding states), or None when the kernel cannot run it: a block that is not attention,
        weights or caches not contiguous fp32 on the CPU, static caches (compiled decoding), norms
        with different eps, more than NATIVE_MAX_BATCH rows, or no kernel library on this machine.
        `weight_format`: the format the kernel reads the matrices in (`multibyte.kernels.matrix_for_kernel`)."""
        blocks = list(stack.blocks)
        if not blocks or len(states) != len(blocks) or not isinstance(states[0], KVCache):
            return None
        if states[0].keys.shape[0] > kernels.NATIVE_MAX_BATCH:
            return None
        if not all(isinstance(b.mixer, CausalSelfAttention) and isinstance(s, KVCache) and not s.static for b, s in zip(blocks, states)):
            return None
        norms = [stack.final_norm] + [n for b in blocks for n in (b.mixer_norm, b.ff_norm) if n is not None]
        if len({n.eps for n in norms}) != 1 or any(n.weight is None for n in norms):
            return None
        eps = norms[0].eps if norms[0].eps is not None else torch.finfo(torch.float32).eps
        first = blocks[0].mixer
        D, H = stack.config.d_model, first.n_heads
        hidden = blocks[0].feed_forward.up.out_features if blocks[0].feed_forward is not None else 0
        frequencies = None
        if first.rotary_base is not None:
            if first.head_dim % 2 or any(b.mixer.rotary_base != first.rotary_base for b in blocks):
                return None
            frequencies = rotary_frequencies(first.head_dim, first.rotary_base, "cpu").contiguous()
        keep: list = [frequencies, stack.final_norm.weight]
        c_blocks = (_Block * len(blocks))()
        for c_block, block, state in zip(c_blocks, blocks, states):
            attention, ff = block.mixer, block.feed_forward
            if attention.n_heads != H or (ff.up.out_features if ff is not None else 0) != hidden:
                return None
            tensors = [block.mixer_norm.weight, attention.qkv.weight, attention.out_proj.weight]
            tensors += [block.ff_norm.weight, ff.up.weight, ff.down.weight] if ff is not None else [None] * 3
            tensors += [state.keys, state.values]
            if any(t is not None and not usable(t) for t in tensors) or tensors[0] is None:
                return None
            if state.lengths.dtype != torch.int64 or not state.lengths.is_contiguous() or state.keys.shape != states[0].keys.shape:
                return None
            linears = (attention.qkv, attention.out_proj) + ((ff.up, ff.down) if ff is not None else ())
            if any(m.bias is not None for m in linears):
                return None
            for i in (1, 2, 4, 5):  # qkv, out_proj, up, down
                tensors[i] = None if tensors[i] is None else matrix_for_kernel(tensors[i], weight_format)
            keep += tensors + [state.lengths]
            pointers = [0 if t is None else t.data_ptr() for t in tensors] + [state.lengths.data_ptr()]
            for field, pointer in zip(_Block._fields_, pointers):
                setattr(c_block, field[0], pointer)
        if not usable(stack.final_norm.weight):
            return None
        library = load_stack_step("attention", _Stack, weight_format)
        if library is None:
            return None
        batch_size, _, slots, _ = states[0].keys.shape
        c_stack = _Stack(
            d_model=D,
            n_heads=H,
            hidden=hidden,
            n_blocks=len(blocks),
            slots=slots,
            eps=eps,
            frequencies=0 if frequencies is None else frequencies.data_ptr(),
            final_norm=stack.final_norm.weight.data_ptr(),
            blocks=c_blocks,
        )
        keep.append(c_blocks)
        return cls(library, c_stack, keep, list(states), batch_size, weight_format)
