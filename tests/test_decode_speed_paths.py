"""The fast decoding paths give what the plain ones give: the torch.compile'd step (one byte, or a
run of bytes per call) against eager decoding, pre-drawn sampling noise against per-step draws,
the host's levels of several steps at once against one at a time, and the short Mamba step."""

import pytest
import torch

from architectures import build
from multibyte.mixers.attention import EXPLICIT_DECODE_KEYS, KVCache, attend_with_cache
from multibyte.model import HierarchicalByteModel
from multibyte.sampling import (
    NoiseChunks,
    allocate_decode_state,
    compiled_run_length,
    decode_step,
    exponential_noise,
    generate,
    prefill,
    sample_next_byte,
    sample_with_noise,
)


@pytest.fixture(scope="module")
def megabyte() -> HierarchicalByteModel:
    return build("megabyte", seed=3)  # two attention stages, patches of 4 bytes


# ------------------------------------------------------------------------------------------------
# Sampling pieces
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 20}, {"top_p": 0.8}])
def test_sampling_with_drawn_noise_is_sample_next_byte(options):
    logits = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)) * 3
    expected = sample_next_byte(logits, generator=torch.Generator().manual_seed(7), **options)
    noise = exponential_noise((5, 256), torch.device("cpu"), torch.Generator().manual_seed(7))
    assert torch.equal(sample_with_noise(logits, noise, **options), expected)


def test_noise_taken_in_runs_is_the_noise_taken_one_by_one():
    one = NoiseChunks((2, 256), torch.device("cpu"), torch.Generator().manual_seed(1), chunk=5)
    runs = NoiseChunks((2, 256), torch.device("cpu"), torch.Generator().manual_seed(1), chunk=5)
    singles = torch.stack([one.next() for _ in range(23)])
    taken = torch.cat([runs.take(1), runs.take(4), runs.take(7), runs.take(4), runs.take(7)])
    assert torch.equal(taken, singles)
    assert (singles > 0).all()
    greedy = NoiseChunks((2, 256), torch.device("cpu"), None, enabled=False)
    assert torch.equal(greedy.take(3), torch.ones(3, 2, 256))


# ------------------------------------------------------------------------------------------------
# Host bookkeeping of several steps at once
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["megabyte", "megabyte-3stage"])
def test_levels_of_a_run_are_the_levels_of_its_steps(name):
    model = build(name)
    singles, runs = (allocate_decode_state(model, 1, 40) for _ in range(2))
    with torch.inference_mode():
        for state in (singles, runs):
            prefill(model, state, torch.zeros(1, 3, dtype=torch.long))
        byte = torch.zeros(1, dtype=torch.long)
        one_by_one = tuple(model.begin_step(singles, byte)[1] for _ in range(9))
        _, together, _ = model.begin_step(runs, byte, count=9)
    assert together == one_by_one and len(set(together)) > 1
    assert runs.host_position == singles.host_position == 12
    with pytest.raises(ValueError, match="full"):
        model.begin_step(runs, byte, count=29)


def test_run_length_divides_the_outermost_unit(megabyte):
    assert compiled_run_length(megabyte, 4) == 4
    assert compiled_run_length(megabyte, 3) == 2
    assert compiled_run_length(build("mambabyte"), 5) == 5  # one stage: any run of steps is alike


# ------------------------------------------------------------------------------------------------
# Compiled decoding == eager decoding
# ------------------------------------------------------------------------------------------------


def test_compiled_step_gives_the_eager_logits_at_every_position(megabyte):
    tokens = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        states = [allocate_decode_state(megabyte, 2, 20, compile=c) for c in (False, True)]
        logits = [prefill(megabyte, state, tokens[:, :3]) for state in states]
        for t in range(3, tokens.shape[1]):
            torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
            logits = [decode_step(megabyte, state, tokens[:, t]) for state in states]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)


def test_compiled_generation_draws_the_eager_bytes(megabyte):
    # A prompt of 3 bytes ends inside a patch: a single compiled step takes it to the next patch,
    # then runs of 4 bytes per call, then single steps for the 3 bytes left after the last run.
    prompt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(4))
    eager = generate(megabyte, prompt, 20, seed=5, top_k=100)
    assert torch.equal(generate(megabyte, prompt, 20, seed=5, top_k=100, compile=True), eager)
    # The second call reuses the compiled graphs, without Dynamo's guards from each step's
    # second call on (see sampling._trusted_call): still the same bytes.
    assert torch.equal(generate(megabyte, prompt, 20, seed=5, top_k=100, compile=True), eager)
    # A stop byte: single compiled steps, rows padded after their stop byte as in eager sampling.
    stop = int(eager[0, 8])
    stopped = generate(megabyte, prompt, 20, seed=5, top_k=100, stop_byte=stop)
    assert torch.equal(generate(megabyte, prompt, 20, seed=5, top_k=100, stop_byte=stop, compile=True), stopped)


# ------------------------------------------------------------------------------------------------
# One query over a static cache
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_len", [40, 300, EXPLICIT_DECODE_KEYS + 10])  # explicit (short, long), SDPA
def test_one_query_on_a_static_cache_attends_to_each_rows_own_prefix(max_len):
    # Rows hold 5, 0 and 250 positions (clamped to the cache); each new query must see exactly its
    # row's keys plus its own new key, whichever kernel reads the cache.
    gen = torch.Generator().manual_seed(0)
    B, H, hd = 3, 2, 8
    cache = KVCache(torch.randn(B, H, max_len + 1, hd, generator=gen), torch.randn(B, H, max_len + 1, hd, generator=gen),
                    torch.tensor([5, 0, min(250, max_len - 1)]))
    cache.make_static()
    q, k, v = (torch.randn(B, H, 1, hd, generator=gen) for _ in range(3))
    before = cache.lengths.clone()
    keys_before, values_before = cache.keys.clone(), cache.values.clone()
    y = attend_with_cache(q, k, v, cache, None)  # (B, H, 1, hd)
    for b in range(B):
        n = int(before[b])
        keys = torch.cat([keys_before[b, :, :n], k[b]], dim=1)  # (H, n + 1, hd)
        values = torch.cat([values_before[b, :, :n], v[b]], dim=1)
        weights = (q[b] @ keys.transpose(-1, -2) / hd**0.5).softmax(-1)
        torch.testing.assert_close(y[b], weights @ values, rtol=1e-5, atol=1e-6)
    assert torch.equal(cache.lengths, before + 1)


# ------------------------------------------------------------------------------------------------
# Mamba's step
# ------------------------------------------------------------------------------------------------


def test_mamba_step_with_some_rows_frozen_leaves_them_untouched():
    model = build("mambabyte", seed=2)
    mixer = model.stages[0].stack.blocks[0].mixer
    u = torch.randn(3, 6, mixer.d_model, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        state = mixer.allocate_state(3, 8, u.device, u.dtype)
        mixer(u[:, :5], state)
        before = (state.conv.clone(), state.ssm.clone())
        run = torch.tensor([True, False, True])
        out = mixer(u[:, 5:], state, run)
        reference = mixer.allocate_state(3, 8, u.device, u.dtype)
        expected = mixer(u, reference)[:, 5:]
    torch.testing.assert_close(out[run], expected[run], rtol=1e-5, atol=1e-6)
    assert torch.equal(state.conv[1], before[0][1]) and torch.equal(state.ssm[1], before[1][1])
    torch.testing.assert_close(state.ssm[run], reference.ssm[run], rtol=1e-5, atol=1e-6)
