"""Patchers: where the units (patches) of one stage start, decided causally per row.

Every patcher has a *rule* and a maximum unit length `max_length` (the stage's patch_size):

    unit starts at byte t  <=>  t == 0
                               or a unit of the enclosing (outer) stage starts at t
                               or the rule fires at t             (may read bytes < t only)
                               or the current unit already holds max_length bytes

    fixed    no rule: units of exactly max_length bytes (MEGABYTE)            fixed.py
    space    after a word boundary (SpaceByte)                               space.py
    entropy  where a small byte model's next-byte entropy is high (BLT)      entropy.py

The same decision is made two ways, which must agree exactly (a test checks it):
- `unit_starts`: for a whole (B, T) sequence at once, as training and scoring need;
- `Patcher.step_rule` + the model's per-row byte counters: one byte at a time while decoding.

`unit_starts` enforces the length limit without a loop over bytes: a rule or outer start begins a
*segment*; inside a segment a forced start falls at every multiple of max_length from the segment's
beginning, which is exactly what a left-to-right counter that resets at every start would give.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from multibyte.config import StageConfig


class Patcher(nn.Module):
    """Base class. Subclasses override `rule` and, when the rule needs memory, the state methods."""

    def __init__(self, stage: StageConfig) -> None:
        super().__init__()
        self.max_length = stage.patch_size

    # -- a whole sequence at once ----------------------------------------------------------------
    def rule(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, T) int64 -> (B, T) bool, True where the rule starts a unit; entry t may depend on
        tokens[:, :t] only. None: the rule never fires (fixed patching)."""
        return None

    # -- one byte at a time ----------------------------------------------------------------------
    def allocate_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> Any:
        """Whatever `step_rule` needs to remember between bytes (None when nothing)."""
        return None

    def start_state(self, state: Any, rows: Optional[torch.Tensor] = None) -> None:
        """Reset `state` to "no byte seen yet" (for `rows` only when given)."""

    def prefill_state(self, state: Any, tokens: torch.Tensor) -> None:
        """From a fresh state, consume (B, n) bytes at once (every row the same n)."""
        for t in range(tokens.shape[1]):
            self.step_rule(state, tokens[:, t])

    def step_rule(self, state: Any, byte: torch.Tensor, run: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Consume byte x_t, (B,) int64; return (B,) bool: does the rule start a unit at t + 1?
        `run` (B,) bool: rows that really consume a byte (the others keep their state).
        None: the rule never fires."""
        return None


def unit_starts(rule: Optional[torch.Tensor], outer: Optional[torch.Tensor], max_length: int, T: int, B: int, device) -> torch.Tensor:
    """(B, T) bool: where units start, from the rule's (B, T) starts (None: no rule), the
    enclosing stage's starts (None: the outermost stage) and the length limit."""
    positions = torch.arange(T, device=device)
    segment = torch.zeros(B, T, dtype=torch.bool, device=device)
    segment[:, 0] = True
    if rule is not None:
        segment |= rule
    if outer is not None:
        segment |= outer
    # Beginning of the segment holding each byte: a running maximum of segment-start positions.
    begin = torch.where(segment, positions, torch.zeros_like(positions)).cummax(dim=1).values
    return segment | ((positions - begin) % max_length == 0)


def build_patcher(stage: StageConfig) -> Patcher:
    """The patcher named by `stage.patcher`."""
    if stage.patcher == "fixed":
        from multibyte.patchers.fixed import FixedPatcher

        return FixedPatcher(stage)
    if stage.patcher == "space":
        from multibyte.patchers.space import SpacePatcher

        return SpacePatcher(stage)
    if stage.patcher == "entropy":
        from multibyte.patchers.entropy import EntropyPatcher

        return EntropyPatcher(stage)
    raise ValueError(f"unknown patcher {stage.patcher!r} (fixed | space | entropy)")
