"""The sampler: cached decoding equals full recompute for every architecture, sampling draws what it
should, seeds reproduce, rows stay independent; the `sample` subcommand and the training callback."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from multibyte.cli import make_cli, resolve_config_path
from architectures import ARCHITECTURES, build, tiny
from multibyte.config import ModelConfig, StageConfig
from multibyte.model import HierarchicalByteModel
from multibyte.sampling import (
    allocate_decode_state,
    decode_step,
    generate,
    prefill,
    reset_decode_state,
    sample_next_byte,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decode-sized ops run fastest on one thread (as `generate` does on a CPU); with two, a busy
    machine makes every small op wait for the other core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models() -> dict[str, HierarchicalByteModel]:
    return {name: build(name, seed=i) for i, name in enumerate(ARCHITECTURES)}


def greedy_with_logits(model, state, prompt: torch.Tensor, new_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding through the cache: (B, T + new_bytes + 1) bytes and the (B, new_bytes + 1, 256)
    logits the cache gave for positions T .. T + new_bytes."""
    logits = [prefill(model, state, prompt)]
    sequence = prompt
    for _ in range(new_bytes):
        byte = logits[-1].argmax(dim=-1)
        sequence = torch.cat([sequence, byte[:, None]], dim=1)
        logits.append(decode_step(model, state, byte))
    sequence = torch.cat([sequence, logits[-1].argmax(dim=-1)[:, None]], dim=1)
    return sequence, torch.stack(logits, dim=1)


# ------------------------------------------------------------------------------------------------
# Cached decoding == full recompute
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
@pytest.mark.parametrize("prompt_len", [0, 5])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_cached_logits_equal_full_recompute_at_every_step(models, name, prompt_len, static):
    # 5 prompt bytes + 26 new ones with P = 4: a prefill that ends inside a patch, then seven
    # patch borders crossed one byte at a time.
    model = models[name]
    new_bytes = 26
    prompt = torch.randint(0, 256, (2, prompt_len), generator=torch.Generator().manual_seed(7))
    state = allocate_decode_state(model, 2, prompt_len + new_bytes + 1, static=static)
    sequence, cached = greedy_with_logits(model, state, prompt, new_bytes)
    with torch.no_grad():
        full = model(sequence)  # (2, L, 256): logits of byte t from bytes < t, recomputed at once
    recomputed = full[:, prompt_len:]
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=1e-4)
    # Greedy through the cache picks what greedy by recompute picks at every step.
    assert torch.equal(sequence[:, prompt_len:], recomputed.argmax(dim=-1))
    generated = generate(model, prompt, new_bytes + 1, temperature=0)
    assert torch.equal(generated, sequence)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_prefill_in_one_pass_equals_feeding_byte_by_byte(models, name):
    model = models[name]
    prompt = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))
    at_once = prefill(model, allocate_decode_state(model, 3, 16), prompt)
    state = allocate_decode_state(model, 3, 16)
    logits = prefill(model, state, prompt[:, :0])
    for t in range(11):
        logits = decode_step(model, state, prompt[:, t])
    torch.testing.assert_close(at_once, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_a_reset_state_repeats_the_exact_same_logits(models, name):
    # What arithmetic coding relies on: the same calls give bit-identical logits, window after window.
    model = models[name]
    data = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))

    def run(state) -> torch.Tensor:
        logits = [prefill(model, state, data[:, :0])]
        logits += [decode_step(model, state, data[:, t]) for t in range(13)]
        return torch.stack(logits)

    state = allocate_decode_state(model, 2, 13)
    first = run(state)
    reset_decode_state(state)
    assert torch.equal(run(state), first)
    assert torch.equal(run(allocate_decode_state(model, 2, 13)), first)


# ------------------------------------------------------------------------------------------------
# Seeds and rows
# ------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(models):
    model = models["megabyte"]
    prompt = torch.tensor([[72, 105]])
    first = generate(model, prompt, 40, seed=11)
    assert torch.equal(generate(model, prompt, 40, seed=11), first)
    # 40 bytes drawn at temperature 1 from an untrained model: a repeat by chance is impossible.
    assert not torch.equal(generate(model, prompt, 40, seed=12), first)


