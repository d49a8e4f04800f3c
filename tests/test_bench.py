"""`bench`: scores equal to a direct computation, every byte scored once, codecs on the same bytes.

The plans of windows themselves are tested in tests/test_windows.py."""

import bz2
import dataclasses
import gzip
import io
import json
import lzma
import math
import os
import stat

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules import AudioDataModule, ImageNet64DataModule, TextDataModule
from multibyte.bench import (
    INFERENCE_MODES,
    markdown_table,
    run_benchmark,
    score_bytes,
    split_bytes,
    write_report,
)
from multibyte.cli import main
from multibyte.codecs import IMAGE_BYTES, bytes_to_image
from multibyte.codecs.audio import pcm16_to_bytes
from multibyte.config import ModelConfig, StageConfig, megabyte
from multibyte.model import HierarchicalByteModel
from multibyte.reference_codecs import audio_codecs, general_purpose_codecs, image_codecs


def tiny_megabyte(patch_size: int = 4, max_seq_len: int = 16) -> HierarchicalByteModel:
    torch.manual_seed(0)
    if patch_size == 1:
        config = ModelConfig(stages=[StageConfig("attention", 16, 1, 2)], max_seq_len=max_seq_len)
    else:
        config = megabyte(patch_size, max_seq_len, 8 * patch_size, 1, 2, 16, 1, 2)
    return HierarchicalByteModel(config).eval()


# ------------------------------------------------------------------------------------------------
# Scores equal a direct computation
# ------------------------------------------------------------------------------------------------


def direct_bits(model: HierarchicalByteModel, data: np.ndarray, context_start) -> float:
    """sum over bytes i of -log2 p(data[i] | data[context_start(i) : i]), one forward per byte."""
    tokens = torch.from_numpy(data.astype(np.int64))
    total = 0.0
    with torch.no_grad():
        for i in range(len(data)):
            start = context_start(i)
            log_p = torch.log_softmax(model(tokens[None, start : i + 1])[0, -1].double(), dim=-1)
            total -= float(log_p[tokens[i]]) / math.log(2)
    return total


