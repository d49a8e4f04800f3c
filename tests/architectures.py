"""Tiny configurations of the one model, one per architecture, shared by the model and sampler tests."""

from multibyte.config import ModelConfig, StackConfig


def tiny(global_mixer: str, local_mixer: str | None, patch_size: int, max_seq_len: int = 64) -> ModelConfig:
    return ModelConfig(
        patch_size=patch_size,
        max_seq_len=max_seq_len,
        global_model=StackConfig(global_mixer, d_model=16 * patch_size, n_layers=2, n_heads=2, d_state=4),
        local_model=None if local_mixer is None else StackConfig(local_mixer, d_model=24, n_layers=2, n_heads=2),
        position_embedding=global_mixer == "attention",
    )


ARCHITECTURES = {
    "megabyte": tiny("attention", "attention", patch_size=4),
    "megabyte-no-local": tiny("attention", None, patch_size=4),
    "vanilla": tiny("attention", None, patch_size=1),
    "mambabyte": tiny("mamba", None, patch_size=1),
    "hybrid": tiny("mamba", "attention", patch_size=4),
}
