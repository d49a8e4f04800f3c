"""The native CPU kernels (`multibyte.kernels`) against their PyTorch references.

`attention_step.c` is one decoding position of an attention stack: it must give the blocks'
output, write the same keys and values into the caches and advance the same lengths, with and
without rotary positions, for rows at different positions; `mamba_step.c` the same for a Mamba
stack and its convolution and state space states. Both must refuse (and change nothing) where
they cannot run, so that the reference runs instead; and the libraries must build, cache and
fail the way `multibyte/kernels/__init__.py` says. Skipped only where there is no C compiler.
"""

import ctypes
import itertools
import shutil
import subprocess
import warnings

import pytest
import torch

import multibyte.kernels as kernels
from architectures import build
from multibyte import cpu_features
from multibyte.config import ModelConfig, StageConfig
from multibyte.kernels import bind_stack_step
from multibyte.kernels.attention import NativeAttentionStep
from multibyte.kernels.decode_run import NativeDecode
from multibyte.kernels.mamba import NativeMambaStep
from multibyte.mixers.mamba import MambaState
from multibyte.model import HierarchicalByteModel, Stack
from multibyte.sampling import allocate_decode_state, decode_step, exponential_noise, generate, prefill, sample_with_noise
from multibyte.weight_formats import matrix_format, round_matrices, rounded

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
    # head widths 8, 16, 12, 16, 48, 64: one to four whole vectors of 16 or 8 lanes, and not whole
    [(32, 4, 2, "none", 1), (48, 3, 3, "rotary", 3), (24, 2, 1, "none", 2), (64, 4, 2, "rotary", 1), (96, 2, 1, "none", 2), (128, 2, 1, "rotary", 1)],
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
    too_many = kernels.NATIVE_MAX_BATCH + 1
    assert bind_stack_step(mamba, mamba.allocate_states(too_many, 8, "cpu", torch.float32)) is None
    assert bind_stack_step(stack, stack.allocate_states(too_many, 8, "cpu", torch.float32)) is None
    native = NativeAttentionStep.bind(stack, stack.allocate_states(2, 8, "cpu", torch.float32))
    assert native(torch.randn(2, 1, 16, dtype=torch.bfloat16)) is None  # wrong dtype: the reference runs
    assert native(torch.randn(3, 1, 16)) is None  # wrong batch


def assert_same_logits(model, states: dict, prompt: torch.Tensor, steps: int = 30) -> None:
    """Prefill `prompt` into both decode states ({native: state}), then decode `steps` bytes (the
    PyTorch state's greedy choices): the native state's logits must equal PyTorch's each time."""
    with torch.no_grad():
        logits = {native: prefill(model, state, prompt) for native, state in states.items()}
        for t in range(steps):
            torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-4, msg=f"byte {t}")
            byte = logits[False].argmax(-1)
            logits = {native: decode_step(model, state, byte) for native, state in states.items()}


@pytest.mark.parametrize("name", ["megabyte", "megabyte-3stage", "megabyte-lags", "vanilla", "mambabyte", "hybrid", "space", "space-3stage-mamba"])
def test_decoding_with_the_kernel_gives_the_pytorch_logits(name):
    model = build(name, seed=5)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(6))
    states = {native: allocate_decode_state(model, 2, 40, native=native) for native in (False, True)}
    stacks_bound = [s.native is not None for s in states[True].stage_states]
    assert any(stacks_bound) and not any(s.native is not None for s in states[False].stage_states)
    assert_same_logits(model, states, prompt)


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
@pytest.mark.parametrize("name", ["megabyte-lags", "vanilla", "mambabyte", "hybrid"])
def test_a_model_on_a_compact_grid_decodes_from_compact_matrices_with_the_same_logits(name, fmt):
    # Every matrix rounded to the bf16 or int8 grid and kept in fp32 (sample --dtype bfloat16 on a
    # CPU, sample --quantize int8): the kernels read bf16 or packed int8 copies of the matrices
    # and must compute what PyTorch computes from the fp32 ones.
    model = round_matrices(build(name, seed=5), fmt)
    assert matrix_format(model) == fmt and matrix_format(build(name, seed=5)) == "float32"
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(6))
    states = {native: allocate_decode_state(model, 2, 40, native=native) for native in (False, True)}
    bound = [s.native for s in states[True].stage_states if s.native is not None]
    assert bound and all(step.weight_format == fmt for step in bound)
    assert states[True].native_decode is not None
    assert_same_logits(model, states, prompt)


