"""Which bytes every window covers: the training draws and the evaluation plans, for one process or many.

Everything here counts symbols: bytes for the byte models, token ids for subword text (a window
is then seq_len tokens, and "every byte exactly once" below reads "every token exactly once",
hence every byte they decode to once).

Training. An epoch is `num_windows` windows with global indices g = 0 .. num_windows - 1. Window g
of epoch e starts at

    alignment * (hash(seed, e, g) mod num_starts)      num_starts = aligned starts whose window fits

a pure function (`train_window_starts`, a counter-based hash: SplitMix64's mixer chained over the
three integers), so a window never depends on which process draws it, on a generator's state or on
how often anything was reseeded. Rank r of W processes draws g = r, r + W, r + 2W, ...
(`TrainWindowSampler`), so the ranks draw different windows, and with B windows per rank the
global batch k is the windows [k·B·W, (k+1)·B·W) whatever W is. A run resumed mid-epoch
continues at the first window not yet trained on: the sampler's position is part of the
checkpoint (`ByteStreamDataModule.state_dict`).

Evaluation. A plan is a list of `Window`s that together score every byte of a split exactly once:
MEGABYTE's four inference modes (Yu et al. 2023, Table 9; see `inference_plan`), whose "basic"
mode, contiguous windows [i·L, min((i+1)·L, N)), is what validation, test and `compress` use.
Rank r of W evaluates windows r, r + W, r + 2W, ... of the plan (`rank_share`): no window is
repeated to even the ranks out (as `DistributedSampler` would; a rank one window short is given an
empty one instead), so summed over the ranks every byte counts once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

INFERENCE_MODES = ("basic", "sliding", "strided", "sliding+strided")

# ------------------------------------------------------------------------------------------------
# Training draws
# ------------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: SplitMix64's increment
_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a bijection of uint64 in which every input bit flips about
    half of the output bits. x: uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def window_hash(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """64-bit hash of (seed, epoch, index) for every index: uint64 array shaped like `indices`."""
    indices = np.asarray(indices)
    if indices.size and int(indices.min()) < 0:
        raise ValueError(f"window indices must be non-negative, got {int(indices.min())}")
    with np.errstate(over="ignore"):
        key = _mix64(np.asarray([seed & _MASK64], dtype=np.uint64) + _GOLDEN)
        key = _mix64(key + np.uint64(epoch & _MASK64) + _GOLDEN)
        return _mix64(key + indices.astype(np.uint64) + _GOLDEN)


def train_window_starts(
    seed: int, epoch: int, indices: np.ndarray, num_bytes: int, seq_len: int, alignment: int = 1
) -> np.ndarray:
    """Start offsets (int64, shaped like `indices`) of training windows `indices` of `epoch`: each a
    multiple of `alignment` chosen uniformly (bias < num_starts / 2^64) among those whose
    `seq_len` bytes fit in `num_bytes`."""
    if seq_len < 1 or alignment < 1:
        raise ValueError(f"seq_len and alignment must be at least 1, got {seq_len} and {alignment}")
    if num_bytes < seq_len:
        raise ValueError(f"{num_bytes} bytes cannot hold one window of seq_len={seq_len}")
    num_starts = (num_bytes - seq_len) // alignment + 1
    choice = window_hash(seed, epoch, indices) % np.uint64(num_starts)
    return choice.astype(np.int64) * alignment


@dataclass(frozen=True)
class TrainPosition:
    """Where a training run is in its stream of windows: `epoch`, and `batches_done` local batches
    already trained in it, by `world_size` ranks of `batch_size` windows each; `seed` keys the draws."""

    seed: int
    epoch: int
    batches_done: int
    batch_size: int
    world_size: int

    def state_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_state_dict(cls, state: dict[str, int]) -> "TrainPosition":
        return cls(**{name: int(state[name]) for name in cls.__dataclass_fields__})


class DrawKey(NamedTuple):
    """Names one training window: window `index` of epoch `epoch` of the draws keyed by `seed`."""

    seed: int
    epoch: int
    index: int


class TrainWindowSampler(Sampler):
    """Yields the `DrawKey`s this rank trains on, in order.

    An epoch has `num_windows` windows; each of the `world_size` ranks draws ceil(num_windows /
    world_size) of them, rank-interleaved (index = i·W + rank), so every rank runs the same number
    of steps (the few indices past num_windows are simply more random windows). Lightning calls
    `set_epoch` before each epoch; `resume` makes the next pass start part-way into an epoch.
    """

    def __init__(self, num_windows: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if num_windows < 1:
            raise ValueError(f"num_windows must be at least 1, got {num_windows}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank}")
        self.num_windows = num_windows
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = math.ceil(num_windows / world_size)
        self.epoch = 0
        self._resume_at: Optional[tuple[int, int]] = None  # (epoch, first local window) of the next pass

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, windows_done: int) -> None:
        """Start the next pass in `epoch` after its first `windows_done` local windows."""
        if windows_done >= self.per_rank:  # that epoch was complete: the next one starts
            epoch, windows_done = epoch + 1, 0
        self.epoch = epoch
        self._resume_at = (epoch, windows_done)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[DrawKey]:
        # The pass is fixed when iteration begins: on a resumed run Lightning creates the iterator
        # before it calls set_epoch, which is why `resume` carries the epoch itself.
        epoch, first = self._resume_at if self._resume_at is not None else (self.epoch, 0)
        self._resume_at = None
        for i in range(first, self.per_rank):
            yield DrawKey(self.seed, epoch, i * self.world_size + self.rank)


# ------------------------------------------------------------------------------------------------
# Evaluation plans
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Bytes [start, stop) go through the model; those from `score_from` on, and, in a strided
    pass, only those in the first half of their patch (counted from `start`), are scored."""

    start: int
    stop: int
    score_from: int
    strided: bool = False

    def scored_mask(self, patch_size: int) -> np.ndarray:
        """(stop - start,) bool: which of the window's positions are scored."""
        offsets = np.arange(self.stop - self.start)
        mask = offsets >= self.score_from - self.start
        if self.strided:
            mask &= offsets % patch_size < patch_size // 2
        return mask


