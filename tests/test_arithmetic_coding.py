"""The arithmetic coder on its own: quantisation, exact round trips, and output length near the ideal.

The distributions come from a real adaptive model written here (order-1 byte counts, updated as
bytes are seen), so encoder and decoder must replay the same evolving probabilities.
"""

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multibyte.arithmetic_coding import (
    FREQUENCY_TOTAL,
    ArithmeticDecoder,
    ArithmeticEncoder,
    cumulative_frequencies,
    decode,
    encode,
)

EMBEDDED_TEXT = Path(__file__).resolve().parents[1] / "datamodules" / "embedded" / "gutenberg_books.txt"


def order1_counts():
    """Adaptive order-1 model: weights of the next byte = 1 + how often it followed the last byte."""
    counts = np.ones((256, 256))

    def next_distribution(prefix: bytes) -> np.ndarray:
        if len(prefix) >= 2:
            counts[prefix[-2], prefix[-1]] += 1  # learn the transition that just completed
        return counts[prefix[-1]] if prefix else np.ones(256)

    return next_distribution


def ideal_bits(symbols: bytes, next_distribution) -> float:
    """sum of -log2 p(symbol) under the quantised frequencies the coder actually uses."""
    total = 0.0
    for i, symbol in enumerate(symbols):
        c = cumulative_frequencies(next_distribution(symbols[:i]))
        total -= math.log2((c[symbol + 1] - c[symbol]) / FREQUENCY_TOTAL)
    return total


# ------------------------------------------------------------------------------------------------
# Quantisation
# ------------------------------------------------------------------------------------------------


def test_frequencies_cover_the_total_and_give_every_symbol_at_least_one():
    rng = np.random.default_rng(0)
    one_hot = np.zeros(256)
    one_hot[7] = 1.0
    peaked = np.full(256, 1e-300)
    peaked[200] = 1.0
    batch = np.stack([rng.dirichlet(np.full(256, 0.05)), one_hot, peaked, np.ones(256), rng.random(256) * 1e6])
    c = cumulative_frequencies(batch)  # (5, 257)
    assert c.shape == (5, 257) and c.dtype == np.int64
    assert (c[:, 0] == 0).all() and (c[:, -1] == FREQUENCY_TOTAL).all()
    assert (np.diff(c, axis=-1) >= 1).all()
    assert np.diff(c[1])[7] == FREQUENCY_TOTAL - 255  # all the spare mass on the certain symbol
    assert (np.diff(c[3]) == FREQUENCY_TOTAL // 256).all()  # uniform stays exactly uniform


def test_quantisation_costs_almost_nothing_against_the_float_probabilities():
    # Each frequency is floor(p * (T - 256)) + 1 >= p * (T - 256) (the most probable symbol also
    # gets the remainder), so a coded probability q is at least p * (1 - 256 / T), and the
    # expected extra code length KL(p || q) is tiny for realistic distributions.
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(256, 0.1), size=200)  # (200, 256) peaky, like a trained model's
    q = np.diff(cumulative_frequencies(p), axis=-1) / FREQUENCY_TOTAL
    expected_extra_bits = (p * (np.log2(p + 1e-300) - np.log2(q))).sum(axis=-1)  # KL(p || q) per step
    entropy = -(p * np.log2(p + 1e-300)).sum(axis=-1)
    assert expected_extra_bits.max() < 1e-4 * max(1.0, entropy.mean())
    assert (q >= p * (1 - 256 / FREQUENCY_TOTAL) * (1 - 1e-12)).all()


@pytest.mark.parametrize(
    "bad, problem",
    [
        (np.ones(255), "256 probabilities"),
        (np.zeros(256), "not all zero"),
        (np.r_[np.ones(255), -1.0], "non-negative"),
        (np.r_[np.ones(255), np.nan], "finite"),
    ],
)
def test_bad_distributions_are_refused(bad, problem):
    with pytest.raises(ValueError, match=problem):
        cumulative_frequencies(bad)


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symbols", [b"", b"\x00", b"\xff", b"a"], ids=["empty", "zero", "ff", "a"])
def test_tiny_inputs_round_trip(symbols):
    packed = encode(symbols, order1_counts())
    assert decode(packed, len(symbols), order1_counts()) == symbols
    assert len(packed) <= 1 + math.ceil((8 * len(symbols) + 2) / 8)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_round_trip(symbols):
    assert decode(encode(symbols, order1_counts()), len(symbols), order1_counts()) == symbols


def test_a_real_file_round_trips_at_the_ideal_length():
    text = EMBEDDED_TEXT.read_bytes()[:6000]
    packed = encode(text, order1_counts())
    assert decode(packed, len(text), order1_counts()) == text
    # The coder's overhead is the final flush (< 2 bytes) plus interval truncation (< 2**-22 bits
    # per symbol): the size is the quantised ideal, rounded up, within 2 bytes.
    ideal = ideal_bits(text, order1_counts()) / 8
    assert ideal <= len(packed) <= ideal + 2, (len(packed), ideal)
    assert len(packed) < 0.7 * len(text)  # and the order-1 model does compress English


def test_symbols_the_model_deems_impossible_still_round_trip():
    # The model is certain of byte 0; every byte is 255. Frequency 1 of 2**24: 24 bits each.
    def certain_of_zero(prefix: bytes) -> np.ndarray:
        weights = np.zeros(256)
        weights[0] = 1.0
        return weights

    symbols = b"\xff" * 50
    packed = encode(symbols, certain_of_zero)
    assert decode(packed, len(symbols), certain_of_zero) == symbols
    bits_each = -math.log2(1 / FREQUENCY_TOTAL)
    assert abs(8 * len(packed) - bits_each * len(symbols)) <= 16


def test_the_step_api_interleaves_independent_streams():
    # Two symbol streams with different static distributions, coded alternately into one stream:
    # what model-driven compression does with its lanes.
    rng = np.random.default_rng(3)
    distributions = [rng.dirichlet(np.full(256, 0.3)), rng.dirichlet(np.full(256, 3.0))]
    cumulative = [cumulative_frequencies(d) for d in distributions]
    streams = [rng.choice(256, size=400, p=d) for d in distributions]
    encoder = ArithmeticEncoder()
    for t in range(400):
        for lane in range(2):
            encoder.encode(cumulative[lane], int(streams[lane][t]))
    decoder = ArithmeticDecoder(encoder.finish())
    decoded = [[], []]
    for t in range(400):
        for lane in range(2):
            decoded[lane].append(decoder.decode(cumulative[lane]))
    assert [list(map(int, s)) for s in streams] == decoded


def test_encoder_refuses_an_empty_interval():
    c = np.zeros(257, dtype=np.int64)
    c[1:] = FREQUENCY_TOTAL  # symbol 0 owns everything, symbol 1 nothing
    with pytest.raises(ValueError, match="empty or invalid interval"):
        ArithmeticEncoder().encode(c, 1)