@pytest.mark.skipif(cpu_features.vector_capability() != "AVX512", reason="only an AVX-512 CPU has a second vector width to build")
@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_the_eight_lane_build_decodes_with_the_pytorch_logits(fmt, monkeypatch, tmp_path):
    # Every library as an AVX2 CPU gets it (eight-lane vectors, no AVX-512 masks; the selects of
    # exp's clamp and softplus must vectorize there too): MambaByte, MEGABYTE with lags and
    # SpaceByte decode through it with PyTorch's logits.
    monkeypatch.setenv("MULTIBYTE_KERNEL_FLAGS", "-mno-avx512f")
    monkeypatch.setenv("MULTIBYTE_KERNEL_CACHE", str(tmp_path))
    for name in ("mambabyte", "megabyte-lags", "space"):
        model = build(name, seed=5)
        if fmt != "float32":
            round_matrices(model, fmt)
        prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(6))
        states = {native: allocate_decode_state(model, 1, 40, native=native) for native in (False, True)}
        assert states[True].native_decode is not None
        assert_same_logits(model, states, prompt)
    # built here, with the flags above (a library's file name hashes its flags)
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.so")) == ["attention_step", "decode_run", "mamba_step"]


def test_compact_matrices_are_used_only_where_the_weights_are_on_their_grid():
    linear = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -0.5, 2.0**-20], [3.0, 0.0, 256.0]]))  # all exact in bf16
        assert matrix_format(linear) == "bfloat16"
        linear.weight[0, 0] = 1.0 + 2.0**-8  # bf16 keeps 8 significant bits: 1 + 2^-8 is not one
        assert matrix_format(linear) == "float32"
        # int8 grid of row 0: scale 2.54 / 127 = 0.02, values 0.02 * (127, -50, 1); row 1 all zero
        linear.weight.copy_(torch.tensor([[127.0, -50.0, 1.0], [0.0, 0.0, 0.0]]) * torch.tensor([[0.02], [1.0]]))
        assert matrix_format(linear) == "int8"
        linear.weight[0, 1] += 0.005  # a quarter step off the grid
        assert matrix_format(linear) == "float32"
    assert matrix_format(torch.nn.LayerNorm(4)) == "float32"  # no matrices at all
    copy = kernels.matrix_for_kernel(torch.tensor([[1.0, 2.5]]), "bfloat16")
    assert copy.dtype == torch.bfloat16 and copy.is_contiguous() and copy.tolist() == [[1.0, 2.5]]
    # packed int8: the rows' fp32 scales, then the values row by row
    packed = kernels.matrix_for_kernel(torch.tensor([[2.54, -1.0, 0.02], [0.0, 0.0, 0.0]]), "int8")
    assert packed.dtype == torch.uint8 and packed.numel() == 2 * 4 + 2 * 3
    assert packed[:8].view(torch.float32).tolist() == pytest.approx([0.02, 0.0])
    assert packed[8:].view(torch.int8).tolist() == [127, -50, 1, 0, 0, 0]
    for fmt, suffix in (("bfloat16", "-bf16w-"), ("int8", "-int8w-")):
        assert kernels.library_path("decode_run", fmt).name.startswith("decode_run" + suffix)
        assert kernels.library_path("decode_run", fmt) != kernels.library_path("decode_run")


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
    assert all(s.native is not None for s in state.stage_states)  # sampling's default
    assert state.native_decode is not None and state.native_decode.has_unit_step
    with_kernels = generate(model, torch.zeros(1, 0, dtype=torch.long), 190, seed=3)
    calls = {"stack": 0, "step": 0, "run": 0}

    def count(name):
        return lambda *args: calls.__setitem__(name, calls[name] + 1)  # returns None: PyTorch runs

    refuse = [(NativeAttentionStep, "__call__", "stack"), (NativeDecode, "step", "step"), (NativeDecode, "run", "run")]
    originals = [(kernel, method, getattr(kernel, method)) for kernel, method, _ in refuse]
    try:
        for kernel, method, name in refuse:
            setattr(kernel, method, count(name))
        without = generate(model, torch.zeros(1, 0, dtype=torch.long), 190, seed=3)
    finally:
        for kernel, method, original in originals:
            setattr(kernel, method, original)
    # Every step asked for a native run first, then for the native whole step, every stage step
    # the stack step.
    assert calls["run"] == calls["step"] == 189 and calls["stack"] > 190
    # Rounding (~1e-6) may move a draw only where two bytes' cumulative probabilities meet the
    # noise within that distance; over 190 draws of random logits none does.
    assert torch.equal(with_kernels, without)


