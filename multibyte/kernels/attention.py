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
from typing import Any, Optional

import torch

import multibyte.kernels as kernels
from multibyte.kernels import NativeStackStep, load_stack_step, usable
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

    def __init__(self, library: ctypes.CDLL, stack: _Stack, keep: list, states: list[KVCache], batch_size: int) -> None:
        super().__init__(library, "attention", stack, keep, batch_size)
        self.states = states

    def _advanced(self) -> None:
        for state in self.states:  # the host's bound on every row's length (lengths moved on in C)
            state.bound += 1

    @classmethod
    def bind(cls, stack: torch.nn.Module, states: list) -> Optional["NativeAttentionStep"]:
        """The native step of `stack` (a `multibyte.model.Stack`) on `states` (its per-block
        decoding states), or None when the kernel cannot run it: a block that is not attention,
        weights or caches not contiguous fp32 on the CPU, static caches (compiled decoding), norms
        with different eps, more than NATIVE_MAX_BATCH rows, or no kernel library on this machine."""
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
            keep += tensors + [state.lengths]
            pointers = [0 if t is None else t.data_ptr() for t in tensors] + [state.lengths.data_ptr()]
            for field, pointer in zip(_Block._fields_, pointers):
                setattr(c_block, field[0], pointer)
        if not usable(stack.final_norm.weight):
            return None
        library = load_stack_step("attention", _Stack)
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
        return cls(library, c_stack, keep, list(states), batch_size)



class _ByteStep(ctypes.Structure):
    _fields_ = [
        ("stack", ctypes.POINTER(_Stack)),
        ("embedding", _pointer),
        ("contexts", _pointer),
        ("head", _pointer),
        ("vocab_in", ctypes.c_int64),
        ("siblings", ctypes.c_int64),
        ("vocab", ctypes.c_int64),
        ("unit_tokens", _pointer),
        ("unit_present", _pointer),
        ("coords", _pointer),
        ("unit_lengths", _pointer),
        ("positions", _pointer),
        ("unit_slots", ctypes.c_int64),
        ("num_stages", ctypes.c_int64),
    ]


class NativeByteStep:
    """The innermost stage's whole step for a byte that ends no outer unit, as one native call:
    the twin of `HierarchicalByteModel._decode_byte_in_step` at level N - 1 (record the byte,
    move the counters on, embedding + parent context through the stack, the head's logits).
    Bound to a model and one decode state when the innermost stage is an attention stack with a
    bound `NativeAttentionStep` and nothing else enters its input (no position table, concat
    pooling, no position or hash embeddings of bytes) and the head is a bias-free fp32 linear."""

    def __init__(self, library: ctypes.CDLL, step: _ByteStep, stack_step: NativeAttentionStep, keep: list, head: torch.nn.Module) -> None:
        self._kernel = library.multibyte_attention_byte_step
        self._step_ref = ctypes.byref(step)
        self._keep = keep + [step]
        self._stack_step, self._head = stack_step, head
        self.batch_size, self.vocab = stack_step.batch_size, step.vocab
        self._work = torch.empty(int(library.multibyte_attention_byte_workspace(self._step_ref, self.batch_size)))
        self._work_ptr = self._work.data_ptr()

    @classmethod
    def bind(cls, model: torch.nn.Module, state: Any) -> Optional["NativeByteStep"]:
        """For `model` (a `HierarchicalByteModel`) and its `state` (a `DecodeState`), or None."""
        N = model.config.num_stages
        stack_step = state.stage_states[-1].native if N > 1 else None
        if not isinstance(stack_step, NativeAttentionStep):
            return None
        stage, head = model.stages[-1], model.head
        if stage.pool is not None or stage.adds_position or state.unit_extra is not None or state.history is not None:
            return None
        tensors = [stage.byte_embedding.weight, state.contexts[-1], head.weight]
        counters = [state.unit_tokens, state.coords, state.unit_lengths, state.positions]
        if head.bias is not None or not all(usable(t) for t in tensors):
            return None
        if not all(t.dtype == torch.int64 and t.is_contiguous() and t.device.type == "cpu" for t in counters):
            return None
        if state.unit_present.dtype != torch.bool or not state.unit_present.is_contiguous() or state.unit_lengths.shape[1] != N - 1:
            return None
        library = load_stack_step("attention", _Stack)
        if library is None or not hasattr(library, "multibyte_attention_byte_step"):
            return None
        if not hasattr(library, "_multibyte_byte_typed"):
            fn, workspace = library.multibyte_attention_byte_step, library.multibyte_attention_byte_workspace
            fn.argtypes = [ctypes.POINTER(_ByteStep), ctypes.c_int64, _pointer, ctypes.c_int64, ctypes.c_int64, _pointer, _pointer]
            fn.restype = ctypes.c_int
            workspace.argtypes, workspace.restype = [ctypes.POINTER(_ByteStep), ctypes.c_int64], ctypes.c_int64
            library._multibyte_byte_typed = True
        step = _ByteStep(
            stack=ctypes.pointer(stack_step.struct),
            embedding=tensors[0].data_ptr(),
            contexts=tensors[1].data_ptr(),
            head=tensors[2].data_ptr(),
            vocab_in=stage.byte_embedding.num_embeddings,
            siblings=state.contexts[-1].shape[1],
            vocab=head.out_features,
            unit_tokens=state.unit_tokens.data_ptr(),
            unit_present=state.unit_present.data_ptr(),
            coords=state.coords.data_ptr(),
            unit_lengths=state.unit_lengths.data_ptr(),
            positions=state.positions.data_ptr(),
            unit_slots=state.unit_tokens.shape[1],
            num_stages=N,
        )
        return cls(library, step, stack_step, tensors + counters + [state.unit_present], head)

    def __call__(self, byte: torch.Tensor, slot: int, context_index: int) -> Optional[torch.Tensor]:
        """byte (B,) int64 -> (B, V) fp32 logits of the next byte, or None (nothing changed):
        the caller then runs the PyTorch step."""
        if self._head._forward_hooks or self._head._forward_pre_hooks or byte.dtype != torch.int64 or byte.shape != (self.batch_size,):
            return None  # a hook on the head (e.g. masking unused ids) must see the PyTorch call
        byte = byte.contiguous()
        logits = torch.empty(self.batch_size, self.vocab)
        if self._kernel(self._step_ref, self.batch_size, byte.data_ptr(), slot, context_index, logits.data_ptr(), self._work_ptr):
            return None
        self._stack_step._advanced()
        return logits
