"""How a byte sequence is cut into patches for the global model.

`FixedPatching` is MEGABYTE's rule: every patch holds exactly P consecutive bytes, so grouping is
a reshape. Dynamic rules (space- or entropy-based boundaries, as in BLT) plug in here with the
same two operations: `group` byte vectors into one vector per patch and `ungroup` patch vectors
back into one vector per byte position.
"""

from __future__ import annotations

import torch


class FixedPatching:
    def __init__(self, patch_size: int) -> None:
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = patch_size

    def padded_length(self, num_bytes: int) -> int:
        """Smallest multiple of P that holds `num_bytes` (the model right-pads to it; padding
        sits after every real byte, so causality keeps it from touching any real logit)."""
        P = self.patch_size
        return -(-num_bytes // P) * P

    def group(self, byte_vectors: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, K, P*D): concatenate the vectors of each patch's bytes."""
        B, T, D = byte_vectors.shape
        return byte_vectors.reshape(B, T // self.patch_size, self.patch_size * D)

    def ungroup(self, patch_vectors: torch.Tensor) -> torch.Tensor:
        """(B, K, P*D) -> (B, K, P, D): split each patch vector into one slice per byte position."""
        B, K, PD = patch_vectors.shape
        return patch_vectors.reshape(B, K, self.patch_size, PD // self.patch_size)
