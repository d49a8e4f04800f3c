"""SpaceByte's word boundaries (Slagle 2024).

A byte is *space-like* when it is none of: an ASCII letter (A-Z, a-z), an ASCII digit (0-9), a
UTF-8 continuation byte (0x80-0xBF). So space, punctuation, newline and control bytes are
space-like, while letters, digits and every byte inside a multi-byte UTF-8 character are not
(the leading byte 0xC0-0xFF of a multi-byte character is space-like, which keeps a run of
non-ASCII characters, e.g. Chinese text, in units of one character each, capped by max_length).

The exact rule: a unit starts at byte t >= 2 when byte t-1 is space-like and byte t-2 is not; at
t = 1 when byte 0 is space-like. A run of space-like bytes ("., " or "\\n\\n") therefore closes ONE
unit after its first byte and the rest of the run opens the next unit with the following word,
as SpaceByte inserts its global block only after the first space-like byte of a run.
"""

from __future__ import annotations

from typing import Optional

import torch

from multibyte.patchers import Patcher


def space_like(tokens: torch.Tensor) -> torch.Tensor:
    """Elementwise: is the byte space-like (see the module docstring)?"""
    t = tokens
    letter = ((t >= 65) & (t <= 90)) | ((t >= 97) & (t <= 122))
    digit = (t >= 48) & (t <= 57)
    continuation = (t >= 0x80) & (t <= 0xBF)
    return ~(letter | digit | continuation)


class SpacePatcher(Patcher):
    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        spacy = space_like(tokens)  # (B, T)
        previous_spacy = torch.zeros_like(spacy)
        previous_spacy[:, 1:] = spacy[:, :-1]
        fires = spacy & ~previous_spacy  # at j: a run of space-like bytes starts at j
        starts = torch.zeros_like(spacy)
        starts[:, 1:] = fires[:, :-1]  # ... so a unit starts at j + 1
        return starts

    def allocate_state(self, batch_size: int, max_len: int, device, dtype) -> torch.Tensor:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)  # was the last byte space-like?

    def start_state(self, state: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        if rows is None:
            state.zero_()
        else:
            state.masked_fill_(rows, False)

    def prefill_state(self, state: torch.Tensor, tokens: torch.Tensor) -> None:
        if tokens.shape[1]:
            state.copy_(space_like(tokens[:, -1]))

    def step_rule(self, state: torch.Tensor, byte: torch.Tensor, run: Optional[torch.Tensor] = None) -> torch.Tensor:
        spacy = space_like(byte)
        fires = spacy & ~state
        if run is None:
            state.copy_(spacy)
        else:
            state.copy_(torch.where(run, spacy, state))
        return fires
