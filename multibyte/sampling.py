"""Incremental decoding and sampling for `HierarchicalByteModel`: a few pure functions.

    state  = allocate_decode_state(model, batch_size, max_len)   every cache allocated once
    logits = prefill(model, state, prompt)                        (B, 256): the byte after the prompt
    byte   = sample_next_byte(logits, temperature, top_k, top_p, generator)
    logits = decode_step(model, state, byte)                      feed one byte, get the next logits
    tokens = generate(model, prompt, max_new_bytes, ...)          the loop above

How one byte is decoded (P bytes per patch; t bytes consumed so far; k, p = divmod(t, P)):

  - at a patch border (p == 0) the global stack runs ONE position, k, whose input is patch k-1
    (the learned pad patch when k = 0), continuing its KV cache or recurrent state; its output,
    cut into P slices and projected to the local width, is kept as `local_context` (B, P, D);
  - for every byte the local stack runs ONE position, p, of its own KV cache (emptied at every
    border) on local_context[:, p] + the embedding of byte t-1 (the learned pad byte at p = 0);
  - the head turns that into the logits of byte t.

Without a local stack the head reads local_context[:, p] directly; with P = 1 that is a plain byte
LM: the vanilla transformer with a KV cache, or MambaByte with its O(1) recurrent step. The prompt
is prefilled in one parallel pass: every complete patch through the global stack at once, then
the bytes of the unfinished patch through the local stack at once.

Determinism: the arithmetic is a function of the inputs and of the sequence of calls. The same
calls (allocate or `reset_decode_state`, one `prefill` of the same prompt, the same bytes through
`decode_step`) on the same device, dtype, batch size and thread count give bit-identical logits,
which is what arithmetic coding needs: encoder and decoder must make the same calls. A prompt
prefilled in one pass and the same bytes fed one by one agree only to rounding (~1e-6 in fp32),
as does a row decoded alone versus inside a larger batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from multibyte.config import VOCAB_SIZE
from multibyte.mixers.attention import KVCache
from multibyte.model import HierarchicalByteModel


@dataclass
class DecodeState:
    """Everything needed to continue B sequences by one byte; allocated once per generation."""

    global_states: list  # per global block: KVCache over max_len // P + 1 patches, or MambaState
    local_states: list  # per local block: KVCache over the P bytes of one patch ([] without a local stack)
    patch_bytes: torch.Tensor  # (B, P) int64: the current patch's bytes so far, its global input once complete
    local_context: torch.Tensor  # (B, P, D): the global output for the current patch, one slice per byte
    device_position: torch.Tensor  # 0-d int64 on the device: bytes consumed so far, as the step reads it
    byte_offsets: torch.Tensor  # (P,) int64 = 0..P-1, to index a patch's positions on the device
    max_len: int  # most bytes this state can consume
    compiled: bool = False  # decode_step runs the torch.compile'd step (static caches)
    position: int = 0  # bytes consumed so far, on the host: for branching and bounds, no device sync

    @property
    def batch_size(self) -> int:
        return self.patch_bytes.shape[0]


def allocate_decode_state(
    model: HierarchicalByteModel,
    batch_size: int,
    max_len: int,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    compile: bool = False,
    static: Optional[bool] = None,
) -> DecodeState:
    """Caches for `batch_size` sequences of up to `max_len` bytes, on the model's device and in its
    dtype unless told otherwise. Nothing grows or is reallocated while decoding.

    With `compile=True`, `decode_step` runs a torch.compile'd step (CUDA graphs on a GPU; see
    `compiled_step`), which needs `static` KV caches: fixed shapes, positions on the device (see
    `KVCache`). `static` defaults to `compile`; static caches also work eagerly.
    """
    config = model.config
    P = config.patch_size
    static = compile if static is None else static
    if compile and not static:
        raise ValueError("compile=True needs static KV caches (static=True or None)")
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be at least 1, got {batch_size} and {max_len}")
    if model.position_embedding is not None and max_len > config.max_seq_len:
        raise ValueError(
            f"max_len={max_len} bytes exceeds the model's max_seq_len={config.max_seq_len} "
            f"(the length of its learned position table)"
        )
    device = model.head.weight.device if device is None else torch.device(device)
    dtype = model.head.weight.dtype if dtype is None else dtype
    # Consuming t bytes runs global positions 0..t // P, hence max_len // P + 1 of them.
    global_states = model.global_stack.allocate_states(batch_size, max_len // P + 1, device, dtype)
    if model.local_stack is not None:
        local_states = model.local_stack.allocate_states(batch_size, P, device, dtype)
        width = config.local_model.d_model
    else:
        local_states = []
        width = config.global_byte_dim
    state = DecodeState(
        global_states=global_states,
        local_states=local_states,
        patch_bytes=torch.zeros(batch_size, P, dtype=torch.long, device=device),
        local_context=torch.zeros(batch_size, P, width, dtype=dtype, device=device),
        device_position=torch.zeros((), dtype=torch.long, device=device),
        byte_offsets=torch.arange(P, device=device),
        max_len=max_len,
        compiled=compile,
    )
    if static:
        for layer_state in global_states + local_states:
            if isinstance(layer_state, KVCache):
                layer_state.make_static()
    if compile:
        for tensor in _state_tensors(state):
            # Updated in place at a fixed address, so CUDA graphs may capture it; and its shape is
            # a constant of the compiled step (a new batch size or max_len compiles anew rather
            # than turning every shape symbolic).
            torch._dynamo.mark_static_address(tensor)
            torch._dynamo.mark_static(tensor)
    return state


def _state_tensors(state: DecodeState) -> list[torch.Tensor]:
    tensors = [state.patch_bytes, state.local_context, state.device_position, state.byte_offsets]
    for layer_state in state.global_states + state.local_states:
        tensors += [value for value in vars(layer_state).values() if isinstance(value, torch.Tensor)]
    return tensors


def reset_decode_state(state: DecodeState) -> None:
    """Make `state` as good as freshly allocated (for the next window of a compressor), in place."""
    for layer_state in state.global_states + state.local_states:
        layer_state.reset()
    state.patch_bytes.zero_()
    state.device_position.zero_()
    state.position = 0


# ------------------------------------------------------------------------------------------------
# The model's parts, one step at a time.
# ------------------------------------------------------------------------------------------------


def _run_global(model: HierarchicalByteModel, state: DecodeState, patch_inputs: torch.Tensor) -> None:
    """Continue the global stack over (B, n, P·D_G) inputs; keep the last output, cut per byte, as
    the local context of the patch that starts now, and empty the local caches for it."""
    h = model.global_stack(patch_inputs.to(state.local_context.dtype), state.global_states)[:, -1:]  # (B, 1, P·D_G)
    h = model.patching.ungroup(h)[:, 0]  # (B, P, D_G)
    if model.local_stack is not None:
        h = model.global_to_local(h)  # (B, P, D_L)
        for layer_state in state.local_states:
            layer_state.reset()
    state.local_context.copy_(h)


def _check_ready(model: HierarchicalByteModel) -> None:
    if model.training:
        raise ValueError("the model is in training mode (dropout would make decoding random): call model.eval()")


@torch.no_grad()
def prefill(model: HierarchicalByteModel, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
    """Consume a prompt (B, T) of bytes (T may be 0, any multiple of P or not) in one parallel pass
    from a fresh state; return the (B, 256) fp32 logits of byte T."""
    _check_ready(model)
    B, T = tokens.shape
    if state.position != 0:
        raise ValueError(f"prefill starts a sequence, but this state has consumed {state.position} bytes: reset it first")
    if B != state.batch_size:
        raise ValueError(f"prompt batch of {B} rows for a decode state of {state.batch_size}")
    if T > state.max_len:
        raise ValueError(f"prompt of {T} bytes is longer than the decode state's max_len={state.max_len}")
    P = model.config.patch_size
    tokens = tokens.to(state.patch_bytes.device, torch.long)

    # Global stack: the pad patch, then every complete patch of the prompt, in one pass.
    complete = T // P
    h = model.global_byte_embedding(tokens[:, : complete * P])  # (B, complete·P, D_G)
    if model.position_embedding is not None:
        h = h + model.position_embedding.weight[: complete * P]
    pad = model.global_pad_patch.expand(B, 1, -1)
    _run_global(model, state, torch.cat([pad, model.patching.group(h)], dim=1))  # (B, complete+1, P·D_G)

    # Local stack: bytes 0..p of the unfinished patch, in one pass.
    partial = tokens[:, complete * P :]  # (B, p)
    p = partial.shape[1]
    state.patch_bytes[:, :p] = partial
    state.position = T
    state.device_position.fill_(T)
    if model.local_stack is None:
        h = state.local_context[:, p]  # (B, D_G)
    else:
        previous = torch.cat([model.local_pad_byte.expand(B, 1, -1), model.local_byte_embedding(partial)], dim=1)
        x = state.local_context[:, : p + 1] + previous  # (B, p+1, D_L)
        h = model.local_stack(x, state.local_states)[:, -1]  # (B, D_L)
    return model.head(h).float()


def _feed_byte(model: HierarchicalByteModel, state: DecodeState, byte: torch.Tensor, completes_patch: bool) -> torch.Tensor:
    """The one-step function: byte (B,) int64 -> (B, 256) fp32 logits of the next byte.

    Positions are read from `state.device_position`, never from a host integer, so the function
    has the same shapes at every step (the host only says whether the byte completes a patch).
    """
    P = model.config.patch_size
    slot = state.device_position % P  # where this byte sits in its patch
    state.patch_bytes.index_copy_(1, slot.view(1), byte[:, None])
    state.device_position.add_(1)
    consumed = state.device_position
    if completes_patch:
        # Patch k-1 is complete: the global stack moves on to patch k.
        positions = consumed - P + state.byte_offsets  # (P,) byte positions of the completed patch
        h = model.global_byte_embedding(state.patch_bytes)  # (B, P, D_G)
        if model.position_embedding is not None:
            h = h + model.position_embedding(positions)
        _run_global(model, state, model.patching.group(h))  # (B, 1, P·D_G)
        context = state.local_context[:, :1]  # (B, 1, D): byte 0 of the new patch
    else:
        context = state.local_context.index_select(1, (consumed % P).view(1))  # (B, 1, D)
    if model.local_stack is None:
        return model.head(context[:, 0]).float()
    if completes_patch:
        previous = model.local_pad_byte.expand(byte.shape[0], 1, -1)
    else:
        previous = model.local_byte_embedding(byte)[:, None]  # (B, 1, D_L)
    h = model.local_stack(context + previous, state.local_states)  # (B, 1, D_L)
    return model.head(h[:, 0]).float()


def compiled_step(device: torch.device) -> Callable:
    """`_feed_byte` under torch.compile: CUDA graphs ("reduce-overhead") on a GPU, where launching
    ~50 small kernels per byte would otherwise dominate; Inductor's fused C++ on a CPU. One graph
    per value of `completes_patch`; the first call of each compiles (seconds to a minute)."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(_feed_byte, mode=mode, fullgraph=True)


