"""Typed model configuration: one hierarchical byte model, many named architectures.

A model is a list of stages, outermost first. Every stage but the last runs over *units* (patches)
of the byte stream that its patcher cuts; the last stage runs over the bytes of the innermost unit.

    MEGABYTE                 [attention over 8-byte patches, attention over bytes]
    MEGABYTE, 3 stages       [attention over 64-byte patches, attention over 8-byte patches, attention over bytes]
    SpaceByte-style          [attention over word patches (space patcher, at most 16 bytes), attention over bytes]
    BLT-style                [attention over entropy patches, attention over bytes]
    MambaByte                [mamba over bytes]
    vanilla byte transformer [attention over bytes]
    hybrid                   [mamba over 8-byte patches, attention over bytes]

`ModelConfig.from_name` returns the named presets at the end of this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Optional

BYTE_VOCAB_SIZE = 256  # one class per byte value; byte 0 is an ordinary byte, there is no pad token
VOCAB_SIZE = BYTE_VOCAB_SIZE  # kept for modules that only ever see bytes

MixerName = Literal["attention", "mamba"]
PatcherName = Literal["fixed", "space", "entropy"]
PoolingName = Literal["concat", "attention"]
PositionName = Literal["none", "learned", "rotary", "grid"]
MIXERS = ("attention", "mamba")
PATCHERS = ("fixed", "space", "entropy")
POOLINGS = ("concat", "attention")
POSITIONS = ("none", "learned", "rotary", "grid")
# StageConfig fields that change how a stage is computed, never its weights or its outputs: a
# checkpoint written under one value is the same model under another, so loading and resuming
# do not compare them (multibyte.checkpoints.config_differences).
COMPUTE_ONLY_STAGE_FIELDS = frozenset({"checkpoint"})


@dataclass
class StageConfig:
    """One stage: a stack of residual blocks over the units of one level of the hierarchy."""

    mixer: MixerName = "attention"
    """Sequence mixer inside each block: causal self-attention, or a Mamba selective state space."""
    d_model: int = 512
    """Width of the stage. With concat pooling it is split evenly among the bytes of a unit
    (MEGABYTE's global model: P × per-byte width), so it must be a multiple of the unit's byte slots."""
    n_layers: int = 4
    """Number of residual blocks (0: the stage only mixes its inputs through its final norm)."""
    n_heads: int = 8
    """Attention heads (attention mixer only); must divide d_model."""
    mlp_ratio: float = 4.0
    """Hidden width of the feed-forward layer as a multiple of d_model (attention blocks only;
    Mamba blocks have no feed-forward layer, as in MambaByte). 0 disables the feed-forward layer."""
    patcher: Optional[PatcherName] = None
    """How this stage's units are cut (every stage but the last; None for the last stage, whose
    units are single bytes): `fixed` every `patch_size` bytes (MEGABYTE), `space` after word
    boundaries (SpaceByte), `entropy` where a small byte model is unsure of the next byte (BLT)."""
    patch_size: int = 1
    """Bytes per unit for `fixed`; the most bytes a unit may hold for `space` and `entropy` (a
    longer run is cut). Must shrink from stage to stage inwards; the last stage's is 1."""
    pooling: PoolingName = "concat"
    """How the bytes of a finished unit become this stage's input vector for the next unit:
    `concat` (MEGABYTE: each byte embedded at d_model / slots channels, concatenated, empty slots
    zero) or `attention` (BLT-like: a learned query attends over the unit's byte embeddings)."""
    entropy_model: Optional[str] = None
    """`entropy` patcher: the byte model whose next-byte entropy places the boundaries, as a
    checkpoint file or an `export` directory. Read once when the model is built; its
    architecture is then kept in `entropy_architecture` and its weights in this model's state."""
    entropy_config: Optional[list[str]] = None
    """`entropy` patcher: the configs (shipped names or files, layered in order, as `--config`
    takes them) that train the entropy model, e.g. [text_entropy.yaml, cpu/text_entropy.yaml].
    When `entropy_model` does not exist yet, `fit` first trains it with `fit` from these configs
    on this run's data and exports it to `entropy_model` (multibyte/entropy_training.py)."""
    entropy_architecture: Optional[dict] = None
    """`entropy` patcher: the entropy model's ModelConfig as a dict (filled in from
    `entropy_model`; set by hand only to build an untrained model for tests)."""
    entropy_threshold: Optional[float] = None
    """`entropy` patcher: θ in bits. None: calibrated on training data at the start of `fit` to
    give `target_patch_length` bytes per patch on average, then stored here."""
    entropy_mode: Literal["global", "monotonic"] = "global"
    """`entropy` patcher: a unit starts at byte t where H(x_t) > θ (global) or where
    H(x_t) - H(x_{t-1}) > θ (monotonic)."""
    target_patch_length: float = 6.0
    """`entropy` patcher: average bytes per unit that threshold calibration aims for."""
    checkpoint: bool = False
    """Activation checkpointing: in training, keep only each block's input and recompute the
    block's activations during the backward pass (about one more forward pass of this stage's
    compute, for activation memory of one block instead of n_layers). Results are unchanged, so a
    checkpoint loads and resumes with either value (the given one applies)."""
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
    position: PositionName = "none"
    """Where this stage's units are, at the stage's own scale (index k: the k-th unit of this
    stage inside its parent unit; for the outermost stage, inside the sequence). `none`: nothing
    (Mamba knows order from its recurrence; MEGABYTE's inner stages know it from the parent's
    slices). `learned`: a learned vector per index added to the unit's input: a table of S_i rows
    for an inner stage, of max_seq_len / U_0 + 1 rows for the outermost. `rotary`: rotary
    embeddings (RoPE) of k on the queries and keys of every attention block (attention only; no
    table, no length limit). `grid` (outermost stage only): units tile a 2-D image of
    `grid` = [rows, cols] units; learned row and column vectors of unit k mod rows·cols are added.
    Independent of ModelConfig.position_embedding, which keeps its meaning."""
    grid: Optional[list[int]] = None
    """`grid` position: [rows, cols] of units in one image, in the order the units are read (e.g.
    64×64 RGB images in patch order with 12-byte patches (2×2 pixels): [32, 32]; in raster order
    with patch_size 12 (4 pixels): [64, 16]). Unit k sits at row (k mod rows·cols) // cols, column
    k mod cols; a second image in the same window starts again at row 0."""
    rotary_base: float = 10000.0
    """`rotary` position: base of the rotary frequencies (head pair j turns by k · base^(-2j/head_dim))."""
    lags: Optional[list[int]] = None
    """Outermost stage with fixed units only: besides the previous unit, unit k also reads the
    pooled units k - l for every l in `lags` (zeros before the sequence starts), concatenated and
    projected to d_model. For images these are the 2-D neighbours that the patch order puts far
    back: with 32 units per image row, [31, 32, 33] are the units above-right, above and above-left
    of the unit being predicted, which attention would otherwise have to learn to find. Each lag
    is at least 1 (the model stays causal)."""

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"stage mixer: unknown mixer {self.mixer!r} (one of: {', '.join(MIXERS)})")
        if self.patcher is not None and self.patcher not in PATCHERS:
            raise ValueError(f"stage patcher: unknown patcher {self.patcher!r} (one of: {', '.join(PATCHERS)})")
        if self.pooling not in POOLINGS:
            raise ValueError(f"stage pooling: unknown pooling {self.pooling!r} (one of: {', '.join(POOLINGS)})")
        for name in ("d_model", "patch_size", "d_state", "d_conv", "expand"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage {name} must be at least 1, got {getattr(self, name)}")
        if self.n_layers < 0:
            raise ValueError(f"stage n_layers must be at least 0, got {self.n_layers}")
        if self.mlp_ratio < 0:
            raise ValueError(f"stage mlp_ratio must be at least 0, got {self.mlp_ratio}")
        if self.mixer == "attention" and self.n_layers > 0:
            if self.n_heads < 1:
                raise ValueError(f"stage n_heads must be at least 1, got {self.n_heads}")
            if self.d_model % self.n_heads:
                raise ValueError(f"stage n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.dt_rank is not None and self.dt_rank < 1:
            raise ValueError(f"stage dt_rank must be at least 1 or null, got {self.dt_rank}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"stage needs 0 < dt_min <= dt_max, got {self.dt_min} and {self.dt_max}")
        if self.entropy_mode not in ("global", "monotonic"):
            raise ValueError(f"stage entropy_mode must be global or monotonic, got {self.entropy_mode!r}")
        if self.target_patch_length < 1:
            raise ValueError(f"stage target_patch_length must be at least 1, got {self.target_patch_length}")
        if self.position not in POSITIONS:
            raise ValueError(f"stage position: unknown position {self.position!r} (one of: {', '.join(POSITIONS)})")
        if self.position == "grid":
            if self.grid is None or len(self.grid) != 2 or any(int(n) != n or n < 1 for n in self.grid):
                raise ValueError(f"stage position: grid needs grid: [rows, cols], two positive integers, got {self.grid!r}")
            self.grid = [int(n) for n in self.grid]
        elif self.grid is not None:
            raise ValueError(f"stage grid={self.grid} is only read with position: grid (got position: {self.position})")
        if self.lags is not None:
            if not self.lags or any(int(lag) != lag or lag < 1 for lag in self.lags) or len(set(self.lags)) != len(self.lags):
                raise ValueError(f"stage lags must be distinct integers of at least 1 (units back), got {self.lags!r}")
            self.lags = [int(lag) for lag in self.lags]
        if self.position == "rotary":
            if self.mixer != "attention" or self.n_layers == 0:
                raise ValueError(
                    f"stage position: rotary turns the queries and keys of attention blocks; this stage has "
                    f"mixer={self.mixer} and n_layers={self.n_layers} (use learned, grid or none)"
                )
            if (self.d_model // self.n_heads) % 2:
                raise ValueError(f"stage position: rotary needs an even head size, got d_model / n_heads = {self.d_model // self.n_heads}")
            if self.rotary_base <= 1:
                raise ValueError(f"stage rotary_base must exceed 1, got {self.rotary_base}")

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)


_OLD_KEYS = {
    "patch_size": "stages[0].patch_size (with stages[0].patcher: fixed)",
    "global_model": "stages[0] (the outermost stage)",
    "local_model": "stages[-1] (the byte-level stage)",
}


@dataclass
class ModelConfig:
    """A hierarchical byte model (MEGABYTE, Yu et al. 2023, generalised to N stages and dynamic
    patches) whose parts are pluggable.

    Stage i reads one vector per unit: the pooled bytes of the previous unit (a learned pad for
    the first unit of its parent) plus, below the outermost stage, its slice of the parent
    stage's output. The last stage's outputs become next-byte logits.
    """

    stages: list[StageConfig] = field(
        default_factory=lambda: [
            StageConfig("attention", 512, 4, 8, patcher="fixed", patch_size=8),
            StageConfig("attention", 256, 2, 4),
        ]
    )
    """The stages, outermost first. Every stage but the last needs a patcher."""
    vocab_size: int = BYTE_VOCAB_SIZE
    """Symbols per position: 256 for bytes; a subword model uses its tokenizer's vocabulary."""
    max_seq_len: int = 8192
    """Longest sequence (in symbols) the model is built for; sizes the learned position tables
    (`position_embedding`, and stages[0].position: learned), the only parts that limit length."""
    position_embedding: bool = True
    """Add a learned absolute position embedding (a table of max_seq_len rows) to the outermost
    stage's byte embeddings (attention needs position information; Mamba is position-aware
    through its recurrence and runs without). For long inputs prefer per-stage positions
    (`StageConfig.position`: rotary, grid, learned) with this off."""
    hash_buckets: int = 0
    """BLT's hash n-gram embeddings: buckets per n-gram size (0: off). The n-grams ending at each
    byte are hashed into this many rows and their embeddings added to the outermost stage's byte
    embedding."""
    hash_ngram_sizes: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    """BLT's hash n-gram embeddings: the n-gram lengths."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches during training."""
    norm_eps: float = 1e-5
    """Epsilon of the RMSNorm layers."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of embeddings and linear layers."""
    patch_size: Optional[int] = None
    """Removed (two-stage layout): use `stages`. Setting it is an error that names the new keys."""
    global_model: Optional[Any] = None
    """Removed (two-stage layout): use `stages`. Setting it is an error that names the new keys."""
    local_model: Optional[Any] = None
    """Removed (two-stage layout): use `stages`. Setting it is an error that names the new keys."""

    def __post_init__(self) -> None:
        old = [name for name in _OLD_KEYS if getattr(self, name) is not None]
        if old:
            raise ValueError(
                "model architecture: " + ", ".join(old) + " belong to the old two-stage layout; use "
                + "; ".join(f"{name} -> {_OLD_KEYS[name]}" for name in old)
                + ". E.g. stages: [{mixer: attention, d_model: 512, n_layers: 4, patcher: fixed, "
                "patch_size: 8}, {mixer: attention, d_model: 256, n_layers: 2}]"
            )
        self.stages = [StageConfig(**s) if isinstance(s, dict) else s for s in self.stages]
        if not self.stages:
            raise ValueError("model architecture: stages must hold at least one stage")
        if self.vocab_size < 2:
            raise ValueError(f"model vocab_size must be at least 2, got {self.vocab_size}")
        if self.max_seq_len < 1:
            raise ValueError(f"model max_seq_len must be at least 1, got {self.max_seq_len}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model dropout must lie in [0, 1), got {self.dropout}")
        if self.hash_buckets < 0 or any(n < 1 for n in self.hash_ngram_sizes):
            raise ValueError("model hash_buckets must be >= 0 and hash_ngram_sizes >= 1")
        last = self.stages[-1]
        if last.patcher is not None or last.patch_size != 1:
            raise ValueError(
                f"stages[{len(self.stages) - 1}] is the byte-level stage: it takes no patcher and patch_size 1 "
                f"(got patcher={last.patcher!r}, patch_size={last.patch_size})"
            )
        for i, stage in enumerate(self.stages):
            if stage.lags and (i > 0 or stage.patcher != "fixed"):
                raise ValueError(
                    f"stages[{i}].lags: only the outermost stage of a model with fixed patches reads lagged units "
                    f"(this stage is stage {i} with patcher={stage.patcher!r})"
                )
        for i, stage in enumerate(self.stages[:-1]):
            if stage.patcher is None:
                raise ValueError(f"stages[{i}] runs over patches: it needs a patcher ({', '.join(PATCHERS)})")
            inner = self.stages[i + 1].patch_size
            if stage.patch_size <= inner:
                raise ValueError(
                    f"stages[{i}].patch_size={stage.patch_size} must exceed the next stage's patch_size={inner}"
                )
            if stage.patcher == "fixed" and self.stages[i + 1].patcher in ("fixed", None) and stage.patch_size % inner:
                raise ValueError(
                    f"stages[{i}].patch_size={stage.patch_size} must be a multiple of stages[{i + 1}].patch_size={inner}"
                )
            if stage.patcher == "entropy" and stage.entropy_model is None and stage.entropy_architecture is None:
                raise ValueError(
                    f"stages[{i}] uses the entropy patcher: name its byte model in entropy_model (a checkpoint or "
                    "export folder; with entropy_config, fit trains it there first)"
                )
        for i, stage in enumerate(self.stages[1:], start=1):
            if stage.position == "grid":
                raise ValueError(
                    f"stages[{i}].position: grid places the outermost stage's units in an image; an inner stage "
                    "knows its place from its parent (use learned: its slot inside the parent unit)"
                )
        for i, stage in enumerate(self.stages):
            slots = self.unit_slots(i)
            if stage.pooling == "concat" and stage.d_model % slots:
                raise ValueError(
                    f"stages[{i}].d_model={stage.d_model} must be a multiple of its {slots} byte slots per unit "
                    f"(concat pooling gives each byte d_model / {slots} channels)"
                )
            if i + 1 < len(self.stages) and stage.d_model % self.child_slots(i + 1):
                raise ValueError(
                    f"stages[{i}].d_model={stage.d_model} must be a multiple of {self.child_slots(i + 1)}, the units "
                    f"of stages[{i + 1}] in one of its units (its output is cut into one slice per unit)"
                )

    # -- the shape of the hierarchy ------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def is_fixed(self) -> bool:
        """Every boundary is fixed: units are reshapes of the byte stream."""
        return all(s.patcher in ("fixed", None) for s in self.stages)

    def child_slots(self, i: int) -> int:
        """S_i: the most units of stage i inside one unit of stage i-1 (i >= 1)."""
        parent, stage = self.stages[i - 1], self.stages[i]
        if parent.patcher == "fixed" and stage.patcher in ("fixed", None):
            return parent.patch_size // stage.patch_size
        if stage.patcher in ("space", "entropy"):
            return parent.patch_size  # a dynamic unit may hold a single byte
        return -(-parent.patch_size // stage.patch_size)  # fixed units inside a dynamic parent

    def unit_slots(self, i: int) -> int:
        """U_i: byte slots of one unit of stage i (1 for the byte-level stage)."""
        return math.prod(self.child_slots(j) for j in range(i + 1, self.num_stages))

    @property
    def length_limited(self) -> bool:
        """Whether a learned table sized by max_seq_len limits the sequence length: the byte
        position table (`position_embedding`) or the outermost stage's learned unit positions.
        Rotary, grid and no positions read any length."""
        return bool(self.position_embedding) or self.stages[0].position == "learned"

    @property
    def alignment(self) -> int:
        """Bytes per outermost unit when every boundary is fixed (windows should be a multiple)."""
        return self.stages[0].patch_size if self.is_fixed else 1

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return replace(PRESETS[name](), **overrides)

    def to_dict(self) -> dict:
        """Plain data (for YAML, checkpoints and `entropy_architecture`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _OLD_KEYS}
        out["stages"] = [{f.name: getattr(s, f.name) for f in fields(s)} for s in self.stages]
        out["hash_ngram_sizes"] = list(self.hash_ngram_sizes)
        return out


def stage(mixer: str, d_model: int, n_layers: int, n_heads: int = 4, **kw) -> StageConfig:
    return StageConfig(mixer, d_model, n_layers, n_heads, **kw)


def megabyte(patch_size, seq_len, g_dim, g_layers, g_heads, l_dim, l_layers, l_heads) -> ModelConfig:
    """Two attention stages over fixed patches of `patch_size` bytes."""
    return ModelConfig(
        stages=[
            stage("attention", g_dim, g_layers, g_heads, patcher="fixed", patch_size=patch_size),
            stage("attention", l_dim, l_layers, l_heads),
        ],
        max_seq_len=seq_len,
    )


def mambabyte(seq_len, d_model, n_layers) -> ModelConfig:
    """One Mamba stage over bytes."""
    return ModelConfig(stages=[stage("mamba", d_model, n_layers, 1)], max_seq_len=seq_len, position_embedding=False)


def vanilla(seq_len, d_model, n_layers, n_heads) -> ModelConfig:
    """One attention stage over bytes."""
    return ModelConfig(stages=[stage("attention", d_model, n_layers, n_heads)], max_seq_len=seq_len)


def hybrid(patch_size, seq_len, g_dim, g_layers, l_dim, l_layers, l_heads) -> ModelConfig:
    """MEGABYTE's layout with a Mamba stage over patches and an attention stage over bytes."""
    return ModelConfig(
        stages=[
            stage("mamba", g_dim, g_layers, 1, patcher="fixed", patch_size=patch_size),
            stage("attention", l_dim, l_layers, l_heads),
        ],
        max_seq_len=seq_len,
        position_embedding=False,
    )


def long3(outer: str, o_dim, o_layers, o_heads, m_dim, m_layers, m_heads, b_dim, b_layers, b_heads) -> ModelConfig:
    """Three stages for million-byte inputs: `outer` (attention or Mamba, no positions) over
    256-byte units, attention over 16-byte units, attention over bytes (learned slot positions),
    every stage with activation checkpointing."""
    return ModelConfig(
        stages=[
            stage(outer, o_dim, o_layers, o_heads, patcher="fixed", patch_size=256, checkpoint=True),
            stage("attention", m_dim, m_layers, m_heads, patcher="fixed", patch_size=16, position="learned", checkpoint=True),
            stage("attention", b_dim, b_layers, b_heads, position="learned", checkpoint=True),
        ],
        max_seq_len=1 << 20,
        position_embedding=False,
    )


# Named architectures. GPU-sized ones follow the papers' settings (scaled where noted in the
# configs/*.yaml comments); "-cpu" ones are small enough to train on a 2-core CPU in minutes.
PRESETS = {
    "megabyte-text": lambda: megabyte(8, 8192, 1024, 16, 16, 512, 8, 8),
    "megabyte-image64": lambda: megabyte(12, 12288, 1536, 16, 16, 512, 8, 8),
    "megabyte-audio": lambda: megabyte(32, 8192, 2048, 16, 16, 512, 8, 8),
    "megabyte-text-cpu": lambda: megabyte(8, 1024, 256, 4, 4, 128, 2, 4),
    "megabyte-image64-cpu": lambda: megabyte(12, 12288, 384, 4, 4, 128, 2, 4),
    "megabyte-audio-cpu": lambda: megabyte(32, 4096, 512, 4, 4, 128, 2, 4),
    "mambabyte-353m": lambda: mambabyte(8192, 1024, 53),
    "mambabyte-972m": lambda: mambabyte(8192, 1792, 48),
    "mambabyte-cpu": lambda: mambabyte(1024, 128, 4),
    "vanilla-byte-transformer-cpu": lambda: vanilla(1024, 256, 4, 4),
    # Two Mamba blocks (~6 d² parameters each, no feed-forward) stand in for each attention block
    # (~12 d² with its feed-forward), so the patch stages match megabyte-text(-cpu) in size.
    "hybrid-text": lambda: hybrid(8, 8192, 1024, 32, 512, 8, 8),
    "hybrid-text-cpu": lambda: hybrid(8, 1024, 256, 8, 128, 2, 4),
    "megabyte3-text-cpu": lambda: ModelConfig(
        stages=[
            stage("attention", 256, 4, 4, patcher="fixed", patch_size=64),
            stage("attention", 128, 2, 4, patcher="fixed", patch_size=8),
            stage("attention", 128, 2, 4),
        ],
        max_seq_len=8192,
    ),
    # Million-byte inputs (configs/text_long*.yaml): 256-byte units, 16-byte units, bytes; no
    # position table sized by the window (16-row slot tables inside, none outside).
    "megabyte3-long": lambda: long3("attention", 2048, 16, 16, 1024, 8, 8, 512, 8, 8),
    "hybrid3-long": lambda: long3("mamba", 2048, 32, 8, 1024, 8, 8, 512, 8, 8),
    "megabyte3-long-cpu": lambda: long3("attention", 512, 2, 8, 256, 2, 4, 128, 2, 4),
    "hybrid3-long-cpu": lambda: long3("mamba", 512, 4, 8, 256, 2, 4, 128, 2, 4),
    "spacebyte-text-cpu": lambda: ModelConfig(
        stages=[
            stage("attention", 256, 4, 4, patcher="space", patch_size=16),
            stage("attention", 128, 2, 4),
        ],
        max_seq_len=1024,
    ),
}
