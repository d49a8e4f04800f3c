"""Sampling from a `HierarchicalByteModel`: a few small pure functions over the model's own
incremental decoding (gpt-fast style: the model owns prefill and one-step decoding).

    state  = allocate_decode_state(model, batch_size, max_len)   every cache allocated once
    logits = prefill(model, state, prompt)                        (B, V): the byte after the prompt
    byte   = sample_next_byte(logits, temperature, top_k, top_p, generator)
    logits = decode_step(model, state, byte)                      feed one byte, get the next logits
    tokens = generate(model, prompt, max_new_bytes, ...)          the loop above

How a byte is decoded (which stages run, per row, on which caches) is documented on
`multibyte.model.DecodeState`; nothing here knows about patches.

Determinism: the arithmetic is a function of the inputs and of the sequence of calls. The same
calls (allocate or `reset_decode_state`, one `prefill` of the same prompt, the same bytes through
`decode_step`) on the same device, dtype, batch size and thread count give bit-identical logits,
which is what arithmetic coding needs: encoder and decoder must make the same calls. A prompt
prefilled in one pass and the same bytes fed one by one agree only to rounding (~1e-6 in fp32),
as does a row decoded alone versus inside a larger batch.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

from multibyte.model import DecodeState, HierarchicalByteModel
from multibyte.model import reset_decode_state as _reset

__all__ = [
    "DecodeState",
    "allocate_decode_state",
    "reset_decode_state",
    "prefill",
    "decode_step",
    "sample_next_byte",
    "generate",
]


def allocate_decode_state(
    model: HierarchicalByteModel,
    batch_size: int,
    max_len: int,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    compile: bool = False,
    static: Optional[bool] = None,
) -> DecodeState:
    """Caches for `batch_size` rows of up to `max_len` bytes (see the model's method). With
    `compile=True`, the state runs torch.compile'd wrappers of the stages' stacks (CUDA graphs
    on a GPU) on static caches: fixed shapes at every step. `static` defaults to `compile`."""
    static = compile if static is None else static
    if compile and not static:
        raise ValueError("compile=True needs static caches (static=True or None)")
    state = model.allocate_decode_state(batch_size, max_len, device=device, dtype=dtype, static=static)
    if compile:
        state.stack_fns = compiled_stacks(model)
    return state


_COMPILED: "weakref.WeakKeyDictionary[HierarchicalByteModel, list]" = weakref.WeakKeyDictionary()


def compiled_stacks(model: HierarchicalByteModel) -> list:
    """torch.compile'd wrappers of every stage's stack (the model itself is left untouched):
    "reduce-overhead" (CUDA graphs) on a GPU, where launching many small kernels per byte would
    dominate; Inductor's fused C++ on a CPU. Made once per model; the first steps compile."""
    if model not in _COMPILED:
        mode = "reduce-overhead" if model.head.weight.is_cuda else "default"
        _COMPILED[model] = [torch.compile(stage.stack, mode=mode) for stage in model.stages]
    return _COMPILED[model]


def reset_decode_state(state: DecodeState) -> None:
    """Make `state` as good as freshly allocated (for the next window of a compressor), in place."""
    _reset(state)


def prefill(model: HierarchicalByteModel, state: DecodeState, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Consume a prompt (B, T) of bytes from a fresh state; (B, V) fp32 logits of the next byte."""
    return model.prefill(state, tokens, lengths)


def decode_step(model: HierarchicalByteModel, state: DecodeState, byte: torch.Tensor, active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Feed one byte per row, (B,), and return the (B, V) fp32 logits of the byte after it."""
    return model.decode_step(state, byte, active)


# ------------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------------


def check_sampling_options(temperature: float, top_k: Optional[int], top_p: Optional[float], vocab_size: int = 256) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must lie in 1..{vocab_size}, got {top_k}")
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


def _as_prompt(prompt: torch.Tensor, device: torch.device, vocab_size: int = 256) -> torch.Tensor:
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be (T,) or (B, T) bytes, got shape {tuple(prompt.shape)}")
    if prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
        raise ValueError(f"prompt must hold integer byte values, got dtype {prompt.dtype}")
    if prompt.numel() and (prompt.min() < 0 or prompt.max() >= vocab_size):
        raise ValueError(f"prompt symbols must lie in 0..{vocab_size - 1}, got {int(prompt.min())}..{int(prompt.max())}")
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
    vocab_size = model.config.vocab_size
    check_sampling_options(temperature, top_k, top_p, vocab_size)
    if max_new_bytes < 0:
        raise ValueError(f"max_new_bytes must be >= 0, got {max_new_bytes}")
    if stop_byte is not None and not 0 <= stop_byte < vocab_size:
        raise ValueError(f"stop_byte must be a symbol 0..{vocab_size - 1}, got {stop_byte}")
    device = model.head.weight.device
    prompt = _as_prompt(prompt, device, vocab_size)
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