def test_basic_score_is_the_mean_cross_entropy_of_the_test_windows():
    model = tiny_megabyte()
    data = np.random.default_rng(0).integers(0, 256, 70, dtype=np.uint8)
    score = score_bytes(model, data, seq_len=16, mode="basic", batch_size=3)
    # Mean cross-entropy as the training loop computes it, window by window (the last one short).
    nats = 0.0
    with torch.no_grad():
        for start in range(0, 70, 16):
            window = torch.from_numpy(data[start : start + 16].astype(np.int64))[None]
            nats += F.cross_entropy(model(window)[0], window[0], reduction="sum").item()
    assert score.scored_bytes == 70 and score.positions_computed == 70
    assert score.bits_per_byte == pytest.approx(nats / math.log(2) / 70, rel=1e-5)
    assert score.bits == pytest.approx(direct_bits(model, data, lambda i: 16 * (i // 16)), rel=1e-5)


@pytest.mark.parametrize("mode", ["sliding", "strided", "sliding+strided"])
def test_sliding_and_strided_scores_equal_the_per_byte_rule(mode):
    L, P, S, half = 16, 4, 8, 2
    model = tiny_megabyte()
    data = np.random.default_rng(1).integers(0, 256, 45, dtype=np.uint8)

    def window_start(i: int, offset: int) -> int:
        """Start of the window that scores byte i in a pass over [offset, N) (see bench.py)."""
        if "sliding" not in mode:
            return offset + L * ((i - offset) // L)
        return offset if i - offset < L else offset + S * ((i - offset - L) // S + 1)

    def context_start(i: int) -> int:
        if "strided" not in mode or i % P < half:
            return window_start(i, 0)  # pass A: bytes in the first half of their patch
        return window_start(i, half)  # pass B: patches shifted by P/2

    score = score_bytes(model, data, seq_len=L, mode=mode, batch_size=4)
    assert score.scored_bytes == 45
    assert score.bits == pytest.approx(direct_bits(model, data, context_start), rel=1e-5)


def test_bf16_scores_stay_close_to_float32():
    model = tiny_megabyte()
    data = np.random.default_rng(2).integers(0, 256, 64, dtype=np.uint8)
    full = score_bytes(model, data, 16, "basic", precision="32-true")
    half = score_bytes(model, data, 16, "basic", precision="bf16-mixed")
    assert half.bits == pytest.approx(full.bits, rel=1e-2)


# ------------------------------------------------------------------------------------------------
# Datamodule splits and codecs on the same bytes
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_datamodule(tmp_path_factory) -> TextDataModule:
    return TextDataModule(seq_len=64, eval_batch_size=64, cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_every_byte_of_a_split_is_scored_once_and_the_codecs_see_the_same_bytes(text_datamodule):
    model = tiny_megabyte(max_seq_len=64)
    report = run_benchmark(model, text_datamodule, "validation", modes=INFERENCE_MODES, max_bytes=None)
    size = text_datamodule.split_num_bytes("validation")
    assert report["num_bytes"] == size
    rows = {row["method"]: row for row in report["results"]}
    model_rows = [row for row in report["results"] if row["kind"] == "model"]
    assert [row["mode"] for row in model_rows] == list(INFERENCE_MODES)
    assert all(row["scored_bytes"] == size for row in model_rows)
    assert [round(row["cost"]) for row in model_rows] == [1, 2, 2, 4]

    raw = (text_datamodule.cache_folder / "validation.bin").read_bytes()
    assert rows["gzip -9"]["compressed_bytes"] == len(gzip.compress(raw, compresslevel=9, mtime=0))
    assert rows["bzip2 -9"]["compressed_bytes"] == len(bz2.compress(raw, 9))
    assert rows["xz -9e"]["compressed_bytes"] == len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    assert rows["bzip2 -9"]["bits_per_byte"] == pytest.approx(8 * len(bz2.compress(raw, 9)) / size)
    assert report["unit"] == "bits/byte"


def test_report_files(text_datamodule, tmp_path):
    model = tiny_megabyte(max_seq_len=64)
    report = run_benchmark(model, text_datamodule, "test", modes=["basic"], max_bytes=2000, codecs=True)
    paths = write_report(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    table = paths["md"].read_text()
    assert table == markdown_table(report)
    assert "| model |" in table and "| xz -9e |" in table and "2,000 bytes" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths["png"] is None
    else:
        with Image.open(paths["png"]) as chart:
            assert chart.format == "PNG" and chart.width > 100
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(paths["json"].stat().st_mode) == 0o666 & ~umask  # not the temporary's 0600


def test_image_split_reports_bits_per_dimension_and_image_codecs(tmp_path):
    datamodule = ImageNet64DataModule(order="patch", patch_size=12, cache_dir=str(tmp_path))
    model = HierarchicalByteModel(
        megabyte(12, IMAGE_BYTES, 48, 1, 2, 16, 1, 2)
    ).eval()
    report = run_benchmark(model, datamodule, "test", max_bytes=2 * IMAGE_BYTES, batch_size=2)
    assert report["unit"] == "bits/dim" and report["num_bytes"] == 2 * IMAGE_BYTES
    rows = {row["method"]: row for row in report["results"]}
    # PNG on the images the patch-scan bytes encode, one file per image.
    data = split_bytes(datamodule, "test", 2 * IMAGE_BYTES).tobytes()
    expected = 0
    for i in range(2):
        buffer = io.BytesIO()
        Image.fromarray(bytes_to_image(data[i * IMAGE_BYTES : (i + 1) * IMAGE_BYTES], "patch", 12)).save(
            buffer, format="PNG", optimize=True
        )
        expected += buffer.tell()
    assert rows["PNG (optimised)"]["compressed_bytes"] == expected
    assert 0 < rows["WebP lossless"]["compressed_bytes"] < 2 * IMAGE_BYTES
    with pytest.raises(ValueError, match="whole number of images"):
        run_benchmark(model, datamodule, "test", max_bytes=IMAGE_BYTES + 1)


def test_audio_codecs_flac_on_pcm16_and_skipped_for_mulaw(tmp_path):
    datamodule = AudioDataModule(sample_rate=8000, seq_len=256, cache_dir=str(tmp_path))
    data = split_bytes(datamodule, "test", 20_000).tobytes()
    (flac,) = audio_codecs(data, 8000, "pcm16")  # round trip checked inside
    assert not flac.skipped and flac.compressed_bytes < len(data)
    assert audio_codecs(data, 8000, "mulaw8")[0].skipped
    # The same samples big-endian: FLAC codes the samples, so the same size (round trip checked inside).
    swapped = np.frombuffer(data, "<i2").astype(">i2").tobytes()
    (flac_be,) = audio_codecs(swapped, 8000, "pcm16be")
    assert flac_be.compressed_bytes == flac.compressed_bytes
    # The same samples as second-order residuals: FLAC decodes them to the samples first.
    (flac_d2,) = audio_codecs(pcm16_to_bytes(np.frombuffer(data, "<i2"), "pcm16d2").tobytes(), 8000, "pcm16d2")
    assert flac_d2.compressed_bytes == flac.compressed_bytes
    codecs = {result.name: result for result in general_purpose_codecs(data)}
    assert codecs["bzip2 -9"].compressed_bytes == len(bz2.compress(data, 9))
    assert "zstd -19" in codecs  # run, or skipped with the reason


def test_image_codecs_refuse_partial_images():
    with pytest.raises(ValueError, match="whole 64x64x3 images"):
        image_codecs(bytes(100))


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def test_cli_bench(tmp_path, capsys):
    architecture = dataclasses.asdict(tiny_megabyte(max_seq_len=64).config)
    out = tmp_path / "report"
    main(
        [
            "bench",
            *("--seed_everything", "0", "--model.architecture", json.dumps(architecture), "--trainer.logger", "false"),
            *("--data", "datamodules.TextDataModule", "--data.seq_len", "64", "--data.cache_dir", str(tmp_path)),
            *("--max_bytes", "3000", "--inference", "[basic, strided]", "--output_dir", str(out)),
        ]
    )
    report = json.loads((out / "bench-text-test.json").read_text())
    model_rows = [row for row in report["results"] if row["kind"] == "model"]
    # text mixes with the n-gram by default where it can (basic), the model alone beside it
    assert [(row["mode"], row["mixing"]) for row in model_rows] == [("basic", None), ("basic", "n-gram"), ("strided", None)]
    assert all(row["scored_bytes"] == 3000 for row in model_rows)
    assert "| model + strided |" in capsys.readouterr().out


def test_cli_bench_scores_the_int8_rounded_model_with_quantize(tmp_path):
    # --quantize int8 scores what `sample --quantize int8` decodes: the report says the matrices are
    # on the int8 grid, and the bits move by the rounding, a little.
    architecture = dataclasses.asdict(tiny_megabyte(max_seq_len=64).config)
    reports = {}
    for quantize in ([], ["--quantize", "int8"]):
        out = tmp_path / ("int8" if quantize else "float32")
        main(
            [
                "bench",
                *("--seed_everything", "0", "--model.architecture", json.dumps(architecture), "--trainer.logger", "false"),
                *("--data", "datamodules.TextDataModule", "--data.seq_len", "64", "--data.cache_dir", str(tmp_path)),
                *("--max_bytes", "2000", "--codecs", "false", "--ngram", "false", "--output_dir", str(out), *quantize),
            ]
        )
        report = json.loads((out / "bench-text-test.json").read_text())
        reports[report["model"]["weights"]] = report["results"][0]["bits_per_byte"]
    assert set(reports) == {"float32", "int8"}
    assert reports["int8"] != reports["float32"] and reports["int8"] == pytest.approx(reports["float32"], rel=0.01)


# ------------------------------------------------------------------------------------------------
# Adaptation's default group of windows
# ------------------------------------------------------------------------------------------------


def test_adapted_scoring_and_coding_update_every_8_windows_by_default(text_datamodule):
    # AdaptConfig's defaults were tuned updating after every 8 windows (README, "Dynamic
    # evaluation"), so bench --adapt and compress --adapt both default to that group, whatever the
    # data's eval_batch_size (64 here): bench then predicts compress without matching flags.
    from multibyte.adaptation import AdaptConfig
    from multibyte.compression import Header, compress_bytes

    adapt = AdaptConfig(learning_rate=3e-3)
    model = tiny_megabyte(max_seq_len=64)
    report = run_benchmark(model, text_datamodule, "test", modes=["basic", "strided"], max_bytes=2000, codecs=False,
                           adapt=adapt, adapt_where_possible=True)
    assert report["model"]["adapt"]["batch_size"] == 8
    data = np.asarray(split_bytes(text_datamodule, "test", 2000))
    bits = {row["mode"]: row["bits_per_byte"] * row["scored_bytes"] for row in report["results"]}
    assert bits["basic"] == pytest.approx(score_bytes(model, data, 64, "basic", 8, adapt=adapt).bits, rel=1e-6)
    assert bits["basic"] != pytest.approx(score_bytes(model, data, 64, "basic", 64, adapt=adapt).bits, rel=1e-6)
    assert bits["strided"] == pytest.approx(score_bytes(model, data, 64, "strided", 64).bits, rel=1e-6)  # not adapted

    blob, stats = compress_bytes(model, data.tobytes(), 64, adapt=adapt)
    assert Header.unpack(blob, "adapted").lanes == 8
    assert stats.model_bits == pytest.approx(bits["basic"], rel=1e-4)
    plain, _ = compress_bytes(model, data.tobytes(), 64)
    assert Header.unpack(plain, "static").lanes == 32  # without adaptation lanes are speed only