@pytest.mark.parametrize("name", ["megabyte", "mambabyte", "hybrid"])
def test_rows_of_a_batch_do_not_influence_each_other(models, name):
    model = models[name]
    prompts = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(5))
    sampled = generate(model, prompts, 30, seed=3, top_k=50)
    changed = prompts.clone()
    changed[2] = (changed[2] + 1) % 256  # a different last row...
    resampled = generate(model, changed, 30, seed=3, top_k=50)
    assert torch.equal(resampled[:2], sampled[:2])  # ...leaves the other rows' draws alone
    assert not torch.equal(resampled[2], sampled[2])
    # Greedy: each row decodes in the batch exactly as it does alone.
    batch = generate(model, prompts, 20, temperature=0)
    for row in range(3):
        assert torch.equal(generate(model, prompts[row : row + 1], 20, temperature=0)[0], batch[row])


# ------------------------------------------------------------------------------------------------
# What sample_next_byte draws
# ------------------------------------------------------------------------------------------------


def frequencies(logits: torch.Tensor, draws: int, **options) -> torch.Tensor:
    """Empirical distribution of sample_next_byte over `draws` rows of the same logits."""
    generator = torch.Generator().manual_seed(0)
    samples = sample_next_byte(logits.expand(draws, -1), generator=generator, **options)
    return torch.bincount(samples, minlength=256).double() / draws


def test_sampling_follows_the_softmax():
    probs = torch.zeros(256, dtype=torch.float64)
    probs[[3, 50, 200, 255]] = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    logits = probs.clamp(min=1e-30).log().float()[None]
    observed = frequencies(logits, 20_000)
    # 20,000 draws: the standard error of a frequency is at most 0.0036, so 0.018 is ~5 sigma.
    torch.testing.assert_close(observed, probs, rtol=0, atol=0.018)
    # Temperature 2 flattens: p_i^(1/2), renormalised.
    flattened = probs.sqrt() / probs.sqrt().sum()
    torch.testing.assert_close(frequencies(logits, 20_000, temperature=2.0), flattened, rtol=0, atol=0.018)


def test_top_k_and_top_p_keep_exactly_the_likeliest_bytes():
    probs = torch.zeros(256, dtype=torch.float64)
    probs[[10, 20, 30, 40]] = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.clamp(min=1e-30).log().float()[None]
    # top_k = 2 keeps bytes 10 and 20, renormalised: 0.5/0.8 and 0.3/0.8.
    expected = torch.zeros(256, dtype=torch.float64)
    expected[[10, 20]] = torch.tensor([0.625, 0.375], dtype=torch.float64)
    torch.testing.assert_close(frequencies(logits, 20_000, top_k=2), expected, rtol=0, atol=0.018)
    # top_p = 0.7: byte 10 (mass before it 0) and 20 (0.5 < 0.7) stay; 30 has 0.8 before it.
    torch.testing.assert_close(frequencies(logits, 20_000, top_p=0.7), expected, rtol=0, atol=0.018)
    # top_p = 0.85 also keeps byte 30 (0.8 before it): 0.5, 0.3, 0.15 over 0.95.
    expected_p = torch.zeros(256, dtype=torch.float64)
    expected_p[[10, 20, 30]] = torch.tensor([0.5, 0.3, 0.15], dtype=torch.float64) / 0.95
    torch.testing.assert_close(frequencies(logits, 20_000, top_p=0.85), expected_p, rtol=0, atol=0.018)
    # Greedy and top_k = 1 are the argmax whatever the generator.
    assert torch.all(sample_next_byte(logits.expand(50, -1), temperature=0) == 10)
    assert torch.all(sample_next_byte(logits.expand(50, -1), top_k=1) == 10)


