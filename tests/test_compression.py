"""Model-driven compression: exact round trips, size as predicted by bench, and clear errors."""

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from multibyte.bench import score_bytes
from multibyte.cli import main
from multibyte.compression import (
    HEADER_SIZE,
    CompressionError,
    compress_bytes,
    decompress_bytes,
    weights_hash,
    window_groups,
)
from multibyte.config import ModelConfig, StageConfig, megabyte
from multibyte.model import HierarchicalByteModel
from multibyte.training import ByteLM, load_model

EMBEDDED_TEXT = Path(__file__).resolve().parents[1] / "datamodules" / "embedded" / "gutenberg_books.txt"
SEQ_LEN = 64


def megabyte_config() -> ModelConfig:
    return megabyte(4, SEQ_LEN, 64, 2, 2, 32, 1, 2)


ARCHITECTURES = {
    "megabyte": megabyte_config,
    "vanilla": lambda: ModelConfig([StageConfig("attention", 32, 2, 2)], max_seq_len=SEQ_LEN),
    "mambabyte": lambda: ModelConfig(
        [StageConfig("mamba", 32, 2, n_heads=1, d_state=4)], max_seq_len=SEQ_LEN, position_embedding=False
    ),
}


@pytest.fixture(scope="module")
def text() -> bytes:
    return EMBEDDED_TEXT.read_bytes()