def num_contiguous_windows(num_bytes: int, seq_len: int) -> int:
    """How many windows of `seq_len` (the last one possibly shorter) cover `num_bytes` bytes."""
    return math.ceil(num_bytes / seq_len)


def contiguous_window(index: int, num_bytes: int, seq_len: int) -> tuple[int, int]:
    """[start, stop) of contiguous window `index`: [i·L, min((i+1)·L, N))."""
    if not 0 <= index < num_contiguous_windows(num_bytes, seq_len):
        raise IndexError(index)
    start = index * seq_len
    return start, min(start + seq_len, num_bytes)


def pass_windows(num_bytes: int, seq_len: int, sliding: bool, offset: int = 0, strided: bool = False) -> list[Window]:
    """One pass of windows over bytes [offset, num_bytes).

    Without sliding: [offset + i·L, offset + (i+1)·L), every byte scored. With sliding: windows
    start every S = L // 2 bytes; window 0 scores all its bytes, window k > 0 only its last S (its
    first L - S are context), so the scored parts tile the range.
    """
    windows: list[Window] = []
    if offset >= num_bytes:
        return windows
    if not sliding:
        for start in range(offset, num_bytes, seq_len):
            windows.append(Window(start, min(start + seq_len, num_bytes), start, strided))
        return windows
    stride = seq_len // 2
    start = offset
    windows.append(Window(start, min(start + seq_len, num_bytes), start, strided))
    while start + seq_len < num_bytes:
        start += stride
        windows.append(Window(start, min(start + seq_len, num_bytes), start + seq_len - stride, strided))
    return windows


def check_mode(mode: str, seq_len: int, patch_size: int) -> None:
    """Raise ValueError when `mode` cannot tile the data with these window and patch sizes."""
    if mode not in INFERENCE_MODES:
        raise ValueError(f"inference mode must be one of {INFERENCE_MODES}, got {mode!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if "sliding" in mode and seq_len < 2:
        raise ValueError(f"sliding-window inference needs seq_len >= 2, got {seq_len}")
    if "strided" in mode:
        if patch_size < 2 or patch_size % 2:
            raise ValueError(
                f"strided inference keeps the first half of each patch: needs an even patch_size, got {patch_size}"
            )
        step_name, step = ("seq_len // 2", seq_len // 2) if "sliding" in mode else ("seq_len", seq_len)
        if step % patch_size:
            raise ValueError(
                f"{mode} inference needs windows that start on patch borders: "
                f"{step_name} = {step} is not a multiple of patch_size={patch_size}"
            )


def inference_plan(num_bytes: int, seq_len: int, patch_size: int, mode: str) -> list[Window]:
    """Every window `mode` runs over `num_bytes` bytes; together they score each byte exactly once.

        basic            contiguous windows of L = seq_len bytes, [i·L, (i+1)·L)
        sliding          windows of L that advance by S = L // 2; each window's first L - S bytes
                         are context only (the first window scores all of its bytes)
        strided          two passes of basic windows, the second offset by P/2 bytes; each keeps
                         only the first half of every patch
        sliding+strided  both: two passes of sliding windows (S must be a multiple of P)
    """
    check_mode(mode, seq_len, patch_size)
    sliding = "sliding" in mode
    if "strided" not in mode:
        return pass_windows(num_bytes, seq_len, sliding)
    # Pass A keeps bytes at phase < P/2 of their patch, pass B (patches shifted by P/2) the rest.
    half = patch_size // 2
    return pass_windows(num_bytes, seq_len, sliding, 0, True) + pass_windows(num_bytes, seq_len, sliding, half, True)


def rank_share(num_windows: int, rank: int = 0, world_size: int = 1) -> range:
    """Indices of the windows rank `rank` of `world_size` evaluates: rank, rank + W, ... (no padding:
    the ranks' shares partition range(num_windows), and may differ in size by one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank}")
    return range(rank, num_windows, world_size)


class EvalShardSampler(Sampler):
    """This rank's share (`rank_share`) of `num_windows` evaluation windows, in order, then None
    (an empty window, which scores nothing) up to ceil(num_windows / world_size) items.

    Every rank so runs the same number of batches: under a sharded model (FSDP) each forward pass
    is a collective that all ranks must join, and an empty window adds no bytes to any score.
    """

    def __init__(self, num_windows: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = rank_share(num_windows, rank, world_size)
        self.length = math.ceil(num_windows / world_size)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Optional[int]]:
        yield from self.indices
        yield from [None] * (self.length - len(self.indices))


def groups(items: Sequence, size: int) -> list[Sequence]:
    """`items` cut into consecutive groups of at most `size` (e.g. windows decoded side by side)."""
    if size < 1:
        raise ValueError(f"group size must be at least 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]
