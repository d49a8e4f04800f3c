"""Invariants of the one hierarchical model, for every architecture and patcher it can be
configured as: causality, cached decoding equals full recompute (also for rows at different
positions), boundaries decided while decoding equal the parallel ones, and worked examples."""

import math

import pytest
import torch

from architectures import ARCHITECTURES, assert_staggered_decoding_matches, build
from multibyte.config import PRESETS, ModelConfig, StageConfig
from multibyte.model import HierarchicalByteModel
from multibyte.patchers import unit_starts
from multibyte.patchers.space import space_like
from multibyte.training import masked_byte_nll

TEXT = b"Hi, there!  A test: 42 bytes, two   spaces.\nNew line; ok." * 2


def text_rows(*offsets: int, length: int = 40) -> torch.Tensor:
    return torch.tensor([list(TEXT[o : o + length]) for o in offsets])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_no_logit_sees_its_own_or_later_bytes(name):
    # Text, so the dynamic patchers place boundaries at several places; 13 bytes cross every
    # kind of border (inside a patch, patch to patch, real to padding).
    model = build(name)
    tokens = text_rows(0, 7, length=13)
    with torch.no_grad():
        reference = model(tokens)
        for t in range(tokens.shape[1]):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 97) % 256  # also moves dynamic boundaries after t
            logits = model(changed)
            # Positions <= t predict bytes <= t from bytes < t: byte t is not among their inputs.
            torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1], rtol=0, atol=1e-6)
            if t + 1 < tokens.shape[1]:
                # ...and some later position must react, or the test proves nothing.
                assert (logits[:, t + 1 :] - reference[:, t + 1 :]).abs().max() > 1e-4, f"byte {t} unused"


@pytest.mark.parametrize("name", ["megabyte", "vanilla", "mambabyte", "hybrid", "megabyte-3stage", "space", "entropy"])
def test_tiny_model_overfits_one_batch(name):
    model = build(name).train()
    # Random bytes, byte 0 included on purpose: it is an ordinary byte to learn, not padding.
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 48))
    tokens[:, ::7] = 0
    tokens[:, 3::5] = 32  # spaces, so the space patcher cuts words
    lengths = torch.full((2,), 48)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(200):
        nll, count = masked_byte_nll(model(tokens), tokens, lengths)
        loss = nll / count
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bpb = loss.item() / math.log(2)
        if bpb < 0.5:
            break
    # The first byte of each row has no context; everything else must be memorised.
    assert bpb < 0.5, f"{name} did not overfit: {bpb:.3f} bits/byte"


def test_padding_to_a_patch_multiple_does_not_change_real_logits():
    model = build("megabyte")
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        full = model(tokens)
        short = model(tokens[:, :13])  # padded internally to 16
    assert short.shape == (1, 13, 256)
    torch.testing.assert_close(short, full[:, :13], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["megabyte", "megabyte-3stage", "hybrid", "megabyte-lags"])