def test_stop_byte_ends_each_row_and_generation(models):
    model = models["megabyte"]
    prompt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(9))
    free = generate(model, prompt, 24, seed=4)
    stop = int(free[0, 3 + 6])  # the byte row 0 draws 7th, so row 0 stops at its first occurrence
    stopped = generate(model, prompt, 24, seed=4, stop_byte=stop)
    first_stop = [int((free[row, 3:] == stop).nonzero()[0]) if (free[row, 3:] == stop).any() else None for row in range(2)]
    # Until a row stops it draws exactly what it drew without a stop byte; after, it repeats the stop byte.
    ends = [24 if f is None else f + 1 for f in first_stop]
    assert stopped.shape == (2, 3 + max(ends))
    for row, end in enumerate(ends):
        assert torch.equal(stopped[row, : 3 + end], free[row, : 3 + end])
        assert torch.all(stopped[row, 3 + end :] == stop)


def test_decode_dtype_follows_the_measured_crossover():
    from multibyte.sampling import CPU_BF16_MIN_BATCH, fastest_decode_dtype
    from multibyte.cpu_features import has_native_bf16

    cpu = torch.device("cpu")
    native = has_native_bf16()
    assert fastest_decode_dtype(cpu, CPU_BF16_MIN_BATCH - 1) == torch.bfloat16  # bf16 values, fp32 arithmetic
    assert fastest_decode_dtype(cpu, CPU_BF16_MIN_BATCH - 1, bf16_trained=False) == torch.float32
    for bf16_trained in (True, False):  # from 32 rows bf16 PyTorch wherever the CPU computes in bf16
        assert fastest_decode_dtype(cpu, CPU_BF16_MIN_BATCH, bf16_trained) == (torch.bfloat16 if native else torch.float32)
    assert fastest_decode_dtype(torch.device("cuda"), 1) == torch.bfloat16
    assert fastest_decode_dtype(torch.device("cuda"), 1, bf16_trained=False) == torch.float32


def test_small_cpu_batches_decode_bf16_values_in_fp32_with_the_bf16_kernels():
    from multibyte.sampling import CPU_BF16_MIN_BATCH, model_for_decoding
    from multibyte.weight_formats import matrix_format

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = HierarchicalByteModel(ModelConfig(stages=[StageConfig("attention", 32, 1, 2)], max_seq_len=64)).train()
    original = model.head.weight.detach().clone()
    rounded = model_for_decoding(model, cpu, torch.bfloat16, CPU_BF16_MIN_BATCH - 1)
    assert rounded is model and not model.training  # moved in place, as nn.Module.to
    assert model.head.weight.dtype == torch.float32 and matrix_format(model) == "bfloat16"
    assert torch.equal(model.head.weight, original.bfloat16().float())
    state = allocate_decode_state(model, 1, 8)
    assert state.stage_states[0].native is None or state.stage_states[0].native.weight_format == "bfloat16"
    assert model_for_decoding(model, cpu, torch.bfloat16, CPU_BF16_MIN_BATCH).head.weight.dtype == torch.bfloat16


def test_quantize_int8_rounds_the_matrices_alone_and_decodes_with_the_int8_kernels():
    from multibyte.sampling import model_for_decoding
    from multibyte.weight_formats import int8_rows, matrix_format

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = HierarchicalByteModel(ModelConfig(stages=[StageConfig("attention", 32, 1, 2)], max_seq_len=64)).train()
    head, norm = model.head.weight.detach().clone(), model.stages[0].stack.final_norm.weight.detach().clone()
    assert model_for_decoding(model, cpu, torch.float32, 1, "int8") is model and not model.training
    assert model.head.weight.dtype == torch.float32 and matrix_format(model) == "int8"
    q, scale = int8_rows(head)  # each row: its largest weight is +-127 steps of max|w| / 127
    assert torch.equal(q.abs().amax(dim=1), torch.full((head.shape[0],), 127, dtype=torch.int8))
    assert torch.allclose(model.head.weight, q.float() * scale[:, None]) and not torch.equal(model.head.weight, head)
    assert (model.head.weight - head).abs().max() <= scale.max() / 2 * (1 + 1e-6)  # at most half a step away
    assert torch.equal(model.stages[0].stack.final_norm.weight, norm)  # norms (and embeddings) untouched
    state = allocate_decode_state(model, 1, 8)
    assert state.stage_states[0].native is None or state.stage_states[0].native.weight_format == "int8"
    with pytest.raises(ValueError, match="quantize='int8' keeps fp32"):
        model_for_decoding(model, cpu, torch.bfloat16, 1, "int8")


