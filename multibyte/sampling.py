"""Sampling from a `HierarchicalByteModel`: a few small pure functions over the model's own
incremental decoding (gpt-fast style: the model owns prefill and one-step decoding).

    state  = allocate_decode_state(model, batch_size, max_len)   every cache allocated once
    logits = prefill(model, state, prompt)                        (B, V): the byte after the prompt
    byte   = sample_next_byte(logits, temperature, top_k, top_p, generator)
    logits = decode_step(model, state, byte)                      feed one byte, get the next logits
    tokens = generate(model, prompt, max_new_bytes, ...)          the loop above

How a byte is decoded (which stages run, per row, on which caches) is documented on
`multibyte.model.DecodeState`; nothing here knows about patches.

The compiled path (`generate(compile=True)`, gpt-fast style: the model is left untouched and
compiled from here): the model's step and the draw of the next byte, `sample_with_noise` with
noise drawn ahead (`NoiseChunks`), form one torch.compile'd graph per host level
(`CompiledStep`), on static caches of a few rounded lengths; with fixed units, a few steps are
unrolled into one call (`compiled_decode_and_sample_unit`), and from the second call of a graph
on, Dynamo's guards are skipped (`_trusted_call`). On a CPU a batch-1 step is bound by the fixed
cost of every op and call, which is what this removes; compiling costs tens of seconds up front.

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

from multibyte import cpu_features
from multibyte.kernels import NATIVE_MAX_BATCH
from multibyte.model import DecodeState, HierarchicalByteModel
from multibyte.model import reset_decode_state as _reset
from multibyte.weight_formats import round_matrices

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
    native: Optional[bool] = None,
) -> DecodeState:
    """Caches for `batch_size` rows of up to `max_len` bytes (see the model's method). With
    `compile=True`, `decode_step` runs a torch.compile'd copy of the model's whole one-byte step
    (`compiled_decode_byte`) on static caches: fixed shapes at every step. `static` defaults to
    `compile`. `native` (default: when not static) runs attention stages' steps in the native
    CPU kernel where it can (`multibyte.kernels`): equal to PyTorch up to rounding, so pass
    False where two runs must agree bit for bit across machines."""
    static = compile if static is None else static
    native = not static if native is None else native
    if compile and not static:
        raise ValueError("compile=True needs static caches (static=True or None)")
    if compile:
        max_len = compiled_state_length(model, max_len)
    state = model.allocate_decode_state(batch_size, max_len, device=device, dtype=dtype, static=static, native=native)
    if compile:
        state.step_fn = compiled_decode_byte(model)
    return state


def compiled_state_length(model: HierarchicalByteModel, max_len: int) -> int:
    """The max_len to allocate a compiled step's static state with: the cache shapes are part of
    the compiled graph, so every length up to the model's context (max_seq_len) gets the whole
    context, and longer ones (models without a learned position table) a power of two, rather
    than making every new length compile again."""
    if max_len <= model.config.max_seq_len:
        return model.config.max_seq_len
    return 1 << (max_len - 1).bit_length()


class CompiledStep:
    """`fn(state, byte, level, active, *args)` torch.compile'd once per host `level` (an int
    such as 0 at an outermost unit boundary and N - 1 inside a unit, or None when the patchers
    decide per row): each level is a different graph, and a Python int argument would otherwise
    be guarded on (one recompilation per value) or traced as a symbolic size.

    On a GPU, "reduce-overhead" (CUDA graphs): launching ~100 small kernels per byte would
    dominate. On a CPU, Inductor's fused C++ with its C++ wrapper (`cpp_wrapper`), which calls
    the kernels without going back to Python for each."""

    def __init__(self, fn: Callable, device: torch.device) -> None:
        self.fn = fn
        self.device = device
        self.by_level: dict = {}

    def __call__(self, state: DecodeState, byte: torch.Tensor, level: Optional[int], active: Optional[torch.Tensor], *args):
        step = self.by_level.get(level)
        if step is None:
            step = self.by_level[level] = self._compile(level)
        return step(state, byte, active, *args)

    def _compile(self, level: Optional[int]) -> Callable:
        fn = self.fn

        def at_level(state: DecodeState, byte: torch.Tensor, active: Optional[torch.Tensor], *args):
            return fn(state, byte, level, active, *args)

        # Dynamo keeps its compiled graphs (and its limit of 8 per function) on the code object:
        # a copy of the code per compiled step keeps models, options and levels apart.
        at_level.__code__ = at_level.__code__.replace(co_name=f"decode_step_level_{level}_{id(self):x}")
        if self.device.type == "cuda":
            return torch.compile(at_level, mode="reduce-overhead", dynamic=False)
        return torch.compile(at_level, dynamic=False, options=dict(CPU_COMPILE_OPTIONS))


# Inductor options of the compiled CPU step (see CompiledStep).
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True}

_COMPILED: "weakref.WeakKeyDictionary[HierarchicalByteModel, dict]" = weakref.WeakKeyDictionary()


def _cached(model: HierarchicalByteModel, key: tuple, make: Callable[[], CompiledStep]) -> CompiledStep:
    """One compiled step per model and key (made on first use; the first calls compile)."""
    steps = _COMPILED.setdefault(model, {})
    if key not in steps:
        steps[key] = make()
    return steps[key]


def compiled_decode_byte(model: HierarchicalByteModel) -> CompiledStep:
    """The model's one-byte device step (`_decode_byte`: logits out), torch.compile'd."""
    return _cached(model, ("logits",), lambda: CompiledStep(model._decode_byte, model.head.weight.device))


def compiled_decode_and_sample(model: HierarchicalByteModel, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> CompiledStep:
    """One byte in, the NEXT byte out: the model's one-byte step and the draw from its logits
    (`sample_with_noise`, given the Exp(1) noise) in one compiled graph."""

    def decode_and_sample(state: DecodeState, byte: torch.Tensor, level: Optional[int], active: Optional[torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        logits = model._decode_byte(state, byte, level, active)
        return sample_with_noise(logits, noise, temperature, top_k, top_p)

    key = ("sample", temperature, top_k, top_p)
    return _cached(model, key, lambda: CompiledStep(decode_and_sample, model.head.weight.device))


# Most bytes one compiled call decodes and samples (`compiled_decode_and_sample_unit`): each call
# has a fixed cost, but the graph is unrolled, so compilation time grows with this.
COMPILED_RUN_BYTES = 4


def compiled_run_length(model: HierarchicalByteModel, limit: Optional[int] = None) -> int:
    """Bytes per compiled call: at most `limit` (default COMPILED_RUN_BYTES), and a divisor of the
    outermost unit (U_0 bytes) so that every run starts at the same few phases of a unit and
    needs only a few graphs."""
    limit = COMPILED_RUN_BYTES if limit is None else limit
    U0 = model.config.unit_slots(0)
    if U0 == 1:  # a single stage: every step is alike
        return limit
    return max(d for d in range(1, limit + 1) if U0 % d == 0)


def compiled_decode_and_sample_unit(
    model: HierarchicalByteModel, temperature: float, top_k: Optional[int], top_p: Optional[float]
) -> CompiledStep:
    """`compiled_decode_and_sample` for several bytes in a row in one compiled call: `level` is
    the tuple of the steps' host levels (one outermost unit's worth, U_0 steps, in practice),
    `noise` (k, B, V) their draws' noise; returns the k sampled bytes, (B, k), and the last of
    them again as a (B,) tensor of its own (the next call's input). The fixed cost of
    calling compiled code (~100-200 us on a CPU, more than a small model's step) is paid once
    per unit instead of once per byte."""

    def decode_and_sample_run(state: DecodeState, byte: torch.Tensor, levels: tuple, active: Optional[torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        sampled = []
        for j, level in enumerate(levels):
            byte = sample_with_noise(model._decode_byte(state, byte, level, active), noise[j], temperature, top_k, top_p)
            sampled.append(byte)
        return torch.stack(sampled, dim=1), byte

    key = ("sample_unit", temperature, top_k, top_p)
    return _cached(model, key, lambda: CompiledStep(decode_and_sample_run, model.head.weight.device))


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

    Draws by an exponential race (see `sample_with_noise`) with tensor ops only (no `.item()`,
    so no host-device sync) and a fixed B × 256 random numbers per call whatever the logits: a
    row's draw never depends on the others.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample_with_noise(logits, exponential_noise(logits.shape, logits.device, generator), temperature, top_k, top_p)


def exponential_noise(shape: tuple, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """fp32 Exp(1) draws of `shape` for `sample_with_noise`, none of them 0."""
    race = torch.empty(shape, device=device).exponential_(generator=generator)
    return race.clamp_(min=torch.finfo(race.dtype).tiny)  # a drawn 0 would turn p = 0 into 0/0


def sample_with_noise(
    logits: torch.Tensor,
    noise: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> torch.Tensor:
    """(B, V) logits and (B, V) Exp(1) `noise` -> (B,) int64: argmax(p / E), which picks byte i
    with probability p_i (the exponential race: the first of independent exponential clocks of
    rates p_i to ring). A pure function of its inputs, so it can run inside a compiled step
    with the noise drawn ahead of time. Temperature 0 is greedy (the noise is unused)."""
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
    return (probs / noise).argmax(dim=-1)


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


# Intra-op threads for the per-byte loop on a CPU: one decoding step is ~50 small ops, and
# splitting each across threads costs more in synchronisation than it saves, far more while other
# processes use the cores (measured by benchmarks/sample_speed.py, `cpu_defaults`).
CPU_DECODE_THREADS = 1
# Smallest batch from which a CPU with native bf16 (AVX512-BF16 or AMX) decodes in bf16 PyTorch:
# up to kernels.NATIVE_MAX_BATCH rows the native kernels (multibyte/kernels, fp32 arithmetic)
# are the faster, beyond it fp32 runs in PyTorch and bf16 PyTorch is ahead of that
# (benchmarks/sample_speed.py, `cpu_defaults`, and README "Speed on a CPU").
CPU_BF16_MIN_BATCH = NATIVE_MAX_BATCH + 1


def fastest_decode_dtype(device: torch.device, batch_size: int, bf16_trained: bool = True) -> torch.dtype:
    """The weight dtype to decode in. On a GPU: bf16 when the model was trained in bf16
    (`bf16_trained`, a bf16-mixed precision), else fp32. On a CPU from CPU_BF16_MIN_BATCH rows:
    bf16 where the CPU has native bf16 arithmetic, else fp32. On a CPU below that: bf16 weights
    for a model trained in bf16 (its matmuls saw bf16 weights), run as bf16 values in fp32
    (`model_for_decoding`): the native kernels read them in half the bytes, faster at batch 1
    (benchmarks/sample_speed.py, `bf16_weights`); fp32 otherwise."""
    if device.type == "cpu" and batch_size >= CPU_BF16_MIN_BATCH:
        return torch.bfloat16 if cpu_features.has_native_bf16() else torch.float32
    return torch.bfloat16 if bf16_trained else torch.float32


def model_for_decoding(
    model: torch.nn.Module, device: torch.device, dtype: torch.dtype, batch_size: int, quantize: Optional[str] = None
) -> torch.nn.Module:
    """`model` moved (in place, as nn.Module.to does) to `device` and `dtype` for sampling
    `batch_size` rows, in eval mode. On a CPU below CPU_BF16_MIN_BATCH rows, bf16 means bf16
    values kept in fp32: the arithmetic and the caches stay fp32 (more exact than bf16 PyTorch,
    which at small batches is also slower) and the native kernels read the matrices as bf16
    (`multibyte.weight_formats.matrix_format`). `quantize` ("int8"; `dtype` must be fp32) rounds
    every matrix to that grid in place, kept in fp32, which the kernels read in the grid's format."""
    if quantize is not None:
        if dtype != torch.float32:
            raise ValueError(f"quantize={quantize!r} keeps fp32 weights and arithmetic, got dtype {dtype}")
        return round_matrices(model.to(device=device, dtype=dtype), quantize).eval()
    if device.type == "cpu" and dtype == torch.bfloat16 and batch_size < CPU_BF16_MIN_BATCH:
        return model.to(device=device, dtype=torch.bfloat16).to(torch.float32).eval()
    return model.to(device=device, dtype=dtype).eval()


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


def _trusted_call(checked: set, step: CompiledStep, state: DecodeState, byte: torch.Tensor, level, *args):
    """step(state, byte, level, *args), skipping Dynamo's guards from the second call of the same
    step and level on: within one generation the state's tensors are the same objects with the
    same shapes at every step, so the guards cannot fail, and checking the few hundred of them
    costs more than a small model's step. The first call checks them (and compiles if needed)."""
    key = (id(step), level)
    if key not in checked:
        checked.add(key)
        return step(state, byte, level, *args)
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        return step(state, byte, level, *args)


class NoiseChunks:
    """The Exp(1) noise of successive draws (`sample_with_noise`), (B, V) per draw, drawn from
    `generator` `chunk` draws at a time: one random-number call per chunk instead of one per
    byte. The same generator state gives the same noise whatever runs the steps, so eager and
    compiled sampling draw the same bytes from the same logits. Disabled (greedy):
    all ones, no random numbers drawn."""

    def __init__(self, shape: tuple, device: torch.device, generator: Optional[torch.Generator], enabled: bool = True, chunk: int = 64) -> None:
        self.shape, self.device, self.generator, self.enabled, self.chunk = tuple(shape), device, generator, enabled, chunk
        self.buffer = torch.ones(1, *self.shape, device=device)
        self.used = 1 if enabled else 0

    def next(self) -> torch.Tensor:
        """The next draw's (B, V) noise."""
        return self.take(1)[0]

    def take(self, k: int) -> torch.Tensor:
        """The next k draws' noise, (k, B, V)."""
        if not self.enabled:
            return self.buffer.expand(k, *self.shape)
        if self.used + k > len(self.buffer):
            fresh = [exponential_noise((self.chunk, *self.shape), self.device, self.generator) for _ in range(-(-k // self.chunk))]
            self.buffer = torch.cat([self.buffer[self.used :], *fresh])
            self.used = 0
        self.used += k
        return self.buffer[self.used - k : self.used]

    def put_back(self, k: int) -> None:
        """Return the last k draws' noise taken but not used: the next take starts with it."""
        if self.enabled:
            self.used -= k


# Bytes a native sampling run (`NativeDecode.run`) takes per call: one NoiseChunks chunk. Long
# enough that the Python around a call is a small share of it, short enough that `on_byte`
# progress stays smooth.
NATIVE_RUN_BYTES = 64


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
    native: Optional[bool] = None,
) -> torch.Tensor:
    """Continue each row of `prompt` ((B, T) or (T,) bytes, T may be 0) by up to `max_new_bytes`.

    Returns (B, T + n) int64: the prompt then the new bytes. With `stop_byte`, a row that samples it
    keeps it and is padded with it afterwards, and generation ends early (n < max_new_bytes) once
    every row has stopped. `seed` makes the draws reproducible (bit-identical bytes on the same
    device, dtype and batch size); None uses torch's global generator. `on_byte(n)` is called
    after each step with the number of new bytes so far (for a progress bar). `compile` runs
    each step and the draw after it as one torch.compile'd graph (`compiled_decode_and_sample`):
    the first call per model and sampling options compiles (seconds to a minute), later ones
    reuse it. The noise of the draws is the same either way (`NoiseChunks`), so compiled and
    eager sampling differ only where rounding differences in the logits change a draw. `native`
    (default: when not compiling): attention stages step in the native CPU kernel where it can
    run (`allocate_decode_state`), and whole runs of steps and draws are native calls
    (`NativeDecode.run`, the same draws from the same noise); False: PyTorch only.
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
    if model.length_limited and T + max_new_bytes > model.config.max_seq_len:
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
        # Compiled: one graph runs the model's step AND the draw of the next byte, on static caches.
        length = T + max_new_bytes
        state = allocate_decode_state(model, B, compiled_state_length(model, length) if compile else length, static=compile, native=native)
        step = compiled_decode_and_sample(model, temperature, top_k, top_p) if compile else None
        # Compiled, with fixed units and no stop byte: `unit` steps per call (see COMPILED_RUN_BYTES).
        unit = compiled_run_length(model) if compile and model.config.is_fixed and stop_byte is None else 0
        unit_step = compiled_decode_and_sample_unit(model, temperature, top_k, top_p) if unit > 1 else None
        # Native: runs of steps and draws in one call each.
        native_run = state.native_decode if step is None else None
        out = torch.empty(B, T + max_new_bytes, dtype=torch.long, device=device)
        out[:, :T] = prompt
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        noise = NoiseChunks((B, vocab_size), device, generator, enabled=temperature > 0)
        logits = prefill(model, state, prompt)
        byte = sample_with_noise(logits, noise.next(), temperature, top_k, top_p)  # (B,)
        n = max_new_bytes
        checked: set = set()  # compiled calls already made once, with their guards, on this state
        with decoding_threads(device):
            i = 0  # `byte` holds new byte i, sampled and not yet fed
            while True:
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
                if native_run is not None:
                    k = min(max_new_bytes - 1 - i, NATIVE_RUN_BYTES)  # bytes i + 1 .. i + k
                    drawn = native_run.run(byte, k, noise.take(k) if temperature > 0 else None, temperature, top_k, top_p, stop_byte, stopped)  # (n, B)
                    done = 0 if drawn is None else drawn.shape[0]
                    if temperature > 0:
                        noise.put_back(k - done)
                    if done:
                        out[:, T + i + 1 : T + i + done] = drawn[:-1].T
                        if on_byte is not None:
                            for n_new in range(i + 2, i + done + 1):
                                on_byte(n_new)
                        byte, i = drawn[-1], i + done
                        continue
                if step is None:
                    logits = decode_step(model, state, byte)
                    byte = sample_with_noise(logits, noise.next(), temperature, top_k, top_p)
                elif unit_step is not None and state.host_position % unit == 0 and i + unit < max_new_bytes:
                    # At a multiple of `unit` bytes: bytes i + 1 .. i + unit in one call.
                    fed, levels, _ = model.begin_step(state, byte, count=unit)
                    run, last = _trusted_call(checked, unit_step, state, fed, levels, None, noise.take(unit))  # (B, unit), (B,)
                    out[:, T + i + 1 : T + i + unit] = run[:, :-1]
                    if on_byte is not None:
                        for k in range(i + 2, i + unit + 1):
                            on_byte(k)
                    byte, i = last.clone(), i + unit  # (a CUDA graph reuses its output buffers)
                    continue
                else:
                    fed, level, _ = model.begin_step(state, byte)
                    byte = _trusted_call(checked, step, state, fed, level, None, noise.next())
                i += 1
        if stop_byte is not None and bool(stopped.all()):
            # Cut after the row that stopped last; the other rows are padded with the stop byte.
            n = 1 + int((out[:, T : T + n] == stop_byte).long().argmax(dim=1).max())
        return out[:, : T + n]
    finally:
        model.train(was_training)