BYTE_STEP_MODELS = {
    "megabyte-lags": [
        StageConfig("attention", 64, 2, 2, patcher="fixed", patch_size=4, lags=[2, 3]),
        StageConfig("attention", 24, 2, 2, position="rotary"),
    ],
    "megabyte-grid": [
        StageConfig("attention", 48, 2, 2, patcher="fixed", patch_size=4, position="grid", grid=[2, 3], lags=[1, 3]),
        StageConfig("attention", 24, 1, 2),
    ],
    "megabyte-learned": [
        StageConfig("attention", 48, 1, 2, patcher="fixed", patch_size=3, position="learned"),
        StageConfig("attention", 32, 2, 4, position="rotary"),
    ],
    "megabyte-3stage": [
        StageConfig("attention", 64, 2, 2, patcher="fixed", patch_size=8),
        StageConfig("attention", 32, 1, 2, patcher="fixed", patch_size=2),
        StageConfig("attention", 24, 1, 2),
    ],
    # Byte positions (the text and audio presets): recorded per byte for the global pooling.
    "megabyte-byte-positions": [
        StageConfig("attention", 64, 2, 2, patcher="fixed", patch_size=4),
        StageConfig("attention", 32, 2, 2),
    ],
    # One stage: the vanilla byte transformer (rotary or byte positions) and MambaByte.
    "vanilla": [StageConfig("attention", 32, 2, 4, position="rotary")],
    "vanilla-byte-positions": [StageConfig("attention", 32, 2, 4)],
    "mambabyte": [StageConfig("mamba", 32, 2, d_state=8, d_conv=4, expand=2)],
    "megabyte-3stage-byte-positions": [
        StageConfig("attention", 64, 1, 2, patcher="fixed", patch_size=4),
        StageConfig("attention", 32, 1, 2, patcher="fixed", patch_size=2),
        StageConfig("attention", 24, 1, 2),
    ],
}


def byte_step_model(name: str) -> HierarchicalByteModel:
    config = ModelConfig(stages=BYTE_STEP_MODELS[name], max_seq_len=64, position_embedding=name.endswith("byte-positions"))
    return HierarchicalByteModel(config).eval()


@pytest.mark.parametrize("name", BYTE_STEP_MODELS)
def test_the_native_whole_steps_update_the_state_as_pytorch_does(name):
    # Every counter, the unit's bytes, the contexts, the lag ring and every cache, after bytes
    # inside and across units (a two-stage model's patch ends take the unit step).
    torch.manual_seed(8)
    model = byte_step_model(name)
    prompt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(9))
    states = {native: allocate_decode_state(model, 2, 40, native=native) for native in (False, True)}
    assert states[True].native_decode is not None and states[False].native_decode is None
    assert states[True].native_decode.has_unit_step == (len(model.stages) == 2)
    with torch.no_grad():
        logits = {native: prefill(model, state, prompt) for native, state in states.items()}
        for t in range(20):
            byte = logits[False].argmax(-1)
            logits = {native: decode_step(model, state, byte) for native, state in states.items()}
            torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-4, msg=f"byte {t}")
            assert_same_decode_state(states[True], states[False], t)


