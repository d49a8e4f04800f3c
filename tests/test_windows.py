"""datamodules/windows.py: training draws are a pure function of (seed, epoch, index) and split
between ranks; every evaluation plan scores each byte exactly once, on any number of ranks."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from datamodules.base import ContiguousWindows
from datamodules.windows import (
    INFERENCE_MODES,
    EvalShardSampler,
    TrainWindowSampler,
    check_mode,
    inference_plan,
    rank_share,
    train_window_starts,
)
from multibyte.compression import window_groups

# ------------------------------------------------------------------------------------------------
# Training draws
# ------------------------------------------------------------------------------------------------


def test_a_window_start_depends_on_seed_epoch_and_index_only():
    indices = np.arange(1000)
    starts = train_window_starts(7, 3, indices, num_bytes=100_000, seq_len=64, alignment=2)
    # Whatever the global generators hold, and however the indices are asked for (one at a time,
    # reversed, in one array), the same key gives the same start.
    torch.manual_seed(123)
    np.random.seed(123)
    one_by_one = [int(train_window_starts(7, 3, np.array([i]), 100_000, 64, 2)[0]) for i in indices]
    reversed_ = train_window_starts(7, 3, indices[::-1], 100_000, 64, 2)[::-1]
    np.testing.assert_array_equal(starts, one_by_one)
    np.testing.assert_array_equal(starts, reversed_)
    # Another seed or epoch draws other windows.
    for seed, epoch in ((8, 3), (7, 4)):
        other = train_window_starts(seed, epoch, indices, 100_000, 64, 2)
        assert (other != starts).mean() > 0.99


@settings(max_examples=60, deadline=None)
@given(
    num_bytes=st.integers(1, 5000),
    seq_len=st.integers(1, 300),
    alignment=st.sampled_from([1, 2, 3, 12]),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 1000),
)
def test_window_starts_are_aligned_and_fit(num_bytes, seq_len, alignment, seed, epoch):
    if num_bytes < seq_len:
        with pytest.raises(ValueError, match="cannot hold one window"):
            train_window_starts(seed, epoch, np.arange(4), num_bytes, seq_len, alignment)
        return
    starts = train_window_starts(seed, epoch, np.arange(200), num_bytes, seq_len, alignment)
    assert starts.dtype == np.int64
    assert (starts % alignment == 0).all() and (starts >= 0).all() and (starts + seq_len <= num_bytes).all()


def test_window_starts_are_uniform():
    # 10 possible starts, 20,000 draws: each start 2,000 times, give or take a few standard deviations (~42).
    starts = train_window_starts(0, 0, np.arange(20_000), num_bytes=19, seq_len=10, alignment=1)
    counts = np.bincount(starts, minlength=10)
    assert len(counts) == 10 and np.abs(counts - 2000).max() < 250


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_draw_disjoint_windows_and_each_global_batch_is_the_same_whatever_the_world_size(world_size):
    num_windows, batch_size = 23, 2
    per_rank = [list(TrainWindowSampler(num_windows, seed=5, rank=r, world_size=world_size)) for r in range(world_size)]
    assert len({len(keys) for keys in per_rank}) == 1  # the same number of steps on every rank
    indices = [key.index for keys in per_rank for key in keys]
    assert len(set(indices)) == len(indices)  # no window drawn by two ranks
    assert set(range(num_windows)) <= set(indices)  # the epoch's windows all drawn
    assert {key.seed for keys in per_rank for key in keys} == {5}
    # Global batch k (batch_size windows from each rank) holds windows [k·B·W, (k+1)·B·W).
    for k in range(len(per_rank[0]) // batch_size):
        step = sorted(key.index for keys in per_rank for key in keys[k * batch_size : (k + 1) * batch_size])
        assert step == list(range(k * batch_size * world_size, (k + 1) * batch_size * world_size))


def test_a_resumed_sampler_continues_the_interrupted_pass():
    sampler = TrainWindowSampler(10, seed=1, rank=1, world_size=2)
    sampler.set_epoch(3)
    uninterrupted = list(sampler)
    assert {key.epoch for key in uninterrupted} == {3}
    resumed = TrainWindowSampler(10, seed=1, rank=1, world_size=2)
    resumed.resume(epoch=3, windows_done=2)
    assert list(resumed) == uninterrupted[2:]
    assert list(resumed) == uninterrupted  # only the first pass after resume is shortened
    # A finished epoch resumes at the start of the next one.
    resumed.resume(epoch=3, windows_done=5)
    assert [key.epoch for key in resumed] == [4] * 5


# ------------------------------------------------------------------------------------------------
# Evaluation plans
# ------------------------------------------------------------------------------------------------


def coverage(num_bytes: int, seq_len: int, patch_size: int, mode: str, world_size: int = 1) -> np.ndarray:
    """How many times each byte is scored, summed over the windows every rank evaluates."""
    plan = inference_plan(num_bytes, seq_len, patch_size, mode)
    counts = np.zeros(num_bytes, dtype=np.int64)
    for rank in range(world_size):
        for i in rank_share(len(plan), rank, world_size):
            window = plan[i]
            counts[window.start : window.stop] += window.scored_mask(patch_size)
    return counts


@settings(max_examples=200, deadline=None)
@given(
    num_bytes=st.integers(0, 400),
    seq_len=st.integers(1, 48),
    patch_size=st.sampled_from([1, 2, 4, 6, 8]),
    mode=st.sampled_from(INFERENCE_MODES),
    world_size=st.integers(1, 3),
)
def test_every_mode_scores_every_byte_exactly_once_on_any_number_of_ranks(
    num_bytes, seq_len, patch_size, mode, world_size
):
    try:
        check_mode(mode, seq_len, patch_size)
    except ValueError:
        return  # combinations that cannot tile are refused (tested below)
    assert (coverage(num_bytes, seq_len, patch_size, mode, world_size) == 1).all()


def test_windows_and_costs_follow_the_paper():
    N, L, P = 100, 16, 4
    basic = inference_plan(N, L, P, "basic")
    assert [(w.start, w.stop) for w in basic] == [(s, min(s + L, N)) for s in range(0, N, L)]
    sliding = inference_plan(N, L, P, "sliding")
    # After the first window, each scored byte has at least L - S = 8 bytes of context before it.
    assert all(w.score_from - w.start == L // 2 for w in sliding[1:])
    assert sliding[0].score_from == 0 and all(w.stop - w.start <= L for w in sliding)
    strided = inference_plan(N, L, P, "strided")
    second_pass = [w for w in strided if w.start % L == P // 2]
    assert second_pass and second_pass[0].start == P // 2  # offset by half a patch
    cost = lambda plan: sum(w.stop - w.start for w in plan) / N  # noqa: E731
    assert cost(basic) == 1.0
    assert 1.8 < cost(sliding) <= 2.0 and 1.9 < cost(strided) <= 2.0
    assert 3.5 < cost(inference_plan(N, L, P, "sliding+strided")) <= 4.0


@pytest.mark.parametrize(
    "mode, seq_len, patch_size, problem",
    [
        ("strided", 16, 1, "even patch_size"),
        ("strided", 15, 3, "even patch_size"),
        ("strided", 18, 4, "seq_len = 18 is not a multiple of patch_size=4"),
        ("sliding+strided", 24, 8, r"seq_len // 2 = 12 is not a multiple of patch_size=8"),
        ("sliding", 1, 1, "seq_len >= 2"),
        ("beam", 16, 4, "inference mode must be one of"),
    ],
)
def test_modes_that_cannot_tile_are_refused(mode, seq_len, patch_size, problem):
    with pytest.raises(ValueError, match=problem):
        check_mode(mode, seq_len, patch_size)


@settings(max_examples=100, deadline=None)
@given(num_windows=st.integers(0, 50), world_size=st.integers(1, 4))
def test_rank_shares_partition_the_windows_and_even_out_with_empty_ones(num_windows, world_size):
    shares = [list(EvalShardSampler(num_windows, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for share in shares for i in share if i is not None) == list(range(num_windows))
    assert len({len(share) for share in shares}) == 1  # as many batches on every rank
    assert sum(i is None for share in shares for i in share) == len(shares[0]) * world_size - num_windows
    assert [list(rank_share(num_windows, rank, world_size)) for rank in range(world_size)] == [
        [i for i in share if i is not None] for share in shares
    ]


def test_validation_bench_and_compress_use_the_same_contiguous_windows(tmp_path):
    num_bytes, seq_len = 1000, 64
    path = tmp_path / "split.bin"
    data = np.random.default_rng(0).integers(0, 256, num_bytes, dtype=np.uint8)
    data.tofile(path)
    basic = [(w.start, w.stop) for w in inference_plan(num_bytes, seq_len, 4, "basic")]
    assert basic == [(s, min(s + seq_len, num_bytes)) for s in range(0, num_bytes, seq_len)]
    dataset = ContiguousWindows(path, num_bytes, seq_len)
    assert len(dataset) == len(basic)
    for i, (start, stop) in enumerate(basic):
        np.testing.assert_array_equal(dataset[i].numpy(), data[start:stop])
    assert [window for group in window_groups(num_bytes, seq_len, 5) for window in group] == basic
    assert [len(group) for group in window_groups(num_bytes, seq_len, 5)] == [5, 5, 5, 1]
