"""The Mamba mixer: the chunked scan against a sequential float64 reference (values and gradients),
the recurrent step and prefill paths against the parallel forward, and the paper's initialisation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multibyte.mixers.mamba as mamba
from multibyte.config import ModelConfig, StageConfig
from multibyte.mixers.mamba import (
    MambaMixer,
    _scan_forward_inplace,
    _scan_reverse_inplace,
    selective_scan,
)
from multibyte.model import HierarchicalByteModel


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every tensor here is tiny: a second intra-op thread only adds synchronisation, which costs
    seconds on a busy machine. Restored for the test files that run after this one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sequential_scan(x, delta, A, B, C, initial_state=None):
    """The definition, one position at a time: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,
    y_t = C_t · h_t. x, delta (b, L, E); A (E, N); B, C (b, L, N); state (b, E, N)."""
    b, L, E = x.shape
    h = initial_state if initial_state is not None else x.new_zeros(b, E, A.shape[1])
    ys = []
    for t in range(L):
        decay = torch.exp(delta[:, t, :, None] * A)  # (b, E, N)
        h = decay * h + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1), h


def random_scan_inputs(b, L, E, N, seed, with_state=True, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(b, L, E, generator=g, **f64)
    delta = torch.rand(b, L, E, generator=g, **f64) * delta_scale  # Δ > 0, as after the softplus
    A = -torch.rand(E, N, generator=g, **f64) * 4 - 0.1  # A < 0
    B = torch.randn(b, L, N, generator=g, **f64)
    C = torch.randn(b, L, N, generator=g, **f64)
    h0 = torch.randn(b, E, N, generator=g, **f64) if with_state else None
    return [x, delta, A, B, C, h0]


# ---------------------------------------------------------------------------- the scan itself
@pytest.mark.parametrize(
    "length, chunk",
    [(1, 16), (7, 16), (16, 16), (37, 8), (100, 16), (129, 32), (300, 64)],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_sequential_reference(length, chunk, with_state):
    inputs = random_scan_inputs(2, length, 5, 3, seed=length, with_state=with_state)
    y_ref, h_ref = sequential_scan(*inputs)
    y, h = selective_scan(*inputs, chunk_size=chunk)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape and h.shape == h_ref.shape
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length, chunk", [(5, 4), (37, 8), (130, 32)])
def test_chunked_scan_gradients_equal_reference_gradients(length, chunk):
    inputs = [t.requires_grad_() for t in random_scan_inputs(2, length, 4, 3, seed=7 + length)]
    y_ref, h_ref = sequential_scan(*inputs)
    # Weight the outputs and the final state randomly so every gradient path is exercised.
    g = torch.Generator().manual_seed(0)
    w_y = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    w_h = torch.randn(h_ref.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad((y_ref * w_y).sum() + (h_ref * w_h).sum(), inputs)
    y, h = selective_scan(*inputs, chunk_size=chunk)
    actual = torch.autograd.grad((y.double() * w_y).sum() + (h.double() * w_h).sum(), inputs)
    for name, a, e in zip(["x", "delta", "A", "B", "C", "initial_state"], actual, expected):
        scale = e.abs().max().item()
        assert (a - e).abs().max().item() <= 1e-5 * max(1.0, scale), f"d/d{name} differs"


def test_gradient_of_outputs_alone_and_of_final_state_alone():
    # The backward pass must cope with either output receiving no gradient (None).
    inputs = [t.requires_grad_() for t in random_scan_inputs(1, 20, 3, 2, seed=3)]
    for which in (0, 1):
        ours = selective_scan(*inputs, chunk_size=8)[which].sum()
        ref = sequential_scan(*inputs)[which].sum()
        expected = torch.autograd.grad(ref, inputs, allow_unused=True)  # h_L does not use C
        for a, e, t in zip(torch.autograd.grad(ours, inputs), expected, inputs):
            torch.testing.assert_close(a, torch.zeros_like(t) if e is None else e, rtol=1e-4, atol=1e-5)


def test_scan_is_stable_for_extreme_step_sizes():
    # Δ·A down to -400 (decays that underflow to 0) next to Δ ~ 1e-4 (decays ~1) over many
    # chunks: a scan that exponentiated positive cumulative sums would overflow here.
    x, delta, A, B, C, h0 = random_scan_inputs(1, 600, 4, 3, seed=11)
    delta = torch.where(torch.rand_like(delta) < 0.5, delta * 100, delta * 1e-4)
    y_ref, h_ref = sequential_scan(x, delta, A, B, C, h0)
    y, h = selective_scan(x, delta, A, B, C, h0, chunk_size=64)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_scan_runs_in_fp32_under_bf16_autocast():
    inputs = random_scan_inputs(1, 40, 4, 2, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = selective_scan(*[t.float() for t in inputs], chunk_size=16)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    torch.testing.assert_close(y.double(), sequential_scan(*inputs)[0], rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(log_length=st.integers(0, 7), reverse=st.booleans(), seed=st.integers(0, 2**16))
def test_in_chunk_blelloch_scans_equal_a_running_recurrence(log_length, reverse, seed):
    c = 2**log_length
    g = torch.Generator().manual_seed(seed)
    decay = torch.rand(2, c, 3, 2, generator=g, dtype=torch.float64)
    value = torch.randn(2, c, 3, 2, generator=g, dtype=torch.float64)
    expected = value.clone()
    order = range(c - 2, -1, -1) if reverse else range(1, c)
    for t in order:
        neighbour = t + 1 if reverse else t - 1
        expected[:, t] += decay[:, t] * expected[:, neighbour]
    (_scan_reverse_inplace if reverse else _scan_forward_inplace)(decay.clone(), value)
    torch.testing.assert_close(value, expected)


def test_softplus_matches_the_definition_and_its_gradient_is_sigmoid():
    v = torch.cat([torch.linspace(-80, 80, 20001), torch.tensor([0.0, 1e-8, -1e-8, 17.0, -17.0])])
    exact = torch.log1p(torch.exp(v.double()))  # float64: no rounding problem at this range
    got = mamba.softplus(v).double()
    assert ((got - exact).abs() / exact).max() < 1e-6
    w = torch.randn(64, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(mamba.softplus(w).sum(), w)
    torch.testing.assert_close(grad, torch.sigmoid(w.detach()))


# ---------------------------------------------------------------------------- the mixer
def tiny_mixer(seed=0, **kwargs) -> MambaMixer:
    torch.manual_seed(seed)
    mixer = MambaMixer(8, d_state=4, d_conv=4, expand=2, **kwargs)
    with torch.no_grad():  # larger step sizes than the init so that the state carries far
        mixer.dt_proj.bias.uniform_(-1.0, 1.0)
    return mixer.eval()


def reference_mixer(mixer: MambaMixer, u: torch.Tensor) -> torch.Tensor:
    """The block's equations written plainly in float64: nn.functional.conv1d for the causal
    depthwise convolution, F.softplus, the sequential scan."""
    p = {name: t.detach().double() for name, t in mixer.named_parameters()}
    E, N, R, K = mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.d_conv
    u = u.double()
    L = u.shape[1]
    x, z = (u @ p["in_proj.weight"].T).split(E, dim=-1)
    x = x.transpose(1, 2)  # (B, E, L)
    x = torch.nn.functional.conv1d(x, p["conv1d.weight"], p["conv1d.bias"], padding=K - 1, groups=E)
    x = torch.nn.functional.silu(x[:, :, :L]).transpose(1, 2)  # keep the causal part
    dt, B, C = (x @ p["x_proj.weight"].T).split([R, N, N], dim=-1)
    delta = torch.nn.functional.softplus(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"])
    y, _ = sequential_scan(x, delta, -torch.exp(p["A_log"]), B, C)
    y = (y + x * p["D"]) * torch.nn.functional.silu(z)
    return y @ p["out_proj.weight"].T


def test_mixer_forward_equals_the_plain_equations():
    mixer = tiny_mixer(seed=2, chunk_size=8)
    u = torch.randn(2, 21, 8)
    torch.testing.assert_close(mixer(u).double(), reference_mixer(mixer, u), rtol=1e-5, atol=1e-6)


def test_mixer_recurrent_steps_equal_parallel_forward_at_every_position():
    mixer = tiny_mixer(chunk_size=8)
    u = torch.randn(3, 29, 8)
    parallel = mixer(u)
    state = mixer.allocate_state(3, max_len=29, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        stepped = torch.cat([mixer(u[:, t : t + 1], state) for t in range(29)], dim=1)
    torch.testing.assert_close(stepped, parallel, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", [1, 5, 16, 23])
def test_mixer_prefill_then_steps_equals_one_parallel_pass(split):
    mixer = tiny_mixer(seed=1, chunk_size=8)
    u = torch.randn(2, 30, 8)
    parallel = mixer(u)
    state = mixer.allocate_state(2, max_len=30, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        pieces = [mixer(u[:, :split], state)]  # parallel prefill from the empty state...
        pieces.append(mixer(u[:, split : split + 4], state))  # ...a second one from a live state
        pieces += [mixer(u[:, t : t + 1], state) for t in range(split + 4, 30)]  # then steps
    torch.testing.assert_close(torch.cat(pieces, dim=1), parallel, rtol=1e-5, atol=1e-6)


def test_state_is_constant_size_and_reset_restarts_the_sequence():
    mixer = tiny_mixer()
    short = mixer.allocate_state(2, max_len=8, device="cpu", dtype=torch.float32)
    long = mixer.allocate_state(2, max_len=1 << 20, device="cpu", dtype=torch.float32)
    assert short.conv.shape == long.conv.shape == (2, 3, 16)
    assert short.ssm.shape == long.ssm.shape == (2, 16, 4) and long.ssm.dtype == torch.float32
    u = torch.randn(2, 6, 8)
    with torch.no_grad():
        first = mixer(u, short)
        short.reset()
        again = mixer(u, short)
    torch.testing.assert_close(again, first)


def test_cpu_forward_never_calls_the_fused_cuda_kernels(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("fused kernel called for a CPU tensor")

    monkeypatch.setattr(mamba, "selective_scan_fn", fail)
    monkeypatch.setattr(mamba, "causal_conv1d_fn", fail)
    tiny_mixer()(torch.randn(1, 5, 8)).sum().backward()


def test_initialisation_follows_the_paper():
    N, dt_min, dt_max = 6, 0.002, 0.05
    mixer = MambaMixer(32, d_state=N, expand=2, dt_min=dt_min, dt_max=dt_max, n_layers=9)
    E = 64
    # A = -(1..N) in every channel, D = 1, both fp32 parameters.
    expected_A = -torch.arange(1, N + 1, dtype=torch.float32).expand(E, N)
    torch.testing.assert_close(-torch.exp(mixer.A_log), expected_A)
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32 and (mixer.D == 1).all()
    # softplus(dt bias) lands in [dt_min, dt_max], spread over the range (log-uniform).
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= dt_min * 0.999 and dt.max() <= dt_max * 1.001
    log_dt = dt.log()
    assert log_dt.max() - log_dt.min() > 0.5 * (math.log(dt_max) - math.log(dt_min))
    # out_proj: PyTorch's fan-in bound 1/sqrt(E), shrunk by sqrt(n_layers).
    assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(E) / math.sqrt(9) + 1e-7
    assert mixer.dt_proj.weight.abs().max() <= mixer.dt_rank**-0.5 + 1e-7


def test_model_keeps_the_mixers_own_initialisation():
    config = ModelConfig(stages=[StageConfig("mamba", d_model=16, n_layers=2, d_state=4)], max_seq_len=32, position_embedding=False)
    model = HierarchicalByteModel(config)
    for block in model.stages[0].stack.blocks:
        torch.testing.assert_close(block.mixer.A_log, torch.log(torch.arange(1.0, 5.0)).expand(32, 4))
        assert (block.mixer.D == 1).all()
        assert (torch.nn.functional.softplus(block.mixer.dt_proj.bias) >= 0.001 * 0.999).all()


# ---------------------------------------------------------------------------- whole models
def mambabyte() -> HierarchicalByteModel:
    torch.manual_seed(0)
    config = ModelConfig(stages=[StageConfig("mamba", d_model=16, n_layers=2, d_state=4)], max_seq_len=64, position_embedding=False)
    return HierarchicalByteModel(config).eval()


def hybrid() -> HierarchicalByteModel:
    torch.manual_seed(0)
    config = ModelConfig(
        stages=[
            StageConfig("mamba", d_model=32, n_layers=2, d_state=4, patcher="fixed", patch_size=4),
            StageConfig("attention", d_model=16, n_layers=2, n_heads=2),
        ],
        max_seq_len=64,
        position_embedding=False,
    )
    return HierarchicalByteModel(config).eval()


@torch.no_grad()
def incremental_logits(model: HierarchicalByteModel, tokens: torch.Tensor, prompt: int = 0) -> torch.Tensor:
    """Logits of every position the way a sampler gets them: the model's own prefill of the first
    `prompt` bytes (Mamba's parallel scan from a state), then one recurrent step per byte."""
    B, T = tokens.shape
    state = model.allocate_decode_state(B, T)
    logits = [model.prefill(state, tokens[:, :prompt])]
    for t in range(prompt, T - 1):
        logits.append(model.decode_step(state, tokens[:, t]))
    return torch.stack(logits, dim=1)  # (B, T - prompt, 256)


@pytest.mark.parametrize("build", [mambabyte, hybrid], ids=["mambabyte", "hybrid"])
def test_model_recurrent_decoding_equals_parallel_forward_at_every_position(build):
    model = build()
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        parallel = model(tokens)
    torch.testing.assert_close(incremental_logits(model, tokens), parallel, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", [mambabyte, hybrid], ids=["mambabyte", "hybrid"])
def test_model_prefill_then_steps_equals_parallel_forward(build):
    model = build()
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        parallel = model(tokens)
    torch.testing.assert_close(incremental_logits(model, tokens, prompt=13), parallel[:, 13:], rtol=1e-4, atol=1e-5)


def test_mambabyte_trains_under_bf16_autocast_with_fp32_scan_parameters():
    model = mambabyte().train()
    tokens = torch.randint(0, 256, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), tokens.reshape(-1))
    loss.backward()
    mixer = model.stages[0].stack.blocks[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32
    assert torch.isfinite(mixer.A_log.grad).all() and mixer.A_log.grad.abs().sum() > 0
    assert torch.isfinite(mixer.D.grad).all() and mixer.D.grad.abs().sum() > 0