def assert_same_decode_state(new, ref, where) -> None:
    for field in ("unit_tokens", "unit_present", "coords", "unit_lengths", "positions"):
        assert torch.equal(getattr(new, field), getattr(ref, field)), (field, where)
    assert new.host_position == ref.host_position, where
    if ref.unit_extra is not None:  # byte positions' vectors, copied from the table
        assert torch.equal(new.unit_extra, ref.unit_extra), where
    for a, b in zip(new.contexts[1:], ref.contexts[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=f"contexts at {where}")
    if ref.lag_ring is not None:
        torch.testing.assert_close(new.lag_ring, ref.lag_ring, rtol=0, atol=1e-4, msg=f"lag ring at {where}")
    for old, cache in zip((c for s in ref.stage_states for c in s), (c for s in new.stage_states for c in s)):
        if isinstance(old, MambaState):
            torch.testing.assert_close(cache.conv, old.conv, rtol=0, atol=1e-4)
            torch.testing.assert_close(cache.ssm, old.ssm, rtol=1e-4, atol=1e-4)
            continue
        assert torch.equal(old.lengths, cache.lengths) and old.bound == cache.bound and old.uniform == cache.uniform, where
        for rows, length in enumerate(old.lengths.tolist()):
            torch.testing.assert_close(cache.keys[rows, :, :length], old.keys[rows, :, :length], rtol=0, atol=1e-4)
            torch.testing.assert_close(cache.values[rows, :, :length], old.values[rows, :, :length], rtol=0, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("name", BYTE_STEP_MODELS)
def test_a_native_run_draws_and_steps_as_pytorch_does(name, temperature):
    # Steps and draws in native runs against decode_step + sample_with_noise with the same noise
    # in PyTorch: the same bytes and the same state after. A one- or two-stage model runs all 29
    # steps in one call; a three-stage one stops where a middle unit ends and takes that step elsewhere.
    torch.manual_seed(3)
    model = byte_step_model(name)
    B, steps = 2, 30
    prompt = torch.randint(0, 256, (B, 5), generator=torch.Generator().manual_seed(4))
    noise = exponential_noise((steps, B, 256), torch.device("cpu"), torch.Generator().manual_seed(5))
    states = {native: allocate_decode_state(model, B, 40, native=native) for native in (False, True)}
    with torch.no_grad():
        first = sample_with_noise(prefill(model, states[False], prompt), noise[0], temperature)
        assert torch.equal(sample_with_noise(prefill(model, states[True], prompt), noise[0], temperature), first)
        expected, byte = [], first
        for j in range(1, steps):
            byte = sample_with_noise(decode_step(model, states[False], byte), noise[j], temperature)
            expected.append(byte)
        got, byte, j, runs = [], first, 1, 0
        while j < steps:
            drawn = states[True].native_decode.run(byte, steps - j, noise[j:] if temperature > 0 else None, temperature)
            if drawn is None:  # a step no native run takes
                drawn = sample_with_noise(decode_step(model, states[True], byte), noise[j], temperature)[None]
            else:
                runs += 1
            got.extend(drawn)
            byte, j = drawn[-1], j + len(drawn)
    assert torch.equal(torch.stack(got), torch.stack(expected))
    assert runs == 1 if len(model.stages) <= 2 else runs > 1
    assert_same_decode_state(states[True], states[False], "the end")


def spacebyte_model() -> HierarchicalByteModel:
    # Units end at word boundaries, or at 4 bytes (the cap), for a 4 x 8-wide concatenated patch.
    stages = [StageConfig("attention", 32, 1, 2, patcher="space", patch_size=4), StageConfig("attention", 24, 1, 2)]
    return HierarchicalByteModel(ModelConfig(stages=stages, max_seq_len=64, position_embedding=True)).eval()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_native_run_ends_spacebyte_units_where_the_patcher_does(temperature):
    # One row of a SpaceByte model: the run applies the word rule to every byte it feeds. Bytes
    # drawn, counters, the patcher's state and every cache match PyTorch's steps with the same
    # noise, the prompt ending inside a unit; units end by the rule and by the length cap.
    torch.manual_seed(6)
    model = spacebyte_model()
    steps = 40
    prompt = torch.tensor([[104, 105, 32, 116, 104]])  # "hi th"
    noise = exponential_noise((steps, 1, 256), torch.device("cpu"), torch.Generator().manual_seed(7))
    states = {native: allocate_decode_state(model, 1, 48, native=native) for native in (False, True)}
    assert states[True].native_decode is not None and states[False].native_decode is None
    unit_lengths = []
    with torch.no_grad():
        first = sample_with_noise(prefill(model, states[False], prompt), noise[0], temperature)
        assert torch.equal(sample_with_noise(prefill(model, states[True], prompt), noise[0], temperature), first)
        expected, byte = [first], first
        for j in range(1, steps):
            byte = sample_with_noise(decode_step(model, states[False], byte), noise[j], temperature)
            expected.append(byte)
            unit_lengths.append(int(states[False].unit_lengths[0, 0]))
        drawn = states[True].native_decode.run(first, steps - 1, noise[1:] if temperature > 0 else None, temperature)
    assert drawn is not None and torch.equal(torch.cat([first[None], drawn]), torch.stack(expected))
    ended = [length for length, after in zip(unit_lengths, unit_lengths[1:]) if after == 0]
    assert 3 in ended and min(ended) < 3  # the cap (a unit of 4 bytes) and the rule both ended units
    new, ref = states[True], states[False]
    for field in ("unit_tokens", "unit_present", "coords", "unit_lengths", "positions"):
        assert torch.equal(getattr(new, field), getattr(ref, field)), field
    assert torch.equal(new.patcher_states[0], ref.patcher_states[0]) and torch.equal(new.unit_extra, ref.unit_extra)
    torch.testing.assert_close(new.contexts[1], ref.contexts[1], rtol=0, atol=1e-4)
    for old, cache in zip((c for s in ref.stage_states for c in s), (c for s in new.stage_states for c in s)):
        assert torch.equal(old.lengths, cache.lengths) and cache.bound >= int(cache.lengths.max())
        length = int(old.lengths[0])
        torch.testing.assert_close(cache.keys[0, :, :length], old.keys[0, :, :length], rtol=0, atol=1e-4)
        torch.testing.assert_close(cache.values[0, :, :length], old.values[0, :, :length], rtol=0, atol=1e-4)


def test_the_native_word_rule_is_the_patchers():
    from multibyte.kernels.decode_run import _library
    from multibyte.patchers.space import space_like

    library = _library()
    if library is None:
        pytest.skip("no native kernels here")
    library.multibyte_space_like.argtypes, library.multibyte_space_like.restype = [ctypes.c_int64], ctypes.c_int
    native = [bool(library.multibyte_space_like(byte)) for byte in range(256)]
    assert native == space_like(torch.arange(256)).tolist()


def test_spacebyte_rows_of_a_batch_decode_in_pytorch():
    # Rows end their words at different bytes: no native run binds, and generate gives the
    # PyTorch-only bytes.
    model = spacebyte_model()
    assert allocate_decode_state(model, 2, 16).native_decode is None
    prompt = torch.tensor([[104, 105], [32, 33]])
    assert torch.equal(generate(model, prompt, 20, seed=1), generate(model, prompt, 20, seed=1, native=False))


DRAW_OPTIONS = {
    "top-k": dict(temperature=0.9, top_k=5),
    "top-p": dict(temperature=0.7, top_p=0.8),
    "top-k-and-p": dict(temperature=1.0, top_k=40, top_p=0.6),
}


@pytest.mark.parametrize("options", DRAW_OPTIONS.values(), ids=list(DRAW_OPTIONS))
def test_a_native_run_masks_as_sample_with_noise_does(options):
    # Spread logits (a scaled head), so that the top-k and top-p masks cut real candidates.
    torch.manual_seed(7)
    model = byte_step_model("megabyte-grid")
    with torch.no_grad():
        model.head.weight.mul_(40)
    B, steps = 3, 40
    noise = exponential_noise((steps, B, 256), torch.device("cpu"), torch.Generator().manual_seed(8))
    states = {native: allocate_decode_state(model, B, 48, native=native) for native in (False, True)}
    with torch.no_grad():
        logits = prefill(model, states[False], torch.zeros(B, 0, dtype=torch.long))
        prefill(model, states[True], torch.zeros(B, 0, dtype=torch.long))
        first = byte = sample_with_noise(logits, noise[0], **options)
        expected, unmasked = [], 0
        for j in range(1, steps):
            logits = decode_step(model, states[False], byte)
            byte = sample_with_noise(logits, noise[j], **options)
            expected.append(byte)
            unmasked += int((sample_with_noise(logits, noise[j], options["temperature"]) != byte).sum())
        drawn = states[True].native_decode.run(first, steps - 1, noise[1:], **options)
    assert torch.equal(drawn, torch.stack(expected))
    assert unmasked > 0  # the masks changed draws: they were exercised


def test_generate_with_a_stop_byte_runs_natively_and_stops_where_pytorch_does():
    torch.manual_seed(9)
    model = byte_step_model("megabyte-lags")
    prompt = torch.randint(0, 256, (3, 2), generator=torch.Generator().manual_seed(10))
    reference = generate(model, prompt, 60, seed=11, native=False)
    stop = int(reference[1, 12])  # row 1 draws it by its 11th new byte; the other rows may not
    expected = generate(model, prompt, 60, seed=11, stop_byte=stop, top_p=0.99, native=False)
    calls = []
    original = NativeDecode.run

    def counted(self, *args, **kwargs):
        calls.append(args[1])
        return original(self, *args, **kwargs)

    NativeDecode.run = counted
    try:
        got = generate(model, prompt, 60, seed=11, stop_byte=stop, top_p=0.99)
    finally:
        NativeDecode.run = original
    assert torch.equal(got, expected) and calls
    first = int((got[1, 2:] == stop).nonzero()[0]) + 2
    assert (got[1, first:] == stop).all()  # a stopped row keeps the stop byte


def test_a_native_run_stops_at_the_end_of_the_state():
    torch.manual_seed(6)
    model = byte_step_model("megabyte-grid")
    state = allocate_decode_state(model, 1, 12)
    with torch.no_grad():
        byte = prefill(model, state, torch.tensor([[1, 2, 3]])).argmax(-1)
        drawn = state.native_decode.run(byte, 100, None, 0.0)
        assert drawn.shape == (9, 1) and state.host_position == 12  # the state holds 12 bytes
        assert state.native_decode.run(drawn[-1], 5, None, 0.0) is None
        with pytest.raises(ValueError, match="decode state is full"):
            decode_step(model, state, drawn[-1])


def test_the_whole_steps_leave_a_hooked_head_to_pytorch():
    # A forward hook on the head (as sample_to_files adds to mask a subword model's unused ids)
    # must see every call: the byte step then declines and the PyTorch step runs.
    torch.manual_seed(4)
    model = byte_step_model("megabyte-3stage")
    state = allocate_decode_state(model, 1, 20)
    assert state.native_decode is not None
    seen = []
    handle = model.head.register_forward_hook(lambda module, inputs, output: seen.append(1))
    try:
        with torch.no_grad():
            logits = prefill(model, state, torch.zeros(1, 0, dtype=torch.long))
            for _ in range(9):
                logits = decode_step(model, state, logits.argmax(-1))
        assert state.native_decode.run(logits.argmax(-1), 4, None, 0.0) is None
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


LINEAR_DRIVER = """
#include "vector_ops.h"
void call_linear(const weight_t *W, const float *X, float *Y, int64_t rows, int64_t out, int64_t in) { linear(W, X, Y, rows, out, in); }
"""


def linear_builds() -> list:
    """The ways `linear` (vector_ops.h) compiles here: as the kernels build it, with the
    lane-by-lane sums of compilers without vector shuffles, and on an AVX-512 x86 CPU also with
    the eight-lane vectors every other CPU gets."""
    builds = [[], ["-DMULTIBYTE_LANE_BY_LANE_SUM"]]
    if cpu_features.vector_capability() == "AVX512":  # x86 with AVX-512
        builds.append(["-mno-avx512f"])
    return builds


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("extra", linear_builds(), ids=lambda flags: " ".join(flags) or "as-built")
def test_the_matrix_vector_product_sums_every_row_and_column(extra, weights, tmp_path):
    # Rows of W in groups of eight and a remainder, columns in whole vectors (bf16: pairs of
    # vectors, int8: four) and a remainder, one or several rows of X: every path of `linear`
    # against a float64 product, for fp32 matrices and for the bf16 and packed int8 ones of the
    # compact-weight libraries.
    compiler = kernels._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    (tmp_path / "driver.c").write_text(LINEAR_DRIVER)
    library = tmp_path / "linear.so"
    sources = [str(tmp_path / "driver.c"), str(kernels.SOURCES / "parallel.c")]
    flags = kernels.FLAGS + kernels.WEIGHT_FORMAT_FLAGS[weights]
    command = [compiler, *flags, *extra, f"-I{kernels.SOURCES}", "-o", str(library), *sources, "-lm"]
    subprocess.run(command, check=True, capture_output=True)
    loaded = ctypes.CDLL(str(library))
    call, set_threads = loaded.call_linear, loaded.multibyte_set_threads
    call.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    set_threads.argtypes, set_threads.restype = [ctypes.c_int], ctypes.c_int
    generator = torch.Generator().manual_seed(0)
    small = itertools.product((1, 3), (1, 7, 8, 13, 24), (1, 5, 8, 16, 24, 37, 64, 96, 130))
    large = [(1, 1536, 384), (2, 389, 400), (1, 24, 6000)]  # split between two threads: >= 128K weights
    for rows, out, width in [*small, *large]:
        W = torch.randn(out, width, generator=generator)
        X = torch.randn(rows, width, generator=generator)
        W = rounded(W, weights)  # the product is of these values; the kernel reads them packed
        packed = kernels.matrix_for_kernel(W, weights)
        results = []
        for threads in (1, 2):
            assert set_threads(threads) == threads
            Y = torch.full((rows, out), float("nan"))
            call(packed.data_ptr(), X.data_ptr(), Y.data_ptr(), rows, out, width)
            results.append(Y)
        expected = (X.double() @ W.double().T).float()
        # fp32 sums of `width` products: rounding grows with the sums' typical size, sqrt(width)
        atol = 4e-6 * (width**0.5 * float(X.std(correction=0) * W.std(correction=0)) + 1)
        torch.testing.assert_close(results[0], expected, rtol=1e-5, atol=atol, msg=f"rows {rows}, out {out}, in {width}")
        assert torch.equal(results[1], results[0]), f"two threads differ at rows {rows}, out {out}, in {width}"


def _mamba_step_in_a_child(stack, x, queue) -> None:
    states = stack.allocate_states(1, 4, "cpu", torch.float32)
    queue.put(NativeMambaStep.bind(stack, states)(x).tolist())  # plain floats: no shared memory


def test_a_large_stack_steps_alike_on_one_or_two_threads_and_in_a_forked_child():
    # A Mamba stack whose projections are split between the caller and the helper thread: the
    # same bits as on one thread, the PyTorch reference to rounding, and a child forked after the
    # helper started steps too (it starts its own helper instead of waiting on the parent's).
    import multiprocessing

    torch.manual_seed(2)
    stack = Stack(StageConfig("mamba", 256, 2, 2, d_state=8, d_conv=4), 0.0, 1e-5).eval()
    assert stack.blocks[0].mixer.in_proj.weight.numel() >= 128 * 1024
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(3))
    if kernels.load("mamba_step") is None:
        pytest.skip("no native kernels here")
    outputs = []
    try:
        for threads in (1, 2):
            kernels.set_native_threads(threads)
            step = NativeMambaStep.bind(stack, stack.allocate_states(1, 4, "cpu", torch.float32))
            outputs.append(step(x))
        with torch.no_grad():
            expected = stack(x, stack.allocate_states(1, 4, "cpu", torch.float32))
        assert torch.equal(outputs[1], outputs[0])
        torch.testing.assert_close(outputs[0], expected, rtol=0, atol=2e-5)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_mamba_step_in_a_child, args=(stack, x, queue))
        child.start()
        try:
            got = queue.get(timeout=60)
            child.join(timeout=10)
        finally:
            if child.is_alive():  # waiting for a helper it does not have
                child.kill()
        assert child.exitcode == 0, f"the forked child ended with {child.exitcode}"
        assert got == outputs[0].tolist()
    finally:
        kernels.set_native_threads(None)


