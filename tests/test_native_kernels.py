"""The native CPU kernels (`multibyte.kernels`) against their PyTorch references.

`attention_step.c` is one decoding position of an attention stack: it must give the blocks'
output, write the same keys and values into the caches and advance the same lengths, with and
without rotary positions, for rows at different positions; `mamba_step.c` the same for a Mamba
stack and its convolution and state space states. Both must refuse (and change nothing) where
they cannot run, so that the reference runs instead; and the libraries must build, cache and
fail the way `multibyte/kernels/__init__.py` says. Skipped only where there is no C compiler.
"""

import shutil
import warnings

import pytest
import torch

import multibyte.kernels as kernels
from architectures import build
from multibyte.config import ModelConfig, StageConfig
from multibyte.kernels import bind_stack_step
from multibyte.kernels.attention import NativeAttentionStep, NativeByteStep
from multibyte.kernels.mamba import NativeMambaStep
from multibyte.model import HierarchicalByteModel, Stack
from multibyte.sampling import allocate_decode_state, decode_step, generate, prefill

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the native kernels")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_stack(d_model: int, n_heads: int, n_layers: int, position: str = "none", seed: int = 0) -> Stack:
    """A stack with every weight random, norm gains included (a kernel that skipped one would pass
    with the default gains of 1)."""
    torch.manual_seed(seed)
    stack = Stack(StageConfig("attention", d_model, n_layers, n_heads, position=position, rotary_base=100.0), 0.0, 1e-5).eval()
    with torch.no_grad():
        for parameter in stack.parameters():
            parameter.copy_(torch.randn_like(parameter) * (0.5 if parameter.dim() == 1 else parameter.shape[-1] ** -0.5) + (1.0 if parameter.dim() == 1 else 0.0))
    return stack


@pytest.mark.parametrize(
    "d_model, n_heads, n_layers, position, batch",
    [(32, 4, 2, "none", 1), (48, 3, 3, "rotary", 3), (24, 2, 1, "none", 2), (64, 4, 2, "rotary", 1)],
)
def test_native_step_equals_the_pytorch_blocks(d_model, n_heads, n_layers, position, batch):
    stack = random_stack(d_model, n_heads, n_layers, position)
    reference = stack.allocate_states(batch, 40, "cpu", torch.float32)
    native_states = stack.allocate_states(batch, 40, "cpu", torch.float32)
    native = NativeAttentionStep.bind(stack, native_states)
    assert native is not None
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in range(25):
            x = torch.randn(batch, 1, d_model, generator=generator) * 2
            expected = stack(x, reference)
            got = native(x)
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-5, msg=f"output at position {t}")
    for ref, new in zip(reference, native_states):
        assert torch.equal(ref.lengths, new.lengths) and ref.bound == new.bound == 25
        torch.testing.assert_close(new.keys[:, :, :25], ref.keys[:, :, :25], rtol=0, atol=2e-5)
        torch.testing.assert_close(new.values[:, :, :25], ref.values[:, :, :25], rtol=0, atol=2e-5)


@pytest.mark.parametrize("d_model, n_layers, d_state, d_conv, batch", [(32, 2, 4, 4, 1), (24, 3, 8, 3, 3), (16, 1, 16, 2, 2)])
def test_native_mamba_step_equals_the_pytorch_blocks(d_model, n_layers, d_state, d_conv, batch):
    torch.manual_seed(2)
    stack = Stack(StageConfig("mamba", d_model, n_layers, 2, d_state=d_state, d_conv=d_conv), 0.0, 1e-5).eval()
    with torch.no_grad():
        for name, parameter in stack.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.5 * torch.randn_like(parameter))
            elif name.endswith("dt_proj.bias"):
                parameter.add_(torch.randn_like(parameter))  # step sizes from ~0.05 to ~1
    reference = stack.allocate_states(batch, 40, "cpu", torch.float32)
    native_states = stack.allocate_states(batch, 40, "cpu", torch.float32)
    native = bind_stack_step(stack, native_states)
    assert isinstance(native, NativeMambaStep)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in range(25):
            x = torch.randn(batch, 1, d_model, generator=generator) * 2
            torch.testing.assert_close(native(x), stack(x, reference), rtol=0, atol=2e-5, msg=f"output at position {t}")
    for ref, new in zip(reference, native_states):
        torch.testing.assert_close(new.conv, ref.conv, rtol=0, atol=2e-5)
        torch.testing.assert_close(new.ssm, ref.ssm, rtol=1e-5, atol=2e-5)