TINY_ARCHITECTURE = json.dumps(dataclasses.asdict(megabyte_config()))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint: `python -m multibyte fit` of a tiny MEGABYTE for 150 steps on the
    embedded books (its train split), so that its predictions are far from uniform (a fresh model
    would make every size check trivially ~8 bits per byte)."""
    root = tmp_path_factory.mktemp("fit")
    main(
        [
            "fit",
            *("--seed_everything", "0", "--model.architecture", TINY_ARCHITECTURE, "--model.learning_rate", "3e-3"),
            *("--model.warmup_steps", "10", "--data", "datamodules.TextDataModule", "--data.seq_len", str(SEQ_LEN)),
            *("--data.batch_size", "16", "--data.cache_dir", str(root / "cache"), "--trainer.max_steps", "150"),
            *("--trainer.val_check_interval", "150", "--trainer.limit_val_batches", "1"),
            *("--trainer.precision", "32-true", "--trainer.logger", "false"),
            *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
            *("--trainer.default_root_dir", str(root), "--test_after_fit", "false"),
        ]
    )
    (last,) = root.rglob("last.ckpt")
    return last


@pytest.fixture(scope="module")
def trained_module(checkpoint: Path) -> ByteLM:
    return load_model(str(checkpoint))


@pytest.fixture(scope="module")
def trained(trained_module: ByteLM) -> HierarchicalByteModel:
    return trained_module.model


@pytest.fixture(scope="module")
def held_out(text: bytes) -> bytes:
    # The last 3,000 bytes of the test split, never trained on: 47 windows of 64 (the last one 56
    # bytes), so with 8 lanes there are 6 groups and the last group is narrower.
    return text[-3000:]


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------


def test_windows_tile_the_input_in_groups_of_lanes():
    groups = window_groups(3000, 64, 8)
    windows = [w for group in groups for w in group]
    assert [len(g) for g in groups] == [8, 8, 8, 8, 8, 7]
    assert windows[0] == (0, 64) and windows[-1] == (2944, 3000)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert window_groups(0, 64, 8) == []


@pytest.mark.parametrize("data", [b"", b"\x00", bytes(range(256)) + b"x" * 44], ids=["empty", "one-byte", "300-bytes"])
def test_round_trip_small_inputs(trained, data):
    blob, stats = compress_bytes(trained, data, SEQ_LEN, lanes=4)
    assert decompress_bytes(trained, blob)[0] == data
    assert stats.original_bytes == len(data) and stats.compressed_bytes == len(blob)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_round_trip_random_bytes_every_architecture(name):
    torch.manual_seed(1)
    model = HierarchicalByteModel(ARCHITECTURES[name]()).eval()
    data = np.random.default_rng(2).integers(0, 256, 150, dtype=np.uint8).tobytes()
    blob, _ = compress_bytes(model, data, SEQ_LEN, lanes=2)
    assert decompress_bytes(model, blob)[0] == data


@pytest.mark.parametrize(
    "name", ["space", "entropy", "entropy-monotonic", "megabyte-3stage", "space-3stage-mamba", "space-hash"]
)
def test_round_trip_text_with_every_patcher(name, text):
    # Every patcher and stage layout of the shared test architectures (tests/architectures.py),
    # on real text so that the dynamic patchers cut irregular units; windows of 64 bytes, 3
    # lanes, so lanes end at different places inside their units.
    from architectures import build

    model = build(name)
    data = text[20_000:20_400]
    blob, stats = compress_bytes(model, data, SEQ_LEN, lanes=3)
    assert decompress_bytes(model, blob)[0] == data
    # The payload is what the model predicts for these windows, to the coder's overhead.
    predicted = score_bytes(model, np.frombuffer(data, dtype=np.uint8), SEQ_LEN, "basic", batch_size=4)
    assert abs(stats.model_bits - predicted.bits) / predicted.bits < 1e-3


def test_round_trip_a_real_file_and_match_bench(trained, held_out):
    blob, stats = compress_bytes(trained, held_out, SEQ_LEN, lanes=8)
    restored, _ = decompress_bytes(trained, blob)
    assert restored == held_out

    # bench scores the same contiguous windows with the parallel forward pass.
    predicted = score_bytes(trained, np.frombuffer(held_out, dtype=np.uint8), SEQ_LEN, "basic").bits
    assert predicted / len(held_out) < 5.0, "the model should be far from a uniform 8 bits/byte"
    payload_bits = 8 * (len(blob) - HEADER_SIZE)
    assert abs(payload_bits - predicted) <= 0.01 * predicted, (payload_bits, predicted)
    # Incremental and parallel logits agree to float rounding in float32.
    assert stats.model_bits == pytest.approx(predicted, rel=1e-4)
    assert payload_bits == pytest.approx(stats.model_bits, abs=16 + 1e-3 * stats.model_bits)


def test_bf16_round_trip_and_size(trained, held_out):
    data = held_out[:1000]
    blob, stats = compress_bytes(trained, data, SEQ_LEN, lanes=8, precision="bf16-mixed")
    assert decompress_bytes(trained, blob)[0] == data
    predicted = score_bytes(trained, np.frombuffer(data, dtype=np.uint8), SEQ_LEN, "basic", precision="bf16-mixed").bits
    assert abs(8 * (len(blob) - HEADER_SIZE) - predicted) <= 0.01 * predicted


# ------------------------------------------------------------------------------------------------
# Every corruption is a clear error
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(trained, held_out) -> bytes:
    return compress_bytes(trained, held_out[:400], SEQ_LEN, lanes=4)[0]


def flip_bit(blob: bytes, position: int) -> bytes:
    changed = bytearray(blob)
    changed[position] ^= 0x10
    return bytes(changed)


def with_fixed_header_crc(blob: bytes) -> bytes:
    fields = blob[: HEADER_SIZE - 4]
    return fields + struct.pack("<I", zlib.crc32(fields)) + blob[HEADER_SIZE:]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b[:-1], "truncated: the header announces"),
        (lambda b: b[:HEADER_SIZE], "truncated: the header announces"),
        (lambda b: b[:20], f"truncated: 20 bytes, shorter than the {HEADER_SIZE}-byte header"),
        (lambda b: b + b"\x00", "has trailing bytes"),
        (lambda b: flip_bit(b, HEADER_SIZE + 3), "corrupt payload"),
        (lambda b: flip_bit(b, len(b) - 1), "corrupt payload"),
        (lambda b: flip_bit(b, 12), "corrupt header"),
        (lambda b: b"GZIP" + b[4:], "not a multibyte compressed file"),
        (lambda b: b"", "not a multibyte compressed file"),
        (lambda b: with_fixed_header_crc(b[:4] + bytes([9]) + b[5:]), "format version 9"),
    ],
    ids=[
        "one-byte-short",
        "payload-missing",
        "header-cut",
        "trailing",
        "payload-bit",
        "last-bit",
        "header-bit",
        "magic",
        "empty",
        "version",
    ],
)
def test_corrupted_input_is_a_clear_error(trained, packed, corrupt, message):
    with pytest.raises(CompressionError, match=message) as error:
        decompress_bytes(trained, corrupt(packed), source="book.mbac")
    assert str(error.value).startswith("book.mbac: ")


def test_another_model_is_refused(packed):
    torch.manual_seed(123)
    other = HierarchicalByteModel(megabyte_config()).eval()
    with pytest.raises(CompressionError, match="compressed with another model"):
        decompress_bytes(other, packed, source="book.mbac")


def test_a_decoder_with_other_probabilities_fails_the_checksum(trained, held_out):
    # Encode in bf16, then pretend (with a valid header) it was float32: same weights, other
    # arithmetic, as a different device or dtype would give. The decoder must notice.
    blob, _ = compress_bytes(trained, held_out[:600], SEQ_LEN, lanes=4, precision="bf16-mixed")
    as_float32 = with_fixed_header_crc(blob[:5] + bytes([0]) + blob[6:])
    with pytest.raises(CompressionError, match="decoded bytes fail the checksum"):
        decompress_bytes(trained, as_float32, source="x.mbac")


def test_weights_hash_sees_every_parameter(trained):
    before = weights_hash(trained)
    with torch.no_grad():
        parameter = trained.stages[-1].stack.blocks[0].mixer.qkv.weight  # the byte-level stage
        parameter[0, 0] += 1e-3
        try:
            assert weights_hash(trained) != before
        finally:
            parameter[0, 0] -= 1e-3
    assert weights_hash(trained) == before


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def test_cli_compress_decompress(checkpoint, held_out, tmp_path, capsys):
    original = tmp_path / "book.txt"
    original.write_bytes(held_out[:500])
    # The windows come from the datamodule's seq_len, as bench's do; the data itself is not read.
    common = [
        *("--trainer.precision", "32-true", "--trainer.logger", "false", "--ckpt_path", str(checkpoint)),
        *("--data", "datamodules.TextDataModule", "--data.seq_len", str(SEQ_LEN)),
    ]
    # --adapt false: 500 bytes are too few for dynamic evaluation to pay for its 81 header bytes.
    main(["compress", *common, "--input_file", str(original), "--lanes", "4", "--adapt", "false"])
    compressed = tmp_path / "book.txt.mbac"
    assert compressed.stat().st_size < 0.75 * original.stat().st_size
    restored = tmp_path / "restored.txt"
    main(["decompress", *common, "--input_file", str(compressed), "--output_file", str(restored)])
    assert restored.read_bytes() == original.read_bytes()
    assert "bits/byte" in capsys.readouterr().out

    compressed.write_bytes(compressed.read_bytes()[:-3])
    with pytest.raises(SystemExit, match=r"book\.txt\.mbac: truncated"):
        main(["decompress", *common, "--input_file", str(compressed), "--output_file", str(restored), "--overwrite", "true"])
    assert restored.read_bytes() == original.read_bytes()  # the earlier output was not touched
