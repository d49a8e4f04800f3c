"""`NativeMambaStep`: a Mamba stack's one-position decoding step (MambaByte) as one native call.

The reference is `multibyte.model.Stack.forward(x, states)` with x of one position over blocks
whose mixer is `multibyte.mixers.mamba.MambaMixer` (`MambaMixer.step`: RMSNorm, in_proj, the
causal convolution's window, the selective state update, the gate, out_proj; then the final
norm). `mamba_step.c` computes the same in fp32 over the weights and states in place. It agrees
with the reference to rounding, not bit for bit (see `multibyte.kernels.attention`).
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

import multibyte.kernels as kernels
from multibyte.kernels import NativeStackStep, load_stack_step, matrix_for_kernel, usable
from multibyte.mixers.mamba import MambaMixer, MambaState

_pointer = ctypes.c_void_p
_BLOCK_FIELDS = ("norm", "in_proj", "conv_weight", "conv_bias", "x_proj", "dt_weight", "dt_bias", "A", "D", "out_proj", "conv_state", "ssm_state")


class _Block(ctypes.Structure):
    _fields_ = [(name, _pointer) for name in _BLOCK_FIELDS]


class _Stack(ctypes.Structure):
    _fields_ = [
        ("d_model", ctypes.c_int64),
        ("d_inner", ctypes.c_int64),
        ("d_state", ctypes.c_int64),
        ("d_conv", ctypes.c_int64),
        ("dt_rank", ctypes.c_int64),
        ("n_blocks", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("final_norm", _pointer),
        ("blocks", ctypes.POINTER(_Block)),
    ]


class NativeMambaStep(NativeStackStep):
    """`mamba_step.c` bound to a Mamba stack and its recurrent states."""

    @classmethod
    def bind(cls, stack: torch.nn.Module, states: list, weight_format: str = "float32") -> Optional["NativeMambaStep"]:
        """The native step of `stack` on `states`, or None when the kernel cannot run it: a block
        that is not a Mamba mixer alone, weights or states not contiguous fp32 on the CPU, norms
        with different eps, more than NATIVE_MAX_BATCH rows, or no kernel library here.
        `weight_format`: the format the kernel reads the matrices in (`multibyte.kernels.matrix_for_kernel`)."""
        blocks = list(stack.blocks)
        if not blocks or len(states) != len(blocks) or not isinstance(states[0], MambaState):
            return None
        batch_size = states[0].ssm.shape[0]
        if batch_size > kernels.NATIVE_MAX_BATCH:
            return None
        if not all(isinstance(b.mixer, MambaMixer) and b.feed_forward is None and isinstance(s, MambaState) for b, s in zip(blocks, states)):
            return None
        first = blocks[0].mixer
        dims = (first.d_model, first.d_inner, first.d_state, first.d_conv, first.dt_rank)
        norms = [stack.final_norm] + [b.mixer_norm for b in blocks]
        if len({n.eps for n in norms}) != 1 or any(n.weight is None for n in norms):
            return None
        eps = norms[0].eps if norms[0].eps is not None else torch.finfo(torch.float32).eps
        keep: list = [stack.final_norm.weight]
        c_blocks = (_Block * len(blocks))()
        for c_block, block, state in zip(c_blocks, blocks, states):
            m = block.mixer
            if (m.d_model, m.d_inner, m.d_state, m.d_conv, m.dt_rank) != dims:
                return None
            if any(layer.bias is not None for layer in (m.in_proj, m.x_proj, m.out_proj)):
                return None
            with torch.no_grad():
                A = m._A().contiguous()  # the reference's -exp(A_log), once per binding instead of per step
                taps = m.conv1d.weight[:, 0].t().contiguous()  # (K, E): each tap's row over the channels
            tensors = [
                block.mixer_norm.weight, m.in_proj.weight, taps, m.conv1d.bias, m.x_proj.weight,
                m.dt_proj.weight, m.dt_proj.bias, A, m.D, m.out_proj.weight, state.conv, state.ssm,
            ]  # fmt: skip
            if not all(usable(t) for t in tensors) or state.conv.shape[0] != batch_size:
                return None
            for i in (1, 4, 5, 9):  # in_proj, x_proj, dt_proj, out_proj
                tensors[i] = matrix_for_kernel(tensors[i], weight_format)
            keep += tensors
            for name, tensor in zip(_BLOCK_FIELDS, tensors):
                setattr(c_block, name, tensor.data_ptr())
        if not usable(stack.final_norm.weight):
            return None
        library = load_stack_step("mamba", _Stack, weight_format)
        if library is None:
            return None
        c_stack = _Stack(*dims, n_blocks=len(blocks), eps=eps, final_norm=stack.final_norm.weight.data_ptr(), blocks=c_blocks)
        keep.append(c_blocks)
        return cls(library, "mamba", c_stack, keep, batch_size, weight_format)
