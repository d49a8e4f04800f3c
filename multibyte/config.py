"""Typed model configuration: one hierarchical byte model, many named architectures.

MEGABYTE, MambaByte, the hybrid (Mamba global + attention local) and the vanilla byte transformer
are all values of `ModelConfig`; `ModelConfig.from_name` returns the named presets below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Optional

VOCAB_SIZE = 256  # one class per byte value; byte 0 is an ordinary byte, there is no pad token

MixerName = Literal["attention", "mamba"]


@dataclass
class StackConfig:
    """One stack of residual blocks (the global model over patches, or the local model over bytes)."""

    mixer: MixerName = "attention"
    """Sequence mixer inside each block: causal self-attention, or a Mamba selective state space."""
    d_model: int = 512
    """Width of the stack. For the global stack this is P × (per-byte global embedding width)."""
    n_layers: int = 4
    """Number of residual blocks."""
    n_heads: int = 8
    """Attention heads (attention mixer only); must divide d_model."""
    mlp_ratio: float = 4.0
    """Hidden width of the feed-forward layer as a multiple of d_model (attention blocks only;
    Mamba blocks have no feed-forward layer, as in MambaByte). 0 disables the feed-forward layer."""
    d_state: int = 16
    """Mamba: state size N per channel."""
    d_conv: int = 4
    """Mamba: width of the causal depthwise convolution."""
    expand: int = 2
    """Mamba: inner width = expand × d_model."""
    dt_rank: Optional[int] = None
    """Mamba: rank of the Δ projection; None means ceil(d_model / 16) as in the paper."""
    dt_min: float = 0.001
    """Mamba: smallest initial step size Δ."""
    dt_max: float = 0.1
    """Mamba: largest initial step size Δ."""

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.n_layers < 0:
            raise ValueError(f"StackConfig: d_model must be > 0 and n_layers >= 0, got {self}")
        if self.mixer == "attention" and self.d_model % self.n_heads != 0:
            raise ValueError(
                f"StackConfig: n_heads={self.n_heads} must divide d_model={self.d_model}"
            )
        if self.mixer not in ("attention", "mamba"):
            raise ValueError(f"StackConfig: unknown mixer {self.mixer!r} (attention | mamba)")

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)


@dataclass
class ModelConfig:
    """A hierarchical byte model (MEGABYTE, Yu et al. 2023) whose parts are pluggable.

    Bytes are grouped into patches of `patch_size`. The global stack reads one vector per patch
    (the concatenated global embeddings of the previous patch's bytes) and the local stack predicts
    the bytes inside each patch. With `patch_size=1` and `local_model=None` the model is a plain byte
    language model (vanilla transformer, or MambaByte with `global_model.mixer="mamba"`).
    """

    patch_size: int = 8
    """P, bytes per patch. Modality-aware defaults in the shipped configs: text 8, image 12, audio 32."""
    max_seq_len: int = 8192
    """Longest sequence (in bytes) the model is built for; sizes the learned position table."""
    global_model: StackConfig = field(default_factory=lambda: StackConfig(d_model=512, n_layers=4, n_heads=8))
    """The global model over patches. global_model.d_model must be a multiple of patch_size."""
    local_model: Optional[StackConfig] = field(
        default_factory=lambda: StackConfig(d_model=256, n_layers=2, n_heads=4)
    )
    """The local model over the bytes of one patch; None means no local model (the global output
    at each byte position predicts that byte directly)."""
    position_embedding: bool = True
    """Add a learned absolute byte-position embedding to the global input (attention needs it;
    Mamba is position-aware through its recurrence and usually runs without)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches during training."""
    norm_eps: float = 1e-5
    """Epsilon of the RMSNorm layers."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of embeddings and linear layers."""

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ValueError(f"ModelConfig: patch_size must be >= 1, got {self.patch_size}")
        if self.global_model.d_model % self.patch_size != 0:
            raise ValueError(
                f"ModelConfig: global_model.d_model={self.global_model.d_model} must be a multiple of "
                f"patch_size={self.patch_size} (each byte gets d_model/patch_size global channels)"
            )
        if self.max_seq_len % self.patch_size != 0:
            raise ValueError(
                f"ModelConfig: max_seq_len={self.max_seq_len} must be a multiple of "
                f"patch_size={self.patch_size}"
            )
        if self.local_model is not None and self.local_model.n_layers == 0:
            self.local_model = None

    @property
    def global_byte_dim(self) -> int:
        """D_G in the paper: per-byte width of the global embedding (global d_model / P)."""
        return self.global_model.d_model // self.patch_size

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return replace(PRESETS[name](), **overrides)


def _megabyte(patch_size, seq_len, g_dim, g_layers, g_heads, l_dim, l_layers, l_heads) -> ModelConfig:
    return ModelConfig(
        patch_size=patch_size,
        max_seq_len=seq_len,
        global_model=StackConfig("attention", g_dim, g_layers, g_heads),
        local_model=StackConfig("attention", l_dim, l_layers, l_heads),
    )


def _mambabyte(seq_len, d_model, n_layers) -> ModelConfig:
    return ModelConfig(
        patch_size=1,
        max_seq_len=seq_len,
        global_model=StackConfig("mamba", d_model, n_layers, n_heads=1, expand=2, d_state=16, d_conv=4),
        local_model=None,
        position_embedding=False,
    )


def _vanilla(seq_len, d_model, n_layers, n_heads) -> ModelConfig:
    return ModelConfig(
        patch_size=1,
        max_seq_len=seq_len,
        global_model=StackConfig("attention", d_model, n_layers, n_heads),
        local_model=None,
    )


# Named architectures. GPU-sized ones follow the papers' settings (scaled where noted in the
# configs/*.yaml comments); "-cpu" ones are small enough to train on a 2-core CPU in minutes.
PRESETS = {
    "megabyte-text": lambda: _megabyte(8, 8192, 1024, 16, 16, 512, 8, 8),
    "megabyte-image64": lambda: _megabyte(12, 12288, 1536, 16, 16, 512, 8, 8),
    "megabyte-audio": lambda: _megabyte(32, 8192, 2048, 16, 16, 512, 8, 8),
    "megabyte-text-cpu": lambda: _megabyte(8, 1024, 256, 4, 4, 128, 2, 4),
    "megabyte-image64-cpu": lambda: _megabyte(12, 12288, 384, 4, 4, 128, 2, 4),
    "megabyte-audio-cpu": lambda: _megabyte(32, 4096, 512, 4, 4, 128, 2, 4),
    "mambabyte-353m": lambda: _mambabyte(8192, 1024, 53),
    "mambabyte-972m": lambda: _mambabyte(8192, 1792, 48),
    "mambabyte-cpu": lambda: _mambabyte(1024, 128, 4),
    "vanilla-byte-transformer-cpu": lambda: _vanilla(1024, 256, 4, 4),
    # The hybrid: MEGABYTE's layout with a Mamba global model over patches and an attention local
    # model within each patch. Two Mamba blocks (~6 d² parameters each, no feed-forward) stand in
    # for each global attention block (~12 d² with its feed-forward), so the global stacks match
    # megabyte-text / megabyte-text-cpu in size; Mamba needs no position table.
    "hybrid-text": lambda: ModelConfig(
        patch_size=8,
        max_seq_len=8192,
        global_model=StackConfig("mamba", 1024, 32, d_state=16, d_conv=4, expand=2),
        local_model=StackConfig("attention", 512, 8, 8),
        position_embedding=False,
    ),
    "hybrid-text-cpu": lambda: ModelConfig(
        patch_size=8,
        max_seq_len=1024,
        global_model=StackConfig("mamba", 256, 8, d_state=16, d_conv=4, expand=2),
        local_model=StackConfig("attention", 128, 2, 4),
        position_embedding=False,
    ),
}
