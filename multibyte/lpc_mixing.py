"""Mixing the model with a backward-adaptive linear predictor over 16-bit PCM (what FLAC and
Monkey's Audio predict with): the model brings what it learned of speech, the predictor fits
this recording's spectrum as it goes.

Bytes 2i, 2i+1 of a "pcm16" stream are sample x_i's low and high byte (little-endian). Per
sample, the predictor gives a real prediction mu_i and a scale b_i, and a discretised Laplace
law over the residual e = x_i - round(mu_i):

    P(e) = 1 - q^(1/2)                     (e = 0)
    P(e) = (1 - q) q^(|e| - 1/2) / 2       (e != 0),    q = exp(-1/b_i)

which sums to one over the integers. Its byte laws follow exactly: the low byte v takes the mass
of every e with x = v (mod 256), a geometric series in closed form; the high byte, knowing v,
takes P(e) renormalised over the 256 samples with low byte v. Per byte,

    p(byte) = w_j * p_model(byte) + (1 - w_j) * p_lpc(byte),   w_j = sigmoid(a_j)

with one weight per byte position j in the sample (low, high): a model is often sure of one
byte and not the other (8-bit recordings stored as 16 bits have a constant low byte).

mu_i = sum_k c_k x_{i-k} over `order` earlier samples; the coefficients c are refitted every
`refit` samples by least squares (ridge `ridge` times the mean diagonal) over the last `history`
samples; b_i is the mean |e| of the last `scale_window` residuals (at least `min_scale`).
What the predictor may read is what a decoder coding groups of windows side by side holds: the
samples before the byte's group of windows, then its own window's samples before it. Its
"visible stream" is that concatenation (the group's first window sees the file as it is), and
each window's first coefficients and residuals are fitted on the visible samples before it.

The logits a_j start at logit(`initial_weight`) and after each group take one step of
`learning_rate` times the mean gradient of log p over the group's bytes in that position (as
`ngram_mixing` steps its one weight).

Two implementations of one definition: `mixed_log2_probabilities` scores a whole file (bench),
`LpcMixer` gives the full distribution byte by byte for the arithmetic coder (compress). Tests
hold them equal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from multibyte.ngram_mixing import check_mixture_options, logit, mix_in_groups, mixture_step, sigmoid

ALPHABET = 256
SAMPLE_BYTES = 2  # pcm16: low byte, then high byte


@dataclass(frozen=True)
class LpcConfig:
    """How the model is mixed with a linear predictor of 16-bit samples (`multibyte.lpc_mixing`)."""

    order: int = 16
    """Earlier samples the prediction is a linear combination of."""
    history: int = 128
    """Samples the coefficients are fitted on (least squares over the latest visible ones)."""
    refit: int = 32
    """Samples between two fits of the coefficients."""
    scale_window: int = 16
    """Residuals whose mean magnitude is the Laplace law's scale."""
    min_scale: float = 0.5
    """Smallest scale (a residual of 0 every time would otherwise make the law a point)."""
    ridge: float = 1e-4
    """Ridge term of the fit, times the mean diagonal of the normal equations (at least 1): > 0."""
    learning_rate: float = 30.0
    """Step of each byte position's mixture logit after each group of windows (0: fixed)."""
    initial_weight: float = 0.5
    """The model's share of the mixture before the first group, in (0, 1)."""

    def __post_init__(self) -> None:
        for name in ("order", "history", "refit", "scale_window"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"lpc {name} must be at least 1, got {getattr(self, name)}")
        if self.history < self.order:
            raise ValueError(f"lpc history ({self.history}) must be at least its order ({self.order})")
        if not 0.0 < self.min_scale < float("inf"):
            raise ValueError(f"lpc min_scale must be a positive number, got {self.min_scale}")
        if not 0.0 < self.ridge < float("inf"):  # > 0: a silent stretch (all zeros) must still solve
            raise ValueError(f"lpc ridge must be a positive number, got {self.ridge}")
        check_mixture_options("lpc", self.learning_rate, self.initial_weight)

    def to_dict(self) -> dict:
        return asdict(self)


