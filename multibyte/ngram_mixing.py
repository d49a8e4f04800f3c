"""Mixing the model with an adaptive byte n-gram (what PPM, cmix and paq build on): the model
brings what it learned in training, the n-gram counts what this file has said so far.

A neural byte model reads a window of `seq_len` bytes and forgets everything before it; a count
model forgets nothing of the file. Mixed, a speaker's name or a formula met 100 KB earlier is
cheap again, as it is for bzip2 and xz. Per byte x_t:

    p(x_t) = w * p_model(x_t) + (1 - w) * p_ngram(x_t),   w = sigmoid(a)

p_ngram interpolates contexts of 0..K previous bytes (Witten & Bell's escape estimate, as PPM's
method C blends them): with c(x) the times byte x followed the context, n = sum_x c(x) and u the
number of distinct bytes seen after it,

    p_k(x) = (c(x) + u * p_{k-1}(x)) / (n + u)     (n > 0)
    p_k(x) = p_{k-1}(x)                            (a context never seen)
    p_{-1}(x) = 1/256

A context stops at the start of its window (as the model's does; `BOUNDARY` fills the rest), so
that a decoder running `lanes` windows side by side knows it. The counts are of the bytes the
decoder has restored when it needs them: every window of the earlier groups (a group: the
`batch_size` windows bench scores between two adaptation updates, the `lanes` windows compress codes
side by side), plus the bytes of the byte's own window before it. So p(x_t) depends only on
bytes before t, and bench's bits are a code length compress achieves.

The mixture's logit a starts at logit(`initial_weight`) and, after each group, takes one step of
`learning_rate` times the group's mean gradient of log p(x_t) (a scalar; deterministic in float64).

Two implementations of one definition: `mixed_log2_probabilities` scores a whole file at once
(sorting, no loop over bytes; bench), `NgramMixer` gives the full distribution byte by byte for
the arithmetic coder (compress). Tests hold them equal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

ALPHABET = 256
BOUNDARY = 256  # the "byte" before a window's start in a context (bytes are 0..255)
MAX_ORDER = 6  # a context of 6 bytes (or BOUNDARY) and the next byte fit a 64-bit key exactly


@dataclass(frozen=True)
class NgramConfig:
    """How the model is mixed with an adaptive byte n-gram (`multibyte.ngram_mixing`)."""

    order: int = 6
    """Longest context, in bytes: contexts of 0..order previous bytes are blended (at most 6)."""
    learning_rate: float = 3.0
    """Step of the mixture's logit after each group of windows (0: the weight stays fixed)."""
    initial_weight: float = 0.5
    """The model's share of the mixture before the first group, in (0, 1)."""

    def __post_init__(self) -> None:
        if not 0 <= self.order <= MAX_ORDER:
            raise ValueError(f"ngram order must lie in 0..{MAX_ORDER}, got {self.order}")
        check_mixture_options("ngram", self.learning_rate, self.initial_weight)

    def to_dict(self) -> dict:
        return asdict(self)


def check_mixture_options(name: str, learning_rate: float, initial_weight: float) -> None:
    """The mixture's own options (here and in `lpc_mixing`): a step >= 0, a weight in (0, 1)."""
    if not 0.0 <= learning_rate < float("inf"):
        raise ValueError(f"{name} learning_rate must be a number >= 0, got {learning_rate}")
    if not 0.0 < initial_weight < 1.0:
        raise ValueError(f"{name} initial_weight must lie strictly between 0 and 1, got {initial_weight}")


def ngram_summary(config: NgramConfig | None) -> str:
    """E.g. "order 6, weight 0.5 at first, lr 3" (for reports); "off" for None."""
    if config is None:
        return "off"
    return f"order {config.order}, model weight {config.initial_weight:g} at first, lr {config.learning_rate:g}"


