"""Lossless compression with a byte model: arithmetic coding under its next-byte probabilities.

A file is cut into the same contiguous windows that `bench` scores, [i·L, min((i+1)·L, N)) with
L = seq_len, and every window is coded from an empty context, so the compressed size matches what
`bench` predicts for the same bytes (up to the coder's < 0.01% and the header). To keep the model
busy, `lanes` windows are decoded side by side as one batch; their bytes are interleaved into ONE
arithmetic-coded stream in step order (byte t of window 0, byte t of window 1, ..., then t+1), which
the decoder can follow because it learns byte t of every lane before it needs step t+1.

Encoder and decoder must compute bit-identical probabilities, so both make exactly the same calls
to the incremental decoder of `multibyte.sampling` on the same batch shapes: a fresh (reset) state
per group of windows, `prefill` of nothing for byte 0, then one `decode_step` per byte; lanes whose
window has ended are fed byte 0. The logits become integer frequencies by one deterministic
float64 quantisation (`arithmetic_coding.cumulative_frequencies`). What this requires of the
environment (same weights, device type, dtype; safest also the same PyTorch build and thread
count) is the README's "Determinism" paragraph; every way it can fail is caught by the container.

Container (little-endian, HEADER_SIZE = 56 bytes, then the payload):

    magic          4s   b"MBAC"
    version        B    FORMAT_VERSION
    precision      B    0 = float32, 1 = bfloat16 autocast (the decoder uses the same)
    lanes          H    windows coded side by side
    seq_len        I    window length L in bytes
    length         Q    original length N
    payload_size   Q    bytes of arithmetic code after the header
    weights_hash   16s  first 16 bytes of the SHA-256 of the model's parameters and buffers
    data_crc       I    CRC32 of the original bytes
    payload_crc    I    CRC32 of the payload
    header_crc     I    CRC32 of the 52 header bytes before it

Decompression checks, in order, magic, version, header checksum, the announced length (at most
MAX_LENGTH, and no more than the payload can encode: see `max_decodable_length`), weights hash,
payload size (truncation) and payload checksum before decoding anything or allocating the output,
and the data checksum after: a wrong model, a truncated or crafted file or a flipped bit raises
`CompressionError` naming the file and the problem, never returns wrong bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from datamodules.windows import groups, inference_plan
from multibyte.arithmetic_coding import (
    ALPHABET_SIZE,
    FREQUENCY_TOTAL,
    STATE_BITS,
    ArithmeticDecoder,
    ArithmeticEncoder,
    cumulative_frequencies,
)
from multibyte.model import HierarchicalByteModel
from multibyte.sampling import DecodeState, allocate_decode_state, decode_step, prefill, reset_decode_state

MAGIC = b"MBAC"
FORMAT_VERSION = 1
PRECISIONS = ("32-true", "bf16-mixed")  # index = the header's precision code
DEFAULT_LANES = 32
_HEADER = struct.Struct("<4sBBHIQQ16sII")  # everything up to header_crc
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size  # 56
# The longest input compressed or restored: both sides hold the whole file in memory.
MAX_LENGTH = 1 << 34  # 16 GiB
# Every symbol keeps at least 1 of the FREQUENCY_TOTAL counts for each of the other 255, so the
# likeliest symbol has p <= (2^24 - 255) / 2^24 and costs at least this many bits (~2.2e-5).
MIN_BITS_PER_SYMBOL = -math.log2((FREQUENCY_TOTAL - (ALPHABET_SIZE - 1)) / FREQUENCY_TOTAL)


def max_decodable_length(payload_size: int) -> int:
    """The most bytes `payload_size` bytes of arithmetic code can stand for. The coder emits (or
    owes) one bit each time its interval has halved, so its output holds at least the symbols'
    total cost, >= length * MIN_BITS_PER_SYMBOL; STATE_BITS of slack covers the final flush and
    the interval's rounding."""
    return int((8 * payload_size + STATE_BITS) / MIN_BITS_PER_SYMBOL)


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
        )
        return fields + _HEADER_CRC.pack(zlib.crc32(fields))

    @classmethod
    def unpack(cls, blob: bytes, source: str) -> "Header":
        """Parse and validate the header at the start of `blob` (`source` names it in errors)."""
        if not blob:
            raise CompressionError(f"{source}: empty file, not a multibyte compressed file")
        if len(blob) < HEADER_SIZE:
            if not MAGIC.startswith(blob[: len(MAGIC)]):
                raise CompressionError(f"{source}: not a multibyte compressed file (no {MAGIC.decode()} signature)")
            raise CompressionError(
                f"{source}: truncated: {len(blob)} bytes, shorter than the {HEADER_SIZE}-byte header"
            )
        fields = blob[: _HEADER.size]
        magic, version, precision, lanes, seq_len, length, payload_size, weights_hash, data_crc, payload_crc = (
            _HEADER.unpack(fields)
        )
        if magic != MAGIC:
            raise CompressionError(f"{source}: not a multibyte compressed file (no {MAGIC.decode()} signature)")
        if version != FORMAT_VERSION:
            raise CompressionError(
                f"{source}: compressed with format version {version}; this multibyte reads version {FORMAT_VERSION}"
            )
        (header_crc,) = _HEADER_CRC.unpack(blob[_HEADER.size : HEADER_SIZE])
        if zlib.crc32(fields) != header_crc:
            raise CompressionError(f"{source}: corrupt header (checksum mismatch)")
        if precision >= len(PRECISIONS) or lanes < 1 or seq_len < 1:
            raise CompressionError(
                f"{source}: corrupt header (precision {precision}, lanes {lanes}, seq_len {seq_len})"
            )
        # The length decides how much is allocated and decoded: bound it before anything trusts it.
        if length > MAX_LENGTH:
            raise CompressionError(
                f"{source}: corrupt header: it announces {length:,} bytes, more than the {MAX_LENGTH:,} "
                f"this multibyte restores"
            )
        if length > max_decodable_length(payload_size):
            raise CompressionError(
                f"{source}: corrupt header: it announces {length:,} bytes, more than a {payload_size:,}-byte "
                f"payload can encode (at most {max_decodable_length(payload_size):,})"
            )
        return cls(PRECISIONS[precision], lanes, seq_len, length, payload_size, weights_hash, data_crc, payload_crc)


