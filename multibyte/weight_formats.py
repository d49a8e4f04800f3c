"""The value grids a model's matrices (the weights of its linear layers) may be rounded to for
decoding, and how to tell which grid a model is on.

    float32   the trained weights as they are
    bfloat16  each weight rounded to the nearest bf16 value (the upper half of an fp32)
    int8      per output row, symmetric: scale = max |w| / 127, weight = scale * round(w / scale),
              round(w / scale) in -127..127 (weight-only quantization: activations, norms,
              embeddings, caches and states are untouched)

A rounded model stays an ordinary fp32 PyTorch model whose matrices happen to hold grid values,
so every code path (PyTorch, compiled, the native kernels) computes the same function from it.
The native CPU kernels (multibyte/kernels) read such matrices in the grid's own format, two or four
times fewer bytes than fp32, which is what a batch-1 decoding step of a large stack waits for;
`matrix_format` is how they find out which format they may use.
"""

from __future__ import annotations

from typing import Literal

import torch

WeightFormat = Literal["float32", "bfloat16", "int8"]
WEIGHT_FORMATS: tuple[str, ...] = ("float32", "bfloat16", "int8")

INT8_LEVELS = 127  # round(w / scale) lies in -127..127 (symmetric: -128 is never used)


def _matrices(module: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)]


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of a matrix (out, in) on the int8 grid: q (out, in) int8, scale (out,) fp32 with
    weight ~ q * scale[:, None]. A row of zeros gets scale 0."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / INT8_LEVELS
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-INT8_LEVELS, INT8_LEVELS)
    return q.to(torch.int8), scale


def rounded(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """`weight`'s values on the `fmt` grid, in fp32."""
    check_format(fmt)
    if fmt == "bfloat16":
        return weight.detach().to(torch.bfloat16).float()
    if fmt == "int8":
        q, scale = int8_rows(weight)
        return q.float() * scale[:, None]
    return weight.detach().float()


def round_matrices(module: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """`module` with every linear layer's weight rounded to the `fmt` grid in place (fp32 kept)."""
    check_format(fmt)
    with torch.no_grad():
        for weight in _matrices(module):
            weight.copy_(rounded(weight, fmt))
    return module


def _on_grid(weight: torch.Tensor, fmt: str) -> bool:
    if weight.dtype != torch.float32:
        return False
    if fmt == "bfloat16":  # bf16 is the upper half of an fp32: the lower 16 bits must be zero
        return not (weight.detach().view(torch.int32) & 0xFFFF).any()
    # int8: re-deriving the scales from rounded values may move a scale by an ulp, so the test
    # allows the matching relative error (off-grid weights miss by up to half a step). Scales are
    # per row, so the first row alone rejects almost every off-grid matrix cheaply (every decoding
    # state of an fp32 or bf16 model asks).
    w = weight.detach()
    eps = torch.finfo(torch.float32).eps
    return all(torch.allclose(rounded(part, "int8"), part, rtol=4 * eps, atol=0.0) for part in (w[:1], w))


def matrix_format(module: torch.nn.Module) -> str:
    """The most compact grid every linear layer's fp32 weight in `module` is on: "int8",
    "bfloat16", or "float32" (also for a module without matrices, or with weights not in fp32)."""
    weights = _matrices(module)
    with torch.no_grad():
        for fmt in ("int8", "bfloat16"):
            if weights and all(_on_grid(w, fmt) for w in weights):
                return fmt
    return "float32"


def check_format(fmt: str) -> str:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format must be one of {', '.join(WEIGHT_FORMATS)}, got {fmt!r}")
    return fmt
