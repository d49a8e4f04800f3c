"""The one hierarchical byte model behind MEGABYTE, MambaByte, SpaceByte/BLT-style models and the
vanilla byte transformer. Read top-down: a residual `Block`, a `Stack` of blocks, a `Stage` (a
stack plus how its inputs are made), and `HierarchicalByteModel`.

The stages, outermost first, run over nested units (patches) of the byte stream; patchers
(multibyte/patchers/) decide where units start. MEGABYTE (Yu et al. 2023, section 2) is the
two-stage case with fixed units of P bytes. Every unit of stage i gets one input vector:

    pooled(previous unit of stage i in the same parent)   learned pad for the parent's first unit
  + slice of the parent stage's output for this unit      stages below the outermost only
  + projected pooled units k - l, l in lags               outermost stage, `StageConfig.lags` only

The padded grid. Units are laid out in a (B, K, S_1, ..., S_{N-1}) grid of byte slots: K
outermost units, S_i slots for the units of stage i inside one unit of stage i-1; S_{N-1} counts
bytes. A unit of stage i is a contiguous block of U_i = S_{i+1}···S_{N-1} byte slots. With fixed
patches the grid IS the byte stream (right-padded to a multiple of U_0), so everything below is
reshapes; dynamic patches scatter bytes into the grid (empty slots are zero and masked).

    tokens (B, T)
    grid of bytes                                       (B, K·U_0)
    stage i: embed each byte slot                       (B, K·U_0, w_i)          w_i = D_i / U_i (concat)
             pool each unit's slots                     (B, K, S_1..S_i, D_i)
             shift right by one unit within the parent  (B, K, S_1..S_i, D_i)    unit j sees units < j
             + parent output cut into S_i slices         (B, K, S_1..S_i, D_i)    projected D_{i-1}/S_i -> D_i
             stack over the S_i axis                    (B·K·S_1..S_{i-1}, S_i, D_i)
    last stage's output back to byte order, head        (B, T, vocab)

Decoding is the model's own: `allocate_decode_state`, `prefill` (a prompt in, next-byte logits
out) and `decode_step` (one byte in, next logits out). Rows of one batch may sit at different
positions inside their units. See `DecodeState` for how one byte is decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from multibyte.chunked_loss import head_nll
from multibyte.config import ModelConfig, StageConfig
from multibyte.kernels import bind_stack_step
from multibyte.kernels.decode_run import NativeDecode
from multibyte.mixers import build_mixer
from multibyte.mixers.attention import KVCache
from multibyte.mixers.rotary import segment_positions
from multibyte.patchers import build_patcher, unit_starts
from multibyte.weight_formats import matrix_format

HASH_MODULUS = 2_147_483_647  # 2^31 - 1: rolling n-gram hashes stay far from int64 overflow


class _RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * w in fp32, returned in `dtype`, with a hand-written backward: autograd of
    the composite (pow, mean, add, rsqrt, mul, mul) keeps and rereads an fp32 tensor of the
    input's size per op; this keeps x itself and one (..., 1) rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, dtype: torch.dtype):
        xf = x.float()  # (..., D)
        rstd = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).mul_(weight.float()).to(dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        xf, grad_y = x.float(), grad_y.float()  # (..., D)
        grad_w = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * xf).mul_(rstd).flatten(0, -2).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # dx = rstd·g - x·rstd³·mean(g·x) with g = dL/dx_hat = grad_y·w: x_hat never built
            g = grad_y * weight.float()
            coef = torch.linalg.vecdot(g, xf).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])  # (..., 1)
            grad_x = g.mul_(rstd).addcmul_(xf, coef, value=-1).to(x.dtype)
        return grad_x, grad_w, None, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and results) whose training forward runs `_RMSNormFunction`
    and, under autocast, returns the autocast dtype: every consumer is a linear layer that would
    cast it there anyway, so autocast's separate copy of each (B, L, D) input disappears."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)  # evaluation and decoding: the stock kernel, no autograd node
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return _RMSNormFunction.apply(x, self.weight, eps, dtype)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x), approximate="tanh")))


class Block(nn.Module):
    """x + mixer(norm(x)), then x + feed_forward(norm(x)) when the stage has one."""

    def __init__(self, stage: StageConfig, dropout: float, norm_eps: float) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(stage.d_model, eps=norm_eps)
        self.mixer = build_mixer(stage, dropout)
        self.mixer_dropout = nn.Dropout(dropout)
        # MambaByte's blocks are mixer-only; attention blocks carry the usual feed-forward layer.
        hidden = int(stage.mlp_ratio * stage.d_model) if stage.mixer == "attention" else 0
        self.ff_norm = RMSNorm(stage.d_model, eps=norm_eps) if hidden else None
        self.feed_forward = FeedForward(stage.d_model, hidden, dropout) if hidden else None

    def forward(self, x: torch.Tensor, state=None, run: Optional[torch.Tensor] = None, **segment_kw) -> torch.Tensor:
        if state is None:
            x = x + self.mixer_dropout(self.mixer(self.mixer_norm(x), **segment_kw))
        else:
            x = x + self.mixer_dropout(self.mixer(self.mixer_norm(x), state, run))
        if self.feed_forward is not None:
            x = x + self.feed_forward(self.ff_norm(x))
        return x


class StackStates(list):
    """A stack's decoding states, one per block (KVCache or MambaState), and `native`: its
    one-position step as one native call (`multibyte.kernels.NativeStackStep`), bound by
    `HierarchicalByteModel.allocate_decode_state(native=True)` where a kernel can run it; None:
    every step runs the blocks in PyTorch."""

    native: Optional[Any] = None


class Stack(nn.Module):
    """n_layers blocks and a final norm: (B, L, D) -> (B, L, D), causal along L."""

    def __init__(self, stage: StageConfig, dropout: float, norm_eps: float) -> None:
        super().__init__()
        self.config = stage
        self.blocks = nn.ModuleList(Block(stage, dropout, norm_eps) for _ in range(stage.n_layers))
        self.final_norm = RMSNorm(stage.d_model, eps=norm_eps)

    def allocate_states(self, batch_size: int, max_len: int, device, dtype) -> StackStates:
        """One decoding state per block (KV cache or recurrent state), allocated once."""
        return StackStates(b.mixer.allocate_state(batch_size, max_len, device, dtype) for b in self.blocks)

    def forward(
        self,
        x: torch.Tensor,
        states: Optional[list] = None,
        run: Optional[torch.Tensor] = None,
        segments: Optional[torch.Tensor] = None,
        window: int = 0,
    ) -> torch.Tensor:
        """`segments` (B, L) nondecreasing ids, `window` >= every segment's length: attention
        sees only earlier positions of the same segment (the packed byte stage)."""
        native = getattr(states, "native", None)
        if native is not None and run is None and x.shape[1] == 1:
            y = native(x)  # the same step as the blocks below, in one native call (None: can't)
            if y is not None:
                return y
        kw = {} if segments is None else {"segments": segments, "window": window}
        # StageConfig.checkpoint: a training forward keeps each block's input only; the block runs
        # again in backward (with the same dropout masks: the RNG state is replayed).
        recompute = self.config.checkpoint and states is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, None, run, use_reentrant=False, **kw)
            else:
                x = block(x, None if states is None else states[i], run, **kw)
        return self.final_norm(x)


class AttentionPooling(nn.Module):
    """BLT-like pooling: a learned query attends over the byte embeddings of one unit.

    (N, U, D) byte vectors with (N, U) present mask -> (N, D)."""

    def __init__(self, d_model: int, slots: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads if d_model % max(1, n_heads) == 0 else 1
        self.query = nn.Parameter(torch.zeros(d_model))
        self.slot_embedding = nn.Parameter(torch.zeros(slots, d_model))  # where in the unit a byte sits
        self.key_value = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, e: torch.Tensor, present: Optional[torch.Tensor]) -> torch.Tensor:
        N, U, D = e.shape
        H = self.n_heads
        k, v = self.key_value(e + self.slot_embedding.to(e.dtype)).view(N, U, 2, H, D // H).permute(2, 0, 3, 1, 4)
        q = self.query.to(e.dtype).view(1, H, 1, D // H).expand(N, H, 1, D // H)
        mask = None
        if present is not None:
            mask = present.clone()
            mask[:, 0] = True  # an empty unit (grid padding) attends to its first slot: finite, unused
            mask = mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, H, 1, D/H)
        return self.out_proj(y.reshape(N, D))


class Stage(nn.Module):
    """Stage i: its stack, its byte embedding, its pooling, its pad and its link to the parent."""

    def __init__(self, config: ModelConfig, i: int) -> None:
        super().__init__()
        stage = config.stages[i]
        self.config = stage
        self.slots = config.unit_slots(i)  # U_i byte slots per unit
        D = stage.d_model
        self.byte_width = D // self.slots if stage.pooling == "concat" else D
        self.byte_embedding = nn.Embedding(config.vocab_size, self.byte_width)
        self.pool = AttentionPooling(D, self.slots, stage.n_heads) if stage.pooling == "attention" else None
        self.pad = nn.Parameter(torch.zeros(D))  # stands in for the unit before a parent's first
        if i > 0:
            self.siblings = config.child_slots(i)  # S_i: units of this stage per parent unit
            parent_width = config.stages[i - 1].d_model
            self.from_parent = nn.Linear(parent_width // self.siblings, D, bias=False)
        else:
            self.siblings = None
            self.from_parent = None
        # Learned positions of this stage's units at its own scale (rotary lives in the mixers):
        # `learned`, one row per unit index (S_i for an inner stage; for the outermost, every
        # unit index a max_seq_len sequence reaches); `grid`, a row and a column table.
        self.unit_position = None
        self.grid_rows = self.grid_cols = None
        if stage.position == "learned":
            if i > 0:
                rows = self.siblings
            else:  # units 0..K-1 in a pass, 0..max_len // U_0 when decoding fixed units
                rows = config.max_seq_len // self.slots + 1 if config.is_fixed else config.max_seq_len + 1
            self.unit_position = nn.Embedding(rows, D)
        elif stage.position == "grid":
            self.grid_rows = nn.Embedding(stage.grid[0], D)
            self.grid_cols = nn.Embedding(stage.grid[1], D)
        # StageConfig.lags (outermost stage): the pooled units l back, concatenated, projected.
        self.lags = list(stage.lags or [])
        self.lag_proj = nn.Linear(len(self.lags) * D, D, bias=False) if self.lags else None
        if self.lags:
            self.register_buffer("lag_offsets", torch.tensor(self.lags, dtype=torch.long), persistent=False)
        self.stack = Stack(stage, config.dropout, config.norm_eps)

    def lagged(self, units: torch.Tensor, length: int) -> torch.Tensor:
        """(B, K, D) pooled units 0..K-1 -> (B, length, D): for each input position k < length,
        the projection of units k - l for l in `lags` (zero where k - l < 0 or k - l >= K)."""
        K = units.shape[1]
        shifted = []
        for lag in self.lags:  # position k reads unit k - lag: lag zero rows in front, cut to length
            front = min(lag, length)
            keep = min(length - front, K)
            shifted.append(F.pad(units[:, :keep], (0, 0, front, length - front - keep)))
        return self.lag_proj(torch.cat(shifted, dim=-1))  # (B, length, D)

    def position(self, index: torch.Tensor) -> Optional[torch.Tensor]:
        """(...) int64 unit indices at this stage's scale -> (..., D_i) position vectors added to
        the units' inputs (None when the stage adds none)."""
        if self.unit_position is not None:  # in range: the model checks lengths against max_seq_len
            return self.unit_position(index)
        if self.grid_rows is not None:
            R, C = self.grid_rows.num_embeddings, self.grid_cols.num_embeddings
            cell = index % (R * C)  # a second image in the same window starts at row 0 again
            return self.grid_rows(cell // C) + self.grid_cols(cell % C)
        return None

    @property
    def adds_position(self) -> bool:
        return self.unit_position is not None or self.grid_rows is not None

    def add_position(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x (..., D_i) + the position vectors of `index` (broadcast against x's leading axes)."""
        pos = self.position(index)
        return x if pos is None else x + pos.to(x.dtype)

    def pooled(self, e: torch.Tensor, present: Optional[torch.Tensor]) -> torch.Tensor:
        """(..., U_i, w_i) byte vectors of units and their (..., U_i) present mask -> (..., D_i)."""
        if self.pool is None:
            if present is not None:
                e = e * present[..., None].to(e.dtype)
            return e.flatten(-2)
        lead = e.shape[:-2]
        flat_present = None if present is None else present.reshape(-1, self.slots)
        return self.pool(e.reshape(-1, self.slots, e.shape[-1]), flat_present).view(*lead, -1)

    def parent_context(self, parent: torch.Tensor) -> torch.Tensor:
        """(..., D_{i-1}) parent outputs -> (..., S_i, D_i): one projected slice per child unit."""
        return self.from_parent(parent.unflatten(-1, (self.siblings, -1)))


@dataclass
class Layout:
    """Where every byte sits in the padded grid of units.

    `index` (B, T): flat grid slot of each byte; None means the grid is the byte stream itself
    (fixed patches; grid slots past T are padding after every real byte). `present` (B, G):
    which grid slots hold a byte (None: all slots up to T, padding at the end is harmless)."""

    num_units: int  # K, outermost units (the most any row has)
    grid_size: int  # G = K · U_0
    index: Optional[torch.Tensor] = None
    present: Optional[torch.Tensor] = None
    inner_starts: Optional[torch.Tensor] = None  # (B, T) bool: where the innermost units start

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) per byte -> (B, G, ...) per grid slot (zeros where no byte)."""
        if self.index is None:
            pad = self.grid_size - values.shape[1]
            return F.pad(values, (0, 0) * (values.dim() - 2) + (0, pad)) if pad else values
        B, T = self.index.shape
        values = values.expand(B, *values.shape[1:])
        out = values.new_zeros((B, self.grid_size) + tuple(values.shape[2:]))
        index = self.index.view(B, T, *([1] * (values.dim() - 2))).expand_as(values)
        return out.scatter_(1, index, values)

    def gather(self, grid: torch.Tensor, T: int) -> torch.Tensor:
        """(B, G, ...) per grid slot -> (B, T, ...) per byte."""
        if self.index is None:
            return grid[:, :T]
        B = grid.shape[0]
        index = self.index.view(B, T, *([1] * (grid.dim() - 2))).expand(B, T, *grid.shape[2:])
        return grid.gather(1, index)


@dataclass
class DecodeState:
    """Everything needed to continue B sequences by one byte; allocated once per generation.

    How one byte x_t is decoded (`HierarchicalByteModel.decode_step`):
      1. x_t is written into its slot of the current outermost unit's buffer;
      2. the patchers decide, per row, the outermost stage whose unit starts at byte t+1 (`level`;
         N-1 when only a new byte starts);
      3. every stage i >= level runs ONE position on its cache: the pooled unit that just ended
         (or its pad, when a new parent unit starts, after emptying the stage's cache for that
         row) plus its slice of the parent output; the last stage's output gives the logits.
    With fixed patches and all rows at the same position, the host knows `level` (no device
    round trip, as CUDA graphs need); otherwise it is a (B,) tensor and stages run masked.
    """

    stage_states: list  # per stage, per block: KVCache or MambaState
    contexts: list  # per stage: None for stage 0, else (B, S_i, D_i) slices of the parent output
    unit_tokens: torch.Tensor  # (B, U_0) int64: bytes of the current outermost unit, by slot
    unit_present: torch.Tensor  # (B, U_0) bool
    unit_extra: Optional[torch.Tensor]  # (B, U_0, w_0): position + hash embeddings of those bytes
    lag_ring: Optional[torch.Tensor]  # (B, max(lags), D_0): pooled outermost units, unit k at slot k % max(lags)
    coords: torch.Tensor  # (B, N) int64: current unit of each stage within its parent (last: byte)
    unit_lengths: torch.Tensor  # (B, max(N-1, 1)) int64: bytes so far in the current unit per stage
    positions: torch.Tensor  # (B,) int64: bytes consumed per row
    history: Optional[torch.Tensor]  # (B, n_max) int64: last bytes, -1 before the start (hashes)
    patcher_states: list
    max_len: int
    fixed: bool = True  # every unit boundary is fixed (the host can follow positions)
    static: bool = False  # no host synchronisation: every stage runs masked (torch.compile, CUDA graphs)
    host_position: Optional[int] = 0  # common position of all rows, when the host can know it
    started: bool = False
    step_fn: Optional[Any] = None  # what runs `decode_step`'s device work, with the signature of
    # HierarchicalByteModel._decode_byte (e.g. its torch.compile'd copy, multibyte.sampling.compiled_decode_byte)
    native_decode: Optional[Any] = None  # native whole steps and sampling runs on this state
    # (multibyte.kernels.decode_run.NativeDecode), when allocated with native=True and they apply

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]


def reset_decode_state(state: DecodeState) -> None:
    """Make `state` as good as freshly allocated, in place (nothing is reallocated)."""
    for layer_state in (s for states in state.stage_states for s in states):
        layer_state.reset()
    for t in (state.unit_tokens, state.coords, state.unit_lengths, state.positions):
        t.zero_()
    state.unit_present.zero_()
    if state.history is not None:
        state.history.fill_(-1)
    state.host_position = 0 if state.fixed else None
    state.started = False


def _where_rows(rows: Optional[torch.Tensor], new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new for the rows in `rows` (B,) bool (all rows when None), old elsewhere."""
    if rows is None:
        return new
    return torch.where(rows.view(-1, *([1] * (new.dim() - 1))), new, old)


class HierarchicalByteModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        N = config.num_stages
        self.stages = nn.ModuleList(Stage(config, i) for i in range(N))
        self.patchers = nn.ModuleList(build_patcher(s) for s in config.stages[:-1])
        w0 = self.stages[0].byte_width
        self.position_embedding = nn.Embedding(config.max_seq_len, w0) if config.position_embedding else None
        self.hash_embedding = (
            nn.Embedding(len(config.hash_ngram_sizes) * config.hash_buckets, w0) if config.hash_buckets else None
        )
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.stages[-1].d_model, config.vocab_size, bias=False)
        # Grid strides: slot of a byte in its outermost unit = Σ_{i>=1} coords[i] · U_i.
        self.register_buffer(
            "slot_strides", torch.tensor([config.unit_slots(i) for i in range(1, N)], dtype=torch.long), persistent=False
        )
        self._counter_update_cache: dict = {}  # `_counter_updates`, per (level, device)
        self._unit_slots = tuple(config.unit_slots(i) for i in range(N))  # U_i, read on every decoded byte
        self._init_weights()

    # ---------------------------------------------------------------- initialisation
    def _init_weights(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.startswith("patchers.") or (".mixer." in name and self._is_mamba_param(name)):
                continue  # entropy models and Mamba mixers initialise themselves
            if p.dim() >= 2 or name.endswith((".pad", ".query")):
                nn.init.normal_(p, mean=0.0, std=std)
        # GPT-2's scaling: each residual branch's output projection shrinks with depth, so the
        # residual stream's variance stays O(1) however many blocks add into it.
        for stage in self.stages:
            scale = std / math.sqrt(2 * max(1, stage.config.n_layers))
            for block in stage.stack.blocks:
                if hasattr(block.mixer, "out_proj") and not getattr(block.mixer, "initialises_itself", False):
                    nn.init.normal_(block.mixer.out_proj.weight, mean=0.0, std=scale)
                if block.feed_forward is not None:
                    nn.init.normal_(block.feed_forward.down.weight, mean=0.0, std=scale)

    def _is_mamba_param(self, name: str) -> bool:
        module = self.get_submodule(name.rsplit(".mixer.", 1)[0] + ".mixer")
        return getattr(module, "initialises_itself", False)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters (a frozen entropy model is not counted)."""
        params = [p for name, p in self.named_parameters() if not name.startswith("patchers.")]
        n = sum(p.numel() for p in params)
        if exclude_embeddings:
            n -= sum(e.weight.numel() for name, e in self.named_modules() if isinstance(e, nn.Embedding) and not name.startswith("patchers."))
        return n

    def training_flops(self, num_bytes: int, num_units: Optional[int] = None) -> float:
        """FLOPs of one forward + backward pass over a sequence of `num_bytes` whose grid holds
        `num_units` outermost units (default: fixed units, ceil(num_bytes / U_0)); padded grid
        slots are counted, since they are computed. 6 x matmul weights used per position, plus
        causal attention (QK^T and AV: 2 x 2 x d FLOPs per query-key pair, (n+1)/2 keys per
        query on average, backward twice the forward)."""
        config = self.config
        U0 = config.unit_slots(0)
        K = -(-num_bytes // U0) if num_units is None else num_units
        G = K * U0
        packed = not config.is_fixed and self._byte_stage_packs
        flops = 6.0 * (num_bytes if packed else G) * self.head.weight.numel()
        for i, stage in enumerate(self.stages):
            last = i == len(self.stages) - 1
            positions = num_bytes if (last and packed) else G // stage.slots
            matrices = sum(p.numel() for p in stage.stack.parameters() if p.dim() >= 2)
            if stage.from_parent is not None:
                matrices += stage.from_parent.weight.numel()
            if stage.pool is not None:
                matrices += sum(p.numel() for p in stage.pool.parameters() if p.dim() >= 2) * stage.slots
            flops += 6.0 * positions * matrices
            if stage.config.mixer == "attention":
                length = K if i == 0 else stage.siblings
                keys = 2 * stage.siblings if (last and packed and i > 0) else (length + 1) / 2  # banded: 2 blocks
                flops += 3.0 * positions * stage.config.n_layers * 4 * stage.config.d_model * keys
        for patcher in self.patchers:  # an entropy model runs forward only, at every byte
            if hasattr(patcher, "model"):
                flops += patcher.model.training_flops(num_bytes) / 3
        return flops

    # ---------------------------------------------------------------- boundaries and layout
    def unit_starts(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(B, T) -> one (B, T) bool per stage but the last: where its units start."""
        B, T = tokens.shape
        starts, outer = [], None
        for patcher in self.patchers:
            outer = unit_starts(patcher.rule(tokens), outer, patcher.max_length, T, B, tokens.device)
            starts.append(outer)
        return starts

    def layout(self, tokens: torch.Tensor, starts: Optional[list[torch.Tensor]] = None) -> Layout:
        """Where each byte of (B, T) `tokens` goes in the grid (see `Layout`)."""
        B, T = tokens.shape
        config = self.config
        U0 = config.unit_slots(0)
        if config.is_fixed and starts is None:
            K = -(-T // U0)
            return Layout(K, K * U0)
        starts = self.unit_starts(tokens) if starts is None else starts
        positions = torch.arange(T, device=tokens.device)
        unit = starts[0].long().cumsum(1) - 1  # (B, T) outermost unit of each byte
        index = unit * U0
        for i in range(1, config.num_stages - 1):
            parent_begin = torch.where(starts[i - 1], positions, 0).cummax(1).values
            count = starts[i].long().cumsum(1)
            index = index + (count - count.gather(1, parent_begin)) * config.unit_slots(i)
        begin = torch.where(starts[-1], positions, 0).cummax(1).values
        index = index + positions - begin  # byte within the innermost unit
        K = int(unit[:, -1].max()) + 1 if T else 0
        present = torch.zeros(B, K * U0, dtype=torch.bool, device=tokens.device).scatter_(1, index, True)
        return Layout(K, K * U0, index, present, starts[-1])

    # ---------------------------------------------------------------- embeddings
    def hash_ids(self, history: torch.Tensor) -> torch.Tensor:
        """(..., n_max) last bytes (-1 before the start; the newest last) -> (..., n_sizes) rows
        of the hash embedding: a rolling hash of the n-gram ending at the newest byte, per size."""
        config = self.config
        ids, h = [], torch.zeros_like(history[..., 0])
        sizes = sorted(config.hash_ngram_sizes)
        n_max = history.shape[-1]
        by_size = {}
        for j in range(max(sizes)):  # newest byte first
            h = (h * 257 + history[..., n_max - 1 - j] + 1) % HASH_MODULUS
            by_size[j + 1] = h
        for k, n in enumerate(config.hash_ngram_sizes):
            ids.append(by_size[n] % config.hash_buckets + k * config.hash_buckets)
        return torch.stack(ids, dim=-1)

    def _byte_extras(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, T) -> (B, T, w_0): position and hash n-gram embeddings added to the outermost
        stage's byte embeddings (None when the model has neither)."""
        B, T = tokens.shape
        extra = None
        if self.position_embedding is not None:
            extra = self.position_embedding.weight[:T][None]  # (1, T, w_0): the same for every row
        if self.hash_embedding is not None:
            n_max = max(self.config.hash_ngram_sizes)
            padded = F.pad(tokens, (n_max - 1, 0), value=-1)
            history = padded.unfold(1, n_max, 1)  # (B, T, n_max): bytes t-n_max+1 .. t
            hashed = self.hash_embedding(self.hash_ids(history)).sum(dim=2)  # (B, T, w_0)
            extra = hashed if extra is None else extra + hashed
        return extra

    # ---------------------------------------------------------------- the forward pass
    @property
    def length_limited(self) -> bool:
        """Whether a learned table sized by max_seq_len limits the sequence length (the byte
        position table, or the outermost stage's learned unit positions): the config's rule,
        which built exactly those tables."""
        return self.config.length_limited

    def _check_length(self, T: int) -> None:
        if self.length_limited and T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} positions exceeds max_seq_len={self.config.max_seq_len}")

    def _pooled_units(self, i: int, grid: torch.Tensor, extra: Optional[torch.Tensor], layout: Layout) -> torch.Tensor:
        """Stage i's pooled units: (B, K, S_1..S_i, D_i), from the (B, G) byte grid."""
        stage = self.stages[i]
        B = grid.shape[0]
        lead = (B, layout.num_units) + tuple(s.siblings for s in self.stages[1 : i + 1])
        e = stage.byte_embedding(grid)  # (B, G, w_i)
        if i == 0 and extra is not None:
            e = e + extra.to(e.dtype)
        present = None if layout.present is None else layout.present.view(*lead, stage.slots)
        return stage.pooled(e.view(*lead, stage.slots, -1), present)

    def forward(
        self,
        tokens: torch.Tensor,
        starts: Optional[list[torch.Tensor]] = None,
        loss_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, T) symbols (any integer dtype) -> (B, T, vocab) next-symbol logits.

        The logit at position t depends only on symbols < t. T need not be a multiple of any
        patch size (the grid is right-padded and the padding's logits dropped). `starts`: unit
        boundaries to use instead of the patchers' (one (B, T) bool per stage but the last).

        With `loss_mask` (B, T) bool, the positions to score: returns (summed NLL in nats of
        those symbols, fp32 scalar; how many there were) instead, taken through the head in
        chunks of positions (`multibyte.chunked_loss.head_nll`), never the full fp32 logits.
        The loss lives inside forward so that FSDP and torch.compile wrap it with the model."""
        h = self.hidden_states(tokens, starts)  # (B, T, D_last)
        if loss_mask is None:
            return self.head(h)
        if loss_mask.shape != tokens.shape:
            raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the shape of tokens {tuple(tokens.shape)}")
        return head_nll(h, self.head.weight, tokens, loss_mask), loss_mask.sum()

    def hidden_states(self, tokens: torch.Tensor, starts: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """(B, T) symbols -> (B, T, D_last): the byte stage's final-norm outputs, which the head
        turns into logits (see `forward`)."""
        B, T = tokens.shape
        self._check_length(T)
        tokens = tokens.long()
        layout = self.layout(tokens, starts)
        extra = self._byte_extras(tokens)
        grid = layout.scatter(tokens)  # (B, G)
        extra = None if extra is None else layout.scatter(extra)  # (B, G, w_0)
        parent = None
        for i, stage in enumerate(self.stages):
            if i == len(self.stages) - 1 and self._packs_bytes(layout):
                return self._packed_byte_stage(tokens, layout, parent)  # (B, T, D_last)
            units = self._pooled_units(i, grid, extra, layout)  # (B, K, S_1..S_i, D_i)
            axis = units.dim() - 2  # the axis this stage runs along (K for stage 0, else S_i)
            pad = stage.pad.to(units.dtype).expand_as(units.narrow(axis, 0, 1))
            x = torch.cat([pad, units.narrow(axis, 0, units.shape[axis] - 1)], dim=axis)
            if stage.lag_proj is not None:  # the outermost stage: units is (B, K, D_0)
                x = x + stage.lagged(units, units.shape[1])
            if parent is not None:
                x = x + stage.parent_context(parent)
            x = stage.add_position(x, torch.arange(x.shape[axis], device=x.device))  # (n, D_i) along the axis
            x = self.embedding_dropout(x)
            shape = x.shape
            parent = stage.stack(x.reshape(-1, shape[-2], shape[-1])).view(shape)
        return layout.gather(parent.reshape(B, layout.grid_size, -1), T)  # (B, T, D_last)

    @property
    def _byte_stage_packs(self) -> bool:
        """Whether the byte stage can run on the packed byte stream: an attention stage with
        concat pooling (a Mamba stage would need its recurrence reset at every unit start)."""
        last = self.stages[-1]
        return last.config.mixer == "attention" and last.pool is None

    def _packs_bytes(self, layout: Layout) -> bool:
        """Dynamic units would leave most byte slots of the grid empty (a unit of S slots holds
        a word of ~5 bytes): an attention byte stage then runs on the packed byte stream instead,
        each byte attending to the earlier bytes of its own unit (see `_packed_byte_stage`)."""
        return layout.index is not None and self._byte_stage_packs

    def _packed_byte_stage(self, tokens: torch.Tensor, layout: Layout, parent: torch.Tensor) -> torch.Tensor:
        """The byte stage on the (B, T) stream itself: the same inputs as in the grid (the
        previous byte of the unit, or the pad at a unit's first byte, plus the byte's slice of
        its unit's parent output) and attention restricted to the byte's own unit."""
        stage = self.stages[-1]
        B, T = tokens.shape
        e = stage.byte_embedding(tokens)  # (B, T, D)
        previous = torch.cat([e[:, :1], e[:, :-1]], dim=1)
        x = torch.where(layout.inner_starts[..., None], stage.pad.to(e.dtype), previous)
        slices = parent.unflatten(-1, (stage.siblings, -1)).reshape(B, layout.grid_size, -1)  # (B, G, D_parent / S)
        context = stage.from_parent(layout.gather(slices, T))  # (B, T, D): projected for real bytes only
        segments = layout.inner_starts.long().cumsum(1)  # (B, T): which innermost unit each byte is in
        x = x + context
        if stage.adds_position:  # the byte's slot inside its unit
            x = stage.add_position(x, segment_positions(segments))
        x = self.embedding_dropout(x)
        return stage.stack(x, segments=segments, window=stage.siblings)

    # ---------------------------------------------------------------- decoding
    def allocate_decode_state(
        self,
        batch_size: int,
        max_len: int,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        static: bool = False,
        native: bool = False,
    ) -> DecodeState:
        """Caches for `batch_size` rows of up to `max_len` bytes each, allocated once (on the
        model's device and in its dtype unless told otherwise). `static`: fixed shapes and no
        host synchronisation in `decode_step` (for torch.compile / CUDA graphs). `native`: every
        stage that a native CPU kernel can run (attention or Mamba, fp32 on a CPU, dynamic
        caches, at most `multibyte.kernels.NATIVE_MAX_BATCH` rows) takes its one-position steps
        there (`StackStates.native`), equal to the PyTorch blocks up to rounding; the others, and
        every other call, run the PyTorch blocks."""
        config = self.config
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be at least 1, got {batch_size} and {max_len}")
        if self.length_limited and max_len > config.max_seq_len:
            raise ValueError(
                f"max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len} "
                f"(the length of its learned position table)"
            )
        device = self.head.weight.device if device is None else torch.device(device)
        dtype = self.head.weight.dtype if dtype is None else dtype
        N, B, U0 = config.num_stages, batch_size, config.unit_slots(0)
        # Consuming t bytes runs stage 0 at positions 0..(units started), at most t // U_0 + 1
        # with fixed units and t + 1 with dynamic ones.
        outer_len = (max_len // U0 + 1) if config.is_fixed else max_len + 1
        stage_states = [self.stages[0].stack.allocate_states(B, outer_len, device, dtype)]
        contexts = [None]
        for i in range(1, N):
            stage = self.stages[i]
            stage_states.append(stage.stack.allocate_states(B, stage.siblings, device, dtype))
            contexts.append(torch.zeros(B, stage.siblings, stage.config.d_model, device=device, dtype=dtype))
        if static:
            for layer_state in (s for states in stage_states for s in states):
                if isinstance(layer_state, KVCache):
                    layer_state.make_static()
        elif native:
            # A model whose matrices all lie on the bf16 or int8 grid (rounded for sampling) runs
            # the kernels' variant for that format: the same arithmetic, a half or a quarter of the
            # bytes read per step.
            weight_format = matrix_format(self) if device.type == "cpu" and dtype == torch.float32 else "float32"
            for stage, states in zip(self.stages, stage_states):
                states.native = bind_stack_step(stage.stack, states, weight_format)
        w0 = self.stages[0].byte_width
        has_extra = self.position_embedding is not None or self.hash_embedding is not None
        state = DecodeState(
            stage_states=stage_states,
            contexts=contexts,
            unit_tokens=torch.zeros(B, U0, dtype=torch.long, device=device),
            unit_present=torch.zeros(B, U0, dtype=torch.bool, device=device),
            unit_extra=torch.zeros(B, U0, w0, device=device, dtype=dtype) if has_extra and N > 1 else None,
            lag_ring=(
                torch.zeros(B, max(self.stages[0].lags), config.stages[0].d_model, device=device, dtype=dtype)
                if self.stages[0].lags
                else None
            ),
            coords=torch.zeros(B, N, dtype=torch.long, device=device),
            unit_lengths=torch.zeros(B, max(N - 1, 1), dtype=torch.long, device=device),
            positions=torch.zeros(B, dtype=torch.long, device=device),
            history=(
                torch.full((B, max(config.hash_ngram_sizes)), -1, dtype=torch.long, device=device)
                if self.hash_embedding is not None
                else None
            ),
            patcher_states=[p.allocate_state(B, max_len, device, dtype) for p in self.patchers],
            max_len=max_len,
            fixed=config.is_fixed,
            static=static,
            host_position=0 if config.is_fixed else None,
        )
        if native and not static:
            state.native_decode = NativeDecode.bind(self, state)
        return state

    def reset_decode_state(self, state: DecodeState) -> None:
        """Make `state` as good as freshly allocated, in place (nothing is reallocated)."""
        reset_decode_state(state)

    @torch.no_grad()
    def prefill(self, state: DecodeState, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Start every row from `tokens` (B, T) (T may be 0); row b's prompt is its first
        lengths[b] bytes (all T when None). Returns (B, vocab) fp32 logits of each row's next byte.

        The longest prefix that ends at an outermost unit boundary in every row, with the same
        number of units in every row, goes through the outermost stage in one parallel pass; the
        rest is fed byte by byte."""
        self._check_ready()
        if state.started:
            raise ValueError("prefill starts a sequence, but this decode state is in use: reset it first (reset_decode_state)")
        B, T = tokens.shape
        if B != state.batch_size:
            raise ValueError(f"prompt batch of {B} rows for a decode state of {state.batch_size}")
        if T > state.max_len:
            raise ValueError(f"prompt of {T} bytes is longer than the decode state's max_len={state.max_len}")
        tokens = tokens.to(state.positions.device, torch.long)
        if lengths is None:
            lengths_list = [T] * B
        else:
            lengths = lengths.to(state.positions.device, torch.long)
            lengths_list = [int(n) for n in lengths.tolist()]
            if min(lengths_list, default=0) < 0 or max(lengths_list, default=0) > T:
                raise ValueError(f"prompt lengths must lie in 0..{T}, got {lengths_list}")
        state.host_position = 0 if state.fixed else None
        state.started = True
        n, starts = self._parallel_prefix(tokens, min(lengths_list, default=0))
        logits = self._prefill_parallel(state, tokens[:, :n], starts) if n else self._open(state)
        uniform = len(set(lengths_list)) == 1
        for t in range(n, max(lengths_list, default=0)):
            active = None if uniform else torch.tensor([t < n_b for n_b in lengths_list], device=tokens.device)
            step_logits = self.decode_step(state, tokens[:, t], active)
            logits = _where_rows(active, step_logits, logits)
        return logits

    def _parallel_prefix(self, tokens: torch.Tensor, shortest: int) -> tuple[int, Optional[list[torch.Tensor]]]:
        """Bytes of the prompt that the outermost stage can take in one pass (see `prefill`), and
        with dynamic units the boundaries of those bytes (computed once: an entropy patcher runs
        its byte model for them)."""
        if shortest == 0:
            return 0, None
        U0 = self.config.unit_slots(0)
        if self.config.is_fixed:
            return shortest // U0 * U0, None
        starts = self.unit_starts(tokens[:, :shortest])  # per stage but the last: (B, shortest)
        count = starts[0].long().cumsum(1)  # outermost units started up to and including each byte
        common = starts[0].all(0) & (count == count[:1]).all(0)  # a boundary at p in every row, equal counts
        common[0] = False
        candidates = common.nonzero()
        n = int(candidates[-1]) if len(candidates) else 0
        return n, [s[:, :n] for s in starts]  # boundaries before n depend on bytes before n only

    def _check_ready(self) -> None:
        if self.training:
            raise ValueError("the model is in training mode (dropout would make decoding random): call model.eval()")

    def _open(self, state: DecodeState) -> torch.Tensor:
        """Byte 0 of every row: every stage starts a unit, fed its pad."""
        for patcher, patcher_state in zip(self.patchers, state.patcher_states):
            patcher.start_state(patcher_state)
        return self._run_stages(state, None, 0, None, state.coords.clone(), first=0)

    def _prefill_parallel(self, state: DecodeState, tokens: torch.Tensor, starts: Optional[list[torch.Tensor]]) -> torch.Tensor:
        """Consume (B, n) bytes ending at an outermost unit boundary (the same number of units c
        in every row; `starts`: their boundaries, None for fixed units): stage 0 runs its c + 1
        positions at once, the inner stages open unit c."""
        B, n = tokens.shape
        layout = self.layout(tokens, starts)
        extra = self._byte_extras(tokens)
        grid = layout.scatter(tokens)
        extra_grid = None if extra is None else layout.scatter(extra)
        units = self._pooled_units(0, grid, extra_grid, layout)  # (B, c, D_0)
        stage = self.stages[0]
        dtype = state.contexts[-1].dtype if len(self.stages) > 1 else self.head.weight.dtype
        x = torch.cat([stage.pad.to(units.dtype).expand(B, 1, -1), units], dim=1)  # (B, c + 1, D_0)
        if stage.lag_proj is not None:
            x = x + stage.lagged(units, x.shape[1])
            ring = state.lag_ring  # the last max(lags) units, unit k at slot k % max(lags)
            keep = min(units.shape[1], ring.shape[1])
            slots = torch.arange(units.shape[1] - keep, units.shape[1], device=x.device) % ring.shape[1]
            ring[:, slots] = units[:, -keep:].to(ring.dtype)
        x = stage.add_position(x, torch.arange(x.shape[1], device=x.device)).to(dtype)
        h = stage.stack(x, state.stage_states[0])[:, -1]  # (B, D_0)
        for patcher, patcher_state in zip(self.patchers, state.patcher_states):
            patcher.prefill_state(patcher_state, tokens)
        if state.history is not None:
            keep = min(n, state.history.shape[1])
            state.history[:, -keep:] = tokens[:, n - keep :]
        state.positions.fill_(n)
        state.coords[:, 0] = layout.num_units
        state.host_position = n if self.config.is_fixed else None
        if len(self.stages) == 1:
            return self.head(h).float()
        state.contexts[1].copy_(self.stages[1].parent_context(h))
        return self._run_stages(state, None, 0, None, state.coords.clone(), first=1)

    def begin_step(
        self, state: DecodeState, byte: torch.Tensor, active: Optional[torch.Tensor] = None, count: int = 1
    ) -> tuple[torch.Tensor, Any, Optional[torch.Tensor]]:
        """The host side of `decode_step` (or of `count` steps in a row): checks, and the host's
        count of positions. Returns the byte on the state's device, the level for `_decode_byte`
        (None: the patchers decide per row; with `count` > 1, a tuple of the levels of the
        `count` steps, or None) and `active` (None when every row is active)."""
        if not state.started:
            raise ValueError("decode_step needs a started decode state: call prefill first (an empty prompt is fine)")
        if active is not None and not state.static and bool(active.all()):
            active = None
        if active is not None:
            state.host_position = None  # rows drift apart
        full = state.host_position + count > state.max_len if state.host_position is not None else (
            not state.static and int(state.positions.max()) + count > state.max_len
        )
        if full:
            raise ValueError(f"the decode state is full ({state.max_len} bytes): allocate it with a larger max_len")
        byte = byte.to(state.positions.device, torch.long)
        if state.host_position is None:
            return byte, None, active
        # Fixed units, rows in step: the outermost stage whose unit starts at the next byte is
        # known on the host.
        N = self.config.num_stages
        levels = []
        for _ in range(count):
            t1 = state.host_position + 1
            levels.append(next((i for i, s in enumerate(self.config.stages[:-1]) if t1 % s.patch_size == 0), N - 1))
            state.host_position = t1
        return byte, (levels[0] if count == 1 else tuple(levels)), active

    @torch.no_grad()
    def decode_step(self, state: DecodeState, byte: torch.Tensor, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feed one byte per row, (B,); return the (B, vocab) fp32 logits of the byte after it.
        `active` (B,) bool: only these rows consume their byte (the others keep their state and
        get meaningless logits); None: all rows."""
        byte, level, active = self.begin_step(state, byte, active)
        if state.step_fn is not None:
            return state.step_fn(state, byte, level, active)
        if level is not None and active is None and not state.static:
            return self._decode_byte_in_step(state, byte, level)
        return self._decode_byte(state, byte, level, active)

    def _counter_updates(self, level: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N,) keep and add vectors of `coords` and the (N-1,) keep vector of `unit_lengths`
        (whose add vector is the same) for a step at host `level`: made once per level."""
        key = (level, device)
        cached = self._counter_update_cache.get(key)
        if cached is None:
            N = self.config.num_stages
            ids = torch.arange(N, device=device)
            lengths_keep = (torch.arange(max(N - 1, 1), device=device) < level).long()
            cached = self._counter_update_cache[key] = ((ids <= level).long(), (ids == level).long(), lengths_keep)
        return cached

    def _decode_byte_in_step(self, state: DecodeState, byte: torch.Tensor, level: int) -> torch.Tensor:
        """`_decode_byte` when every row sits at the same position `state.host_position` of fixed
        units (the common case of sampling): the same state updates and stage runs, with the
        slot and unit indices known on the host, so each is one indexed write instead of the
        general per-row gathers, scatters and selects (a batch-1 step is bound by op count)."""
        U = self._unit_slots
        N = len(U)
        t = state.host_position - 1  # the byte being consumed; the next one is t + 1
        if state.native_decode is not None:  # the same step, in one native call where it runs
            logits = state.native_decode.step(byte, t, level)
            if logits is not None:
                return logits
        extra = self._step_extra(state, byte, None)
        old_coords = None
        if N > 1:
            slot = t % U[0]
            state.unit_tokens[:, slot] = byte
            state.unit_present[:, slot] = True
            if state.unit_extra is not None:
                state.unit_extra[:, slot] = extra.to(state.unit_extra.dtype)
            if level < N - 1:  # an inner unit ended: its pooling reads the coordinates before the update
                old_coords = state.coords.clone()
        # coords: stages after `level` restart at 0, `level` moves on, those before stay;
        # unit_lengths: stages from `level` on restart, the others grow (as in `_decode_byte`).
        coords_keep, coords_add, lengths_keep = self._counter_updates(level, state.coords.device)
        state.coords.mul_(coords_keep).add_(coords_add)
        if N > 1:
            state.unit_lengths.mul_(lengths_keep).add_(lengths_keep)
        state.positions += 1
        # Unit index of each stage at byte t + 1 inside its parent (what `coords` now holds).
        inner = [(t + 1) % U[i - 1] // U[i] for i in range(1, N)]
        logits = self._run_stages(state, byte, level, None, old_coords, first=0, extra=extra, host_coords=[None] + inner)
        if N > 1 and level == 0:
            state.unit_present.fill_(False)  # the outermost unit's buffer empties when a new one starts
        return logits

    def _decode_byte(self, state: DecodeState, byte: torch.Tensor, level: Optional[int], active: Optional[torch.Tensor]) -> torch.Tensor:
        """The device work of `decode_step` (no host synchronisation when `state.static`): `level`
        is the outermost stage whose unit starts at the next byte when the host knows it (fixed
        units, rows in step), None to let the patchers decide per row. A torch.compile'd copy of
        this method (one graph per host level) is what `state.step_fn` holds when compiled."""
        config = self.config
        N = config.num_stages
        old_coords = state.coords.clone()

        # 1. record the byte in its slot of the current outermost unit
        extra = self._step_extra(state, byte, active)  # (B, w_0) or None
        if N > 1:
            slot = (state.coords[:, 1:] * self.slot_strides).sum(1, keepdim=True)  # (B, 1)
            rows_tokens = state.unit_tokens.scatter(1, slot, byte[:, None])
            state.unit_tokens.copy_(_where_rows(active, rows_tokens, state.unit_tokens))
            state.unit_present.copy_(_where_rows(active, state.unit_present.scatter(1, slot, True), state.unit_present))
            if state.unit_extra is not None:
                rows_extra = state.unit_extra.scatter(1, slot[:, :, None].expand(-1, 1, extra.shape[-1]), extra[:, None].to(state.unit_extra.dtype))
                state.unit_extra.copy_(_where_rows(active, rows_extra, state.unit_extra))

        # 2. which stage's unit starts at the next byte (unless the host knows)
        if level is None:
            level = torch.full_like(byte, N - 1)
            outer = torch.zeros_like(byte, dtype=torch.bool)
            for i, patcher in enumerate(self.patchers):
                fires = patcher.step_rule(state.patcher_states[i], byte, active)
                starts = outer | (state.unit_lengths[:, i] + 1 >= patcher.max_length)
                if fires is not None:
                    starts = starts | fires
                level = torch.where(starts & (level == N - 1), i, level)
                outer = starts

        # 3. counters for byte t+1
        lv = level if isinstance(level, torch.Tensor) else torch.full_like(byte, level)
        stage_ids = torch.arange(N, device=byte.device)
        new_coords = torch.where(
            lv[:, None] < stage_ids, 0, torch.where(lv[:, None] == stage_ids, old_coords + 1, old_coords)
        )
        state.coords.copy_(_where_rows(active, new_coords, old_coords))
        if N > 1:
            lengths = torch.where(lv[:, None] <= stage_ids[: N - 1], 0, state.unit_lengths + 1)
            state.unit_lengths.copy_(_where_rows(active, lengths, state.unit_lengths))
        state.positions.add_(1 if active is None else active.long())

        logits = self._run_stages(state, byte, level, active, old_coords, first=0, extra=extra)
        # the outermost unit's buffer empties when a new one starts
        if N > 1:
            cleared = lv == 0 if active is None else (lv == 0) & active
            state.unit_present.masked_fill_(cleared[:, None], False)
        return logits

    def _step_extra(self, state: DecodeState, byte: torch.Tensor, active: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Position and hash embeddings of the byte being consumed, (B, w_0), updating the
        hash history."""
        extra = None
        if self.position_embedding is not None:
            extra = self.position_embedding(state.positions.clamp(max=self.config.max_seq_len - 1))
        if state.history is not None:
            history = torch.cat([state.history[:, 1:], byte[:, None]], dim=1)
            state.history.copy_(_where_rows(active, history, state.history))
            hashed = self.hash_embedding(self.hash_ids(history)).sum(dim=1)
            extra = hashed if extra is None else extra + hashed
        return extra

    def _run_stages(
        self,
        state: DecodeState,
        byte: Optional[torch.Tensor],
        level: int | torch.Tensor,
        active: Optional[torch.Tensor],
        old_coords: torch.Tensor,
        first: int,
        extra: Optional[torch.Tensor] = None,
        host_coords: Optional[list] = None,
    ) -> torch.Tensor:
        """Run one position of every stage from `first` whose unit starts now; return logits.

        byte None: opening (every stage i > `first`... starts a new parent unit, pad inputs).
        `host_coords`: every row's `coords` of the inner stages as host integers, when the host
        knows them (`_decode_byte_in_step`)."""
        N = self.config.num_stages
        B = state.batch_size
        host_level = level if isinstance(level, int) else None
        logits = None
        for i in range(first, N):
            stage = self.stages[i]
            # Which rows run stage i, and which of them start a new parent unit (pad input).
            if host_level is not None:
                if i < host_level:
                    continue
                run, new_parent = active, (i > host_level or byte is None) and i > 0
                if byte is None and i == 0:
                    new_parent = True
            else:
                run = level <= i
                if active is not None:
                    run = run & active
                if not state.static:
                    count = int(run.sum())
                    if count == 0:
                        continue
                    run = None if count == B else run
                new_parent = level < i
            # Input: the pooled unit that just ended, or the pad.
            if byte is None:
                x = stage.pad.expand(B, -1)
            else:
                x = self._pooled_step(i, state, byte, old_coords, extra)
                if isinstance(new_parent, torch.Tensor):
                    x = torch.where(new_parent[:, None], stage.pad.to(x.dtype), x)
                elif new_parent:
                    x = stage.pad.expand(B, -1)
            if i > 0 and host_coords is not None:
                x = x.to(state.contexts[i].dtype) + state.contexts[i][:, host_coords[i]]
            elif i > 0:
                context = state.contexts[i].gather(1, state.coords[:, i, None, None].expand(-1, 1, state.contexts[i].shape[-1]))
                x = x.to(context.dtype) + context[:, 0]
            elif stage.lag_proj is not None:
                x = x + self._lagged_step(state, x if byte is not None else None, run)
            if stage.adds_position:
                x = stage.add_position(x, state.coords[:, i])  # this unit's index at the stage's scale
            # A new parent unit empties this stage's caches (for those rows).
            if isinstance(new_parent, torch.Tensor):
                reset_rows = new_parent if run is None else new_parent & run
                for layer_state in state.stage_states[i]:
                    layer_state.reset(reset_rows)
            elif new_parent:
                for layer_state in state.stage_states[i]:
                    layer_state.reset(None if run is None else run)
            dtype = state.contexts[-1].dtype if N > 1 else self.head.weight.dtype
            h = stage.stack(x[:, None].to(dtype), state.stage_states[i], run)[:, 0]  # (B, D_i)
            if i + 1 < N:
                context = self.stages[i + 1].parent_context(h)  # (B, S_{i+1}, D_{i+1})
                state.contexts[i + 1].copy_(_where_rows(run, context, state.contexts[i + 1]))
            else:
                logits = self.head(h).float()
        return logits

    def _lagged_step(self, state: DecodeState, finished: Optional[torch.Tensor], run: Optional[torch.Tensor]) -> torch.Tensor:
        """The outermost stage's lag input for the unit k = coords[:, 0] that starts now, (B, D_0):
        `finished` (B, D_0), the pooled unit k - 1 that just ended (None when opening), goes into
        the ring first (for the rows in `run`), then units k - l are read back from it."""
        stage, ring = self.stages[0], state.lag_ring
        B, H, D = ring.shape
        k = state.coords[:, 0]  # (B,)
        if finished is not None:
            slot = ((k - 1) % H)[:, None, None].expand(-1, 1, D)
            written = ring.scatter(1, slot, finished[:, None].to(ring.dtype))
            ring.copy_(_where_rows(run, written, ring))
        back = k[:, None] - stage.lag_offsets  # (B, n): the units read
        values = ring.gather(1, (back % H)[:, :, None].expand(-1, -1, D))  # (B, n, D)
        values = values * (back >= 0)[:, :, None].to(values.dtype)  # before the sequence: zeros
        return stage.lag_proj(values.flatten(1).to(stage.lag_proj.weight.dtype))

    def _pooled_step(self, i: int, state: DecodeState, byte: torch.Tensor, old_coords: torch.Tensor, extra) -> torch.Tensor:
        """(B, D_i): stage i's pooled input for the unit that ends with `byte`."""
        stage = self.stages[i]
        N = self.config.num_stages
        if i == N - 1:  # the unit is the byte itself
            e = stage.byte_embedding(byte)
            if i == 0 and extra is not None:
                e = e + extra.to(e.dtype)
            return e if stage.pool is None else stage.pooled(e[:, None], None)  # one slot: concat is e
        # Slots of the finished unit of stage i inside the outermost unit's buffer.
        base = (old_coords[:, 1 : i + 1] * self.slot_strides[:i]).sum(1, keepdim=True)  # (B, 1)
        slots = base + torch.arange(stage.slots, device=byte.device)  # (B, U_i)
        tokens = state.unit_tokens.gather(1, slots)
        present = state.unit_present.gather(1, slots)
        e = stage.byte_embedding(tokens)  # (B, U_i, w_i)
        if i == 0 and state.unit_extra is not None:
            e = e + state.unit_extra.gather(1, slots[:, :, None].expand(-1, -1, e.shape[-1])).to(e.dtype)
        return stage.pooled(e, present)