def test_rows_at_different_positions_attend_over_their_own_lengths():
    # Row 0 holds 7 positions, row 1 holds 3 (as after prompts of different lengths): each row's
    # new entry goes to its own slot, rotary turns it by its own position, and it attends to its own.
    stack = random_stack(32, 2, 2, "rotary", seed=3)
    reference = stack.allocate_states(2, 20, "cpu", torch.float32)
    native_states = stack.allocate_states(2, 20, "cpu", torch.float32)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for t in range(7):
            x = torch.randn(2, 1, 32, generator=generator)
            run = torch.tensor([True, t < 3])
            stack(x, reference, run)
            stack(x, native_states, run)  # not native: bound below, after the masked steps
        native = NativeAttentionStep.bind(stack, native_states)
        assert native_states[0].lengths.tolist() == [7, 3]
        for _ in range(4):
            x = torch.randn(2, 1, 32, generator=generator)
            torch.testing.assert_close(native(x), stack(x, reference), rtol=0, atol=2e-5)
    assert native_states[1].lengths.tolist() == reference[1].lengths.tolist() == [11, 7]


def test_a_full_cache_is_refused_untouched_and_the_reference_raises():
    stack = random_stack(16, 2, 1)
    states = stack.allocate_states(1, 3, "cpu", torch.float32)
    native = NativeAttentionStep.bind(stack, states)
    with torch.no_grad():
        for _ in range(3):
            assert native(torch.randn(1, 1, 16)) is not None
        keys = states[0].keys.clone()
        assert native(torch.randn(1, 1, 16)) is None
        assert torch.equal(states[0].keys, keys) and states[0].lengths.tolist() == [3]
        states.native = native
        with pytest.raises(ValueError, match="KV cache holds 3 positions"):
            stack(torch.randn(1, 1, 16), states)


def test_the_kernel_is_not_bound_where_it_cannot_run():
    stack = random_stack(16, 2, 1)
    static = stack.allocate_states(1, 8, "cpu", torch.float32)
    static[0].make_static()
    assert NativeAttentionStep.bind(stack, static) is None  # compiled decoding's static caches
    assert NativeAttentionStep.bind(stack, stack.allocate_states(1, 8, "cpu", torch.bfloat16)) is None
    mamba = Stack(StageConfig("mamba", 16, 1, 2, d_state=4), 0.0, 1e-5)
    assert NativeAttentionStep.bind(mamba, mamba.allocate_states(1, 8, "cpu", torch.float32)) is None
    assert NativeMambaStep.bind(stack, stack.allocate_states(1, 8, "cpu", torch.float32)) is None
    assert bind_stack_step(mamba, mamba.allocate_states(1, 8, "cpu", torch.bfloat16)) is None
    assert bind_stack_step(mamba, mamba.allocate_states(17, 8, "cpu", torch.float32)) is None  # > NATIVE_MAX_BATCH
    assert bind_stack_step(stack, stack.allocate_states(17, 8, "cpu", torch.float32)) is None
    native = NativeAttentionStep.bind(stack, stack.allocate_states(2, 8, "cpu", torch.float32))
    assert native(torch.randn(2, 1, 16, dtype=torch.bfloat16)) is None  # wrong dtype: the reference runs
    assert native(torch.randn(3, 1, 16)) is None  # wrong batch


@pytest.mark.parametrize("name", ["megabyte", "megabyte-3stage", "megabyte-lags", "vanilla", "mambabyte", "hybrid", "space", "space-3stage-mamba"])
def test_decoding_with_the_kernel_gives_the_pytorch_logits(name):
    model = build(name, seed=5)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(6))
    states = {native: allocate_decode_state(model, 2, 40, native=native) for native in (False, True)}
    stacks_bound = [s.native is not None for s in states[True].stage_states]
    assert any(stacks_bound) and not any(s.native is not None for s in states[False].stage_states)
    with torch.no_grad():
        logits = {native: prefill(model, state, prompt) for native, state in states.items()}
        for t in range(30):
            torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-4, msg=f"byte {t}")
            byte = logits[False].argmax(-1)
            logits = {native: decode_step(model, state, byte) for native, state in states.items()}


def test_generate_uses_the_kernels_and_draws_the_same_bytes():
    config = ModelConfig(
        stages=[
            StageConfig("attention", 96, 2, 2, patcher="fixed", patch_size=12, position="grid", grid=[4, 4], lags=[3, 4]),
            StageConfig("attention", 48, 2, 4),
        ],
        max_seq_len=192,
        position_embedding=False,
    )
    torch.manual_seed(0)
    model = HierarchicalByteModel(config).eval()
    state = allocate_decode_state(model, 1, 192)
    assert all(s.native is not None for s in state.stage_states) and state.byte_step is not None  # sampling's default
    with_kernels = generate(model, torch.zeros(1, 0, dtype=torch.long), 190, seed=3)
    calls = {"stack": 0, "byte": 0}
    refuse = {
        NativeAttentionStep: lambda self, x: calls.__setitem__("stack", calls["stack"] + 1),
        NativeByteStep: lambda self, byte, slot, index: calls.__setitem__("byte", calls["byte"] + 1),
    }  # both return None: the PyTorch step runs
    originals = {kernel: kernel.__call__ for kernel in refuse}
    try:
        for kernel, replacement in refuse.items():
            kernel.__call__ = replacement
        without = generate(model, torch.zeros(1, 0, dtype=torch.long), 190, seed=3)
    finally:
        for kernel, original in originals.items():
            kernel.__call__ = original
    # Every byte inside a patch asked the byte step first, every stage step the stack step.
    assert calls["byte"] == 189 - 189 // 12 and calls["stack"] > 190
    # Rounding (~1e-6) may move a draw only where two bytes' cumulative probabilities meet the
    # noise within that distance; over 190 draws of random logits none does.
    assert torch.equal(with_kernels, without)