_COMPILED_STEPS: dict[str, Callable] = {}


@torch.no_grad()
def decode_step(model: HierarchicalByteModel, state: DecodeState, byte: torch.Tensor) -> torch.Tensor:
    """Feed one byte per row, (B,), and return the (B, 256) fp32 logits of the byte after it."""
    if state.position >= state.max_len:
        raise ValueError(f"the decode state is full ({state.max_len} bytes): allocate it with a larger max_len")
    state.position += 1
    completes_patch = state.position % model.config.patch_size == 0
    byte = byte.to(torch.long)
    if not state.compiled:
        return _feed_byte(model, state, byte, completes_patch)
    device = state.patch_bytes.device
    if device.type not in _COMPILED_STEPS:
        _COMPILED_STEPS[device.type] = compiled_step(device)
    torch._dynamo.mark_static(byte)
    return _COMPILED_STEPS[device.type](model, state, byte, completes_patch)


# ------------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------------


def check_sampling_options(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= VOCAB_SIZE:
        raise ValueError(f"top_k must lie in 1..{VOCAB_SIZE}, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def sample_next_byte(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """(B, 256) logits -> (B,) int64 bytes. Temperature 0 is greedy (argmax, no randomness).

    Draws by an exponential race, argmax(p / E) with E ~ Exp(1) i.i.d., which picks byte i with
    probability p_i, with tensor ops only (no `.item()`, so no host-device sync) and a fixed
    B × 256 random numbers per call whatever the logits: a row's draw never depends on the others.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Keep the most likely bytes until their mass reaches top_p (the likeliest is always kept).
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    race.clamp_(min=torch.finfo(race.dtype).tiny)  # a drawn 0 would turn p = 0 into 0/0
    return (probs / race).argmax(dim=-1)


def _as_prompt(prompt: torch.Tensor, device: torch.device) -> torch.Tensor:
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be (T,) or (B, T) bytes, got shape {tuple(prompt.shape)}")
    if prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
        raise ValueError(f"prompt must hold integer byte values, got dtype {prompt.dtype}")
    if prompt.numel() and (prompt.min() < 0 or prompt.max() >= VOCAB_SIZE):
        raise ValueError(f"prompt bytes must lie in 0..255, got {int(prompt.min())}..{int(prompt.max())}")
    return prompt.to(device, torch.long)


# Intra-op threads for the per-byte loop on a CPU. Measured on the shared 2-core machine this was
# built on (benchmarks/sample_speed.py, `cpu_defaults`): one decoding step is ~50 small ops, and
# splitting each across 2 threads cost more in synchronisation than it saved: 10-15x slower at
# batch 1 and at batch 16 while other processes used the cores.
CPU_DECODE_THREADS = 1
# Smallest batch from which bf16 weights decode faster than fp32 on a CPU with native bf16
# (AVX512-BF16 or AMX). Measured twice with the CPU image preset's dims, bytes/s fp32 vs bf16:
# batch 1: 1822 vs 1640 and 1959 vs 889; batch 8: 8837 vs 9826 and 9403 vs 9023 (a draw);
# batch 16: 12699 vs 14149 and 12421 vs 15310; batch 32: 16583 vs 20867.
CPU_BF16_MIN_BATCH = 16


def fastest_decode_dtype(device: torch.device, batch_size: int, gpu_bf16: bool = True) -> torch.dtype:
    """The weight dtype to decode in: on a CPU, bf16 from CPU_BF16_MIN_BATCH rows up when the CPU
    has native bf16 and fp32 otherwise (small matrix-vector products gain nothing from bf16);
    on a GPU, bf16 unless `gpu_bf16` is False."""
    if device.type == "cpu":
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native_bf16 and batch_size >= CPU_BF16_MIN_BATCH else torch.float32
    return torch.bfloat16 if gpu_bf16 else torch.float32


@contextmanager
def decoding_threads(device: torch.device, threads: Optional[int] = None) -> Iterator[None]:
    """Run the enclosed decoding loop with `threads` (default CPU_DECODE_THREADS) intra-op threads
    on a CPU; the previous count is restored after."""
    threads = CPU_DECODE_THREADS if threads is None else threads
    previous = torch.get_num_threads()
    if device.type == "cpu" and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@torch.inference_mode()
def generate(
    model: HierarchicalByteModel,
    prompt: torch.Tensor,
    max_new_bytes: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_byte: Optional[int] = None,
    seed: Optional[int] = None,
    on_byte: Optional[Callable[[int], None]] = None,
    compile: bool = False,
) -> torch.Tensor:
    """Continue each row of `prompt` ((B, T) or (T,) bytes, T may be 0) by up to `max_new_bytes`.

    Returns (B, T + n) int64: the prompt then the new bytes. With `stop_byte`, a row that samples it
    keeps it and is padded with it afterwards, and generation ends early (n < max_new_bytes) once
    every row has stopped. `seed` makes the draws reproducible (bit-identical bytes on the same
    device, dtype and batch size); None uses torch's global generator. `on_byte(n)` is called
    after each step with the number of new bytes so far (for a progress bar). `compile` runs the
    torch.compile'd step (see `allocate_decode_state`).
    """
    check_sampling_options(temperature, top_k, top_p)
    if max_new_bytes < 0:
        raise ValueError(f"max_new_bytes must be >= 0, got {max_new_bytes}")
    if stop_byte is not None and not 0 <= stop_byte < VOCAB_SIZE:
        raise ValueError(f"stop_byte must be a byte value 0..255, got {stop_byte}")
    device = model.head.weight.device
    prompt = _as_prompt(prompt, device)
    B, T = prompt.shape
    if max_new_bytes == 0:
        return prompt.clone()
    if model.position_embedding is not None and T + max_new_bytes > model.config.max_seq_len:
        raise ValueError(
            f"a prompt of {T} bytes plus max_new_bytes={max_new_bytes} exceeds the model's "
            f"max_seq_len={model.config.max_seq_len}"
        )
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    # A stop check reads a device value; on a GPU do it every few bytes so the host runs ahead.
    stop_check_interval = 1 if device.type == "cpu" else 16

    was_training = model.training
    model.eval()
    try:
        # The last sampled byte is never fed back, so T + max_new_bytes - 1 positions suffice;
        # allocating one more keeps the arithmetic simple and costs one cache row.
        state = allocate_decode_state(model, B, T + max_new_bytes, compile=compile)
        out = torch.empty(B, T + max_new_bytes, dtype=torch.long, device=device)
        out[:, :T] = prompt
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        logits = prefill(model, state, prompt)
        n = max_new_bytes
        with decoding_threads(device):
            for i in range(max_new_bytes):
                byte = sample_next_byte(logits, temperature, top_k, top_p, generator)  # (B,)
                if stop_byte is not None:
                    byte = byte.masked_fill(stopped, stop_byte)
                    stopped |= byte == stop_byte
                out[:, T + i] = byte
                if on_byte is not None:
                    on_byte(i + 1)
                if i + 1 == max_new_bytes:
                    break
                if stop_byte is not None and (i + 1) % stop_check_interval == 0 and bool(stopped.all()):
                    n = i + 1
                    break
                logits = decode_step(model, state, byte)
        if stop_byte is not None and bool(stopped.all()):
            # Cut after the row that stopped last; the other rows are padded with the stop byte.
            n = 1 + int((out[:, T : T + n] == stop_byte).long().argmax(dim=1).max())
        return out[:, : T + n]
    finally:
        model.train(was_training)
