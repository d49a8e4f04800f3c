"""`NativeDecode`: whole decoding steps of a model with fixed units, and runs of them with the
draw of every next byte, as native calls (decode_run.c, with the attention stack step); runs also
for one row of a two-stage SpaceByte model, whose units end at word boundaries.

The references are `multibyte.model.HierarchicalByteModel._decode_byte_in_step` (one step, every
row at the same position of fixed units) and `multibyte.sampling.sample_with_noise` (one draw
from logits and Exp(1) noise). Two steps are native:
  - the byte step, for a byte after which no outer unit starts (11 of 12 with P = 12), when the
    innermost stage is attention over its byte embedding and the parent's context (byte
    positions, which only the outermost pooling reads, are recorded; not hashed n-grams);
  - the unit step, for the last byte of a patch of a two-stage (MEGABYTE-shaped) model whose
    global stage is attention over concatenated byte vectors (lags and learned or grid patch
    positions included);
  - the one step of a one-stage model (the vanilla byte transformer, MambaByte): embedding
    (+ byte position), its attention or Mamba stack, the head.
A run (`NativeDecode.run`) is up to k steps and draws in one call: a whole patch, or many, for
one call from Python. With SpaceByte's units (`multibyte.patchers.space`) the run applies the
patcher's rule to each byte it feeds to choose the byte or the unit step, at batch 1 only (rows
end their words at different bytes; a batch decodes in PyTorch). Like the stack steps it agrees
with the reference to rounding, not bit for bit (a draw can move only where two bytes' scores
meet within that rounding).
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any, Optional

import torch

from multibyte.kernels import load, matrix_for_kernel, usable
from multibyte.kernels.attention import NativeAttentionStep, _Stack
from multibyte.kernels.mamba import NativeMambaStep
from multibyte.mixers.attention import KVCache

_pointer = ctypes.c_void_p


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
        ("position_table", _pointer),
        ("position_rows", ctypes.c_int64),
        ("extra_width", ctypes.c_int64),
        ("unit_extra", _pointer),
    ]


class _UnitStep(ctypes.Structure):
    _fields_ = [
        ("inner", ctypes.POINTER(_ByteStep)),
        ("stack", ctypes.POINTER(_Stack)),
        ("embedding", _pointer),
        ("width", ctypes.c_int64),
        ("lag_proj", _pointer),
        ("lag_ring", _pointer),
        ("lags", _pointer),
        ("n_lags", ctypes.c_int64),
        ("ring", ctypes.c_int64),
        ("unit_position", _pointer),
        ("position_rows", ctypes.c_int64),
        ("grid_rows", _pointer),
        ("grid_cols", _pointer),
        ("grid_r", ctypes.c_int64),
        ("grid_c", ctypes.c_int64),
        ("from_parent", _pointer),
        ("pad", _pointer),
    ]


class _SingleStage(ctypes.Structure):
    _fields_ = [
        ("stack", _pointer),
        ("mamba", ctypes.c_int64),
        ("embedding", _pointer),
        ("position_table", _pointer),
        ("position_rows", ctypes.c_int64),
        ("head", _pointer),
        ("vocab_in", ctypes.c_int64),
        ("vocab", ctypes.c_int64),
        ("d_model", ctypes.c_int64),
        ("coords", _pointer),
        ("positions", _pointer),
    ]


class _DrawRule(ctypes.Structure):
    _fields_ = [("temperature", ctypes.c_float), ("top_k", ctypes.c_int64), ("top_p", ctypes.c_float), ("stop", ctypes.c_int64)]


def _library(weight_format: str = "float32") -> Optional[ctypes.CDLL]:
    library = load("decode_run", weight_format)
    if library is not None and not hasattr(library, "_multibyte_decode_typed"):
        byte, unit, single, i64 = ctypes.POINTER(_ByteStep), ctypes.POINTER(_UnitStep), ctypes.POINTER(_SingleStage), ctypes.c_int64
        rule = ctypes.POINTER(_DrawRule)
        signatures = {
            "multibyte_byte_step": ([byte, i64, _pointer, i64, i64, _pointer, _pointer], ctypes.c_int),
            "multibyte_unit_step": ([unit, i64, _pointer, i64, _pointer, _pointer], ctypes.c_int),
            "multibyte_decode_run": ([byte, unit, i64, i64, i64, _pointer, i64, _pointer, rule, _pointer, _pointer, _pointer], i64),
            "multibyte_decode_run_workspace": ([byte, unit, i64], i64),
            "multibyte_single_step": ([single, i64, _pointer, _pointer, _pointer], ctypes.c_int),
            "multibyte_single_run": ([single, i64, _pointer, i64, _pointer, rule, _pointer, _pointer, _pointer], i64),
            "multibyte_single_workspace": ([single, i64], i64),
            "multibyte_space_run": ([byte, unit, i64, _pointer, i64, _pointer, i64, _pointer, rule, _pointer, _pointer, _pointer, _pointer], i64),
        }
        for name, (arguments, result) in signatures.items():
            function = getattr(library, name)
            function.argtypes, function.restype = arguments, result
        library._multibyte_decode_typed = True
    return library


def _host_counter(t: torch.Tensor) -> bool:
    """A state counter the kernels may update in place: contiguous int64 on the CPU."""
    return t.dtype == torch.int64 and t.is_contiguous() and t.device.type == "cpu"


def _pointer_of(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class NativeDecode:
    """The native whole steps of one model on one decode state (`bind`), for `decode_step`
    (`step`) and for sampling (`run`). Pointers into the weights and the state are taken at
    binding, as for the stack steps (`multibyte.kernels.NativeStackStep`)."""

    def __init__(self, library: ctypes.CDLL, step: ctypes.Structure, unit_step: Optional[_UnitStep], keep: list, model: Any, state: Any) -> None:
        """`step`: a _ByteStep (two stages or more, with the `unit_step` of two) or a _SingleStage."""
        self._library = library
        self._single = isinstance(step, _SingleStage)
        self._byte_ref = None if self._single else ctypes.byref(step)
        self._single_ref = ctypes.byref(step) if self._single else None
        self._unit_ref = None if unit_step is None else ctypes.byref(unit_step)
        self._keep = keep + [step, unit_step]  # what the kernel's pointers point into
        self._head = model.head
        self._state_ref = weakref.ref(state)  # the state holds this object: no reference cycle
        self._patch_sizes = [s.patch_size for s in model.config.stages[:-1]]
        self._unit_slots = 1 if self._single else int(step.unit_slots)
        self._inner_period = self._patch_sizes[-1] if self._patch_sizes else 1  # the innermost stage's parent unit, in bytes
        self.batch_size, self.vocab = state.batch_size, int(step.vocab)
        self.has_unit_step = unit_step is not None
        # SpaceByte's units: the patcher's state (was the last byte space-like?) and longest unit
        self._word_units = not model.config.is_fixed
        self._spacy = state.patcher_states[0] if self._word_units else None
        self._max_length = model.patchers[0].max_length if self._word_units else 0
        if self._single:
            work = library.multibyte_single_workspace(self._single_ref, self.batch_size)
        else:
            work = library.multibyte_decode_run_workspace(self._byte_ref, self._unit_ref, self.batch_size)
        self._work = torch.empty(int(work))
        self._work_ptr = self._work.data_ptr()

    @classmethod
    def bind(cls, model: torch.nn.Module, state: Any) -> Optional["NativeDecode"]:
        """For `model` (a `HierarchicalByteModel` with fixed units, or two stages with SpaceByte's
        units at batch 1: `_can_run_word_units`) and its `state` (a `DecodeState` whose
        innermost stack has a bound `NativeAttentionStep`, or with one stage a native attention
        or Mamba step), or None where the byte step cannot run: something besides the byte
        embedding and the context enters the innermost input, hashed n-gram embeddings, a head
        with a bias, weights not fp32. The model's matrices are read as its stack steps read
        them (their `weight_format`)."""
        config = model.config
        N = config.num_stages
        if state.static or not (config.is_fixed or cls._can_run_word_units(model, state)):
            return None
        if N == 1:
            return cls._bind_single(model, state)
        inner_step = state.stage_states[-1].native
        if not isinstance(inner_step, NativeAttentionStep):
            return None
        stage, head = model.stages[-1], model.head
        if stage.pool is not None or stage.adds_position or state.history is not None:
            return None  # (hashed n-grams need the history)
        positions = model.position_embedding.weight if model.position_embedding is not None else None
        if (positions is None) != (state.unit_extra is None) or not (positions is None or usable(positions) and usable(state.unit_extra)):
            return None
        tensors = [stage.byte_embedding.weight, state.contexts[-1], head.weight]
        counters = [state.unit_tokens, state.coords, state.unit_lengths, state.positions]
        if head.bias is not None or not all(usable(t) for t in tensors):
            return None
        if not all(_host_counter(t) for t in counters):
            return None
        if state.unit_present.dtype != torch.bool or not state.unit_present.is_contiguous() or state.unit_lengths.shape[1] != N - 1:
            return None
        weight_format = inner_step.weight_format
        tensors[2] = matrix_for_kernel(head.weight, weight_format)
        library = _library(weight_format)
        if library is None:
            return None
        byte_step = _ByteStep(
            stack=ctypes.pointer(inner_step.struct),
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
            position_table=_pointer_of(positions),
            position_rows=0 if positions is None else positions.shape[0],
            extra_width=0 if positions is None else positions.shape[1],
            unit_extra=_pointer_of(state.unit_extra),
        )
        keep = tensors + counters + [state.unit_present, inner_step, positions, state.unit_extra]
        unit_step = cls._bind_unit_step(model, state, byte_step, keep, weight_format) if N == 2 else None
        if unit_step is None and not config.is_fixed:
            return None  # word units end at nearly every other byte: no gain without the unit step
        return cls(library, byte_step, unit_step, keep, model, state)

    @staticmethod
    def _can_run_word_units(model: Any, state: Any) -> bool:
        """Whether a model without fixed units can run natively: two stages whose outer units end
        at SpaceByte's word boundaries, its patcher state a contiguous bool, one row."""
        from multibyte.patchers.space import SpacePatcher

        if model.config.num_stages != 2 or type(model.patchers[0]) is not SpacePatcher or state.batch_size != 1:
            return False
        spacy = state.patcher_states[0]
        return spacy.dtype == torch.bool and spacy.is_contiguous() and spacy.device.type == "cpu"

    @classmethod
    def _bind_single(cls, model: Any, state: Any) -> Optional["NativeDecode"]:
        """A one-stage model (the vanilla byte transformer, MambaByte) whose stack has a native
        step, fed its byte embedding (+ byte positions), its head bias-free fp32; else None."""
        stage, head = model.stages[0], model.head
        stack_step = state.stage_states[0].native
        if not isinstance(stack_step, (NativeAttentionStep, NativeMambaStep)):
            return None
        if stage.pool is not None or stage.adds_position or state.history is not None or head.bias is not None:
            return None
        positions = model.position_embedding.weight if model.position_embedding is not None else None
        tensors = [stage.byte_embedding.weight, head.weight]
        counters = [state.coords, state.positions]
        if not all(usable(t) for t in tensors) or not (positions is None or usable(positions)):
            return None
        if not all(_host_counter(t) for t in counters):
            return None
        tensors[1] = matrix_for_kernel(head.weight, stack_step.weight_format)
        library = _library(stack_step.weight_format)
        if library is None:
            return None
        single = _SingleStage(
            stack=ctypes.cast(ctypes.pointer(stack_step.struct), _pointer),
            mamba=int(isinstance(stack_step, NativeMambaStep)),
            embedding=tensors[0].data_ptr(),
            position_table=_pointer_of(positions),
            position_rows=0 if positions is None else positions.shape[0],
            head=tensors[1].data_ptr(),
            vocab_in=stage.byte_embedding.num_embeddings,
            vocab=head.out_features,
            d_model=stage.config.d_model,
            coords=state.coords.data_ptr(),
            positions=state.positions.data_ptr(),
        )
        return cls(library, single, None, tensors + counters + [positions, stack_step], model, state)

    @staticmethod
    def _bind_unit_step(model: Any, state: Any, byte_step: _ByteStep, keep: list, weight_format: str) -> Optional[_UnitStep]:
        """The global stage's step of a two-stage model, or None where the kernel does not run
        it (pooling by attention, a global stack that is not attention, weights not fp32, or a
        global stack bound for another matrix format than the local one's `weight_format`)."""
        outer, inner = model.stages
        outer_step = state.stage_states[0].native
        if outer.pool is not None or not isinstance(outer_step, NativeAttentionStep) or outer_step.weight_format != weight_format:
            return None
        D0, S = outer.config.d_model, inner.siblings
        if D0 % S or inner.from_parent is None or outer.byte_width * outer.slots != D0:
            return None
        lags = outer.lag_offsets if outer.lag_proj is not None else None
        positions = outer.unit_position.weight if outer.unit_position is not None else None
        grid = (outer.grid_rows.weight, outer.grid_cols.weight) if outer.grid_rows is not None else (None, None)
        tensors = [outer.byte_embedding.weight, inner.from_parent.weight, inner.pad]
        optional = [None if lags is None else outer.lag_proj.weight, None if lags is None else state.lag_ring, positions, *grid]
        if not all(usable(t) for t in tensors) or not all(t is None or usable(t) for t in optional):
            return None
        if lags is not None and (lags.dtype != torch.int64 or not lags.is_contiguous() or lags.device.type != "cpu"):
            return None
        tensors[1] = matrix_for_kernel(tensors[1], weight_format)  # from_parent
        if lags is not None:
            optional[0] = matrix_for_kernel(optional[0], weight_format)  # lag_proj
        keep += tensors + optional + [lags, outer_step]
        return _UnitStep(
            inner=ctypes.pointer(byte_step),
            stack=ctypes.pointer(outer_step.struct),
            embedding=tensors[0].data_ptr(),
            width=outer.byte_width,
            lag_proj=_pointer_of(optional[0]),
            lag_ring=_pointer_of(optional[1]),
            lags=_pointer_of(lags),
            n_lags=0 if lags is None else len(lags),
            ring=0 if lags is None else state.lag_ring.shape[1],
            unit_position=_pointer_of(positions),
            position_rows=0 if positions is None else positions.shape[0],
            grid_rows=_pointer_of(grid[0]),
            grid_cols=_pointer_of(grid[1]),
            grid_r=0 if grid[0] is None else grid[0].shape[0],
            grid_c=0 if grid[1] is None else grid[1].shape[0],
            from_parent=tensors[1].data_ptr(),
            pad=tensors[2].data_ptr(),
        )

    def _declines(self, byte: torch.Tensor) -> bool:
        # A hook on the head (e.g. masking a subword model's unused ids) must see the PyTorch call.
        return bool(self._head._forward_hooks or self._head._forward_pre_hooks) or byte.dtype != torch.int64 or byte.shape != (self.batch_size,)

    def _level(self, position: int) -> int:
        """The outermost stage whose unit starts at byte `position` (the host's rule, as in
        `HierarchicalByteModel.begin_step`)."""
        return next((i for i, p in enumerate(self._patch_sizes) if position % p == 0), len(self._patch_sizes))

    def _advance_caches(self, level: int) -> None:
        """The caches' host bookkeeping (`KVCache.bound`) after a native step at `level`:
        stages inside a new parent unit restart, every stage from `level` on holds one more."""
        stage_states = self._state_ref().stage_states
        for i in range(level, len(stage_states)):
            for cache in stage_states[i]:
                if isinstance(cache, KVCache):
                    if i > level:
                        cache.bound, cache.uniform = 0, True
                    cache.bound += 1

    def step(self, byte: torch.Tensor, t: int, level: int) -> Optional[torch.Tensor]:
        """Consume byte t (B,) of every row, the next byte starting a unit of stage `level`
        (the host already counted it): the (B, V) fp32 logits of byte t + 1, or None (nothing
        changed) when no native step runs it; the caller then runs the PyTorch step. (Word
        units: only runs, whose kernel applies the patcher's rule.)"""
        if self._declines(byte) or self._word_units:
            return None
        byte = byte.contiguous()
        logits = torch.empty(self.batch_size, self.vocab)
        last = len(self._patch_sizes)
        if self._single:
            failed = self._library.multibyte_single_step(self._single_ref, self.batch_size, byte.data_ptr(), logits.data_ptr(), self._work_ptr)
        elif level == last:
            failed = self._library.multibyte_byte_step(
                self._byte_ref, self.batch_size, byte.data_ptr(), t % self._unit_slots, (t + 1) % self._inner_period, logits.data_ptr(), self._work_ptr
            )
        elif level == 0 and self._unit_ref is not None:
            failed = self._library.multibyte_unit_step(self._unit_ref, self.batch_size, byte.data_ptr(), t % self._unit_slots, logits.data_ptr(), self._work_ptr)
        else:
            return None
        if failed:
            return None
        self._advance_caches(level)
        return logits

    def run(
        self,
        byte: torch.Tensor,
        k: int,
        noise: Optional[torch.Tensor],
        temperature: float,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        stop_byte: Optional[int] = None,
        stopped: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """Feed `byte` (B,), draw the next byte from its logits and noise[0] ((k, B, V) Exp(1),
        None when greedy) as `sample_with_noise(logits, noise[0], temperature, top_k, top_p)`
        does, feed that, ... for up to k steps: (n, B) int64, the n >= 1 bytes drawn, with the
        state moved on by n steps; None (nothing changed) when no step runs here. With
        `stop_byte`, `stopped` ((B,) bool, updated in place) marks the rows that drew it, which
        draw it from then on, and the run ends once every row has. n < k also where the step
        after cannot run natively (a unit boundary without the unit step, a full cache): the
        caller takes that one in PyTorch."""
        state = self._state_ref()
        if self._declines(byte) or not state.started or (state.host_position is None and not self._word_units):
            return None
        k = min(k, state.max_len - (int(state.positions.max()) if self._word_units else state.host_position))
        if k < 1:
            return None
        if noise is not None and (noise.shape != (k, self.batch_size, self.vocab) or not usable(noise)):
            return None
        if stop_byte is not None and (stopped is None or stopped.dtype != torch.bool or stopped.shape != (self.batch_size,) or not stopped.is_contiguous()):
            return None
        rule = _DrawRule(
            temperature=temperature if noise is not None else 0.0,
            top_k=top_k or 0,
            top_p=1.0 if top_p is None else top_p,
            stop=-1 if stop_byte is None else stop_byte,
        )
        byte = byte.contiguous()
        out = torch.empty(k, self.batch_size, dtype=torch.long)
        draws = (_pointer_of(noise), ctypes.byref(rule), _pointer_of(stopped if stop_byte is not None else None), out.data_ptr(), self._work_ptr)
        if self._single:
            done = self._library.multibyte_single_run(self._single_ref, self.batch_size, byte.data_ptr(), k, *draws)
        elif self._word_units:
            levels = torch.empty(k, dtype=torch.long)
            done = self._library.multibyte_space_run(
                self._byte_ref, self._unit_ref, self.batch_size, self._spacy.data_ptr(), self._max_length, byte.data_ptr(), k,
                *draws[:4], levels.data_ptr(), self._work_ptr,
            )  # fmt: skip
            for level in levels[:done].tolist():
                self._advance_caches(level)
            return out[:done] if done else None
        else:
            done = self._library.multibyte_decode_run(
                self._byte_ref, self._unit_ref, self.batch_size, state.host_position, self._inner_period, byte.data_ptr(), k, *draws
            )
        for _ in range(done):
            state.host_position += 1
            self._advance_caches(self._level(state.host_position))
        return out[:done] if done else None
