"""Binary arithmetic coding of byte streams under any next-byte distribution.

This module knows nothing about models: a distribution is 256 non-negative weights (probabilities)
per step, and the same distributions must be produced, bit for bit, when encoding and decoding.
Other alphabets work the same way (a subword model's V token ids: V weights per step, V + 1
cumulative counts); the numbers below are for bytes.

Two steps turn a distribution into bits:

1. `cumulative_frequencies` quantises the probabilities of one step into integer frequencies that
   add up to exactly FREQUENCY_TOTAL = 2**24, every symbol at least 1 (so any byte stays
   codable, however confident the model is), returned as 257 cumulative counts. The quantisation
   is plain float64 arithmetic, deterministic for equal inputs. Its cost against the ideal
   -log2 p is at most 256 / 2**24 of the probability mass plus the rounding of each frequency,
   well under 0.01% of the output for the distributions a byte model produces.
2. `ArithmeticEncoder` / `ArithmeticDecoder` narrow an integer interval of STATE_BITS = 48 bits by
   each symbol's share of the total (Witten, Neal & Cleary's coder: emit a bit whenever the
   interval lies in one half, count "pending" bits when it straddles the middle). Python's
   integers are exact at any width, so the interval never loses precision; with a 48-bit state
   and 24-bit frequencies, truncating the interval's ends costs under 2**-22 bits per symbol.

The encoder's output length is within 2 bytes of sum(-log2 p(symbol)) / 8 plus those small costs.

`encode(symbols, next_distribution)` / `decode(data, length, next_distribution)` run the whole
loop for a callable that maps the bytes seen so far to the next distribution; model-driven
compression (`multibyte.compression`) drives the coder step by step instead, many streams at once.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

ALPHABET_SIZE = 256  # bytes; `cumulative_frequencies` takes any alphabet up to MAX_ALPHABET_SIZE
FREQUENCY_BITS = 24
FREQUENCY_TOTAL = 1 << FREQUENCY_BITS
# Every symbol keeps at least 1 count, so this many symbols take at most 1/64 of the total away
# from the likely ones (4,096 tokens: 1/4096 of it).
MAX_ALPHABET_SIZE = FREQUENCY_TOTAL >> 6
STATE_BITS = 48
_FULL = (1 << STATE_BITS) - 1
_HALF = 1 << (STATE_BITS - 1)
_QUARTER = 1 << (STATE_BITS - 2)

NextDistribution = Callable[[bytes], np.ndarray]  # bytes so far -> (256,) non-negative weights


def cumulative_frequencies(probabilities: np.ndarray, alphabet_size: int = ALPHABET_SIZE) -> np.ndarray:
    """Quantise distributions into cumulative integer frequencies.

    probabilities (..., V) non-negative and finite, any positive sum (normalised here), over
    V = `alphabet_size` symbols (256 bytes, or a tokenizer's ids; 2..MAX_ALPHABET_SIZE) ->
    int64 (..., V + 1) with c[..., 0] = 0, c[..., V] = FREQUENCY_TOTAL and c[s+1] - c[s] >= 1:
    symbol s owns [c[s], c[s+1]).
    """
    if not 2 <= alphabet_size <= MAX_ALPHABET_SIZE:
        raise ValueError(f"alphabet_size must lie in 2..{MAX_ALPHABET_SIZE}, got {alphabet_size}")
    weights = np.asarray(probabilities, dtype=np.float64)
    if weights.ndim == 0 or weights.shape[-1] != alphabet_size:
        raise ValueError(f"expected {alphabet_size} probabilities per step, got shape {weights.shape}")
    totals = weights.sum(axis=-1, keepdims=True)
    if not (np.isfinite(weights).all() and (weights >= 0).all() and (totals > 0).all()):
        raise ValueError("probabilities must be finite, non-negative and not all zero")
    normalised = weights / totals
    # Every symbol gets 1 for free; the rest of the total is shared in proportion. Each floor is at
    # most p * spare and the p add up to 1 (within float rounding far below one count), so the
    # floors add up to at most `spare`: the shortfall is >= 0 and goes to the most probable symbol.
    spare = FREQUENCY_TOTAL - alphabet_size
    frequencies = np.floor(normalised * spare).astype(np.int64) + 1
    shortfall = FREQUENCY_TOTAL - frequencies.sum(axis=-1, keepdims=True)
    most_probable = normalised.argmax(axis=-1)[..., None]
    topped_up = np.take_along_axis(frequencies, most_probable, axis=-1) + shortfall
    np.put_along_axis(frequencies, most_probable, topped_up, axis=-1)
    cumulative = np.zeros(frequencies.shape[:-1] + (alphabet_size + 1,), dtype=np.int64)
    np.cumsum(frequencies, axis=-1, out=cumulative[..., 1:])
    return cumulative


class ArithmeticEncoder:
    """Encodes symbols one at a time; `finish()` returns the bytes.

    Each call to `encode(cumulative, symbol)` takes the step's 257 cumulative frequencies (from
    `cumulative_frequencies`, total FREQUENCY_TOTAL) and the symbol that occurred.
    """

    def __init__(self) -> None:
        self._low = 0
        self._high = _FULL
        self._pending = 0  # opposite bits owed after the next decided bit (interval straddled the middle)
        self._out = bytearray()
        self._bit_buffer = 0
        self._bit_count = 0
        self._finished = False

    def _emit(self, bit: int) -> None:
        self._push(bit)
        for _ in range(self._pending):
            self._push(1 - bit)
        self._pending = 0

    def _push(self, bit: int) -> None:
        self._bit_buffer = (self._bit_buffer << 1) | bit
        self._bit_count += 1
        if self._bit_count == 8:
            self._out.append(self._bit_buffer)
            self._bit_buffer = 0
            self._bit_count = 0

    def encode(self, cumulative: np.ndarray, symbol: int) -> None:
        if self._finished:
            raise RuntimeError("encode() after finish()")
        low_count, high_count = int(cumulative[symbol]), int(cumulative[symbol + 1])
        if not 0 <= low_count < high_count <= FREQUENCY_TOTAL:
            raise ValueError(f"symbol {symbol} has an empty or invalid interval [{low_count}, {high_count})")
        span = self._high - self._low + 1
        self._high = self._low + span * high_count // FREQUENCY_TOTAL - 1
        self._low = self._low + span * low_count // FREQUENCY_TOTAL
        while True:
            if self._high < _HALF:
                self._emit(0)
            elif self._low >= _HALF:
                self._emit(1)
                self._low -= _HALF
                self._high -= _HALF
            elif self._low >= _QUARTER and self._high < _HALF + _QUARTER:
                self._pending += 1
                self._low -= _QUARTER
                self._high -= _QUARTER
            else:
                break
            self._low <<= 1
            self._high = (self._high << 1) | 1

    def finish(self) -> bytes:
        """Flush: two more bits pin a point inside the final interval; pad the last byte with zeros."""
        if not self._finished:
            self._pending += 1
            self._emit(0 if self._low < _QUARTER else 1)
            if self._bit_count:
                self._out.append(self._bit_buffer << (8 - self._bit_count))
                self._bit_buffer = 0
                self._bit_count = 0
            self._finished = True
        return bytes(self._out)


class ArithmeticDecoder:
    """Decodes what `ArithmeticEncoder` wrote, given the same cumulative frequencies step by step.

    Bits beyond the end of `data` read as zeros (the encoder's padding). A decoder fed corrupted
    data or other distributions decodes *something*: detecting that is the container's job
    (lengths and checksums, see `multibyte.compression`).
    """

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._num_bits = 8 * len(self._data)
        self._position = 0
        self._low = 0
        self._high = _FULL
        self._value = 0
        for _ in range(STATE_BITS):
            self._value = (self._value << 1) | self._next_bit()

    def _next_bit(self) -> int:
        position = self._position
        self._position += 1
        if position >= self._num_bits:
            return 0
        return (self._data[position >> 3] >> (7 - (position & 7))) & 1

    def decode(self, cumulative: np.ndarray) -> int:
        span = self._high - self._low + 1
        # The largest count c with low + span * c // TOTAL <= value, i.e. where value falls.
        target = ((self._value - self._low + 1) * FREQUENCY_TOTAL - 1) // span
        symbol = int(np.searchsorted(cumulative, target, side="right")) - 1
        symbol = min(max(symbol, 0), len(cumulative) - 2)  # only reachable with corrupted data
        low_count, high_count = int(cumulative[symbol]), int(cumulative[symbol + 1])
        self._high = self._low + span * high_count // FREQUENCY_TOTAL - 1
        self._low = self._low + span * low_count // FREQUENCY_TOTAL
        while True:
            if self._high < _HALF:
                pass
            elif self._low >= _HALF:
                self._low -= _HALF
                self._high -= _HALF
                self._value -= _HALF
            elif self._low >= _QUARTER and self._high < _HALF + _QUARTER:
                self._low -= _QUARTER
                self._high -= _QUARTER
                self._value -= _QUARTER
            else:
                break
            self._low <<= 1
            self._high = (self._high << 1) | 1
            self._value = (self._value << 1) | self._next_bit()
        return symbol


def encode(symbols: bytes, next_distribution: NextDistribution) -> bytes:
    """Arithmetic-code `symbols`; `next_distribution(prefix)` gives the weights of the byte after `prefix`."""
    symbols = bytes(symbols)
    encoder = ArithmeticEncoder()
    for index, symbol in enumerate(symbols):
        encoder.encode(cumulative_frequencies(next_distribution(symbols[:index])), symbol)
    return encoder.finish()


def decode(data: bytes, length: int, next_distribution: NextDistribution) -> bytes:
    """Inverse of `encode`: the `length` bytes that `data` encodes under the same distributions."""
    decoder = ArithmeticDecoder(data)
    out = bytearray()
    for _ in range(length):
        out.append(decoder.decode(cumulative_frequencies(next_distribution(bytes(out)))))
    return bytes(out)
