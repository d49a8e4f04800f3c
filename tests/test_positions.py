"""Per-stage positions (`StageConfig.position`: learned, rotary, grid) and the old byte table
(`ModelConfig.position_embedding`): causality, cached decoding equals the full pass for every
kind, the packed byte stage equals the padded grid, worked examples, and clear config errors."""

import pytest
import torch

from architectures import assert_staggered_decoding_matches
from multibyte.config import ModelConfig, StageConfig
from multibyte.mixers.rotary import apply_rotary, segment_positions
from multibyte.model import HierarchicalByteModel

TEXT = b"Hi, there!  A test: 42 bytes, two   spaces.\nNew line; ok." * 3


def rows(*offsets: int, length: int = 40) -> torch.Tensor:
    return torch.tensor([list(TEXT[o : o + length]) for o in offsets])


def megabyte(outer: str, inner: str, **outer_kw) -> ModelConfig:
    return ModelConfig(
        stages=[
            StageConfig("attention", 64, 2, 2, patcher="fixed", patch_size=4, position=outer, **outer_kw),
            StageConfig("attention", 24, 2, 2, position=inner),
        ],
        max_seq_len=64,
        position_embedding=False,
    )


POSITIONED = {
    "rotary-learned": megabyte("rotary", "learned"),
    "learned-rotary": megabyte("learned", "rotary"),
    # 16 units of 4 bytes in 64 bytes: a 2 x 3 grid wraps after 6 units
    "grid-learned": megabyte("grid", "learned", grid=[2, 3]),
    "grid-none": megabyte("grid", "none", grid=[4, 4]),
    "rotary-3stage": ModelConfig(
        stages=[
            StageConfig("attention", 64, 2, 2, patcher="fixed", patch_size=8, position="rotary"),
            StageConfig("attention", 32, 1, 2, patcher="fixed", patch_size=2, position="learned"),
            StageConfig("attention", 24, 1, 2, position="rotary"),
        ],
        max_seq_len=64,
        position_embedding=False,
    ),
    "vanilla-rotary": ModelConfig(stages=[StageConfig("attention", 16, 2, 2, position="rotary")], max_seq_len=64, position_embedding=False),
    "hybrid-learned": ModelConfig(
        stages=[
            StageConfig("mamba", 64, 2, 1, patcher="fixed", patch_size=4, d_state=4),
            StageConfig("attention", 24, 2, 2, position="learned"),
        ],
        max_seq_len=64,
        position_embedding=False,
    ),
    # dynamic units: the byte stage runs packed, its positions are slots inside each word
    "space-rotary": ModelConfig(
        stages=[
            StageConfig("attention", 48, 2, 2, patcher="space", patch_size=6, position="rotary"),
            StageConfig("attention", 24, 2, 2, position="rotary"),
        ],
        max_seq_len=64,
        position_embedding=False,
    ),
    "space-learned": ModelConfig(
        stages=[
            StageConfig("attention", 48, 2, 2, patcher="space", patch_size=6, position="learned"),
            StageConfig("attention", 24, 2, 2, position="learned"),
        ],
        max_seq_len=64,
        position_embedding=False,
    ),
    # the old byte table and per-stage positions together
    "table-and-grid": ModelConfig(
        stages=[
            StageConfig("attention", 64, 2, 2, patcher="fixed", patch_size=4, position="grid", grid=[4, 4]),
            StageConfig("attention", 24, 2, 2, position="learned"),
        ],
        max_seq_len=64,
        position_embedding=True,
    ),
}


def build(name: str, seed: int = 0) -> HierarchicalByteModel:
    torch.manual_seed(seed)
    model = HierarchicalByteModel(POSITIONED[name]).eval()
    # Untrained position vectors are as small as every other weight (init_std); make them count,
    # so a test fails if any path drops or misplaces them.
    with torch.no_grad():
        for stage in model.stages:
            for table in (stage.unit_position, stage.grid_rows, stage.grid_cols):
                if table is not None:
                    table.weight.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("name", POSITIONED)
def test_no_logit_sees_its_own_or_later_bytes(name):
    model = build(name)
    tokens = rows(0, 7, length=13)
    with torch.no_grad():
        reference = model(tokens)
        for t in range(tokens.shape[1]):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 97) % 256
            logits = model(changed)
            torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1], rtol=0, atol=1e-6)
            if t + 1 < tokens.shape[1]:
                assert (logits[:, t + 1 :] - reference[:, t + 1 :]).abs().max() > 1e-4, f"byte {t} unused"


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
@pytest.mark.parametrize("name", POSITIONED)
def test_prefill_and_decode_steps_equal_the_full_pass(name, static):
    # Rows with prompts of 0, 9 and 17 bytes (different offsets inside their units, and past a
    # grid's wrap), then 40 shared steps to the end of the window: each row's logits equal the
    # full pass at its own positions.
    assert_staggered_decoding_matches(build(name), rows(0, 5, 20, length=64), torch.tensor([0, 9, 17]), 40, 5e-5, static)


@pytest.mark.parametrize("name", ["rotary-learned", "grid-learned", "vanilla-rotary"])
def test_uniform_prompt_prefills_in_one_pass(name):
    # All rows the same length: the outermost stage takes the prompt in one parallel pass.
    model = build(name)
    tokens = rows(0, 3, length=64)
    with torch.no_grad():
        full = model(tokens)
    state = model.allocate_decode_state(2, 64)
    logits = model.prefill(state, tokens[:, :32])
    torch.testing.assert_close(logits, full[:, 32], rtol=0, atol=5e-5)
    for t in range(32, 63):
        logits = model.decode_step(state, tokens[:, t])
        torch.testing.assert_close(logits, full[:, t + 1], rtol=0, atol=5e-5)


