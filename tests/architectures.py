"""Tiny configurations of the one model, one per architecture and patcher, shared by the model
and sampler tests."""

from multibyte.config import ModelConfig, StageConfig


def tiny(global_mixer: str, local_mixer: str | None, patch_size: int, max_seq_len: int = 64) -> ModelConfig:
    """Two stages (one when patch_size is 1): the MEGABYTE family."""
    if patch_size == 1:
        stages = [StageConfig(global_mixer, d_model=16, n_layers=2, n_heads=2, d_state=4)]
    else:
        stages = [
            StageConfig(global_mixer, 16 * patch_size, 2, 2, patcher="fixed", patch_size=patch_size, d_state=4),
            StageConfig(local_mixer or "attention", 24, 2 if local_mixer else 0, 2, d_state=4),
        ]
    return ModelConfig(stages=stages, max_seq_len=max_seq_len, position_embedding=global_mixer == "attention")


def entropy_model_dict() -> dict:
    """A tiny untrained byte model to place entropy boundaries (its weights come from the seed)."""
    # A large init spreads its entropies over bits, not millibits: a boundary decision then never
    # hinges on rounding between the parallel pass and one-step decoding.
    return ModelConfig(stages=[StageConfig("attention", 16, 1, 2)], max_seq_len=64, init_std=0.5).to_dict()


def dynamic(patcher: str, **overrides) -> ModelConfig:
    extra = {}
    if patcher == "entropy":
        extra = dict(entropy_architecture=entropy_model_dict(), entropy_threshold=5.5, entropy_mode="global")
    extra.update(overrides)
    return ModelConfig(
        stages=[
            StageConfig("attention", 48, 2, 2, patcher=patcher, patch_size=6, **extra),
            StageConfig("attention", 24, 2, 2),
        ],
        max_seq_len=64,
    )


ARCHITECTURES = {
    "megabyte": tiny("attention", "attention", patch_size=4),
    "megabyte-no-local": tiny("attention", None, patch_size=4),
    "vanilla": tiny("attention", None, patch_size=1),
    "mambabyte": tiny("mamba", None, patch_size=1),
    "hybrid": tiny("mamba", "attention", patch_size=4),
    "megabyte-3stage": ModelConfig(
        stages=[
            StageConfig("attention", 64, 2, 2, patcher="fixed", patch_size=8),
            StageConfig("attention", 32, 1, 2, patcher="fixed", patch_size=2),
            StageConfig("attention", 24, 1, 2),
        ],
        max_seq_len=64,
    ),
    # Lagged outermost units (StageConfig.lags): 16 units of 4 bytes in 64, a ring of 5 units.
    "megabyte-lags": ModelConfig(
        stages=[
            StageConfig("attention", 64, 2, 2, patcher="fixed", patch_size=4, lags=[2, 3, 5]),
            StageConfig("attention", 24, 2, 2),
        ],
        max_seq_len=64,
    ),
    "space": dynamic("space"),
    "entropy": dynamic("entropy"),
    "entropy-monotonic": dynamic("entropy", entropy_mode="monotonic", entropy_threshold=0.05),
    "space-attention-pooling": dynamic("space", pooling="attention"),
    "space-3stage-mamba": ModelConfig(
        stages=[
            StageConfig("mamba", 48, 2, 2, patcher="space", patch_size=8, d_state=4),
            StageConfig("attention", 24, 1, 2, patcher="fixed", patch_size=2),
            StageConfig("mamba", 16, 1, 2, d_state=4),
        ],
        max_seq_len=64,
        position_embedding=False,
    ),
    "space-hash": dynamic("space", pooling="concat"),
}
ARCHITECTURES["space-hash"].hash_buckets = 13
ARCHITECTURES["space-hash"].hash_ngram_sizes = [2, 3]

# Bytes the entropy patchers calibrate their threshold on (any fixed text works; English has
# both easy and hard positions once a model is trained, an untrained one just spreads its values).
CALIBRATION_TEXT = b"The quick brown fox jumps over the lazy dog; 0123456789. " * 4


def build(name: str, seed: int = 0):
    """The named tiny model, initialised from `seed`, in eval mode; entropy patchers calibrated
    to patches of 3 bytes on average, so that boundaries fall irregularly."""
    import torch

    from multibyte.model import HierarchicalByteModel
    from multibyte.patchers.entropy import EntropyPatcher

    torch.manual_seed(seed)
    model = HierarchicalByteModel(ARCHITECTURES[name]).eval()
    sample = torch.tensor([list(CALIBRATION_TEXT[:64])])
    for patcher in model.patchers:
        if isinstance(patcher, EntropyPatcher):
            patcher.target_patch_length = 3.0
            patcher.calibrate(sample)
    return model


def assert_staggered_decoding_matches(model, tokens, lengths, steps: int, atol: float, static: bool = False) -> None:
    """Rows prefilled with prompts of `lengths` bytes of `tokens` (B, L), then `steps` shared
    decode steps: every row's logits equal the full pass over `tokens` at its own positions."""
    import torch

    B, L = tokens.shape
    with torch.no_grad():
        full = model(tokens)  # (B, L, 256)
    state = model.allocate_decode_state(B, L, static=static)
    logits = model.prefill(state, tokens[:, : int(lengths.max())], lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(logits[b], full[b, n], rtol=0, atol=atol)
    position, rows = lengths.clone(), torch.arange(B)
    for _ in range(steps):
        logits = model.decode_step(state, tokens[rows, position])
        position += 1
        torch.testing.assert_close(logits, full[rows, position], rtol=0, atol=atol)