def logit(weight: float) -> float:
    return math.log(weight / (1.0 - weight))


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def mixture_step(logit: float, learning_rate: float, p_model: np.ndarray, p_other: np.ndarray) -> float:
    """A mixture logit after one group (here and in `lpc_mixing`): `p_model`, `p_other` (n,) are the
    probabilities the model and the second predictor gave the group's bytes; the step is the mean
    of d log p / d a = w (1 - w) (p_model - p_other) / p."""
    if learning_rate == 0.0 or len(p_model) == 0:
        return logit
    w = sigmoid(logit)
    mixed = w * p_model + (1.0 - w) * p_other
    gradient = float(np.mean(w * (1.0 - w) * (p_model - p_other) / mixed))
    return logit + learning_rate * gradient


# ------------------------------------------------------------------------------------------------
# Whole file at once (bench)
# ------------------------------------------------------------------------------------------------


def _context_keys(data: np.ndarray, order: int, window_starts: np.ndarray) -> np.ndarray:
    """(N,) uint64: the `order` bytes before each position, BOUNDARY where they fall before its window."""
    positions = np.arange(len(data))
    keys = np.zeros(len(data), dtype=np.uint64)
    for back in range(1, order + 1):
        symbol = np.full(len(data), BOUNDARY, dtype=np.uint64)
        inside = positions - back >= window_starts
        symbol[inside] = data[positions[inside] - back]
        keys = keys * np.uint64(ALPHABET + 1) + symbol
    return keys


class _CountsBefore:
    """For integer keys (N,): how many positions s < q hold key[t] (or the sum of weights[s] over
    them), for query positions q per t. One sort of (key, position); each query is a binary search
    from the key's first entry, found once."""

    def __init__(self, keys: np.ndarray) -> None:
        _, dense = np.unique(keys, return_inverse=True)
        n = len(keys)
        self.base = dense.astype(np.int64).reshape(-1) * (n + 1)
        combined = self.base + np.arange(n)
        self.order = np.argsort(combined)
        self.sorted = combined[self.order]
        self.first = np.searchsorted(self.sorted, self.base)  # (N,) where each key's entries begin

    def cumulative(self, weights: np.ndarray) -> np.ndarray:
        """(N + 1,) running sums of `weights` in (key, position) order, for `__call__`."""
        return np.concatenate([[0.0], np.cumsum(weights[self.order], dtype=np.float64)])

    def __call__(self, query: np.ndarray, cumulative: np.ndarray | None = None) -> np.ndarray:
        last = np.searchsorted(self.sorted, self.base + query)
        if cumulative is None:
            return (last - self.first).astype(np.float64)
        return cumulative[last] - cumulative[self.first]


def ngram_log2_probabilities(
    data: np.ndarray, windows: Sequence[tuple[int, int]], group_size: int, order: int
) -> np.ndarray:
    """(N,) float64 log2 p_ngram of every byte of `data` (uint8), under the counts visible to it:
    the windows ([start, stop), tiling `data` in order) of the earlier groups of `group_size`
    windows, and its own window's bytes before it."""
    data = np.asarray(data, dtype=np.uint8)
    n = len(data)
    window_starts = np.zeros(n, dtype=np.int64)
    group_starts = np.zeros(n, dtype=np.int64)
    for index, (start, stop) in enumerate(windows):
        window_starts[start:stop] = start
        group_starts[start:stop] = windows[index - index % group_size][0]
    if n and (windows[0][0] != 0 or windows[-1][1] != n):
        raise ValueError("the windows must tile the data")
    positions = np.arange(n)
    p = np.full(n, 1.0 / ALPHABET)
    for k in range(order + 1):
        contexts = _context_keys(data, k, window_starts)
        pairs = contexts * np.uint64(ALPHABET) + data.astype(np.uint64)  # < 257^6 * 256 < 2^64
        context_count, pair_count = _CountsBefore(contexts), _CountsBefore(pairs)
        pair_now, pair_window, pair_group = pair_count(positions), pair_count(window_starts), pair_count(group_starts)
        n_k = context_count(group_starts) + context_count(positions) - context_count(window_starts)
        c_k = pair_group + pair_now - pair_window
        # distinct followers: pairs first seen before the group, plus pairs new in this window so far
        first_ever = context_count.cumulative((pair_now == 0).astype(np.float64))
        new_here = context_count.cumulative(((pair_now == pair_window) & (pair_group == 0)).astype(np.float64))
        u_k = context_count(group_starts, first_ever) + context_count(positions, new_here) - context_count(window_starts, new_here)
        seen = n_k > 0
        p = np.where(seen, (c_k + u_k * p) / np.where(seen, n_k + u_k, 1.0), p)
    return np.log2(p)