BYTE_STEP_MODELS = {
    "megabyte-lags": [
        StageConfig("attention", 64, 2, 2, patcher="fixed", patch_size=4, lags=[2, 3]),
        StageConfig("attention", 24, 2, 2, position="rotary"),
    ],
    "megabyte-3stage": [
        StageConfig("attention", 64, 2, 2, patcher="fixed", patch_size=8),
        StageConfig("attention", 32, 1, 2, patcher="fixed", patch_size=2),
        StageConfig("attention", 24, 1, 2),
    ],
}


@pytest.mark.parametrize("name", BYTE_STEP_MODELS)
def test_the_native_byte_step_updates_the_state_as_pytorch_does(name):
    # Every counter, the unit's bytes and every cache, after bytes inside and across units.
    torch.manual_seed(8)
    model = HierarchicalByteModel(ModelConfig(stages=BYTE_STEP_MODELS[name], max_seq_len=64, position_embedding=False)).eval()
    prompt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(9))
    states = {native: allocate_decode_state(model, 2, 40, native=native) for native in (False, True)}
    assert states[True].byte_step is not None and states[False].byte_step is None
    with torch.no_grad():
        logits = {native: prefill(model, state, prompt) for native, state in states.items()}
        for t in range(20):
            byte = logits[False].argmax(-1)
            logits = {native: decode_step(model, state, byte) for native, state in states.items()}
            torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-4, msg=f"byte {t}")
            for field in ("unit_tokens", "unit_present", "coords", "unit_lengths", "positions"):
                assert torch.equal(getattr(states[True], field), getattr(states[False], field)), (field, t)
            for ref, new in zip((c for s in states[False].stage_states for c in s), (c for s in states[True].stage_states for c in s)):
                assert torch.equal(ref.lengths, new.lengths) and ref.bound == new.bound


def test_the_byte_step_leaves_a_hooked_head_to_pytorch():
    # A forward hook on the head (as sample_to_files adds to mask a subword model's unused ids)
    # must see every call: the byte step then declines and the PyTorch step runs.
    torch.manual_seed(4)
    model = HierarchicalByteModel(ModelConfig(stages=BYTE_STEP_MODELS["megabyte-3stage"], max_seq_len=64, position_embedding=False)).eval()
    state = allocate_decode_state(model, 1, 20)
    assert state.byte_step is not None
    seen = []
    handle = model.head.register_forward_hook(lambda module, inputs, output: seen.append(1))
    try:
        with torch.no_grad():
            logits = prefill(model, state, torch.zeros(1, 0, dtype=torch.long))
            for _ in range(9):
                logits = decode_step(model, state, logits.argmax(-1))
    finally:
        handle.remove()
    assert len(seen) == 10


def test_switched_off_and_unbuildable_kernels_fall_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("MULTIBYTE_NATIVE", "0")
    assert kernels.load("attention_step") is None
    stack = random_stack(16, 2, 1)
    assert NativeAttentionStep.bind(stack, stack.allocate_states(1, 8, "cpu", torch.float32)) is None
    model = build("megabyte", seed=1)
    assert generate(model, torch.zeros(1, 0, dtype=torch.long), 9, temperature=0).shape == (1, 9)

    monkeypatch.setenv("MULTIBYTE_NATIVE", "1")
    monkeypatch.setenv("MULTIBYTE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with pytest.warns(RuntimeWarning, match="native kernel 'attention_step' unavailable.*failed"):
        assert kernels.load("attention_step") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.load("attention_step") is None  # decided once per process: no second warning
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind


def test_the_library_is_built_once_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("MULTIBYTE_KERNEL_CACHE", str(tmp_path))
    path = kernels.library_path("attention_step")
    assert path.parent == tmp_path and not path.exists()
    assert kernels.load("attention_step") is not None
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]
    built = path.stat().st_mtime_ns
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.load("attention_step") is not None
    assert path.stat().st_mtime_ns == built  # reused, not rebuilt