def test_threads_decoding_at_once_share_the_helper_safely():
    # Two Python threads step large stacks at the same time (ctypes lets go of the GIL): one holds
    # the helper while the other computes alone; both get the bits of a step taken alone.
    import threading

    torch.manual_seed(4)
    stack = Stack(StageConfig("mamba", 256, 2, 2, d_state=8, d_conv=4), 0.0, 1e-5).eval()
    if kernels.load("mamba_step") is None:
        pytest.skip("no native kernels here")
    inputs = torch.randn(40, 1, 1, 256, generator=torch.Generator().manual_seed(5))

    def run(results: list) -> None:
        step = NativeMambaStep.bind(stack, stack.allocate_states(1, 4, "cpu", torch.float32))
        results.extend(step(x) for x in inputs)

    try:
        kernels.set_native_threads(2)
        alone: list = []
        run(alone)
        together: list = [[], []]
        threads = [threading.Thread(target=run, args=(out,)) for out in together]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        kernels.set_native_threads(None)
    for out in together:
        assert len(out) == len(alone) and all(torch.equal(a, b) for a, b in zip(out, alone))


def test_native_threads_come_from_the_caller_or_the_environment(monkeypatch):
    monkeypatch.setenv("MULTIBYTE_NATIVE_THREADS", "1")
    assert kernels.native_threads() == 1
    monkeypatch.setenv("MULTIBYTE_NATIVE_THREADS", "4")
    with pytest.raises(ValueError, match="MULTIBYTE_NATIVE_THREADS must be 1 or 2, got '4'"):
        kernels.native_threads()
    monkeypatch.delenv("MULTIBYTE_NATIVE_THREADS")  # (the libraries follow only set_native_threads)
    try:
        kernels.set_native_threads(1)
        assert kernels.native_threads() == 1
    finally:
        kernels.set_native_threads(None)
    with pytest.raises(ValueError, match="native threads must be 1 or 2"):
        kernels.set_native_threads(3)