def mixed_log2_probabilities(
    model_log2_p: np.ndarray,
    data: np.ndarray,
    windows: Sequence[tuple[int, int]],
    group_size: int,
    config: NgramConfig,
) -> np.ndarray:
    """(N,) float64 log2 p of every byte under the mixture, given the model's log2 p of each."""
    p_ngram = np.exp2(ngram_log2_probabilities(data, windows, group_size, config.order))
    return mix_in_groups(model_log2_p, p_ngram, windows, group_size, config.initial_weight, config.learning_rate)


def mix_in_groups(
    model_log2_p: np.ndarray,
    p_other: np.ndarray,
    windows: Sequence[tuple[int, int]],
    group_size: int,
    initial_weight: float,
    learning_rate: float,
    period: int = 1,
) -> np.ndarray:
    """(N,) float64 log2 of w * p_model + (1 - w) * p_other per byte, with one weight per byte
    position modulo `period` (windows start at multiples of it), each stepped after every group of
    `group_size` windows on that position's bytes of the group (here and in `lpc_mixing`)."""
    p_model = np.exp2(np.asarray(model_log2_p, dtype=np.float64))
    mixed = np.empty(len(p_model))
    logits = [logit(initial_weight)] * period
    for first in range(0, len(windows), group_size):
        start, stop = windows[first][0], windows[min(first + group_size, len(windows)) - 1][1]
        for j in range(period):
            at = slice(start + j, stop, period)
            w = sigmoid(logits[j])
            mixed[at] = w * p_model[at] + (1.0 - w) * p_other[at]
            logits[j] = mixture_step(logits[j], learning_rate, p_model[at], p_other[at])
    return np.log2(mixed)


# ------------------------------------------------------------------------------------------------
# Byte by byte (compress / decompress)
# ------------------------------------------------------------------------------------------------