@pytest.mark.parametrize("name", ["megabyte", "mambabyte"])
def test_bf16_weights_decode_close_to_fp32(models, name):
    # What `sample` runs from batch 16 on a CPU: same bytes in, logits within bf16 rounding.
    model = models[name]
    data = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    low = copy.deepcopy(model).to(torch.bfloat16)
    results = []
    for m in (model, low):
        state = allocate_decode_state(m, 2, 10)
        logits = [prefill(m, state, data[:, :3])]
        logits += [decode_step(m, state, data[:, t]) for t in range(3, 10)]
        results.append(torch.stack(logits))
    assert results[1].dtype == torch.float32
    # bf16 keeps ~3 significant digits: errors of a few thousandths on logits spread ~0.1 apart,
    # where a wrong step would be off by the spread itself.
    spread = results[0].std().item()
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0.1 * spread)


# ------------------------------------------------------------------------------------------------
# Bad input: one clear error
# ------------------------------------------------------------------------------------------------


def test_bad_input_is_one_clear_error(models):
    model = models["megabyte"]  # max_seq_len 64
    with pytest.raises(ValueError, match="60 bytes plus max_new_bytes=10 exceeds the model's max_seq_len=64"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"symbols must lie in 0\.\.255"):
        generate(model, torch.tensor([[1, 256]]), 1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 1, top_p=0.0)
    state = allocate_decode_state(model, 1, 2)
    prefill(model, state, torch.zeros(1, 0, dtype=torch.long))
    decode_step(model, state, torch.zeros(1, dtype=torch.long))
    decode_step(model, state, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="the decode state is full"):
        decode_step(model, state, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="reset it first"):
        prefill(model, state, torch.zeros(1, 0, dtype=torch.long))
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            prefill(model, allocate_decode_state(model, 1, 2), torch.zeros(1, 0, dtype=torch.long))
    finally:
        model.eval()


# ------------------------------------------------------------------------------------------------
# The `sample` subcommand, in process (a fresh interpreter would spend seconds importing Lightning)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the CPU text preset's model, randomly initialised (as fit would save it)."""
    cli = make_cli(["--config", resolve_config_path("text.yaml"), "--config", resolve_config_path("cpu/text.yaml")], run=False)
    path = tmp_path_factory.mktemp("ckpt") / "text.ckpt"
    torch.save({"state_dict": cli.model.state_dict()}, path)
    return path


def sample_cli(checkpoint: Path, output: Path, *extra: str):
    args = ["sample", "--config", resolve_config_path("text.yaml"), "--config", resolve_config_path("cpu/text.yaml")]
    args += ["--ckpt_path", str(checkpoint), "--output_dir", str(output), "--trainer.enable_progress_bar", "false"]
    return make_cli(args + list(extra))