@dataclass(frozen=True)
class CompressionStats:
    """What one compress / decompress call did."""

    original_bytes: int
    compressed_bytes: int  # header + payload
    header_bytes: int
    model_bits: float  # sum of -log2 p(byte) under the model's float probabilities (what bench reports)
    seconds: float

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
    """The windows [start, stop) of `length` bytes, `seq_len` each (the last one shorter: bench's
    basic plan, `datamodules.windows`), in groups of at most `lanes` that are decoded side by side."""
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
    """(B, 256) logits -> (B, 257) cumulative integer frequencies, deterministically (float64)."""
    z = logits.double().cpu().numpy()
    return cumulative_frequencies(np.exp(z - z.max(axis=-1, keepdims=True)))


def _log2_probabilities(logits: torch.Tensor) -> np.ndarray:
    """(B, 256) logits -> (B, 256) float64 log2 probabilities (for reporting the ideal code length)."""
    return (torch.log_softmax(logits.double(), dim=-1) / math.log(2)).cpu().numpy()


class _LaneStepper:
    """Runs the incremental decoder for one group of windows: `start()` gives byte 0's logits and
    `feed(bytes)` those of the next position, reusing one state per batch size."""

    def __init__(self, model: HierarchicalByteModel, seq_len: int, precision: str) -> None:
        self.model = model
        self.seq_len = seq_len
        self.precision = precision
        self.device = model.head.weight.device
        self._states: dict[int, DecodeState] = {}  # one per batch size (the last group may be narrower)
        self._state: DecodeState | None = None  # the current group's

    def start(self, batch_size: int) -> torch.Tensor:
        state = self._states.get(batch_size)
        if state is None:
            state = self._states[batch_size] = allocate_decode_state(self.model, batch_size, self.seq_len)
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