@pytest.mark.parametrize("name", ["space-rotary", "space-learned"])
def test_packed_byte_stage_equals_the_padded_grid(name, monkeypatch):
    model = build(name)
    tokens = rows(0, 13, length=37)
    with torch.no_grad():
        packed = model(tokens)
        monkeypatch.setattr(type(model), "_packs_bytes", lambda self, layout: False)
        padded = model(tokens)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["rotary-learned", "learned-rotary", "grid-learned", "space-rotary", "hybrid-learned"])
def test_positions_change_the_logits(name):
    # The same weights without the position information must predict differently: the positions
    # are wired into the pass (parity with decoding is tested above).
    model = build(name)
    tokens = rows(0, length=48)
    with torch.no_grad():
        with_positions = model(tokens)
        for stage in model.stages:
            for table in (stage.unit_position, stage.grid_rows, stage.grid_cols):
                if table is not None:
                    table.weight.zero_()
            for block in stage.stack.blocks:
                if getattr(block.mixer, "rotary_base", None) is not None:
                    block.mixer.rotary_base = None
        without = model(tokens)
    assert (with_positions - without).abs().max() > 1e-3


def test_grid_places_units_by_row_and_column_and_wraps():
    model = build("grid-learned")  # grid [2, 3]
    stage = model.stages[0]
    index = torch.arange(8)
    expected_rows = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0])  # unit 6 starts a second image
    expected_cols = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    expected = stage.grid_rows.weight[expected_rows] + stage.grid_cols.weight[expected_cols]
    torch.testing.assert_close(stage.position(index), expected, rtol=0, atol=0)
    assert stage.grid_rows.num_embeddings == 2 and stage.grid_cols.num_embeddings == 3


def test_rotary_scores_depend_on_the_offset_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)

    def score(p_q: int, p_k: int) -> torch.Tensor:
        rq = apply_rotary(q, torch.tensor([p_q]), 10000.0)
        rk = apply_rotary(k, torch.tensor([p_k]), 10000.0)
        return (rq * rk).sum(-1)

    torch.testing.assert_close(score(7, 3), score(1007, 1003), rtol=0, atol=1e-4)
    assert (score(7, 3) - score(7, 5)).abs().max() > 1e-3
    # a rotation: lengths are kept
    r = apply_rotary(q, torch.tensor([12345]), 10000.0)
    torch.testing.assert_close(r.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_segment_positions_worked_example():
    segments = torch.tensor([[1, 1, 1, 2, 3, 3, 4, 4, 4, 4]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 0, 1, 0, 1, 2, 3]]


def test_table_free_positions_read_past_max_seq_len():
    # Only learned tables sized by max_seq_len limit the length: rotary and grid models run on
    # (and decode) sequences longer than max_seq_len; a learned outermost table refuses clearly.
    for name in ("rotary-learned", "grid-learned", "rotary-3stage"):
        model = build(name)
        assert not model.length_limited
        tokens = torch.tensor([list(TEXT[:160])])
        with torch.no_grad():
            full = model(tokens)
        state = model.allocate_decode_state(1, 160)
        logits = model.prefill(state, tokens[:, :150])
        torch.testing.assert_close(logits, full[:, 150], rtol=0, atol=5e-5)
    model = build("learned-rotary")
    assert model.length_limited and model.stages[0].unit_position.num_embeddings == 64 // 4 + 1
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len=65 exceeds the model's max_seq_len=64"):
        model.allocate_decode_state(1, 65)


def test_old_position_embedding_keeps_its_meaning():
    # A config written before per-stage positions (no `position` keys): the same parameters as
    # before, one learned table of max_seq_len byte positions, no per-stage tables, no rotary.
    old = {
        "stages": [
            {"mixer": "attention", "d_model": 64, "n_layers": 1, "n_heads": 2, "patcher": "fixed", "patch_size": 4},
            {"mixer": "attention", "d_model": 24, "n_layers": 1, "n_heads": 2},
        ],
        "max_seq_len": 32,
        "position_embedding": True,
    }
    model = HierarchicalByteModel(ModelConfig(**old))
    assert model.position_embedding.weight.shape == (32, 16)
    assert not any("unit_position" in n or "grid_" in n for n, _ in model.named_parameters())
    assert all(getattr(b.mixer, "rotary_base", None) is None for s in model.stages for b in s.stack.blocks)
    assert [s.position for s in model.config.stages] == ["none", "none"]
    # ...and the round trip through to_dict keeps the new fields' values
    assert ModelConfig(**ModelConfig(**old).to_dict()) == ModelConfig(**old)


@pytest.mark.parametrize(
    "stages, message",
    [
        ([dict(mixer="mamba", position="rotary")], "rotary turns the queries and keys of attention blocks"),
        ([dict(position="rotary", n_layers=0)], "rotary turns the queries and keys"),
        ([dict(position="grid")], r"grid needs grid: \[rows, cols\]"),
        ([dict(position="grid", grid=[4, 0])], r"grid needs grid: \[rows, cols\]"),
        ([dict(position="none", grid=[4, 4])], "only read with position: grid"),
        ([dict(position="absolute")], "unknown position 'absolute'"),
        ([dict(position="rotary", d_model=12, n_heads=4)], "even head size"),
        (
            [dict(patcher="fixed", patch_size=4, d_model=64), dict(d_model=24, position="grid", grid=[2, 2])],
            r"stages\[1\].position: grid places the outermost stage's units",
        ),
    ],
)
def test_bad_position_settings_fail_with_one_clear_error(stages, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(stages=[StageConfig(**{"d_model": 16, "n_heads": 2, **s}) for s in stages])