def lpc_summary(config: LpcConfig | None) -> str:
    """E.g. "order 16 on 128 samples, refit every 32, model weight 0.5 at first, lr 30" (for
    reports); "off" for None."""
    if config is None:
        return "off"
    return (
        f"order {config.order} on {config.history} samples, refit every {config.refit}, "
        f"model weight {config.initial_weight:g} at first, lr {config.learning_rate:g}"
    )


def check_stream(audio_encoding: str | None, seq_len: int | None) -> None:
    """Refuse a stream the predictor cannot read: another audio encoding than pcm16 (when known),
    windows (`seq_len` bytes) that would split samples."""
    if audio_encoding is not None and audio_encoding != "pcm16":
        raise ValueError(f"--lpc predicts 16-bit little-endian samples (audio encoding pcm16), not {audio_encoding}")
    if seq_len is not None and seq_len % SAMPLE_BYTES:
        raise ValueError(f"--lpc reads 16-bit samples: windows of {seq_len} bytes would split them; use an even --seq_len")


def check_windows(windows: Sequence[tuple[int, int]], total: int) -> None:
    """Windows must tile the stream and start on whole samples."""
    if total and (windows[0][0] != 0 or windows[-1][1] != total):
        raise ValueError("the windows must tile the data")
    for start, _ in windows:
        if start % SAMPLE_BYTES:
            raise ValueError(
                f"--lpc reads 16-bit samples: a window starts at byte {start}, inside a sample; "
                f"use an even --seq_len"
            )


# ------------------------------------------------------------------------------------------------
# The predictor over one visible stream
# ------------------------------------------------------------------------------------------------


def _lagged(x: np.ndarray, order: int) -> np.ndarray:
    """(n, order) float64: row i holds x[i-1], ..., x[i-order] (zeros before the stream)."""
    n = len(x)
    padded = np.concatenate([np.zeros(order), x])
    return np.stack([padded[order - k : order - k + n] for k in range(1, order + 1)], axis=1)


def _lag_rows(x: np.ndarray, lo: int, at: int, order: int) -> np.ndarray:
    """Rows lo..at-1 of `_lagged(x, order)`, from the samples they need only."""
    base = max(0, lo - order)
    return _lagged(x[base:at], order)[lo - base :]


def _solve(lags: np.ndarray, targets: np.ndarray, config: LpcConfig) -> np.ndarray:
    """(order,) least-squares coefficients of `targets` on their `lags`, with the relative ridge;
    zeros when there is nothing to fit."""
    if len(targets) == 0:
        return np.zeros(config.order)
    gram = lags.T @ lags
    ridge = config.ridge * max(float(np.trace(gram)) / config.order, 1.0)
    return np.linalg.solve(gram + ridge * np.eye(config.order), lags.T @ targets)


def _coefficients(x: np.ndarray, at: int, config: LpcConfig) -> np.ndarray:
    """(order,) coefficients for the samples from `at` on: least squares over the `history`
    samples of the stream `x` (float64) before `at`, each on its `order` predecessors (zeros
    before the stream's start)."""
    lo = max(0, at - config.history)
    return _solve(_lag_rows(x, lo, at, config.order), x[lo:at], config)


