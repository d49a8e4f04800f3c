"""Lossless compression with a byte model: arithmetic coding under its next-byte probabilities.

A file is cut into the same contiguous windows that `bench` scores, [i·L, min((i+1)·L, N)) with
L = seq_len, and every window is coded from an empty context, so the compressed size matches what
`bench` predicts for the same bytes (up to the coder's < 0.01% and the header). To keep the model
busy, `lanes` windows are decoded side by side as one batch; their bytes are interleaved into ONE
arithmetic-coded stream in step order (byte t of window 0, byte t of window 1, ..., then t+1), which
the decoder can follow because it learns byte t of every lane before it needs step t+1.

A subword model (vocab_size != 256) codes token ids instead: the file is encoded by its BPE
tokenizer (exact on any bytes; the literal `<|endoftext|>` becomes the special id, which decodes
to the same bytes), windows are L tokens, and the arithmetic coder works over the model's V ids.
The decoder rebuilds the ids and decodes them with the same tokenizer, whose fingerprint the
container records.

Encoder and decoder must compute bit-identical probabilities, so both make exactly the same calls
to the incremental decoder of `multibyte.sampling` on the same batch shapes: a fresh (reset) state
per group of windows, `prefill` of nothing for symbol 0, then one `decode_step` per symbol; lanes
whose window has ended are fed symbol 0. The logits become integer frequencies by one
deterministic float64 quantisation (`arithmetic_coding.cumulative_frequencies`). What this requires
of the environment (same weights, device type, dtype; safest also the same PyTorch build and
thread count) is the README's "Determinism" paragraph; every way it can fail is caught by the
container.

With an `AdaptConfig` (`compress --adapt`, dynamic evaluation: `multibyte.adaptation`), the
model learns while it codes: after each group of windows is coded, a copy of the model is updated
on the group's symbols, which the decoder has just restored too, so both sides make the same
updates. That makes the probabilities depend on the backward pass and the optimizer as well, so
the container records the options and the environment (device type, intra-op thread count,
PyTorch version), and a decoder under another setting is refused with one clear error instead of
decoding garbage.

With a mixing config (`multibyte.mixing`: `compress --ngram true` or `--lpc true`), each byte is
coded under the model's distribution mixed with a second predictor's: an adaptive byte n-gram
(`multibyte.ngram_mixing`) or a linear predictor of 16-bit samples (`multibyte.lpc_mixing`), both
fed only what the decoder has restored too (the groups already coded, the lane's window so far).

Container (little-endian, HEADER_SIZE = 86 bytes, ADAPT_HEADER_SIZE = 167 with adaptation, the
mixing block's 17 (n-gram) or 48 (LPC) more with mixing, then the payload), format version 6:

    magic          4s   b"MBAC"
    version        B    FORMAT_VERSION
    precision      B    0 = float32, 1 = bfloat16 autocast (the decoder uses the same)
    lanes          H    windows coded side by side
    seq_len        I    window length L in symbols (bytes or tokens)
    length         Q    original length N in bytes
    payload_size   Q    bytes of arithmetic code after the header
    weights_hash   16s  first 16 bytes of the SHA-256 of the model's parameters and buffers
    data_crc       I    CRC32 of the original bytes
    payload_crc    I    CRC32 of the payload
    num_symbols    Q    symbols coded: N for a byte model, the token count for a subword model
    alphabet_size  I    the model's vocabulary V (256 for bytes)
    tokenizer_hash 16s  first 16 bytes of the tokenizer's fingerprint; zeros for a byte model
    adapt          B    1 = coded with dynamic evaluation: the adapt block follows; 0 = it does not
    mixing         B    0 = the model alone, 1 = mixed with a byte n-gram, 2 = with a linear
                        predictor: that mixing's block follows (after any adapt block)
  the adapt block (81 bytes, only when adapt = 1):
    optimizer      B    index into adaptation.OPTIMIZERS
    parameters     B    index into adaptation.PARAMETER_SETS
    adapt_precision B   index into adaptation.ADAPT_PRECISIONS
    steps          H    optimizer steps per group of windows_per_step windows
    windows_per_step H
    learning_rate  d
    max_grad_norm  d
    beta1, beta2   dd
    device_type    8s   the encoder's device type ("cpu", "cuda"), NUL-padded
    threads        H    the encoder's torch.get_num_threads()
    torch_version  32s  the encoder's torch.__version__, NUL-padded
  the n-gram block (17 bytes, mixing = 1): NgramConfig's fields in order, "<Bdd"
  the LPC block (48 bytes, mixing = 2): LpcConfig's fields in order, "<IIIIdddd"
    header_crc     I    CRC32 of the header bytes before it

Since version 6 the model's decoding steps run on one intra-op thread (CODING_THREADS) on a CPU,
whatever the caller's thread count: CPU kernels such as scaled_dot_product_attention split their
sums by the thread count, so a file coded under 8 threads could not be decoded under 4. A
file coded with adaptation is decoded only under the same device type, thread count (its updates
run on the caller's threads) and PyTorch version. Version 5 files (the same layout, coded and
decoded under the caller's threads), version 4 files (the same layout; the mixing byte is 0 or 1), version 3 files (no mixing byte: 85 bytes, 166 with the adapt block), version 2 files (the fields
up to tokenizer_hash, then header_crc; 84 bytes) and version 1 files (byte models only: the
fields up to payload_crc, then header_crc; 56 bytes) are still read. Decompression checks, in order, magic, version, header checksum, the announced
length (at most MAX_LENGTH, and no more symbols than the payload can encode: see
`max_decodable_length`), weights hash, tokenizer, payload size (truncation) and payload checksum
before decoding anything or allocating the output, and the data checksum after: a wrong model or
tokenizer, a truncated or crafted file or a flipped bit raises `CompressionError` naming the file
and the problem, never returns wrong bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch

from datamodules.windows import groups, inference_plan
from multibyte.atomic_files import write_atomically
from multibyte.arithmetic_coding import (
    ALPHABET_SIZE,
    FREQUENCY_TOTAL,
    MAX_ALPHABET_SIZE,
    STATE_BITS,
    ArithmeticDecoder,
    ArithmeticEncoder,
    cumulative_frequencies,
)
from multibyte.adaptation import ADAPT_PRECISIONS, OPTIMIZERS, PARAMETER_SETS, AdaptConfig, Adapter, adapt_summary
from multibyte.model import HierarchicalByteModel
from multibyte.mixing import MIXINGS, MixingConfig, by_code, byte_mixer, kind, pack_block, unpack_block
from multibyte.mixing import check as check_mixing
from multibyte.progress import progress_bar
from multibyte.sampling import DecodeState, allocate_decode_state, decode_step, decoding_threads, prefill, reset_decode_state

if TYPE_CHECKING:
    from multibyte.bpe import BPETokenizer

MAGIC = b"MBAC"
FORMAT_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
# Intra-op threads of the decoding steps of a version 6 file on a CPU: one, so the probabilities do
# not depend on the thread count (per-byte steps gain little from a second thread anyway:
# sampling.CPU_DECODE_THREADS).
CODING_THREADS = 1
PRECISIONS = ("32-true", "bf16-mixed")  # index = the header's precision code
DEFAULT_LANES = 32  # windows coded side by side without adaptation: more lanes, fewer steps per byte
# With adaptation the lanes are also the windows coded between two updates (and bench's batch is
# the windows scored between two): 8 by default in both, the group AdaptConfig's defaults were
# tuned with (README, "Dynamic evaluation"; updating more often scored better, 32 worse).
DEFAULT_ADAPT_WINDOWS = 8
_HEADER_V1 = struct.Struct("<4sBBHIQQ16sII")  # version 1: everything up to header_crc
_HEADER_V2 = struct.Struct("<4sBBHIQQ16sIIQI16s")  # version 2: everything up to header_crc
_HEADER_V3 = struct.Struct("<" + _HEADER_V2.format[1:] + "B")  # version 3: version 2's fields and the adapt flag
_HEADER = struct.Struct("<" + _HEADER_V3.format[1:] + "B")  # versions 4 to 6: version 3's fields and the mixing byte
_ADAPT_BLOCK = struct.Struct("<BBBHHdddd8sH32s")  # with adapt = 1: the options and the environment
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size  # 86: the header of a file coded without adaptation
ADAPT_HEADER_SIZE = HEADER_SIZE + _ADAPT_BLOCK.size  # 167: with adaptation
_LAYOUTS = {1: _HEADER_V1, 2: _HEADER_V2, 3: _HEADER_V3, 4: _HEADER, 5: _HEADER, 6: _HEADER}
_MIXING_CODES = {4: (0, 1), 5: (0, *(mixing.code for mixing in MIXINGS))}  # the mixing byte's values by version
_MIXING_CODES[6] = _MIXING_CODES[5]
_HEADER_SIZES = {version: layout.size + _HEADER_CRC.size for version, layout in _LAYOUTS.items()}  # the shortest
NO_TOKENIZER = bytes(16)  # the tokenizer_hash of a byte model's file
# The longest input compressed or restored: both sides hold the whole file in memory.
MAX_LENGTH = 1 << 34  # 16 GiB


def min_bits_per_symbol(alphabet_size: int = ALPHABET_SIZE) -> float:
    """The fewest bits the coder can spend on a symbol: every symbol keeps at least 1 of the
    FREQUENCY_TOTAL counts for each of the other V - 1, so the likeliest has p <= (2^24 - V + 1) / 2^24."""
    return -math.log2((FREQUENCY_TOTAL - (alphabet_size - 1)) / FREQUENCY_TOTAL)


MIN_BITS_PER_SYMBOL = min_bits_per_symbol(ALPHABET_SIZE)  # bytes: ~2.2e-5


def max_decodable_length(payload_size: int, alphabet_size: int = ALPHABET_SIZE) -> int:
    """The most symbols `payload_size` bytes of arithmetic code can stand for. The coder emits (or
    owes) one bit each time its interval has halved, so its output holds at least the symbols'
    total cost, >= count * min_bits_per_symbol; STATE_BITS of slack covers the final flush and
    the interval's rounding."""
    return int((8 * payload_size + STATE_BITS) / min_bits_per_symbol(alphabet_size))


