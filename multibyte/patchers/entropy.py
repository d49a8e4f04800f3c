"""BLT's entropy patches (Pagnoni et al. 2024).

A small byte model of this suite (any `ModelConfig`, trained with `fit` from its own config) reads
the stream; H(x_t) is the entropy, in bits, of its next-byte distribution for position t, which
depends on bytes < t only. A unit starts at byte t when

    global mode     H(x_t) > θ
    monotonic mode  H(x_t) - H(x_{t-1}) > θ        (t >= 1)

θ is `StageConfig.entropy_threshold`; when it is None, `calibrate` picks it on training bytes so
that units hold `target_patch_length` bytes on average (length limit included), and it is stored
in this module's buffer (so it travels with the checkpoint, as do the entropy model's weights,
which stay frozen).

Decoding runs the entropy model alongside, one byte at a time, from its own decode state. A
parallel pass and byte-by-byte decoding compute H to rounding, not bit for bit, so an entropy
within rounding of θ could be placed differently by the two; encoder and decoder of the
compressor make identical calls and therefore identical decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from multibyte.config import ModelConfig, StageConfig
from multibyte.patchers import Patcher, unit_starts


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...,) entropy of softmax(logits) in bits, computed in fp32."""
    log_p = logits.float().log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1) / math.log(2.0)


@dataclass
class EntropyState:
    model_state: object  # the entropy model's own DecodeState
    next_entropy: torch.Tensor  # (B,) fp32: H of the byte about to come
    logits: torch.Tensor  # (B, V): the entropy model's prediction of that byte


class EntropyPatcher(Patcher):
    def __init__(self, stage: StageConfig) -> None:
        super().__init__(stage)
        from multibyte.model import HierarchicalByteModel  # the entropy model is one of ours

        if stage.entropy_architecture is None:
            from multibyte.checkpoints import load_byte_model

            model = load_byte_model(stage.entropy_model)
            stage.entropy_architecture = model.config.to_dict()  # travels with the config from now on
        else:
            model = HierarchicalByteModel(ModelConfig(**stage.entropy_architecture))
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.mode = stage.entropy_mode
        self.target_patch_length = stage.target_patch_length
        theta = math.nan if stage.entropy_threshold is None else stage.entropy_threshold
        self.register_buffer("threshold", torch.tensor(theta, dtype=torch.float32))

    def train(self, mode: bool = True) -> "EntropyPatcher":
        super().train(mode)
        self.model.eval()  # frozen: no dropout, ever
        return self

    def _check(self) -> float:
        theta = float(self.threshold)
        if math.isnan(theta):
            raise ValueError(
                "entropy patcher: no threshold yet; set entropy_threshold or call calibrate() "
                "(fit does it on training data)"
            )
        return theta

    @torch.no_grad()
    def entropies(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T) fp32: H(x_t) in bits for every position."""
        return entropy_bits(self.model(tokens))

    def _fires(self, entropy: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        theta = self.threshold
        if self.mode == "global":
            return entropy > theta
        return (entropy - previous) > theta

    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check()
        H = self.entropies(tokens)  # (B, T)
        previous = torch.cat([H[:, :1], H[:, :-1]], dim=1)  # t = 0 has no predecessor: difference 0
        fires = self._fires(H, previous)
        fires[:, 0] = False  # t = 0 starts a unit anyway
        return fires

    @torch.no_grad()
    def calibrate(self, tokens: torch.Tensor) -> float:
        """Choose θ so that units average `target_patch_length` bytes on (B, T) sample bytes,
        this stage's length limit included (an enclosing stage's starts, which only add more,
        are not); store and return it.

        The mean unit length never falls as θ rises (fewer rule starts; a merged segment needs at
        most one forced start more than its two parts had starts), so θ is found by bisection over
        the sample's own scores: of the two neighbouring scores whose mean lengths bracket the
        target, the one closer to it."""
        B, T = tokens.shape
        if T < 2:
            raise ValueError(f"entropy patcher: calibration needs rows of at least 2 bytes, got {T}")
        H = self.entropies(tokens)  # (B, T) fp32
        score = H if self.mode == "global" else H - torch.cat([H[:, :1], H[:, :-1]], dim=1)
        candidates = torch.unique(score[:, 1:])  # sorted; θ = a candidate fires where score > θ

        def mean_length(theta: torch.Tensor) -> float:
            fires = score > theta
            fires[:, 0] = False
            starts = unit_starts(fires, None, self.max_length, T, B, tokens.device)
            return B * T / int(starts.sum())

        low, high = 0, len(candidates) - 1  # find the first candidate reaching the target
        if mean_length(candidates[high]) < self.target_patch_length:
            low = high  # the length limit caps the mean below the target: fire as rarely as possible
        while low < high:
            middle = (low + high) // 2
            if mean_length(candidates[middle]) >= self.target_patch_length:
                high = middle
            else:
                low = middle + 1
        if low > 0:
            above, below = mean_length(candidates[low]), mean_length(candidates[low - 1])
            if abs(below - self.target_patch_length) < abs(above - self.target_patch_length):
                low -= 1
        self.threshold.fill_(candidates[low])
        return float(self.threshold)

    # -- decoding --------------------------------------------------------------------------------
    def allocate_state(self, batch_size: int, max_len: int, device, dtype) -> EntropyState:
        # The entropy model decodes in the dtype its weights have (cast with the whole model).
        state = self.model.allocate_decode_state(batch_size, max_len, device=device)
        V = self.model.config.vocab_size
        return EntropyState(state, torch.zeros(batch_size, device=device), torch.zeros(batch_size, V, device=device))

    def start_state(self, state: EntropyState, rows: Optional[torch.Tensor] = None) -> None:
        if rows is not None and not bool(rows.all()):
            raise ValueError("entropy patcher: rows restart together (reset the whole decode state)")
        self.model.reset_decode_state(state.model_state)
        B = state.next_entropy.shape[0]
        logits = self.model.prefill(state.model_state, torch.zeros(B, 0, dtype=torch.long, device=state.logits.device))
        state.logits.copy_(logits)
        state.next_entropy.copy_(entropy_bits(logits))

    def prefill_state(self, state: EntropyState, tokens: torch.Tensor) -> None:
        self.model.reset_decode_state(state.model_state)
        logits = self.model.prefill(state.model_state, tokens)
        state.logits.copy_(logits)
        state.next_entropy.copy_(entropy_bits(logits))

    def step_rule(self, state: EntropyState, byte: torch.Tensor, run: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check()
        logits = self.model.decode_step(state.model_state, byte, active=run)
        H = entropy_bits(logits)
        fires = self._fires(H, state.next_entropy)
        if run is None:
            state.next_entropy.copy_(H)
            state.logits.copy_(logits)
        else:
            state.next_entropy.copy_(torch.where(run, H, state.next_entropy))
            state.logits.copy_(torch.where(run[:, None], logits, state.logits))
        return fires
