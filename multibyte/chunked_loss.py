"""Cross-entropy of a linear head without the full logits: `head_nll`.

A byte model's last hidden states h (N, D) become logits h W^T (N, V) and a summed next-symbol
NLL. Done naively, autograd keeps the fp32 (N, V) logits, their log-softmax and their gradient
alive at once: at N = 32K positions that is several times the memory of h itself, and every byte
of it is written and read again in the backward pass. Here the positions go through the head in
chunks of `chunk` rows; for each chunk the logits live only while its loss and its gradient are
taken, and what is kept for the backward pass is dL/dh (N, D) and dL/dW (V, D):

    logits_c = h_c W^T                         (c, V)   in the autocast dtype, then fp32
    nll_c    = -log_softmax(logits_c)[target]
    dlogits  = (softmax(logits_c) - onehot(target)) * mask_c
    dL/dh_c  = dlogits W,   dL/dW += dlogits^T h_c

The backward pass only scales them by the incoming gradient of the (scalar) loss, so the head's
matmuls run once each, as with full logits. Without gradients (evaluation) only the NLL is taken.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

LOGITS_PER_CHUNK = 1 << 20  # fp32 logits of one chunk: 4 MiB, cache-sized, whatever the vocabulary


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk: about `LOGITS_PER_CHUNK` logits (4,096 positions of 256 byte values)."""
    return max(16, LOGITS_PER_CHUNK // vocab_size)


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on for t's device, else t's."""
    device = t.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, D) hidden states of one chunk -> fp32 log-probabilities (c, V) and NLL (c,)."""
    log_probs = torch.log_softmax(F.linear(h, weight).float(), dim=-1)  # (c, V)
    return log_probs, -log_probs.gather(1, targets[:, None])[:, 0]


class _HeadNLL(torch.autograd.Function):
    """sum over rows of mask * NLL(h W^T, targets); gradients taken chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, chunk: int):
        # hidden (N, D), weight (V, D), targets (N,) int64, mask (N,) fp32 in {0, 1}
        dtype = _matmul_dtype(hidden)
        w = weight.to(dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, t, m = hidden[s : s + chunk].to(dtype), targets[s : s + chunk], mask[s : s + chunk]
            log_probs, nll = _chunk_nll(h, w, t)
            total += (nll * m).sum(dtype=torch.float64)
            if need_h or need_w:
                # softmax - onehot, in place over the chunk's log-probabilities; rows outside the mask are 0
                grad = log_probs.exp_()
                grad.scatter_add_(1, t[:, None], torch.full_like(m[:, None], -1.0))
                grad = grad.mul_(m[:, None]).to(dtype)  # (c, V)
                if need_h:
                    grad_h[s : s + chunk] = grad @ w
                if need_w:
                    grad_w += (grad.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        return total.float()

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        dw = None if grad_w is None else grad_w * grad_out
        return dh, dw, None, None, None


def head_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """Summed NLL (nats, fp32 scalar) of `targets` under logits hidden @ weight^T, over `mask`.

    hidden (..., D), weight (V, D), targets (...) integer, mask (...) bool: the positions that
    count. Equal to cross_entropy(hidden @ weight.T, targets)[mask].sum() computed with fp32
    logits, but never holds more than `chunk` rows of logits (default `default_chunk(V)`).
    Under autocast the matmuls run in the autocast dtype, as an autocast linear layer would.
    """
    if hidden.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(
            f"head_nll: hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)} and mask {tuple(mask.shape)} "
            "must share their leading shape"
        )
    chunk = default_chunk(weight.shape[0]) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"head_nll: chunk must be at least 1 row, got {chunk}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    flat_mask = mask.reshape(-1).to(torch.float32)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _HeadNLL.apply(flat, weight, flat_targets, flat_mask, chunk)
    with torch.no_grad():
        nll = head_token_nll(flat, weight, flat_targets, chunk)  # (N,)
        return (nll * flat_mask).sum(dtype=torch.float64).float()


@torch.no_grad()
def head_token_nll(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: Optional[int] = None
) -> torch.Tensor:
    """NLL (nats, fp32) of every target under logits hidden @ weight^T: hidden (..., D) ->
    (...), computed `chunk` rows of logits at a time (no gradient; what scoring byte by byte
    needs, e.g. n-gram mixing in `bench`)."""
    chunk = default_chunk(weight.shape[0]) if chunk is None else chunk
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    dtype = _matmul_dtype(flat)
    w = weight.to(dtype)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for s in range(0, flat.shape[0], chunk):
        out[s : s + chunk] = _chunk_nll(flat[s : s + chunk].to(dtype), w, flat_targets[s : s + chunk])[1]
    return out.view(targets.shape)


def real_positions(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the first lengths[b] positions of row b (the rest is right padding)."""
    return torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