def tokenizer_hash(tokenizer: Optional["BPETokenizer"]) -> bytes:
    """What a container records of the tokenizer: the first 16 bytes of its fingerprint."""
    return NO_TOKENIZER if tokenizer is None else bytes.fromhex(tokenizer.fingerprint())[:16]


class CompressionError(ValueError):
    """A compressed file cannot be decoded faithfully. The message names the file and the problem."""


@dataclass(frozen=True)
class Header:
    precision: str
    lanes: int
    seq_len: int
    length: int
    payload_size: int
    weights_hash: bytes
    data_crc: int
    payload_crc: int
    num_symbols: int = -1  # -1: length (a byte model's file)
    alphabet_size: int = ALPHABET_SIZE
    tokenizer_hash: bytes = NO_TOKENIZER
    adapt: Optional[AdaptConfig] = None  # dynamic evaluation's options; None: the weights stay fixed
    device_type: str = ""  # the encoder's environment ("" in files before version 3)
    threads: int = 0
    torch_version: str = ""
    version: int = FORMAT_VERSION  # of the file read; pack() always writes FORMAT_VERSION
    mixing: Optional[MixingConfig] = None  # the second predictor's options (versions 4 to 6); None: the model alone

    def __post_init__(self) -> None:
        if self.num_symbols < 0:
            object.__setattr__(self, "num_symbols", self.length)

    @property
    def size(self) -> int:
        return (
            _HEADER_SIZES[self.version]
            + (_ADAPT_BLOCK.size if self.adapt is not None else 0)
            + (kind(self.mixing).block.size if self.mixing is not None else 0)
        )

    def pack(self) -> bytes:
        fields = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            PRECISIONS.index(self.precision),
            self.lanes,
            self.seq_len,
            self.length,
            self.payload_size,
            self.weights_hash,
            self.data_crc,
            self.payload_crc,
            self.num_symbols,
            self.alphabet_size,
            self.tokenizer_hash,
            int(self.adapt is not None),
            0 if self.mixing is None else kind(self.mixing).code,
        )
        if self.adapt is not None:
            fields += _ADAPT_BLOCK.pack(
                *_adapt_fields(self.adapt), _padded(self.device_type, 8), self.threads, _padded(self.torch_version, 32)
            )
        if self.mixing is not None:
            fields += pack_block(self.mixing)
        return fields + _HEADER_CRC.pack(zlib.crc32(fields))

    @classmethod
    def unpack(cls, blob: bytes, source: str) -> "Header":
        """Parse and validate the header at the start of `blob` (`source` names it in errors)."""
        if not blob:
            raise CompressionError(f"{source}: empty file, not a multibyte compressed file")
        if not blob.startswith(MAGIC[: len(blob)]) or (len(blob) >= len(MAGIC) and blob[: len(MAGIC)] != MAGIC):
            raise CompressionError(f"{source}: not a multibyte compressed file (no {MAGIC.decode()} signature)")
        version = blob[len(MAGIC)] if len(blob) > len(MAGIC) else FORMAT_VERSION
        if version not in READABLE_VERSIONS:
            raise CompressionError(
                f"{source}: compressed with format version {version}; this multibyte reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        size = _HEADER_SIZES[version]
        if len(blob) < size:
            raise CompressionError(f"{source}: truncated: {len(blob)} bytes, shorter than the {size}-byte header")
        layout = _LAYOUTS[version]
        flags = 2 if version >= 4 else 1 if version == 3 else 0  # the adapt (and mixing) bytes end the layout
        adapted = flags >= 1 and blob[layout.size - flags] == 1  # checked by the checksum below
        mixed = by_code(blob[layout.size - 1]) if flags >= 2 and blob[layout.size - 1] in _MIXING_CODES[version] else None
        block = (_ADAPT_BLOCK.size if adapted else 0) + (mixed.block.size if mixed is not None else 0)
        if len(blob) < size + block:
            raise CompressionError(
                f"{source}: truncated: {len(blob)} bytes, shorter than the {size + block}-byte header"
            )
        fields = blob[: layout.size + block]
        (header_crc,) = _HEADER_CRC.unpack(blob[layout.size + block : size + block])
        if zlib.crc32(fields) != header_crc:
            raise CompressionError(f"{source}: corrupt header (checksum mismatch)")
        values = layout.unpack(fields[: layout.size])
        _, _, precision, lanes, seq_len, length, payload_size, weights_hash, data_crc, payload_crc = values[:10]
        num_symbols, alphabet_size, tokens_of = values[10:13] if version >= 2 else (length, ALPHABET_SIZE, NO_TOKENIZER)
        if version >= 3 and values[13] not in (0, 1):
            raise CompressionError(f"{source}: corrupt header (adapt flag {values[13]})")
        if version >= 4 and values[14] not in _MIXING_CODES[version]:
            raise CompressionError(f"{source}: corrupt header (mixing {values[14]})")
        adapt, device_type, threads, torch_version, mixing = None, "", 0, "", None
        if adapted:
            options = _ADAPT_BLOCK.unpack(fields[layout.size : layout.size + _ADAPT_BLOCK.size])
            adapt = _parse_adapt_fields(options[:9], source)
            device_type, threads, torch_version = _unpadded(options[9]), options[10], _unpadded(options[11])
        if mixed is not None:
            try:
                mixing = unpack_block(mixed, fields[len(fields) - mixed.block.size :])
            except ValueError as error:
                raise CompressionError(f"{source}: corrupt header ({error})") from None
        if precision >= len(PRECISIONS) or lanes < 1 or seq_len < 1 or not 2 <= alphabet_size <= MAX_ALPHABET_SIZE:
            raise CompressionError(
                f"{source}: corrupt header (precision {precision}, lanes {lanes}, seq_len {seq_len}, "
                f"alphabet {alphabet_size})"
            )
        # The lengths decide how much is allocated and decoded: bound them before anything trusts them.
        if length > MAX_LENGTH:
            raise CompressionError(
                f"{source}: corrupt header: it announces {length:,} bytes, more than the {MAX_LENGTH:,} "
                f"this multibyte restores"
            )
        if mixing is not None and (tokens_of != NO_TOKENIZER or alphabet_size != ALPHABET_SIZE):
            raise CompressionError(f"{source}: corrupt header: mixing on a file not coded as bytes")
        most = max_decodable_length(payload_size, alphabet_size)
        if tokens_of == NO_TOKENIZER:
            if length > most:
                raise CompressionError(
                    f"{source}: corrupt header: it announces {length:,} bytes, more than a {payload_size:,}-byte "
                    f"payload can encode (at most {most:,})"
                )
            if num_symbols != length:
                raise CompressionError(f"{source}: corrupt header: {num_symbols:,} symbols coded for {length:,} bytes")
        else:
            if num_symbols > most:
                raise CompressionError(
                    f"{source}: corrupt header: it announces {num_symbols:,} tokens, more than a {payload_size:,}-byte "
                    f"payload can encode (at most {most:,})"
                )
            if num_symbols > length or (length and not num_symbols):
                raise CompressionError(
                    f"{source}: corrupt header: {num_symbols:,} tokens cannot decode to {length:,} bytes"
                )
        return cls(
            PRECISIONS[precision], lanes, seq_len, length, payload_size, weights_hash, data_crc, payload_crc,
            num_symbols, alphabet_size, tokens_of, adapt, device_type, threads, torch_version, version, mixing,
        )

    def environment(self) -> str:
        """E.g. "cpu, 2 threads, PyTorch 2.14.1" (what the encoder ran on)."""
        return describe_environment(self.device_type, self.threads, self.torch_version)


def _padded(text: str, size: int) -> bytes:
    return text.encode("ascii", "replace")[:size].ljust(size, b"\0")


def _unpadded(field: bytes) -> str:
    return field.rstrip(b"\0").decode("ascii", "replace")


def _adapt_fields(adapt: AdaptConfig) -> tuple:
    """The adapt block's nine option fields (optimizer ... beta2)."""
    return (
        OPTIMIZERS.index(adapt.optimizer),
        PARAMETER_SETS.index(adapt.parameters),
        ADAPT_PRECISIONS.index(adapt.precision),
        adapt.steps,
        adapt.windows_per_step,
        adapt.learning_rate,
        adapt.max_grad_norm,
        adapt.beta1,
        adapt.beta2,
    )


def _parse_adapt_fields(values: tuple, source: str) -> AdaptConfig:
    optimizer, parameters, precision, steps, windows, learning_rate, max_grad_norm, beta1, beta2 = values
    if optimizer >= len(OPTIMIZERS) or parameters >= len(PARAMETER_SETS) or precision >= len(ADAPT_PRECISIONS):
        raise CompressionError(
            f"{source}: corrupt header (adapt optimizer {optimizer}, parameters {parameters}, precision {precision})"
        )
    try:
        return AdaptConfig(
            optimizer=OPTIMIZERS[optimizer],
            learning_rate=learning_rate,
            parameters=PARAMETER_SETS[parameters],
            steps=steps,
            windows_per_step=windows,
            precision=ADAPT_PRECISIONS[precision],
            max_grad_norm=max_grad_norm,
            beta1=beta1,
            beta2=beta2,
        )
    except ValueError as error:
        raise CompressionError(f"{source}: corrupt header ({error})") from None


def describe_environment(device_type: str, threads: int, torch_version: str) -> str:
    return f"{device_type or '?'}, {threads} thread{'s' if threads != 1 else ''}, PyTorch {torch_version or '?'}"


def current_environment(device: torch.device) -> tuple[str, int, str]:
    """(device type, intra-op threads, torch version) of this process, as a header records them."""
    return device.type, torch.get_num_threads(), torch.__version__


@dataclass(frozen=True)
class CompressionStats:
    """What one compress / decompress call did."""

    original_bytes: int
    compressed_bytes: int  # header + payload
    header_bytes: int
    model_bits: float  # sum of -log2 p(symbol) under the model's float probabilities (what bench reports)
    seconds: float
    num_symbols: int = -1  # symbols coded: bytes, or a subword model's tokens; -1 means original_bytes
    adapted: bool = False  # the model learned while coding (the file stores the options)

    def __post_init__(self) -> None:
        if self.num_symbols < 0:
            object.__setattr__(self, "num_symbols", self.original_bytes)

    @property
    def bits_per_byte(self) -> float:
        """Compressed size, header included, in bits per original byte."""
        return 8 * self.compressed_bytes / max(1, self.original_bytes)

    @property
    def bytes_per_second(self) -> float:
        return self.original_bytes / max(self.seconds, 1e-9)


def weights_hash(model: torch.nn.Module) -> bytes:
    """First 16 bytes of the SHA-256 over every parameter and buffer: name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()[:16]


def window_groups(length: int, seq_len: int, lanes: int) -> list[list[tuple[int, int]]]:
    """The windows [start, stop) of `length` symbols (bytes or tokens), `seq_len` each (the last one
    shorter: bench's basic plan, `datamodules.windows`), in groups of at most `lanes` that are
    decoded side by side."""
    windows = [(window.start, window.stop) for window in inference_plan(length, seq_len, 1, "basic")]
    return [list(group) for group in groups(windows, lanes)]


# ------------------------------------------------------------------------------------------------
# The model side: the same calls, in the same order, for the encoder and the decoder.
# ------------------------------------------------------------------------------------------------


def _precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _frequencies(logits: torch.Tensor) -> np.ndarray:
    """(B, V) logits -> (B, V + 1) cumulative integer frequencies, deterministically (float64)."""
    z = logits.double().cpu().numpy()
    return cumulative_frequencies(np.exp(z - z.max(axis=-1, keepdims=True)), z.shape[-1])


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    """(B, V) logits -> (B, V) float64 probabilities, deterministically (softmax in float64)."""
    z = logits.double().cpu().numpy()
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log2_probabilities(logits: torch.Tensor) -> np.ndarray:
    """(B, V) logits -> (B, V) float64 log2 probabilities (for reporting the ideal code length)."""
    return (torch.log_softmax(logits.double(), dim=-1) / math.log(2)).cpu().numpy()


class _LaneStepper:
    """Runs the incremental decoder for one group of windows: `start()` gives symbol 0's logits and
    `feed(symbols)` those of the next position, reusing one state per batch size. `threads`: the
    intra-op threads `_code_windows` runs `start` and `feed` under on a CPU (the file's version
    says which)."""

    def __init__(self, model: HierarchicalByteModel, seq_len: int, precision: str, version: int = FORMAT_VERSION) -> None:
        self.model = model
        self.seq_len = seq_len
        self.precision = precision
        self.device = model.head.weight.device
        self.threads = CODING_THREADS if version >= 6 else torch.get_num_threads()
        self._states: dict[int, DecodeState] = {}  # one per batch size (the last group may be narrower)
        self._state: DecodeState | None = None  # the current group's

    def start(self, batch_size: int) -> torch.Tensor:
        state = self._states.get(batch_size)
        if state is None:
            # PyTorch only (native=False): the native kernel is compiled for this CPU, and a file
            # must decode to the same probabilities wherever the same PyTorch build runs it.
            state = self._states[batch_size] = allocate_decode_state(self.model, batch_size, self.seq_len, native=False)
        reset_decode_state(state)
        self._state = state
        empty = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)
        with _precision_context(self.precision, self.device):
            return prefill(self.model, state, empty)

    def feed(self, byte: torch.Tensor) -> torch.Tensor:
        with _precision_context(self.precision, self.device):
            return decode_step(self.model, self._state, byte.to(self.device))


def _check_model(model: HierarchicalByteModel, seq_len: int, lanes: int, precision: str) -> None:
    if model.training:
        raise ValueError("the model is in training mode (dropout would make coding random): call model.eval()")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not 1 <= lanes <= 0xFFFF:
        raise ValueError(f"lanes must lie in 1..65535, got {lanes}")
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} must lie in 1..{model.config.max_seq_len} (the model's max_seq_len)")


# ------------------------------------------------------------------------------------------------
# Bytes in, bytes out.
# ------------------------------------------------------------------------------------------------


def _symbols(model: HierarchicalByteModel, data: bytes, tokenizer: Optional["BPETokenizer"]) -> np.ndarray:
    """What the model codes: the bytes themselves, or a subword model's token ids of them."""
    vocab_size = model.config.vocab_size
    if tokenizer is None:
        if vocab_size != ALPHABET_SIZE:
            raise ValueError(
                f"the model reads {vocab_size} symbols, not bytes: a subword model compresses through its "
                f"tokenizer (pass the one it was trained with)"
            )
        return np.frombuffer(data, dtype=np.uint8)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's {vocab_size}")
    return tokenizer.encode_array(data, allowed_special="all")


def _code_windows(
    stepper: _LaneStepper,
    length: int,
    seq_len: int,
    lanes: int,
    next_symbol,
    adapter: Optional[Adapter] = None,
    symbols: Optional[np.ndarray] = None,
    bar=None,
    mixer=None,
) -> float:
    """Walk the windows of `length` symbols as both sides do: per group a fresh state, then per
    step t the logits of every live lane; `next_symbol(cumulative, start + t)` codes one symbol
    and returns it. With `adapter` (whose model the stepper runs), after every group but the last
    the model learns from the group's `symbols` (the array being read or filled). With `mixer`
    (`multibyte.mixing.byte_mixer`) the coded distribution is the model's mixed with its predictor's.
    `bar` counts the symbols coded. Returns the -log2 p of the symbols coded (the mixture's with
    a mixer)."""
    model_bits = 0.0
    all_groups = window_groups(length, seq_len, lanes)
    for index, group in enumerate(all_groups):
        with decoding_threads(stepper.device, stepper.threads):
            model_bits += _code_group(stepper, group, next_symbol, bar, mixer)
        if adapter is not None and index + 1 < len(all_groups):  # nothing is coded after the last
            tokens = torch.zeros(len(group), seq_len, dtype=torch.long)  # (B, L), right-padded
            mask = torch.zeros(len(group), seq_len, dtype=torch.bool)
            for row, (start, stop) in enumerate(group):
                tokens[row, : stop - start] = torch.from_numpy(np.asarray(symbols[start:stop], dtype=np.int64))
                mask[row, : stop - start] = True
            adapter.update(tokens, mask)  # on the caller's threads, which an adapted file records
    return model_bits


def _code_group(stepper: _LaneStepper, group: list[tuple[int, int]], next_symbol, bar, mixer) -> float:
    """Code the windows of one group side by side (see `_code_windows`); returns their -log2 p."""
    model_bits = 0.0
    lengths = [stop - start for start, stop in group]
    longest = max(lengths)
    logits = stepper.start(len(group))
    if mixer is not None:
        mixer.start_group(len(group))
    for t in range(longest):
        step = np.zeros(len(group), dtype=np.int64)  # ended lanes are fed 0 on both sides
        if mixer is None:
            cumulative = _frequencies(logits)  # (B, V + 1)
            log2_p = _log2_probabilities(logits)  # (B, V)
            for lane, (start, _) in enumerate(group):
                if t < lengths[lane]:
                    step[lane] = symbol = next_symbol(cumulative[lane], start + t)
                    model_bits -= log2_p[lane, symbol]
        else:  # a lane's mixture needs no other lane's byte of this step: all first, then code
            p_model = _probabilities(logits)  # (B, 256)
            live = [lane for lane in range(len(group)) if t < lengths[lane]]
            mixed = np.stack([mixer.distribution(lane, p_model[lane]) for lane in live])  # (live, 256)
            cumulative = cumulative_frequencies(mixed)
            for row, lane in enumerate(live):
                step[lane] = symbol = next_symbol(cumulative[row], group[lane][0] + t)
                model_bits -= math.log2(mixed[row, symbol])
                mixer.observe(lane, symbol)
        if t + 1 < longest:
            logits = stepper.feed(torch.from_numpy(step))
        if bar is not None:
            bar.update(sum(t < n for n in lengths))
    if mixer is not None:
        mixer.end_group()
    return model_bits


@torch.inference_mode()
def compress_bytes(
    model: HierarchicalByteModel,
    data: bytes,
    seq_len: int,
    lanes: Optional[int] = None,
    precision: str = "32-true",
    tokenizer: Optional["BPETokenizer"] = None,
    adapt: Optional[AdaptConfig] = None,
    progress: Optional[bool] = False,
    mixing: Optional[MixingConfig] = None,
) -> tuple[bytes, CompressionStats]:
    """Compress `data` with `model` in windows of `seq_len` symbols; returns (container bytes, stats).

    A subword model (vocab_size != 256) needs its `tokenizer`: the data is coded as its token ids.
    `adapt`: learn while coding (dynamic evaluation, after every group of `lanes` windows); the
    model given is not modified. `lanes` None: DEFAULT_ADAPT_WINDOWS with `adapt`, else
    DEFAULT_LANES. `progress`: a bar on stderr (None: when stderr is a terminal). `mixing`: mix the
    model with a second predictor (`multibyte.mixing`; a byte model only)."""
    if lanes is None:
        lanes = DEFAULT_ADAPT_WINDOWS if adapt is not None else DEFAULT_LANES
    _check_model(model, seq_len, lanes, precision)
    if len(data) > MAX_LENGTH:
        raise ValueError(f"input of {len(data):,} bytes: at most {MAX_LENGTH:,} can be compressed")
    if mixing is not None:
        check_mixing(mixing, "basic", tokenizer is not None, seq_len=seq_len)
    began = time.perf_counter()
    data = bytes(data)
    symbols = _symbols(model, data, tokenizer)
    encoder = ArithmeticEncoder()

    def encode(cumulative: np.ndarray, position: int) -> int:
        symbol = int(symbols[position])
        encoder.encode(cumulative, symbol)
        return symbol

    if adapt is not None and len(symbols) <= seq_len * lanes:
        adapt = None  # one group of windows: no update would ever run, so the file says none
    adapter = Adapter(model, adapt, deterministic=True) if adapt is not None else None
    stepper = _LaneStepper(model if adapter is None else adapter.model, seq_len, precision)
    bar = progress_bar(len(symbols), "compress", "B" if tokenizer is None else "tok", progress)
    try:
        mixer = byte_mixer(mixing) if mixing is not None else None
        model_bits = _code_windows(stepper, len(symbols), seq_len, lanes, encode, adapter, symbols, bar, mixer)
    finally:
        bar.close()
    payload = encoder.finish()
    device_type, threads, torch_version = current_environment(model.head.weight.device)
    header = Header(
        precision=precision,
        lanes=lanes,
        seq_len=seq_len,
        length=len(data),
        payload_size=len(payload),
        weights_hash=weights_hash(model),
        data_crc=zlib.crc32(data),
        payload_crc=zlib.crc32(payload),
        num_symbols=len(symbols),
        alphabet_size=model.config.vocab_size,
        tokenizer_hash=tokenizer_hash(tokenizer),
        adapt=adapt,
        device_type=device_type,
        threads=threads,
        torch_version=torch_version,
        mixing=mixing,
    ).pack()
    seconds = time.perf_counter() - began
    stats = CompressionStats(len(data), len(header) + len(payload), len(header), model_bits, seconds, len(symbols), adapt is not None)
    return header + payload, stats


def _check_tokenizer(header: Header, tokenizer: Optional["BPETokenizer"], source: str) -> None:
    """The file's tokenizer (its fingerprint's first 16 bytes) must be the one given."""
    given = tokenizer_hash(tokenizer)
    if header.tokenizer_hash == given:
        if tokenizer is not None and header.length > header.num_symbols * int(tokenizer.token_byte_lengths().max()):
            raise CompressionError(
                f"{source}: corrupt header: {header.num_symbols:,} tokens cannot decode to {header.length:,} bytes"
            )
        return
    if header.tokenizer_hash == NO_TOKENIZER:
        raise CompressionError(f"{source}: compressed as bytes by a byte model, but a subword tokenizer was given")
    if tokenizer is None:
        raise CompressionError(
            f"{source}: compressed as the token ids of a subword tokenizer (fingerprint {header.tokenizer_hash.hex()}), "
            f"and this model has none"
        )
    raise CompressionError(
        f"{source}: compressed with another tokenizer (fingerprint {header.tokenizer_hash.hex()}, this model's is "
        f"{given.hex()})"
    )


@torch.inference_mode()
def decompress_bytes(
    model: HierarchicalByteModel,
    blob: bytes,
    source: str = "<input>",
    tokenizer: Optional["BPETokenizer"] = None,
    progress: Optional[bool] = False,
) -> tuple[bytes, CompressionStats]:
    """Inverse of `compress_bytes` (with the same model and tokenizer; adaptation's options come
    from the file); raises CompressionError (naming `source`) instead of returning wrong output."""
    began = time.perf_counter()
    header = Header.unpack(blob, source)
    if header.weights_hash != weights_hash(model):
        raise CompressionError(
            f"{source}: compressed with another model (weights hash {header.weights_hash.hex()}, "
            f"this model's is {weights_hash(model).hex()})"
        )
    _check_tokenizer(header, tokenizer, source)
    if header.alphabet_size != model.config.vocab_size:
        raise CompressionError(
            f"{source}: corrupt header: coded over {header.alphabet_size} symbols, the model has {model.config.vocab_size}"
        )
    payload = blob[header.size :]
    if len(payload) != header.payload_size:
        problem = "truncated" if len(payload) < header.payload_size else "has trailing bytes"
        raise CompressionError(
            f"{source}: {problem}: the header announces {header.payload_size} payload bytes, "
            f"the file holds {len(payload)}"
        )
    if zlib.crc32(payload) != header.payload_crc:
        raise CompressionError(f"{source}: corrupt payload (checksum mismatch)")
    try:
        _check_model(model, header.seq_len, header.lanes, header.precision)
    except ValueError as error:
        raise CompressionError(f"{source}: {error}") from error
    here = current_environment(model.head.weight.device)
    if header.adapt is not None and (header.device_type, header.threads, header.torch_version) != here:
        raise CompressionError(
            f"{source}: compressed with --adapt ({adapt_summary(header.adapt)}) on {header.environment()}; "
            f"this decoder runs on {describe_environment(*here)}, where the model's updates would differ "
            f"and decoding cannot be exact: decompress on the same device type, with the same thread count "
            f"(OMP_NUM_THREADS={header.threads}) and PyTorch version"
        )

    decoder = ArithmeticDecoder(payload)
    out = np.zeros(header.num_symbols, dtype=np.uint8 if tokenizer is None else np.int32)  # ids < MAX_ALPHABET_SIZE

    def decode(cumulative: np.ndarray, position: int) -> int:
        out[position] = symbol = decoder.decode(cumulative)
        return symbol

    adapter = None
    if header.adapt is not None:
        try:
            adapter = Adapter(model, header.adapt, deterministic=True)
        except ValueError as error:
            raise CompressionError(f"{source}: {error}") from error
    stepper = _LaneStepper(model if adapter is None else adapter.model, header.seq_len, header.precision, header.version)
    bar = progress_bar(header.num_symbols, "decompress", "B" if tokenizer is None else "tok", progress)
    try:
        mixer = byte_mixer(header.mixing) if header.mixing is not None else None
        model_bits = _code_windows(
            stepper, header.num_symbols, header.seq_len, header.lanes, decode, adapter, out, bar, mixer
        )
    finally:
        bar.close()
    encoder_ran_on = f" (the encoder ran on {header.environment()})" if header.device_type else ""
    mismatch = (
        f"{source}: the decoded {'bytes' if tokenizer is None else 'tokens'} fail the checksum: this decoder's "
        f"probabilities differ from the encoder's (different device type, dtype, PyTorch build or thread "
        f"count?{encoder_ran_on})"
    )
    try:
        data = out.tobytes() if tokenizer is None else tokenizer.decode(out)
    except ValueError:  # an id the tokenizer does not have: only wrong probabilities decode one
        raise CompressionError(mismatch) from None
    if len(data) != header.length or zlib.crc32(data) != header.data_crc:
        raise CompressionError(mismatch)
    stats = CompressionStats(
        len(data), len(blob), header.size, model_bits, time.perf_counter() - began, header.num_symbols, header.adapt is not None
    )
    return data, stats


# ------------------------------------------------------------------------------------------------
# Files.
# ------------------------------------------------------------------------------------------------


def _read_input(path: Union[str, Path]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CompressionError(f"{path}: cannot read ({error.strerror or error})") from error


def compress_file(
    model: HierarchicalByteModel,
    input_path: Union[str, Path],
    output_path: Union[str, Path],
    seq_len: int,
    lanes: Optional[int] = None,
    precision: str = "32-true",
    tokenizer: Optional["BPETokenizer"] = None,
    adapt: Optional[AdaptConfig] = None,
    progress: Optional[bool] = False,
    mixing: Optional[MixingConfig] = None,
) -> CompressionStats:
    blob, stats = compress_bytes(
        model, _read_input(input_path), seq_len, lanes, precision, tokenizer, adapt, progress, mixing
    )
    write_atomically(output_path, blob)
    return stats


def decompress_file(
    model: HierarchicalByteModel,
    input_path: Union[str, Path],
    output_path: Union[str, Path],
    tokenizer: Optional["BPETokenizer"] = None,
    progress: Optional[bool] = False,
) -> CompressionStats:
    data, stats = decompress_bytes(
        model, _read_input(input_path), source=str(input_path), tokenizer=tokenizer, progress=progress
    )
    write_atomically(output_path, data)
    return stats