def test_extra_kernel_flags_come_from_the_environment_as_shell_words(monkeypatch):
    monkeypatch.setenv("MULTIBYTE_KERNEL_FLAGS", "-mno-avx512f  -DNAME='a b'")
    assert kernels.extra_flags() == ("-mno-avx512f", "-DNAME=a b")
    assert kernels._flags("int8")[-3:] == ["-DMULTIBYTE_INT8_WEIGHTS", "-mno-avx512f", "-DNAME=a b"]
    with_flags = kernels.library_path("mamba_step")
    monkeypatch.delenv("MULTIBYTE_KERNEL_FLAGS")
    assert kernels.extra_flags() == () and kernels.library_path("mamba_step") != with_flags
    monkeypatch.setenv("MULTIBYTE_KERNEL_FLAGS", "-DNAME='a")
    with pytest.raises(ValueError, match="MULTIBYTE_KERNEL_FLAGS is not a list of shell words .*: \"-DNAME='a\""):
        kernels.extra_flags()


def test_a_decode_state_with_native_steps_is_freed_without_the_cycle_collector():
    # Its caches are the largest tensors of sampling: dropping the state must free them at once.
    import gc
    import weakref

    model = byte_step_model("megabyte-grid")
    gc.disable()
    try:
        state = allocate_decode_state(model, 2, 24)
        assert state.native_decode is not None and all(s.native is not None for s in state.stage_states)
        freed = weakref.ref(state.stage_states[0][0].keys)
        del state
        assert freed() is None
    finally:
        gc.enable()


def test_generate_reports_every_byte_once_in_order_through_native_runs():
    # Runs draw up to 64 bytes per call; the progress callback still sees 1, 2, ..., n.
    model = byte_step_model("megabyte-grid")
    seen: list = []
    with_progress = generate(model, torch.zeros(2, 0, dtype=torch.long), 150, seed=4, on_byte=seen.append)
    assert seen == list(range(1, 151))
    assert torch.equal(with_progress, generate(model, torch.zeros(2, 0, dtype=torch.long), 150, seed=4))
