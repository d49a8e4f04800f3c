"""The Mamba mixer (Gu & Dao 2023) as used by MambaByte (Wang et al. 2024).

One mixer, two paths with one contract:

    training / scoring   forward(x)              chunked parallel selective scan, pure PyTorch
    prefill              forward(x, state)       the same parallel scan, started from `state`
                                                 and written back into it
    sampling             forward(x[:, -1:], state)  one recurrent step, O(1) time and memory

The block computes, for an input u of shape (B, L, D) and inner width E = expand · D:

    (x, z)   = in_proj(u)                                  (B, L, E) each
    x        = SiLU(causal depthwise conv1d(x))            kernel d_conv, per channel
    (δ, B, C)= x_proj(x)                                   ranks dt_rank, N, N
    Δ        = softplus(dt_proj(δ) + dt_bias)              (B, L, E)
    A        = -exp(A_log)                                 (E, N), A < 0
    h_t      = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t          (B, E, N) state per position
    y_t      = C_t · h_t + D ⊙ x_t                         (B, L, E)
    out      = out_proj(y ⊙ SiLU(z))                       (B, L, D)

The selective scan (the h_t recurrence) is the only sequential part. `selective_scan` runs it in
chunks of `chunk_size` positions: inside a chunk a log-depth (Blelloch) scan of (decay, input)
pairs, across chunks the state is carried in a loop over chunks (L / chunk_size iterations, never
one per position). A custom autograd function keeps only the state at each chunk boundary,
(B, L / chunk_size, N, E), and recomputes the chunk's (chunk_size, E, N) states in the backward
pass, so memory grows like the inputs (B, L, E) rather than like the full state history (B, L, E, N),
which is what the fused CUDA kernel does too. Every decay product is a product of numbers in (0, 1]:
there is no exp of a positive cumulative sum anywhere, so long chunks cannot overflow.

On a CUDA device, the fused kernels of `mamba-ssm` / `causal-conv1d` are used for the stateless
training path when they are importable (the `[cuda]` extra); they are never required.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional fused kernels; only ever called on CUDA tensors
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except Exception:  # ImportError, or a CUDA extension that fails to load on this machine
    causal_conv1d_fn = None
    selective_scan_fn = None

LOG2_E = 1.4426950408889634  # exp(v) == exp2(v · log2 e); torch's CPU exp2 measured faster than its exp


def default_chunk_size(batch: int, d_inner: int, d_state: int, device: torch.device) -> int:
    """Positions per scan chunk: a power of two whose (batch, chunk, N, E) fp32 tile is ~4 MiB on
    CPU (measured on a 2-core AVX-512 machine: 2-4 MiB tiles are within ~10% of each other; 8 MiB
    and up spill to L3 and lose 30-60%; small ones pay the ~20 per-op overheads of every chunk more
    often), and long chunks on GPUs, where kernel launches dominate instead. Only the
    chunk-boundary states are kept for backward, (B, L / chunk, N, E), so memory barely depends on
    this choice."""
    if device.type != "cpu":
        return 256
    target_elements = 2**20  # 4 MiB of fp32
    chunk = target_elements // max(1, batch * d_inner * d_state)
    return max(16, min(256, 1 << max(0, chunk.bit_length() - 1)))


# ------------------------------------------------------------------------------------------------
# The in-chunk scans. Both work in place on (batch, chunk, N, E) tensors along dim 1, whose length
# must be a power of two. `value` ends up holding the scanned states; `decay` is clobbered.
# ------------------------------------------------------------------------------------------------


def _scan_forward_inplace(decay: torch.Tensor, value: torch.Tensor) -> None:
    """value[t] <- decay[t] · value[t-1] + value[t] for t = 1..c-1 (inclusive prefix scan).

    Blelloch's two sweeps over pairs (decay, value), with the composition
    (d2, v2) ∘ (d1, v1) = (d2 · d1, d2 · v1 + v2) for segment 1 followed by segment 2.
    Up-sweep: position i ≡ 2s-1 (mod 2s) absorbs the segment of length s before it, so it ends up
    covering its aligned segment of length 2s. Down-sweep: position i ≡ s-1 (mod 2s), which covers
    the s positions ending at i, absorbs the finished prefix ending just before its segment.
    2·log2(c) - 1 vectorised steps, ~3c element operations in all.
    """
    b, c = value.shape[:2]
    rest = value.shape[2:]
    stride = 1
    while stride < c:  # up-sweep
        v = value.view(b, c // (2 * stride), 2 * stride, *rest)
        d = decay.view(b, c // (2 * stride), 2 * stride, *rest)
        v[:, :, -1].addcmul_(d[:, :, -1], v[:, :, stride - 1])
        if 2 * stride < c:  # the top level's total decay is never read
            d[:, :, -1].mul_(d[:, :, stride - 1])
        stride *= 2
    stride = c // 4
    while stride >= 1:  # down-sweep: targets at 2s(j+1) + s - 1, their prefix ends at 2s(j+1) - 1
        v = value[:, 2 * stride - 1 : c - 1].view(b, c // (2 * stride) - 1, 2 * stride, *rest)
        d = decay[:, 2 * stride - 1 : c - 1].view(b, c // (2 * stride) - 1, 2 * stride, *rest)
        v[:, :, stride].addcmul_(d[:, :, stride], v[:, :, 0])
        stride //= 2


def _scan_reverse_inplace(decay: torch.Tensor, value: torch.Tensor) -> None:
    """value[t] <- decay[t] · value[t+1] + value[t] for t = c-2..0 (inclusive suffix scan).

    The mirror image of `_scan_forward_inplace` (position i plays the role of c-1-i).
    """
    b, c = value.shape[:2]
    rest = value.shape[2:]
    stride = 1
    while stride < c:  # up-sweep: position i ≡ 0 (mod 2s) absorbs the segment of length s after it
        v = value.view(b, c // (2 * stride), 2 * stride, *rest)
        d = decay.view(b, c // (2 * stride), 2 * stride, *rest)
        v[:, :, 0].addcmul_(d[:, :, 0], v[:, :, stride])
        if 2 * stride < c:
            d[:, :, 0].mul_(d[:, :, stride])
        stride *= 2
    stride = c // 4
    while stride >= 1:  # down-sweep: targets at 2sj + s, their suffix starts at 2s(j+1)
        v = value[:, 1 : c - 2 * stride + 1].view(b, c // (2 * stride) - 1, 2 * stride, *rest)
        d = decay[:, 1 : c - 2 * stride + 1].view(b, c // (2 * stride) - 1, 2 * stride, *rest)
        v[:, :, stride - 1].addcmul_(d[:, :, stride - 1], v[:, :, 2 * stride - 1])
        stride //= 2


# ------------------------------------------------------------------------------------------------
# The chunked selective scan with a memory-lean backward pass.
# ------------------------------------------------------------------------------------------------


class _ChunkedSelectiveScan(torch.autograd.Function):
    """y, h_L = scan(x, Δ, A, B, C, h_0); all fp32, shapes as in `selective_scan`, except that
    states are laid out (batch, N, E) here: with E innermost, the contractions over N (for y and
    for dL/dx) are vector-matrix products, which CPU matmul kernels run well.

    Every (batch, chunk, N, E) tensor in the chunk loops is a buffer allocated once per call and
    written with out= / in-place ops: on CPU a fresh multi-MiB temporary per chunk costs more in
    page faults than the arithmetic done on it.
    """

    @staticmethod
    def forward(ctx, x, delta, A, B, C, initial_state, chunk):
        batch, length, d_inner = x.shape
        d_state = A.shape[1]
        n_chunks = length // chunk  # the caller pads L to a multiple of the chunk
        A2 = (A * LOG2_E).t().contiguous()  # (N, E), so that exp(Δ A) = exp2(Δ A2)
        delta_x = delta * x  # (B, L, E), the Δ_t x_t factor of the scan's input

        y = torch.empty_like(x)
        # boundaries[:, k] is the state before chunk k; the last one is the final state h_L.
        # Only these are kept for the backward pass.
        boundaries = x.new_empty(batch, n_chunks + 1, d_state, d_inner)
        if initial_state is None:
            boundaries[:, 0].zero_()
        else:
            boundaries[:, 0] = initial_state
        decay = x.new_empty(batch, chunk, d_state, d_inner)
        states = x.new_empty(batch, chunk, d_state, d_inner)
        y_chunk = x.new_empty(batch, chunk, 1, d_inner)
        for k in range(n_chunks):
            span = slice(k * chunk, (k + 1) * chunk)
            torch.mul(delta[:, span, None, :], A2, out=decay)  # Δ_t A          (B, c, N, E)
            torch.exp2(decay, out=decay)  # a_t = exp(Δ_t A), in (0, 1]
            torch.mul(B[:, span, :, None], delta_x[:, span, None, :], out=states)  # u_t = Δ_t B_t x_t
            states[:, 0].addcmul_(decay[:, 0], boundaries[:, k])  # fold the carried state in
            _scan_forward_inplace(decay, states)  # states[t] = h_t
            torch.matmul(C[:, span, None, :], states, out=y_chunk)  # y_t = C_t · h_t  (B, c, 1, E)
            y[:, span] = y_chunk.squeeze(2)
            boundaries[:, k + 1] = states[:, -1]

        ctx.chunk = chunk
        ctx.has_initial_state = initial_state is not None
        ctx.save_for_backward(x, delta, A, B, C, boundaries)
        return y, boundaries[:, -1]

    @staticmethod
    def backward(ctx, grad_y, grad_final_state):
        # grad_y's device, not ctx.saved_tensors[0]'s: saved tensors may be unpacked only once
        # (under activation checkpointing a second unpack is an error)
        with torch.autocast(device_type=grad_y.device.type, enabled=False):
            return _ChunkedSelectiveScan._backward(ctx, grad_y, grad_final_state)

    @staticmethod
    def _backward(ctx, grad_y, grad_final_state):
        x, delta, A, B, C, boundaries = ctx.saved_tensors
        chunk = ctx.chunk
        batch, length, d_inner = x.shape
        d_state = A.shape[1]
        n_chunks = length // chunk
        At = A.t().contiguous()  # (N, E)
        A2 = At * LOG2_E
        delta_x = delta * x
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        grad_y = grad_y.contiguous()

        grad_delta_x = torch.empty_like(x)  # dL/d(Δ_t x_t)
        grad_delta = torch.empty_like(x)  # dL/dΔ through the decay exp(Δ A) only, for now
        grad_B = torch.empty_like(B)
        grad_C = torch.empty_like(C)
        # dL/dh at the end of the current chunk, from everything after it.
        carry = x.new_zeros(batch, d_state, d_inner)
        if grad_final_state is not None:
            carry += grad_final_state

        decay = x.new_empty(batch, chunk, d_state, d_inner)
        next_decay = x.new_empty(batch, chunk, d_state, d_inner)
        states = x.new_empty(batch, chunk, d_state, d_inner)
        grad_h = x.new_empty(batch, chunk, d_state, d_inner)
        # Σ over chunks of dL/d(Δ_t A) · Δ_t, summed over (batch, position) once at the end.
        grad_A_terms = x.new_zeros(batch, chunk, d_state, d_inner)
        first_decay = x.new_empty(batch, d_state, d_inner)
        vector_chunk = x.new_empty(batch, chunk, 1, d_inner)
        state_vector_chunk = x.new_empty(batch, chunk, d_state)
        for k in reversed(range(n_chunks)):
            span = slice(k * chunk, (k + 1) * chunk)
            # 1. Recompute the chunk's decays and states from its saved start state.
            torch.mul(delta[:, span, None, :], A2, out=decay)
            torch.exp2(decay, out=decay)
            next_decay[:, :-1] = decay[:, 1:]  # the reverse scan multiplies g_{t+1} by a_{t+1}
            first_decay.copy_(decay[:, 0])
            torch.mul(B[:, span, :, None], delta_x[:, span, None, :], out=states)
            states[:, 0].addcmul_(first_decay, boundaries[:, k])
            _scan_forward_inplace(decay, states)  # states[t] = h_t; decay is now scratch

            # 2. dL/dC_t[n] = Σ_e dL/dy_t[e] h_t[n, e]. (On CPU this multiply-and-sum measured faster
            #    than a batched matrix-vector product.)
            torch.mul(states, grad_y[:, span, None, :], out=decay)
            torch.sum(decay, dim=-1, out=state_vector_chunk)
            grad_C[:, span] = state_vector_chunk

            # 3. g_t = dL/dh_t = C_t dL/dy_t + a_{t+1} g_{t+1}: a reverse scan, whose last
            #    position also receives the carry from the next chunk.
            torch.mul(C[:, span, :, None], grad_y[:, span, None, :], out=grad_h)
            grad_h[:, -1] += carry
            _scan_reverse_inplace(next_decay, grad_h)
            torch.mul(first_decay, grad_h[:, 0], out=carry)  # h_0 = a_0 h_{-1} + u_0

            # 4. The input u_t = B_t (Δ_t x_t) receives g_t.
            torch.matmul(B[:, span, None, :], grad_h, out=vector_chunk)
            grad_delta_x[:, span] = vector_chunk.squeeze(2)
            torch.mul(grad_h, delta_x[:, span, None, :], out=decay)
            torch.sum(decay, dim=-1, out=state_vector_chunk)
            grad_B[:, span] = state_vector_chunk

            # 5. The decay a_t = exp(Δ_t A) receives g_t h_{t-1}, so dL/d(Δ_t A) is
            #    g_t a_t h_{t-1} = g_t (h_t - u_t): no shifted copy of the states needed.
            states.addcmul_(B[:, span, :, None], delta_x[:, span, None, :], value=-1.0)  # h_t - u_t
            states.mul_(grad_h)  # states <- dL/d(Δ_t A)   (B, c, N, E)
            grad_A_terms.addcmul_(states, delta[:, span, None, :])
            torch.mul(states, At, out=decay)
            torch.sum(decay, dim=2, out=vector_chunk.squeeze(2))
            grad_delta[:, span] = vector_chunk.squeeze(2)

        grad_x = grad_delta_x * delta
        grad_delta += grad_delta_x * x
        grad_A = grad_A_terms.sum((0, 1)).t()  # (E, N)
        grad_initial = carry if ctx.has_initial_state else None
        return grad_x, grad_delta, grad_A, grad_B, grad_C, grad_initial, None


def selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, y_t = C_t · h_t, in fp32.

    x, delta: (B, L, E); A: (E, N), negative; B, C: (B, L, N); initial_state: (B, E, N) or None
    (zeros). Returns y (B, L, E) and the final state h_L (B, E, N), both fp32. The skip term D x is
    left to the caller. Differentiable in every tensor argument (including initial_state).
    chunk_size (rounded up to a power of two) trades per-chunk overhead against cache locality;
    None picks `default_chunk_size`. Results do not depend on it beyond rounding.
    """
    batch, length, d_inner = x.shape
    d_state = A.shape[1]
    x, delta, A, B, C = (t.float() for t in (x, delta, A, B, C))
    if chunk_size is None:
        chunk_size = default_chunk_size(batch, d_inner, d_state, x.device)
    # The in-chunk scan needs a power of two; short inputs get a chunk just long enough.
    chunk = min(1 << (chunk_size - 1).bit_length(), 1 << max(0, (length - 1).bit_length()))
    padding = -length % chunk
    if padding:
        # Padded positions have Δ = 0: decay exp(0) = 1 and input 0, so the state passes through
        # them unchanged and the final state is still h_L; their outputs are dropped.
        x, delta, B, C = (F.pad(t, (0, 0, 0, padding)) for t in (x, delta, B, C))
    if initial_state is not None:
        initial_state = initial_state.float().transpose(1, 2).contiguous()  # (B, N, E)
    with torch.autocast(device_type=x.device.type, enabled=False):  # the scan stays fp32
        y, final_state = _ChunkedSelectiveScan.apply(
            x.contiguous(), delta.contiguous(), A, B.contiguous(), C.contiguous(), initial_state, chunk
        )
    return y[:, :length], final_state.transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# Softplus for the step sizes.