@torch.inference_mode()
def compress_bytes(
    model: HierarchicalByteModel,
    data: bytes,
    seq_len: int,
    lanes: int = DEFAULT_LANES,
    precision: str = "32-true",
) -> tuple[bytes, CompressionStats]:
    """Compress `data` with `model` in windows of `seq_len` bytes; returns (container bytes, stats)."""
    _check_model(model, seq_len, lanes, precision)
    if len(data) > MAX_LENGTH:
        raise ValueError(f"input of {len(data):,} bytes: at most {MAX_LENGTH:,} can be compressed")
    began = time.perf_counter()
    data = bytes(data)
    source = np.frombuffer(data, dtype=np.uint8)
    stepper = _LaneStepper(model, seq_len, precision)
    encoder = ArithmeticEncoder()
    model_bits = 0.0
    for group in window_groups(len(data), seq_len, lanes):
        lengths = [stop - start for start, stop in group]
        longest = max(lengths)
        tokens = np.zeros((len(group), longest), dtype=np.int64)  # (B, longest), ended lanes read 0
        for lane, (start, stop) in enumerate(group):
            tokens[lane, : stop - start] = source[start:stop]
        token_tensor = torch.from_numpy(tokens)
        logits = stepper.start(len(group))
        for t in range(longest):
            cumulative = _frequencies(logits)  # (B, 257)
            live = [lane for lane, length in enumerate(lengths) if t < length]
            log2_p = _log2_probabilities(logits)
            for lane in live:
                symbol = int(tokens[lane, t])
                encoder.encode(cumulative[lane], symbol)
                model_bits -= log2_p[lane, symbol]
            if t + 1 < longest:
                logits = stepper.feed(token_tensor[:, t])
    payload = encoder.finish()
    header = Header(
        precision=precision,
        lanes=lanes,
        seq_len=seq_len,
        length=len(data),
        payload_size=len(payload),
        weights_hash=weights_hash(model),
        data_crc=zlib.crc32(data),
        payload_crc=zlib.crc32(payload),
    ).pack()
    seconds = time.perf_counter() - began
    stats = CompressionStats(len(data), len(header) + len(payload), len(header), model_bits, seconds)
    return header + payload, stats


@torch.inference_mode()
def decompress_bytes(
    model: HierarchicalByteModel, blob: bytes, source: str = "<input>"
) -> tuple[bytes, CompressionStats]:
    """Inverse of `compress_bytes`; raises CompressionError (naming `source`) instead of wrong output."""
    began = time.perf_counter()
    header = Header.unpack(blob, source)
    if header.weights_hash != weights_hash(model):
        raise CompressionError(
            f"{source}: compressed with another model (weights hash {header.weights_hash.hex()}, "
            f"this model's is {weights_hash(model).hex()})"
        )
    payload = blob[HEADER_SIZE:]
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

    stepper = _LaneStepper(model, header.seq_len, header.precision)
    decoder = ArithmeticDecoder(payload)
    out = np.zeros(header.length, dtype=np.uint8)
    model_bits = 0.0
    for group in window_groups(header.length, header.seq_len, header.lanes):
        lengths = [stop - start for start, stop in group]
        longest = max(lengths)
        logits = stepper.start(len(group))
        for t in range(longest):
            cumulative = _frequencies(logits)
            log2_p = _log2_probabilities(logits)
            step_bytes = np.zeros(len(group), dtype=np.int64)  # ended lanes are fed 0, as when encoding
            for lane, (start, _) in enumerate(group):
                if t < lengths[lane]:
                    symbol = decoder.decode(cumulative[lane])
                    step_bytes[lane] = symbol
                    out[start + t] = symbol
                    model_bits -= log2_p[lane, symbol]
            if t + 1 < longest:
                logits = stepper.feed(torch.from_numpy(step_bytes))
    data = out.tobytes()
    if zlib.crc32(data) != header.data_crc:
        raise CompressionError(
            f"{source}: the decoded bytes fail the checksum: this decoder's probabilities differ from the "
            f"encoder's (different device type, dtype, PyTorch build or thread count?)"
        )
    stats = CompressionStats(len(data), len(blob), HEADER_SIZE, model_bits, time.perf_counter() - began)
    return data, stats


# ------------------------------------------------------------------------------------------------
# Files.
# ------------------------------------------------------------------------------------------------


def write_atomically(path: Union[str, Path], data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename,
    so a reader never sees half a file. The file gets the usual permissions (0666 minus umask),
    not the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
    lanes: int = DEFAULT_LANES,
    precision: str = "32-true",
) -> CompressionStats:
    blob, stats = compress_bytes(model, _read_input(input_path), seq_len, lanes, precision)
    write_atomically(output_path, blob)
    return stats


def decompress_file(
    model: HierarchicalByteModel, input_path: Union[str, Path], output_path: Union[str, Path]
) -> CompressionStats:
    data, stats = decompress_bytes(model, _read_input(input_path), source=str(input_path))
    write_atomically(output_path, data)
    return stats