def test_fixed_grid_equals_the_scattered_grid(name):
    # Fixed patches take the reshape path; giving the same boundaries explicitly takes the
    # scatter/gather path of dynamic patches. Both must compute the same logits.
    model = build(name)
    tokens = text_rows(0, 3, length=29)
    with torch.no_grad():
        starts = model.unit_starts(tokens)
        torch.testing.assert_close(model(tokens, starts=starts), model(tokens), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Boundaries: worked examples, and the decoder decides what the parallel pass decides
# ------------------------------------------------------------------------------------------------


def starts_string(text: bytes, starts: torch.Tensor) -> str:
    return "".join(("|" if s else "") + chr(c) for c, s in zip(text, starts.tolist()))


def test_space_rule_worked_example():
    # Space-like: not a letter, digit or UTF-8 continuation byte. A unit starts after the first
    # space-like byte of a run (the run's other bytes open the next word); max_length 5 cuts
    # "abcdefgh" after 5 bytes.
    text = b"ab, cd  e1 abcdefgh"
    tokens = torch.tensor([list(text)])
    from multibyte.patchers.space import SpacePatcher

    patcher = SpacePatcher(StageConfig(patcher="space", patch_size=5))
    starts = unit_starts(patcher.rule(tokens), None, 5, len(text), 1, "cpu")[0]
    assert starts_string(text, starts) == "|ab,| cd | e1 |abcde|fgh"
    # UTF-8: "é" is C3 A9 (lead byte space-like, continuation not); "日本" is E6 97 A5 E6 9C AC.
    assert space_like(torch.tensor(list("aé日".encode()))).tolist() == [False, True, False, True, False, False]


def test_nested_starts_worked_example():
    # Outer fixed units of 6 bytes, inner units of 2 bytes restart at every outer start.
    T = 10
    outer = unit_starts(None, None, 6, T, 1, "cpu")
    inner = unit_starts(None, outer, 2, T, 1, "cpu")
    assert outer[0].nonzero().flatten().tolist() == [0, 6]
    assert inner[0].nonzero().flatten().tolist() == [0, 2, 4, 6, 8]
    # An inner rule start restarts the length count: rule at 3 -> 0, 2, 3, 5, then outer 6, 8.
    rule = torch.zeros(1, T, dtype=torch.bool)
    rule[0, 3] = True
    inner = unit_starts(rule, outer, 2, T, 1, "cpu")
    assert inner[0].nonzero().flatten().tolist() == [0, 2, 3, 5, 6, 8]


def boundaries_while_decoding(model, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: where the decoder opened a new outermost unit while consuming `tokens`."""
    B, T = tokens.shape
    state = model.allocate_decode_state(B, T + 1)
    model.prefill(state, tokens[:, :0])
    seen = [torch.ones(B, dtype=torch.bool)]
    for t in range(T - 1):
        before = state.coords[:, 0].clone()
        model.decode_step(state, tokens[:, t])
        seen.append(state.coords[:, 0] != before)
    return torch.stack(seen, dim=1)


@pytest.mark.parametrize("name", ["space", "entropy", "entropy-monotonic", "space-3stage-mamba", "megabyte"])
def test_decoder_places_boundaries_where_the_parallel_pass_does(name):
    model = build(name)
    tokens = text_rows(0, 11, length=40)
    parallel = model.unit_starts(tokens)[0]
    assert 0.1 < parallel.float().mean() < 0.9  # irregular boundaries, not every byte nor none
    assert torch.equal(boundaries_while_decoding(model, tokens), parallel)


# ------------------------------------------------------------------------------------------------
# Decoding with rows at different positions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["megabyte", "megabyte-3stage", "mambabyte", "hybrid", "space", "entropy", "space-3stage-mamba", "megabyte-lags"]
)
def test_rows_with_different_prompt_lengths_match_full_recompute(name):
    # Three rows, prompts of 0, 9 and 17 bytes (different offsets inside their patches), then
    # 12 shared steps: each row's logits equal the full forward pass at its own positions.
    # Tolerance 2e-5 in fp32: a cached step and a full pass sum in different orders.
    assert_staggered_decoding_matches(build(name), text_rows(0, 5, 20, length=32), torch.tensor([0, 9, 17]), 12, 2e-5)


def test_inactive_rows_keep_their_state():
    model = build("space")
    rows = text_rows(0, 5, length=20)
    with torch.no_grad():
        full = model(rows)
    state = model.allocate_decode_state(2, 20)
    model.prefill(state, rows[:, :0])
    # Row 1 sits out every other step; it must end where feeding its bytes alone would put it.
    fed = [0, 0]
    for step in range(14):
        active = torch.tensor([True, step % 2 == 0])
        byte = torch.stack([rows[0, fed[0]], rows[1, fed[1]]])
        logits = model.decode_step(state, byte, active)
        fed[0] += 1
        if step % 2 == 0:
            fed[1] += 1
            torch.testing.assert_close(logits[1], full[1, fed[1]], rtol=0, atol=2e-5)
        torch.testing.assert_close(logits[0], full[0, fed[0]], rtol=0, atol=2e-5)


def test_a_subword_vocabulary_is_the_same_core():
    config = ModelConfig(
        stages=[StageConfig("attention", 32, 1, 2, patcher="fixed", patch_size=2), StageConfig("attention", 16, 1, 2)],
        vocab_size=1000,
        max_seq_len=16,
    )
    torch.manual_seed(0)
    model = HierarchicalByteModel(config).eval()
    tokens = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        full = model(tokens)
    assert full.shape == (2, 9, 1000)
    state = model.allocate_decode_state(2, 9)
    logits = model.prefill(state, tokens[:, :4])
    torch.testing.assert_close(logits, full[:, 4], rtol=0, atol=1e-5)


def test_hash_ngram_ids_worked_example():
    model = build("space-hash")  # buckets 13, sizes [2, 3]
    # The 2-gram ending at the newest byte: h = ((0·257 + (b_t + 1))·257 + (b_{t-1} + 1)).
    history = torch.tensor([[-1, 5, 7]])  # ..., 5, 7 (newest last)
    ids = model.hash_ids(history)[0].tolist()
    two = ((7 + 1) * 257 + (5 + 1)) % 13
    three = (((7 + 1) * 257 + (5 + 1)) * 257 + 0) % 13 + 13  # the byte before the start hashes as 0
    assert ids == [two, three]


# ------------------------------------------------------------------------------------------------
# Loss and configuration
# ------------------------------------------------------------------------------------------------


def test_masked_nll_counts_only_real_bytes():
    # Uniform logits: every real byte costs exactly ln 256 nats, i.e. 8 bits.
    logits = torch.zeros(2, 5, 256)
    tokens = torch.randint(0, 256, (2, 5))
    nll, count = masked_byte_nll(logits, tokens, torch.tensor([5, 2]))
    assert count.item() == 7
    assert nll.item() == pytest.approx(7 * math.log(256), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patch_size=8), r"patch_size -> stages\[0\]\.patch_size"),
        (dict(global_model={"d_model": 16}), r"global_model -> stages\[0\]"),
        (dict(stages=[StageConfig(d_model=16, n_heads=2, patcher="fixed", patch_size=4)]), "byte-level stage"),
        (dict(stages=[StageConfig(d_model=32, n_heads=2), StageConfig(d_model=16, n_heads=2)]), "needs a patcher"),
        (dict(stages=[StageConfig(d_model=30, n_heads=2, patcher="fixed", patch_size=4), StageConfig(d_model=16, n_heads=2)]), "multiple of its 4 byte slots"),
        (
            dict(stages=[
                StageConfig(d_model=48, n_heads=2, patcher="fixed", patch_size=6),
                StageConfig(d_model=16, n_heads=2, patcher="fixed", patch_size=4),
                StageConfig(d_model=16, n_heads=2),
            ]),
            "must be a multiple of stages",
        ),
        (dict(stages=[StageConfig(d_model=32, n_heads=2, patcher="entropy", patch_size=4), StageConfig(d_model=16, n_heads=2)]), "entropy_model"),
        (dict(vocab_size=1), "vocab_size"),
    ],
)
def test_config_rejects_inconsistent_shapes_with_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=30, n_heads=4), "must divide d_model"),
        (dict(n_heads=0), "n_heads must be at least 1"),
        (dict(mixer="lstm"), "unknown mixer 'lstm'"),
        (dict(patcher="words"), "unknown patcher 'words'"),
        (dict(d_model=0), "d_model must be at least 1"),
        (dict(patch_size=0), "patch_size must be at least 1"),
    ],
)
def test_stage_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StageConfig(**kwargs)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    config = ModelConfig.from_name(name)
    with torch.device("meta"):  # shapes only: GPU-sized presets would need gigabytes
        model = HierarchicalByteModel(config)
    assert model.num_parameters() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "length, block",
    [
        (12, None),  # one block: the plain three ops
        (12, 5),  # query blocks of 5, 5 and 2, each scoring the keys up to its end
        (300, None),  # the shipped block size, a full block and a partial one
    ],
)
def test_explicit_attention_equals_fused_kernel(dtype, length, block, monkeypatch):
    from multibyte.mixers import attention
    from multibyte.mixers.attention import explicit_causal_attention

    if block is not None:
        monkeypatch.setattr(attention, "EXPLICIT_QUERY_BLOCK", block)
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, length, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*exact, is_causal=True)
    got = explicit_causal_attention(q, k, v)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=tolerance)
    # Training takes either path (CausalSelfAttention._explicit_is_faster): same gradients too.
    upstream = torch.randn(expected.shape)
    expected.backward(upstream)
    got.backward(upstream.to(dtype))
    for mine, reference in zip((q, k, v), exact):
        torch.testing.assert_close(mine.grad.float(), reference.grad, rtol=0, atol=2 * tolerance)


@pytest.mark.parametrize(
    "dtype, length, vectors, explicit",
    [
        (torch.bfloat16, 12, "AVX512", True),
        (torch.bfloat16, 1024, "AVX2", True),
        (torch.bfloat16, 1025, "AVX512", False),  # the (L, L) scores would cost too much memory
        (torch.float32, 12, "AVX512", False),  # the fused kernel wins in fp32 there
        (torch.float32, 16, "AVX2", True),
        (torch.float32, 17, "AVX2", False),
        (torch.float32, 12, "DEFAULT", False),  # not measured: the fused kernel
        (torch.float16, 12, "AVX2", False),
    ],
)
def test_training_attention_takes_the_measured_faster_path(dtype, length, vectors, explicit, monkeypatch):
    from multibyte import cpu_features
    from multibyte.mixers import attention

    monkeypatch.setattr(cpu_features, "vector_capability", lambda: vectors)
    calls = []
    real = attention.explicit_causal_attention
    monkeypatch.setattr(attention, "explicit_causal_attention", lambda *a: calls.append(1) or real(*a))
    layer = attention.CausalSelfAttention(32, 4).to(dtype)
    x = torch.randn(2, length, 32, dtype=dtype, requires_grad=True)
    layer(x).sum().backward()
    assert bool(calls) == explicit


@pytest.mark.parametrize("name", ["space", "entropy", "space-hash"])
def test_packed_byte_stage_equals_the_padded_grid(name, monkeypatch):
    # With dynamic units the byte stage runs on the packed stream (no empty slots computed);
    # forcing the padded grid must give the same logits.
    model = build(name)
    tokens = text_rows(0, 13, length=37)
    with torch.no_grad():
        packed = model(tokens)
        monkeypatch.setattr(type(model), "_packs_bytes", lambda self, layout: False)
        padded = model(tokens)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


def test_segment_causal_attention_equals_a_full_mask():
    from multibyte.mixers.attention import segment_causal_attention

    torch.manual_seed(0)
    B, H, L, hd, W = 2, 2, 23, 8, 5
    q, k, v = (torch.randn(B, H, L, hd) for _ in range(3))
    starts = torch.rand(B, L) < 0.3
    starts[:, 0] = True
    # cut segments longer than W, as the patchers guarantee
    positions = torch.arange(L)
    begin = torch.where(starts, positions, 0).cummax(1).values
    starts |= (positions - begin) % W == 0
    segments = starts.long().cumsum(1)
    mask = (segments[:, None, :] == segments[:, :, None]) & torch.ones(L, L, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    torch.testing.assert_close(segment_causal_attention(q, k, v, segments, W), expected, rtol=0, atol=1e-5)