# ------------------------------------------------------------------------------------------------


class _Softplus(torch.autograd.Function):
    """softplus(v) = log(1 + exp(v)), computed as max(v, 0) + log1p(exp(-|v|)), with log1p(t)
    evaluated as log(w) · t / (w - 1) for w = 1 + t rounded (Goldberg's trick: within a few ulp,
    2e-7 relative in fp32, like F.softplus). Faster than F.softplus on CPU, whose log1p is scalar
    code while exp and log are vectorised; this runs once per layer over (B, L, E).
    Backward: d softplus(v) / dv = sigmoid(v).
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v)
        tail = v.abs().neg_().exp_()  # exp(-|v|) in (0, 1]
        w = tail + 1.0
        rounded = w - 1.0  # tail as representable after the addition; 0 when tail < ulp(1) / 2
        log1p_tail = w.log_().mul_(tail).div_(rounded)  # 0/0 = nan where rounded == 0...
        log1p_tail = torch.where(rounded == 0, tail, log1p_tail)  # ...where log1p(tail) = tail
        return log1p_tail.add_(v.clamp(min=0))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (v,) = ctx.saved_tensors
        return grad * torch.sigmoid(v)


def softplus(v: torch.Tensor) -> torch.Tensor:
    return _Softplus.apply(v)


# ------------------------------------------------------------------------------------------------
# The mixer.
# ------------------------------------------------------------------------------------------------


@dataclass
class MambaState:
    """Everything one Mamba layer needs to continue a sequence, allocated once per generation."""

    conv: torch.Tensor  # (B, d_conv - 1, E): the last d_conv - 1 inputs of the causal convolution
    ssm: torch.Tensor  # (B, E, N), fp32: the selective state space's state h_t
    # No position counter: nothing here depends on how many positions came before, which also
    # keeps a torch.compile'd decoding step free of Python-int guards.

    def reset(self, rows: Optional[torch.Tensor] = None) -> None:
        """Back to "no position seen" (for `rows` only, (B,) bool, when given)."""
        if rows is None:
            self.conv.zero_()
            self.ssm.zero_()
        else:
            self.conv.masked_fill_(rows[:, None, None], 0)
            self.ssm.masked_fill_(rows[:, None, None], 0)


class MambaMixer(nn.Module):
    """Mamba's selective state space mixer: (B, L, D) -> (B, L, D), causal along L."""

    initialises_itself = True  # HierarchicalByteModel leaves this module's parameters to us

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        n_layers: int = 1,
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.n_layers = n_layers  # only scales the initial out_proj (one residual branch per layer)
        self.chunk_size = chunk_size  # None: `default_chunk_size` for the input at hand

        E = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)  # -> (x, z)
        # Depthwise: one d_conv-tap filter per channel, weight (E, 1, d_conv) as in Mamba. Applied
        # by `_causal_conv` with explicit left context (zeros, or the inputs cached in a state).
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, bias=True)
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * d_state, bias=False)  # -> (δ, B, C)
        self.dt_proj = nn.Linear(self.dt_rank, E, bias=True)  # δ -> Δ before the softplus
        self.A_log = nn.Parameter(torch.empty(E, d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(E, dtype=torch.float32))
        self.out_proj = nn.Linear(E, d_model, bias=False)
        # Hints for optimiser setup: decaying A_log or D towards 0 has no meaning (Mamba exempts them).
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation (Gu & Dao 2023, section 3.6 and the reference model)."""
        E, N = self.d_inner, self.d_state
        # Projections and the convolution: PyTorch's default uniform fan-in initialisation.
        for layer in (self.in_proj, self.conv1d, self.x_proj):
            layer.reset_parameters()
        # out_proj: the same, shrunk by sqrt(n_layers) so that the residual stream's variance
        # stays O(1) however many blocks add into it.
        self.out_proj.reset_parameters()
        self.out_proj.weight /= math.sqrt(self.n_layers)
        # dt_proj's weight: uniform in ±dt_rank^-1/2, so that dt_proj(δ) starts out O(1)...
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        # ...and its bias puts softplus(bias) at step sizes drawn log-uniformly from
        # [dt_min, dt_max]: bias = softplus^-1(Δ) = Δ + log(1 - exp(-Δ)).
        log_dt = torch.empty(E).uniform_(math.log(self.dt_min), math.log(self.dt_max))
        dt = log_dt.exp().clamp(min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # A = -(1, 2, ..., N) for every channel (S4D-real), stored as log so that A stays negative.
        self.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(E, N))
        self.D.fill_(1.0)

    def allocate_state(self, batch_size: int, max_len: int, device, dtype) -> MambaState:
        """The recurrent state for `batch_size` sequences. Its size does not depend on `max_len`
        (accepted for the common mixer interface): the state is O(1) in the sequence length."""
        del max_len
        return MambaState(
            conv=torch.zeros(batch_size, self.d_conv - 1, self.d_inner, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    # -------------------------------------------------------------------------------- forward
    def forward(self, u: torch.Tensor, state: Optional[MambaState] = None, run: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, D) -> (B, L, D). With a state, continue the sequence it holds and update it in
        place: one O(1) recurrent step when L == 1, a parallel prefill when L > 1. `run` (B,)
        bool: only these rows' states advance (one-step decoding; None: all rows)."""
        if state is not None and u.shape[1] == 1:
            return self.step(u, state, run)
        if run is not None:
            raise ValueError("MambaMixer: a parallel prefill advances every row (run must be None)")
        if state is None and u.is_cuda and selective_scan_fn is not None:
            return self._forward_fused(u)
        return self._forward_parallel(u, state)

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, E) -> Δ (B, L, E) fp32, B (B, L, N), C (B, L, N): the input-dependent
        ("selective") parameters."""
        dt_low_rank, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The bias is added in fp32 after the (possibly bf16) matmul: tiny step sizes matter.
        delta = softplus(F.linear(dt_low_rank, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        return delta, B, C

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())  # (E, N), strictly negative: every decay is < 1

    def _causal_conv(self, x_with_context: torch.Tensor) -> torch.Tensor:
        """(B, L + d_conv - 1, E) -> (B, L, E): output t = bias + Σ_k w_k · input (t + k), i.e. taps
        over the current and the d_conv - 1 previous positions. A loop over the d_conv taps with
        shifted views, in the time-major layout the projections use: on CPU faster (forward +
        backward) than nn.Conv1d's depthwise kernel plus the two transposes around it. Products
        with the fp32 weight promote, so under bf16 autocast the convolution runs in fp32."""
        L = x_with_context.shape[1] - (self.d_conv - 1)
        taps = self.conv1d.weight[:, 0]  # (E, d_conv)
        out = self.conv1d.bias + x_with_context[:, 0:L] * taps[:, 0]
        for k in range(1, self.d_conv):
            out = out + x_with_context[:, k : k + L] * taps[:, k]
        return out

    def _forward_parallel(self, u: torch.Tensor, state: Optional[MambaState]) -> torch.Tensor:
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, E) each
        # Causal depthwise convolution over time with d_conv - 1 positions of left context.
        if state is None:
            x_with_context = F.pad(x, (0, 0, self.d_conv - 1, 0))  # zeros before the start
        else:
            x_with_context = torch.cat([state.conv.to(x.dtype), x], dim=1)
            state.conv.copy_(x_with_context[:, -(self.d_conv - 1) :].detach())
        x = F.silu(self._causal_conv(x_with_context))  # (B, L, E), shared by x_proj, scan, D x

        delta, B, C = self._ssm_inputs(x)
        y, final_state = selective_scan(
            x,
            delta,
            self._A(),
            B,
            C,
            initial_state=None if state is None else state.ssm,
            chunk_size=self.chunk_size,
        )
        if state is not None:  # decoding states carry values, not autograd history
            state.ssm.copy_(final_state.detach())
        y = y + x.float() * self.D.float()  # (B, L, E) fp32
        y = y * F.silu(z.float())
        return self.out_proj(y.to(z.dtype))

    def step(self, u: torch.Tensor, state: MambaState, run: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One position, (B, 1, D) -> (B, 1, D), in O(1) time and memory; updates `state` (the
        rows in `run` only, when given). At batch 1 on a CPU every op costs a few microseconds
        whatever its size, so the step is written with as few ops as the maths allows (~20 per
        layer: fused bias, one multiply-and-sum for the convolution, the state updated in place)."""
        x, z = self.in_proj(u[:, 0]).chunk(2, dim=-1)  # (B, E) each
        # Convolution: slide the window by one position and apply the taps to it.
        window = torch.cat([state.conv.to(x.dtype), x[:, None, :]], dim=1)  # (B, d_conv, E)
        state.conv.copy_(window[:, 1:] if run is None else torch.where(run[:, None, None], window[:, 1:], state.conv))
        taps = self.conv1d.weight[:, 0].t()  # (d_conv, E)
        x = F.silu((window * taps).sum(1) + self.conv1d.bias)  # (B, E); fp32 like `_causal_conv`

        dt_low_rank, B, C = self.x_proj(x.to(z.dtype)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if dt_low_rank.dtype == torch.float32:
            delta = F.softplus(F.linear(dt_low_rank, self.dt_proj.weight, self.dt_proj.bias))  # (B, E)
        else:  # the bias is added in fp32 after the bf16 matmul, as in `_ssm_inputs`
            delta = F.softplus(F.linear(dt_low_rank, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        xf = x.float()
        decay = torch.exp(delta[:, :, None] * self._A())  # (B, E, N)
        impulse = (delta * xf)[:, :, None] * B.float()[:, None, :]  # Δ_t B_t x_t  (B, E, N)
        if run is None:
            h = state.ssm.mul_(decay).add_(impulse)  # in place: the state is h_t from here on
        else:
            h = torch.addcmul(impulse, decay, state.ssm)
            state.ssm.copy_(torch.where(run[:, None, None], h, state.ssm))
        y = torch.addcmul(torch.bmm(h, C.float()[:, :, None])[..., 0], xf, self.D.float())  # C_t · h_t + D x_t  (B, E)
        y = y * F.silu(z.float())
        return self.out_proj(y.to(z.dtype))[:, None, :]

    def _forward_fused(self, u: torch.Tensor) -> torch.Tensor:
        """The training path with mamba-ssm's CUDA kernels (same maths, fused)."""
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x, z = x.transpose(1, 2).contiguous(), z.transpose(1, 2).contiguous()  # (B, E, L)
        x = causal_conv1d_fn(x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        dt_low_rank, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        delta = F.linear(dt_low_rank, self.dt_proj.weight).transpose(1, 2)  # (B, E, L), bias in-kernel
        y = selective_scan_fn(
            x,
            delta.contiguous(),
            self._A(),
            B.transpose(1, 2).contiguous(),  # (B, N, L)
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )  # (B, E, L): already (C·h + D x) · SiLU(z)
        return self.out_proj(y.transpose(1, 2))