def test_sample_subcommand_writes_text_continuing_the_prompt(text_checkpoint, tmp_path):
    sample_cli(text_checkpoint, tmp_path / "a", "--prompt", "The ", "--max_new_bytes", "24", "--num_samples", "3", "--batch_size", "2")
    texts = sorted((tmp_path / "a").glob("sample_*.txt"))
    assert [p.name for p in texts] == ["sample_000.txt", "sample_001.txt", "sample_002.txt"]
    for path in texts:
        assert path.read_bytes().startswith(b"The ")
    info = json.loads((tmp_path / "a" / "sample_info.json").read_text())
    assert info["new_bytes"] == 3 * 24 and info["prompt_bytes"] == 4 and info["checkpoint"] == str(text_checkpoint)
    # The same seed and batch size give the same bytes.
    sample_cli(text_checkpoint, tmp_path / "b", "--prompt", "The ", "--max_new_bytes", "24", "--num_samples", "3", "--batch_size", "2")
    for path in texts:
        assert (tmp_path / "b" / path.name).read_bytes() == path.read_bytes()
    # PyTorch only (--native false): recorded, and the same greedy bytes as the default.
    greedy = ("--prompt", "The ", "--max_new_bytes", "24", "--num_samples", "2", "--temperature", "0")
    sample_cli(text_checkpoint, tmp_path / "c", *greedy)
    sample_cli(text_checkpoint, tmp_path / "d", *greedy, "--native", "false")
    assert json.loads((tmp_path / "c" / "sample_info.json").read_text())["native"] is True
    assert json.loads((tmp_path / "d" / "sample_info.json").read_text())["native"] is False
    for name in ("sample_000.txt", "sample_001.txt"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "d" / name).read_bytes()
    # --quantize int8: the int8-rounded model, recorded, the same greedy bytes natively and in PyTorch.
    assert json.loads((tmp_path / "c" / "sample_info.json").read_text())["matrices"] == "bfloat16"  # the CPU default
    sample_cli(text_checkpoint, tmp_path / "e", *greedy, "--quantize", "int8")
    sample_cli(text_checkpoint, tmp_path / "f", *greedy, "--quantize", "int8", "--native", "false")
    for folder in ("e", "f"):
        info = json.loads((tmp_path / folder / "sample_info.json").read_text())
        assert (info["matrices"], info["arithmetic"]) == ("int8", "float32")
    for name in ("sample_000.txt", "sample_001.txt"):
        assert (tmp_path / "e" / name).read_bytes() == (tmp_path / "f" / name).read_bytes()


def test_sample_subcommand_errors_name_the_file(text_checkpoint, tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(SystemExit, match=f"checkpoint {missing}: no such file"):
        sample_cli(missing, tmp_path / "out")
    with pytest.raises(SystemExit, match="exceeds the model's max_seq_len=1024"):
        sample_cli(text_checkpoint, tmp_path / "out", "--prompt", "x" * 1000, "--max_new_bytes", "100")
    with pytest.raises(SystemExit, match="prompt file .*nothing.txt: no such file"):
        sample_cli(text_checkpoint, tmp_path / "out", "--prompt_file", str(tmp_path / "nothing.txt"))
    (tmp_path / "out").mkdir()
    existing = tmp_path / "out" / "sample_001.txt"
    existing.write_text("keep me")
    with pytest.raises(SystemExit, match=f"{existing}: already exists"):
        sample_cli(text_checkpoint, tmp_path / "out", "--max_new_bytes", "4", "--num_samples", "2")
    assert existing.read_text() == "keep me" and not (tmp_path / "out" / "sample_000.txt").exists()


# ------------------------------------------------------------------------------------------------
# The training callback
# ------------------------------------------------------------------------------------------------


def test_sample_callback_writes_samples_every_n_validations(tmp_path):
    from lightning import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from datamodules import TextDataModule
    from multibyte.callbacks import SampleCallback
    from multibyte.training import ByteLM

    (tmp_path / "data.txt").write_bytes(bytes(range(32, 127)) * 100)
    data = TextDataModule(data_path=str(tmp_path / "data.txt"), seq_len=32, batch_size=2, cache_dir=str(tmp_path / "cache"))
    callback = SampleCallback(every_n_validations=2, num_samples=2, max_new_bytes=10)
    trainer = Trainer(
        max_steps=4,
        val_check_interval=1,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        callbacks=[callback],
        logger=CSVLogger(tmp_path / "logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(ByteLM(tiny("attention", "attention", patch_size=4, max_seq_len=32)), datamodule=data)
    # 4 validations (one per step; the sanity check does not count): samples after the 2nd and 4th.
    folders = sorted(p.name for p in (Path(trainer.log_dir) / "samples").iterdir())
    assert folders == ["validation_0002_step_2", "validation_0004_step_4"]
    for folder in folders:
        texts = sorted((Path(trainer.log_dir) / "samples" / folder).glob("sample_*.txt"))
        assert len(texts) == 2
        # 10 bytes; an invalid byte becomes U+FFFD, 3 bytes of UTF-8, so the file holds at least 10.
        assert all(len(path.read_bytes()) >= 10 for path in texts)
    assert callback.state_dict() == {"validations": 4}
    assert np.isfinite(trainer.callback_metrics["val/bpb"].item())