def _prediction(lags: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """Rounded predictions (int64) of samples whose lags are `lags` (n, order), clipped to int16."""
    return np.clip(np.rint(lags @ coefficients), -32768, 32767).astype(np.int64)


def _seed(x: np.ndarray, first: int, coefficients: np.ndarray, config: LpcConfig) -> np.ndarray:
    """|residuals| of the last `scale_window` samples before `first` under `coefficients`: what
    the scale of a window's first samples is measured on."""
    lo = max(0, first - config.scale_window)
    return np.abs(x[lo:first] - _prediction(_lag_rows(x, lo, first, config.order), coefficients))


def predict(visible: np.ndarray, first: int, config: LpcConfig) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and scales of samples `visible[first:]` (the visible stream, int16 values), each
    from the samples before it: (rounded prediction (n,) int64, scale (n,) float64)."""
    x = np.asarray(visible, dtype=np.float64)
    n = len(x) - first
    lagged = _lagged(x, config.order)
    rounded = np.zeros(n, dtype=np.int64)
    for block in range(0, n, config.refit):
        at = first + block
        lo = max(0, at - config.history)
        coefficients = _solve(lagged[lo:at], x[lo:at], config)  # as `_coefficients`, on rows built once
        if block == 0:
            seed = _seed(x, first, coefficients, config)
        stop = min(n, block + config.refit)
        rounded[block:stop] = _prediction(lagged[at : first + stop], coefficients)
    if n == 0:
        return rounded, np.zeros(0)
    magnitudes = np.concatenate([seed, np.abs(x[first:] - rounded)])
    running = np.concatenate([[0.0], np.cumsum(magnitudes)])
    end = np.arange(n) + len(seed)  # sample i's residual is magnitudes[end[i]]; its scale, the ones before
    begin = np.maximum(end - config.scale_window, 0)
    count = end - begin
    scale = np.where(count > 0, (running[end] - running[begin]) / np.maximum(count, 1), config.min_scale)
    return rounded, np.maximum(scale, config.min_scale)


# ------------------------------------------------------------------------------------------------
# Byte laws of the discretised Laplace
# ------------------------------------------------------------------------------------------------


def _class_mass(c: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Mass of every residual e = c (mod 256), c in 0..255 (broadcast with q)."""
    c = np.asarray(c, dtype=np.float64)
    geometric = 0.5 * (1.0 - q) / (1.0 - q**ALPHABET)
    positive = geometric * q ** (c - 0.5)  # e = c, c + 256, ... (c > 0)
    negative = geometric * q ** (ALPHABET - c - 0.5)  # e = c - 256, c - 512, ...
    zero = (1.0 - np.sqrt(q)) + 2.0 * geometric * q ** (ALPHABET - 0.5)
    return np.where(c == 0, zero, positive + negative)


def _residual_mass(e: np.ndarray, q: np.ndarray) -> np.ndarray:
    """P(e) for integer residuals e (broadcast with q)."""
    magnitude = np.abs(np.asarray(e, dtype=np.float64))
    return np.where(magnitude == 0, 1.0 - np.sqrt(q), 0.5 * (1.0 - q) * q ** (magnitude - 0.5))


def _decay(scale: np.ndarray) -> np.ndarray:
    return np.exp(-1.0 / np.asarray(scale, dtype=np.float64))


_BYTE_VALUES = np.arange(ALPHABET)
_HIGH_BYTE_SAMPLES = (_BYTE_VALUES - (_BYTE_VALUES >= 128) * ALPHABET) * ALPHABET  # each high byte's signed sample, low byte 0


def low_byte_probabilities(rounded: int, scale: float) -> np.ndarray:
    """(256,) p(low byte) of a sample predicted `rounded` with Laplace scale `scale`."""
    return _class_mass((_BYTE_VALUES - rounded) % ALPHABET, _decay(scale))


def high_byte_probabilities(rounded: int, scale: float, low: int) -> np.ndarray:
    """(256,) p(high byte | low byte `low`): P(e) over the 256 samples ending in `low`."""
    mass = _residual_mass(_HIGH_BYTE_SAMPLES + (low - rounded), _decay(scale))
    return mass / mass.sum()


def _byte_probabilities(samples: np.ndarray, rounded: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p_lpc of each sample's actual low byte and of its actual high byte given the low one."""
    q = _decay(scale)
    low = samples & 0xFF
    p_low = _class_mass((low - rounded) % ALPHABET, q)
    p_sample = _residual_mass(samples - rounded, q)
    # the 256 samples ending in `low` are the residue class minus the ones beyond int16's range
    geometric = 0.5 * (1.0 - q) / (1.0 - q**ALPHABET)
    above = geometric * q ** (low + 32768.0 - rounded - 0.5)  # e = low + 32768 - rounded + 256 j > 0
    below = geometric * q ** (rounded - (low - 32768.0 - ALPHABET) - 0.5)  # e = low - 33024 - rounded - 256 j < 0
    p_high = p_sample / (p_low - above - below)
    return p_low, p_high


def lpc_log2_probabilities(
    data: np.ndarray, windows: Sequence[tuple[int, int]], group_size: int, config: LpcConfig
) -> np.ndarray:
    """(N,) float64 log2 p_lpc of every byte of `data` (uint8, pcm16) under what is visible to it:
    the samples before its group of `group_size` windows, then its window's before it. A last odd
    byte (half a sample) is a low byte."""
    data = np.asarray(data, dtype=np.uint8)
    check_windows(windows, len(data))
    even = len(data) - len(data) % SAMPLE_BYTES
    x = data[:even].view("<i2").astype(np.int64)
    p = np.empty(len(data))
    for index, (start, stop) in enumerate(windows):
        group_start = windows[index - index % group_size][0] // SAMPLE_BYTES
        first, last = start // SAMPLE_BYTES, (stop + 1) // SAMPLE_BYTES  # samples the window holds (or starts)
        before = x[max(0, group_start - config.history - config.order) : group_start]
        whole = x[first : min(last, len(x))]
        rounded, scale = predict(np.concatenate([before, whole, [0] * (last - first - len(whole))]), len(before), config)
        if len(whole):
            p_low, p_high = _byte_probabilities(whole, rounded[: len(whole)], scale[: len(whole)])
            p[start : start + 2 * len(whole) : 2] = p_low
            p[start + 1 : start + 2 * len(whole) : 2] = p_high
        if last > len(x):  # the stream's last odd byte
            p[-1] = _class_mass(np.array([(int(data[-1]) - rounded[-1]) % ALPHABET]), _decay(scale[-1]))[0]
    with np.errstate(divide="ignore"):  # a residual far beyond the scale underflows to p = 0: -inf bits
        return np.log2(p)


# ------------------------------------------------------------------------------------------------
# The mixture
# ------------------------------------------------------------------------------------------------


def mixed_log2_probabilities(
    model_log2_p: np.ndarray,
    data: np.ndarray,
    windows: Sequence[tuple[int, int]],
    group_size: int,
    config: LpcConfig,
) -> np.ndarray:
    """(N,) float64 log2 p of every byte under the mixture, given the model's log2 p of each."""
    p_lpc = np.exp2(lpc_log2_probabilities(data, windows, group_size, config))
    return mix_in_groups(
        model_log2_p, p_lpc, windows, group_size, config.initial_weight, config.learning_rate, SAMPLE_BYTES
    )


# ------------------------------------------------------------------------------------------------
# Byte by byte (compress / decompress)
# ------------------------------------------------------------------------------------------------


class LpcMixer:
    """The same mixture for a coder that walks groups of windows side by side.

    Per group: `start_group(n_lanes)`; per coded byte, `distribution(lane, p_model)` (the mixed
    (256,) probabilities, given the model's) then `observe(lane, byte)`; `end_group()` appends the
    group's samples to the file's and steps the mixture's weights. Windows start on whole samples.
    """

    def __init__(self, config: LpcConfig) -> None:
        self.config = config
        self.logits = [logit(config.initial_weight)] * SAMPLE_BYTES
        self.tail = np.zeros(0)  # the file's last history + order samples before the group
        self._lanes: list[_LpcLane] = []

    def start_group(self, n_lanes: int) -> None:
        self._lanes = [_LpcLane(self.tail, self.config) for _ in range(n_lanes)]

    @property
    def model_weights(self) -> tuple[float, ...]:
        """The model's share for the low and the high byte."""
        return tuple(sigmoid(value) for value in self.logits)

    def distribution(self, lane: int, p_model: np.ndarray) -> np.ndarray:
        """(256,) mixed probabilities of lane `lane`'s next byte; remembers both parts' for the update."""
        state = self._lanes[lane]
        p_lpc = state.lpc_distribution()
        state.pending = (p_model, p_lpc)
        w = sigmoid(self.logits[state.position])
        return w * p_model + (1.0 - w) * p_lpc

    def observe(self, lane: int, byte: int) -> None:
        """Lane `lane`'s byte was `byte` (after `distribution`)."""
        state = self._lanes[lane]
        p_model, p_lpc = state.pending
        state.p_model[state.position].append(float(p_model[byte]))
        state.p_lpc[state.position].append(float(p_lpc[byte]))
        state.push(byte)

    def end_group(self) -> None:
        """The group is coded: its samples extend the file's, and each position's weight takes its
        step (on the group's bytes in that position, in file order, as bench does)."""
        samples = [state.samples() for state in self._lanes]
        keep = self.config.history + self.config.order
        self.tail = np.concatenate([self.tail, *samples])[-keep:]
        for j in range(SAMPLE_BYTES):
            p_model = np.array([p for state in self._lanes for p in state.p_model[j]], dtype=np.float64)
            p_lpc = np.array([p for state in self._lanes for p in state.p_lpc[j]], dtype=np.float64)
            self.logits[j] = mixture_step(self.logits[j], self.config.learning_rate, p_model, p_lpc)
        self._lanes = []


class _LpcLane:
    """One window's side of the mixer: its visible stream (the file's samples before the group,
    then its own), the current coefficients and residual magnitudes."""

    def __init__(self, tail: np.ndarray, config: LpcConfig) -> None:
        self.config = config
        self.first = len(tail)
        self.x = np.zeros(len(tail) + config.refit * 64)  # grows as needed
        self.x[: self.first] = tail
        self.length = self.first  # samples held
        self.low: int | None = None  # the current sample's low byte, once coded
        self.coefficients = np.zeros(config.order)
        self.magnitudes: list[float] = []
        self.mu = 0
        self.scale = config.min_scale
        self.p_model: list[list[float]] = [[] for _ in range(SAMPLE_BYTES)]
        self.p_lpc: list[list[float]] = [[] for _ in range(SAMPLE_BYTES)]
        self.pending: tuple[np.ndarray, np.ndarray] | None = None
        self._predict()

    @property
    def position(self) -> int:
        return 0 if self.low is None else 1

    def _predict(self) -> None:
        """Prediction and scale of the next sample (at index `length` of the visible stream)."""
        config, at = self.config, self.length
        done = at - self.first
        if done % config.refit == 0:
            self.coefficients = _coefficients(self.x[:at], at, config)
            if done == 0:
                self.magnitudes = list(_seed(self.x[:at], at, self.coefficients, config))
        lags = self.x[max(0, at - config.order) : at][::-1]
        lags = np.concatenate([lags, np.zeros(config.order - len(lags))])
        self.mu = int(_prediction(lags[None, :], self.coefficients)[0])
        recent = self.magnitudes[-config.scale_window :]
        self.scale = max(sum(recent) / len(recent), config.min_scale) if recent else config.min_scale

    def lpc_distribution(self) -> np.ndarray:
        if self.low is None:
            return low_byte_probabilities(self.mu, self.scale)
        return high_byte_probabilities(self.mu, self.scale, self.low)

    def push(self, byte: int) -> None:
        if self.low is None:
            self.low = byte
            return
        sample = self.low + (byte << 8)
        sample -= 65536 if sample >= 32768 else 0
        if self.length == len(self.x):
            self.x = np.concatenate([self.x, np.zeros(len(self.x))])
        self.x[self.length] = sample
        self.length += 1
        self.magnitudes.append(abs(sample - self.mu))
        self.low = None
        self._predict()

    def samples(self) -> np.ndarray:
        """The window's whole samples (a last half sample ends the file and is never needed)."""
        return self.x[self.first : self.length]
