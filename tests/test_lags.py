"""StageConfig.lags: the outermost stage also reads the pooled units l back (for images, the
patches above). Causality, cache parity and staggered decoding of a lagged model are covered with
the other architectures (`megabyte-lags` in tests/architectures.py); here: what exactly a unit
reads, a worked example of the lag input, and the config's errors."""

import pytest
import torch

from multibyte.config import ModelConfig, StageConfig
from multibyte.model import HierarchicalByteModel


def no_mixing_model(lags: list[int]) -> HierarchicalByteModel:
    # A stage 0 with no blocks mixes nothing across units: unit k's bytes can then depend on
    # earlier units only through the previous unit and the lagged ones.
    torch.manual_seed(0)
    config = ModelConfig(
        stages=[
            StageConfig("attention", 32, 0, 2, patcher="fixed", patch_size=4, lags=lags),
            StageConfig("attention", 16, 1, 2),
        ],
        max_seq_len=48,
        position_embedding=False,
    )
    return HierarchicalByteModel(config).eval()


def changed_units(model: HierarchicalByteModel, tokens: torch.Tensor, unit: int) -> set[int]:
    """Units (of 4 bytes) whose logits change when the bytes of `unit` change."""
    other = tokens.clone()
    other[:, 4 * unit : 4 * unit + 4] = (other[:, 4 * unit : 4 * unit + 4] + 101) % 256
    with torch.no_grad():
        delta = (model(tokens) - model(other)).abs().amax(dim=(0, 2))  # (T,)
    return {t // 4 for t in range(tokens.shape[1]) if delta[t] > 1e-6}


def test_a_unit_reads_the_previous_unit_and_exactly_its_lags():
    model = no_mixing_model([3, 5])
    tokens = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    # Unit 2's bytes reach unit 2 itself (its later bytes), unit 3 (previous unit), 5 and 7 (lags).
    assert changed_units(model, tokens, 2) == {2, 3, 5, 7}
    # Without lags only the unit itself and the next one.
    assert changed_units(no_mixing_model(None), tokens, 2) == {2, 3}


def test_lag_input_worked_example():
    # Units 0..3 of width 1 with values 1, 2, 3, 4; lags [1, 3] and a projection that reads
    # 10 x (unit k - 1) + 1 x (unit k - 3). Position k gets 10·u[k-1] + u[k-3], zero outside:
    # k=0: 0; k=1: 10; k=2: 20; k=3: 30 + 1 = 31; k=4: 40 + 2 = 42.
    model = no_mixing_model([1, 3])
    stage = model.stages[0]
    stage.lag_proj = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        stage.lag_proj.weight.copy_(torch.tensor([[10.0, 1.0]]))
    units = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)
    assert stage.lagged(units, 5).flatten().tolist() == [0.0, 10.0, 20.0, 31.0, 42.0]
    assert stage.lagged(units, 4).flatten().tolist() == [0.0, 10.0, 20.0, 31.0]


OUTER = dict(mixer="attention", d_model=32, n_layers=1, n_heads=2, patcher="fixed", patch_size=4)
BYTES = dict(mixer="attention", d_model=16, n_layers=1, n_heads=2)


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{**OUTER, "lags": [0]}, BYTES], "stage lags must be distinct integers of at least 1"),
        ([{**OUTER, "lags": [2, 2]}, BYTES], "stage lags must be distinct integers of at least 1"),
        ([OUTER, {**BYTES, "lags": [2]}], r"stages\[1\]\.lags: only the outermost stage"),
        ([{**OUTER, "patcher": "space", "lags": [2]}, BYTES], r"stages\[0\]\.lags: only the outermost stage of a model with fixed patches"),
        ([{**BYTES, "lags": [2]}], r"stages\[0\]\.lags: only the outermost stage of a model with fixed patches"),
    ],
)
def test_bad_lags_fail_with_one_clear_error(stages, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(stages=stages, max_seq_len=48)


def test_compiled_generation_of_a_lagged_model_draws_the_eager_bytes():
    # 40 new bytes are 10 units of 4: the ring of 5 units wraps twice inside the compiled steps.
    from architectures import build
    from multibyte.sampling import generate

    model = build("megabyte-lags", seed=3)
    prompt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(4))
    eager = generate(model, prompt, 40, seed=5, top_k=100)
    assert torch.equal(generate(model, prompt, 40, seed=5, top_k=100, compile=True), eager)