class NgramMixer:
    """The same mixture for a coder that walks groups of windows side by side.

    Per group: `start_group(n_lanes)`; per coded byte, `distribution(lane, p_model)` (the mixed (256,)
    probabilities, given the model's) then `observe(lane, byte)`; `end_group()` adds the group's
    counts and steps the mixture's weight. A lane's context starts empty at its window's start.

    Unrolled, the recursion is p_K = sum_k a_k (prod_{j>k} b_j) c_k + (prod_j b_j) / 256 with
    a_k = 1/(n_k + u_k), b_k = u_k/(n_k + u_k) (a_k = 0, b_k = 1 for an unseen context), so a byte
    costs K+1 scaled additions of count vectors; every table entry keeps its n and u.
    """

    def __init__(self, config: NgramConfig) -> None:
        self.config = config
        self.logit = logit(config.initial_weight)
        # per order: context key -> [counts (256,), n, u] of the earlier groups
        self.counts: list[dict[int, list]] = [{} for _ in range(config.order + 1)]
        self._lanes: list[_Lane] = []

    def start_group(self, n_lanes: int) -> None:
        self._lanes = [_Lane(self.config.order) for _ in range(n_lanes)]

    @property
    def model_weight(self) -> float:
        return sigmoid(self.logit)

    def ngram_distribution(self, lane: int) -> np.ndarray:
        """(256,) float64 p_ngram of lane `lane`'s next byte."""
        state = self._lanes[lane]
        p = None
        scale = 1.0  # prod_{j > k} b_j, from the longest context down
        for k in range(self.config.order, -1, -1):
            key = state.keys[k]
            entry = state.counts[k].get(key) or self.counts[k].get(key)
            if entry is None:
                continue
            counts, n, u = entry[0], entry[1], entry[2]
            weight = scale / (n + u)
            p = counts * weight if p is None else p + counts * weight
            scale *= u / (n + u)
        floor = scale / ALPHABET
        return np.full(ALPHABET, floor) if p is None else p + floor

    def distribution(self, lane: int, p_model: np.ndarray) -> np.ndarray:
        """(256,) mixed probabilities of lane `lane`'s next byte; remembers both parts' for the update."""
        p_ngram = self.ngram_distribution(lane)
        state = self._lanes[lane]
        state.pending = (p_model, p_ngram)
        w = self.model_weight
        return w * p_model + (1.0 - w) * p_ngram

    def observe(self, lane: int, byte: int) -> None:
        """Lane `lane`'s byte was `byte` (after `distribution`): count it in its window."""
        state = self._lanes[lane]
        p_model, p_ngram = state.pending
        state.p_model.append(float(p_model[byte]))
        state.p_ngram.append(float(p_ngram[byte]))
        for k, key in enumerate(state.keys):
            table = state.counts[k]
            entry = table.get(key)
            if entry is None:  # the lane's view: the earlier groups' counts, then its own on top
                shared = self.counts[k].get(key)
                own = np.zeros(ALPHABET, dtype=np.int64)
                entry = table[key] = [own.copy(), 0, 0, own] if shared is None else [shared[0].copy(), shared[1], shared[2], own]
            counts = entry[0]
            if counts[byte] == 0:
                entry[2] += 1
            counts[byte] += 1
            entry[1] += 1
            entry[3][byte] += 1
        state.push(byte)

    def end_group(self) -> None:
        """The group is coded: its counts join the file's, and the mixture's weight takes its step
        (on the group's bytes in file order, as bench does)."""
        for state in self._lanes:
            for shared, table in zip(self.counts, state.counts):
                for key, entry in table.items():
                    own = entry[3]
                    before = shared.get(key)
                    counts = own.copy() if before is None else before[0] + own
                    shared[key] = [counts, int(counts.sum()), int(np.count_nonzero(counts))]
        p_model = np.array([p for state in self._lanes for p in state.p_model], dtype=np.float64)
        p_ngram = np.array([p for state in self._lanes for p in state.p_ngram], dtype=np.float64)
        self.logit = mixture_step(self.logit, self.config.learning_rate, p_model, p_ngram)
        self._lanes = []


class _Lane:
    """One window's side of the mixer: the keys of its current contexts and its counts.

    The key of the order-k context is its k bytes (BOUNDARY before the window's start) as base-257
    digits, the latest byte lowest: unique within an order, and each order has its own table.
    `counts[k][key]` is [counts as this lane sees them, n, u, this window's own counts]."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.recent: list[int] = [BOUNDARY] * order  # the last `order` bytes, the latest first
        self.keys: list[int] = self._keys()
        self.counts: list[dict[int, list]] = [{} for _ in range(order + 1)]
        self.p_model: list[float] = []
        self.p_ngram: list[float] = []
        self.pending: tuple[np.ndarray, np.ndarray] | None = None

    def _keys(self) -> list[int]:
        keys, key, scale = [0], 0, 1
        for symbol in self.recent:
            key += symbol * scale
            scale *= ALPHABET + 1
            keys.append(key)
        return keys

    def push(self, byte: int) -> None:
        if self.order:
            self.recent = [byte] + self.recent[:-1]
        self.keys = self._keys()
