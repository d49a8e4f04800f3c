"""benchmarks/density.py: every figure it prints is the one the library's own code paths give on the
same bytes (bench's scores, the reference codecs, the compressor's round trip), in quick mode on
tiny models and in full mode on a tiny recipe's held-out split."""

import bz2
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO_ROOT
from datamodules import TextDataModule
from multibyte.adaptation import AdaptConfig
from multibyte.bench import INFERENCE_MODES, score_bytes
from multibyte.compression import HEADER_SIZE, compress_bytes, decompress_bytes
from multibyte.config import megabyte
from multibyte.reference_codecs import reference_codecs
from multibyte.training import ByteLM


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("density_benchmark", REPO_ROOT / "benchmarks" / "density.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


db = _load_benchmark()

SEQ_LEN = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny MEGABYTE (untrained, seeded) saved as a Lightning-format checkpoint, and its byte model."""
    torch.manual_seed(0)
    module = ByteLM(megabyte(4, SEQ_LEN, 32, 1, 2, 16, 1, 2))
    module.configure_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path, module.model.eval()


def assert_codec_figures(figures: dict[str, float], data: bytes, modality: str, **params) -> None:
    """Each codec's bits per byte is 8 x its real compressed size / the bytes, as reference_codecs gives."""
    codecs = [c for c in reference_codecs(data, modality, **params) if not c.skipped]
    expected = {c.name: round(8 * c.compressed_bytes / len(data), 4) for c in codecs}
    assert figures == expected and all(value > 0 for value in figures.values())
    assert figures["bzip2 -9"] == round(8 * len(bz2.compress(data, 9)) / len(data), 4)


# ------------------------------------------------------------------------------------------------
# Quick mode: `measure` on a sample of bytes
# ------------------------------------------------------------------------------------------------


def test_quick_samples_are_the_embedded_data():
    quick = db.samples(quick=True)
    assert set(quick) == {"text", "image", "audio"}
    text, params = quick["text"]
    assert len(text) == 8_192 and params == {}
    assert text in (REPO_ROOT / "datamodules" / "embedded" / "gutenberg_books.txt").read_bytes()
    image, params = quick["image"]
    assert len(image) == 64 * 64 * 3 and params == {"order": "raster", "patch_size": 12}
    audio, params = quick["audio"]
    assert len(audio) > 0 and len(audio) % 2 == 0 and params["encoding"] == "pcm16"  # 16-bit samples


def test_measure_reports_bench_scores_codecs_and_an_exact_round_trip(checkpoint):
    path, model = checkpoint
    data = db.samples(quick=True)["text"][0][:1_500]
    result = db.measure("text", data, {}, str(path), lanes=4, compress_limit=700)
    assert (result["num_bytes"], result["seq_len"], result["parameters"]) == (1_500, SEQ_LEN, model.num_parameters())

    # The model's figures are bench's scores of the checkpoint's weights on the same bytes.
    array = np.frombuffer(data, dtype=np.uint8)
    for mode in INFERENCE_MODES:
        score = score_bytes(model, array, SEQ_LEN, mode)
        assert result["model_bits_per_byte"][mode] == round(score.bits_per_byte, 4)
        assert result["model_cost"][mode] == round(score.cost, 3)
    assert 7 < result["model_bits_per_byte"]["basic"] < 9  # untrained: near uniform over 256 bytes

    assert_codec_figures(result["codec_bits_per_byte"], data, "text")

    compression = result["compression"]
    blob, _ = compress_bytes(model, data[:700], SEQ_LEN, lanes=4)
    assert decompress_bytes(model, blob)[0] == data[:700]
    predicted = score_bytes(model, array[:700], SEQ_LEN, "basic").bits / 8
    assert compression["input_bytes"] == 700 and compression["header_bytes"] == HEADER_SIZE
    assert compression["compressed_bytes"] == len(blob)
    assert compression["predicted_payload_bytes"] == round(predicted, 1)
    assert compression["round_trip"] is True and compression["within_1_percent"] is True
    assert abs(compression["payload_vs_prediction"]) <= 0.01


def test_measure_without_a_checkpoint_uses_the_seeded_tiny_model():
    data = db.samples(quick=True)["text"][0][:1_100]
    model, seq_len = db.tiny_model("text")
    result = db.measure("text", data, {}, None, lanes=2, compress_limit=300)
    assert (result["seq_len"], result["parameters"], result["checkpoint"]) == (seq_len, model.num_parameters(), None)
    score = score_bytes(model, np.frombuffer(data, dtype=np.uint8), seq_len, "basic")
    assert result["model_bits_per_byte"]["basic"] == round(score.bits_per_byte, 4)
    assert result["compression"]["round_trip"] is True and result["compression"]["input_bytes"] == 300


# ------------------------------------------------------------------------------------------------
# Full mode: `measure_held_out` on a recipe's test split
# ------------------------------------------------------------------------------------------------


def test_held_out_figures_are_bench_with_and_without_adaptation(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    book = tmp_path / "book.txt"
    book.write_bytes((REPO_ROOT / "datamodules" / "embedded" / "gutenberg_books.txt").read_bytes()[:24_000])
    recipe = tmp_path / "recipe.yaml"
    init_args = {"data_path": str(book), "seq_len": SEQ_LEN, "eval_batch_size": 16, "num_workers": 0,
                 "cache_dir": str(tmp_path / "cache")}
    recipe.write_text(yaml.safe_dump({"data": {"init_args": init_args}}))
    adapt = AdaptConfig(learning_rate=3e-3)

    figures = db.measure_held_out("text", str(path), str(recipe), adapt, adapt_batch=4, max_bytes=None)

    datamodule = TextDataModule(**init_args)
    test = datamodule.byte_split("test")
    assert figures["held_out"]["num_bytes"] == len(test) == datamodule.split_num_bytes("test")
    assert figures["held_out"]["source"] == str(book) and figures["unit"] == "bits/byte"
    assert figures["parameters"] == model.num_parameters()
    assert figures["adapt"] == {**adapt.to_dict(), "batch_size": 4}

    bits = figures["bits"]
    static = score_bytes(model, test, SEQ_LEN, "basic", batch_size=16)
    adapted = score_bytes(model, test, SEQ_LEN, "basic", batch_size=4, adapt=adapt)
    assert bits["model"] == round(static.bits_per_byte, 4)
    assert bits["model + adapt"] == round(adapted.bits_per_byte, 4)
    assert bits["model + adapt"] < bits["model"]  # an untrained model learns the letters' frequencies fast
    assert set(figures["model_seconds"]) == {"model", "model + adapt"}
    assert_codec_figures({k: v for k, v in bits.items() if k not in figures["model_seconds"]}, bytes(test), "text")

    db.print_table("text", figures)
    table = capsys.readouterr().err
    assert all(name in table for name in bits)
    best_codec = min(value for name, value in bits.items() if name not in figures["model_seconds"])
    assert f"{bits['model + adapt'] - best_codec:+.4f}" in table
