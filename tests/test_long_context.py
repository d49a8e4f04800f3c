"""Long inputs (issue #14) at a length a test can afford, 64K bytes with tiny models: no table
grows with the length, cached decoding after a 64K prompt equals the full pass, sampling and
sliding evaluation run at 64K windows. (benchmarks/long_context.py measures 8K..1M.)"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multibyte.bench import score_bytes
from multibyte.config import PRESETS, ModelConfig, StageConfig
from multibyte.model import HierarchicalByteModel
from multibyte.sampling import generate

LONG = 1 << 16  # 65,536 bytes


def three_stage(outer: str = "attention") -> ModelConfig:
    """The long presets' layout (256-byte units, 16-byte units, bytes) at toy width. max_seq_len
    only checks lengths here: nothing is sized by it."""
    return ModelConfig(
        stages=[
            StageConfig(outer, 256, 1, 4, patcher="fixed", patch_size=256, d_state=4,
                        position="rotary" if outer == "attention" else "none"),
            StageConfig("attention", 32, 1, 2, patcher="fixed", patch_size=16, position="learned"),
            StageConfig("attention", 16, 1, 2, position="learned"),
        ],
        max_seq_len=1 << 20,
        position_embedding=False,
    )


LONG_MODELS = {
    "megabyte3-rotary": three_stage("attention"),
    "hybrid3": three_stage("mamba"),
    "mambabyte": ModelConfig(stages=[StageConfig("mamba", 16, 1, 1, d_state=4)], max_seq_len=1 << 20, position_embedding=False),
}


def build(name: str) -> HierarchicalByteModel:
    torch.manual_seed(0)
    return HierarchicalByteModel(LONG_MODELS[name]).eval()


def text_bytes(n: int, seed: int = 0) -> torch.Tensor:
    """n bytes of word-like text (a seeded random choice of words): varied, with structure."""
    words = b"the of and a to in is was he for it with as his on be at by had this not but from".split()
    rng = np.random.default_rng(seed)
    out = bytearray()
    while len(out) < n:
        out += words[rng.integers(len(words))] + (b". " if rng.random() < 0.1 else b" ")
    return torch.tensor(list(out[:n]))


@pytest.mark.parametrize("name", LONG_MODELS)
def test_no_parameter_or_decode_state_grows_with_the_length(name):
    model = build(name)
    # the biggest tables are the byte embeddings (256 rows): no position table of the length
    assert max(e.num_embeddings for e in model.modules() if isinstance(e, torch.nn.Embedding)) <= 256
    assert not model.length_limited
    # the decode state for 1M bytes is small: stage 0 holds one cache row per 256-byte unit, the
    # inner stages one per unit of their parent, Mamba a fixed-size recurrent state
    state = model.allocate_decode_state(1, 1 << 20)
    held = sum(t.numel() for s in state.stage_states for layer in s for t in vars(layer).values() if torch.is_tensor(t))
    if name == "megabyte3-rotary":
        assert held == 2 * 4 * (4096 + 2) * 64 + 2 * 2 * 17 * 16 + 2 * 2 * 17 * 8 + 3  # keys + values (+ lengths)
    assert held < 3_000_000  # at most a few floats per unit of 256 bytes, never per byte


@pytest.mark.parametrize("name", LONG_MODELS)
def test_decoding_after_a_64k_prompt_equals_the_full_pass(name):
    # A prompt that ends 5 bytes before a 256-byte boundary: one parallel pass over the first
    # 65,280 bytes, 251 single steps, then 40 steps across two boundaries.
    model = build(name)
    tokens = text_bytes(LONG + 48)[None]
    with torch.no_grad():
        full = model(tokens)  # (1, 65584, 256)
    prompt = LONG - 5
    state = model.allocate_decode_state(1, LONG + 48)
    logits = model.prefill(state, tokens[:, :prompt])
    torch.testing.assert_close(logits, full[:, prompt], rtol=0, atol=5e-5)
    for t in range(prompt, prompt + 40):
        logits = model.decode_step(state, tokens[:, t])
        torch.testing.assert_close(logits, full[:, t + 1], rtol=0, atol=5e-5)


def test_greedy_sampling_continues_a_64k_prompt():
    # Greedy bytes from cached decoding are the argmax of the full pass over what was generated.
    model = build("megabyte3-rotary")
    prompt = text_bytes(LONG, seed=1)
    out = generate(model, prompt, 24, temperature=0)
    assert out.shape == (1, LONG + 24) and torch.equal(out[0, :LONG], prompt)
    with torch.no_grad():
        full = model(out)  # logits at t predict byte t from the bytes before it
    assert torch.equal(full[0, LONG:].argmax(-1), out[0, LONG:])


def test_sliding_evaluation_with_64k_windows():
    # 100,352 bytes, 64K windows advancing by 32K: window 1 scores bytes [0, 64K), window 2
    # [64K, 96K) after 32K of context, window 3 (cut short by the end) the last 2K, also after
    # 32K of context. Expected: each window's full logits, a plain fp64 cross-entropy.
    model = build("megabyte3-rotary")
    data = text_bytes(96 * 1024 + 2048, seed=2)
    score = score_bytes(model, data.numpy().astype(np.uint8), LONG, "sliding", batch_size=1)
    expected = 0.0
    with torch.no_grad():
        for start, first_scored in ((0, 0), (LONG // 2, LONG // 2), (LONG, LONG // 2)):
            window = data[start : start + LONG][None]
            nll = F.cross_entropy(model(window)[0].double(), window[0], reduction="none")
            expected += float(nll[first_scored:].sum()) / math.log(2)
    assert score.scored_bytes == len(data)
    assert score.bits == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["megabyte3-long", "hybrid3-long", "megabyte3-long-cpu", "hybrid3-long-cpu"])
def test_long_presets_carry_no_table_sized_by_the_window(name):
    config = ModelConfig.from_name(name)
    assert config.max_seq_len == 1 << 20 and not config.position_embedding
    assert [s.patch_size for s in config.stages] == [256, 16, 1]
    with torch.device("meta"):
        model = HierarchicalByteModel(config)
    assert max(e.num_embeddings for e in model.modules() if isinstance(e, torch.nn.Embedding)) <= 256
    assert all(s.checkpoint for s in config.stages)
    assert name in PRESETS
