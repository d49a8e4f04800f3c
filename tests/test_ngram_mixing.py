"""Mixing the model with an adaptive byte n-gram: worked examples, the two implementations agree,
causality, and the compressor stays exact and is what bench predicts."""

from __future__ import annotations

import numpy as np
import pytest

from multibyte.bench import score_bytes
from multibyte.compression import (
    ADAPT_HEADER_SIZE,
    HEADER_SIZE,
    CompressionError,
    Header,
    compress_bytes,
    decompress_bytes,
)
from multibyte.mixing import kind
from multibyte.ngram_mixing import NgramConfig, NgramMixer, mixed_log2_probabilities, ngram_log2_probabilities
from tests.test_adapt import ADAPT, SEQ_LEN, text_bytes, tiny_model, under_coding_threads

NGRAM_BLOCK_SIZE = kind(NgramConfig()).block.size  # the container's n-gram block: 17 bytes

A, B = ord("a"), ord("b")


def ngram_p(data: bytes, windows, group_size: int, order: int) -> np.ndarray:
    return np.exp2(ngram_log2_probabilities(np.frombuffer(data, dtype=np.uint8), windows, group_size, order))


# ------------------------------------------------------------------------------------------------
# Worked examples (derived by hand from the module docstring's recursion)
# ------------------------------------------------------------------------------------------------


def test_worked_example_one_window():
    # "abab", order 1. Byte 0: nothing seen, 1/256 at both orders. Byte 1 ('b'): order 0 has seen
    # {a: 1}: n = 1, u = 1, c(b) = 0 -> (0 + 1/256) / 2 = 1/512; context 'a' never seen -> 1/512.
    # Byte 2 ('a'): order 0 {a: 1, b: 1}: (1 + 2/256) / 4 = 129/512; context 'b' unseen.
    # Byte 3 ('b'): order 0 {a: 2, b: 1}: (1 + 2/256) / 5 = 129/640; context 'a' saw {b: 1}:
    # (1 + 1 * 129/640) / 2 = 769/1280.
    p = ngram_p(b"abab", [(0, 4)], 1, 1)
    np.testing.assert_allclose(p, [1 / 256, 1 / 512, 129 / 512, 769 / 1280], rtol=1e-12)


def test_worked_example_windows_and_groups():
    windows = [(0, 2), (2, 4)]
    # One group: the second window sees only its own bytes, so it starts afresh: 1/256, 1/512.
    together = ngram_p(b"abab", windows, 2, 1)
    np.testing.assert_allclose(together, [1 / 256, 1 / 512, 1 / 256, 1 / 512], rtol=1e-12)
    # Groups of one window: the second sees the first. Byte 2 ('a'): order 0 {a: 1, b: 1} ->
    # 129/512; its context is the window's start (BOUNDARY), which byte 0 also had, followed by
    # 'a': (1 + 129/512) / 2 = 641/1024. Byte 3 ('b'): order 0 {a: 2, b: 1} -> 129/640; context
    # 'a' saw {b: 1} -> 769/1280.
    apart = ngram_p(b"abab", windows, 1, 1)
    np.testing.assert_allclose(apart, [1 / 256, 1 / 512, 641 / 1024, 769 / 1280], rtol=1e-12)


def test_mixture_weight_steps_on_the_groups_gradient():
    # Two groups of one byte each; the model gives 1/2 to each byte, the n-gram 1/256 then 1/512.
    windows = [(0, 1), (1, 2)]
    data = np.array([A, B], dtype=np.uint8)
    config = NgramConfig(order=0, learning_rate=2.0, initial_weight=0.5)
    log2_p = mixed_log2_probabilities(np.log2([0.5, 0.5]), data, windows, 1, config)
    # Group 1: w = 1/2, p = (1/2 + 1/256) / 2; gradient w (1 - w) (p_m - p_n) / p.
    p1 = 0.5 * 0.5 + 0.5 / 256
    logit = 2.0 * 0.25 * (0.5 - 1 / 256) / p1
    w = 1 / (1 + np.exp(-logit))
    # Group 2: byte 'b' after {a: 1} at order 0 -> 1/512.
    np.testing.assert_allclose(np.exp2(log2_p), [p1, w * 0.5 + (1 - w) / 512], rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# The two implementations, causality
# ------------------------------------------------------------------------------------------------


def windows_of(n: int, length: int) -> list[tuple[int, int]]:
    return [(start, min(start + length, n)) for start in range(0, n, length)]


def sequential(data: np.ndarray, p_model: np.ndarray, windows, group_size: int, mixer) -> np.ndarray:
    """log2 p of every byte from a byte-by-byte mixer (NgramMixer, LpcMixer), walking the groups
    as the compressor does."""
    out = np.zeros(len(data))
    for first in range(0, len(windows), group_size):
        group = windows[first : first + group_size]
        mixer.start_group(len(group))
        for t in range(max(stop - start for start, stop in group)):
            for lane, (start, stop) in enumerate(group):
                if start + t < stop:
                    p = mixer.distribution(lane, p_model[start + t])
                    assert p.sum() == pytest.approx(1.0, abs=1e-12) and (p > 0).all()
                    out[start + t] = np.log2(p[data[start + t]])
                    mixer.observe(lane, int(data[start + t]))
        mixer.end_group()
    return out


@pytest.mark.parametrize("order, length, group_size", [(6, 100, 3), (2, 37, 1), (4, 1000, 8)])
def test_bench_and_compressor_implementations_agree(order, length, group_size):
    data = np.frombuffer(text_bytes() * 2, dtype=np.uint8)[:2_500]
    rng = np.random.default_rng(order)
    p_model = rng.dirichlet(np.full(256, 0.2), size=len(data))
    windows = windows_of(len(data), length)
    config = NgramConfig(order=order, learning_rate=3.0, initial_weight=0.3)
    vectorised = mixed_log2_probabilities(np.log2(p_model[np.arange(len(data)), data]), data, windows, group_size, config)
    np.testing.assert_allclose(sequential(data, p_model, windows, group_size, NgramMixer(config)), vectorised, rtol=0, atol=1e-9)


def test_a_bytes_probability_depends_only_on_bytes_before_it():
    data = np.frombuffer(text_bytes(), dtype=np.uint8).copy()
    windows = windows_of(len(data), 64)
    before = ngram_log2_probabilities(data, windows, 3, 4)
    for position in (0, 63, 64, 700, len(data) - 1):
        changed = data.copy()
        changed[position] ^= 0x55
        after = ngram_log2_probabilities(changed, windows, 3, 4)
        np.testing.assert_array_equal(after[:position], before[:position])
        assert position == len(data) - 1 or not np.array_equal(after[position:], before[position:])


def test_repeats_beyond_the_window_are_cheap():
    """What the n-gram is for: a phrase met far back, out of the model's window, costs little."""
    model = tiny_model(1)
    line = b"Dynamic evaluation keeps learning from what it has already coded. "
    data = np.frombuffer((line * 60)[:3_840], dtype=np.uint8)
    plain = score_bytes(model, data, SEQ_LEN, "basic", 4)
    mixed = score_bytes(model, data, SEQ_LEN, "basic", 4, mixing=NgramConfig(order=4))
    assert plain.bits_per_byte > 7.5 and mixed.bits_per_byte < 1.0
    assert mixed.unmixed_bits == pytest.approx(plain.bits, rel=1e-6)  # the model's own bits, same pass


def test_config_is_checked():
    for bad in ({"order": 7}, {"order": -1}, {"learning_rate": -1.0}, {"initial_weight": 1.0}, {"initial_weight": 0.0}):
        with pytest.raises(ValueError, match="ngram"):
            NgramConfig(**bad)


def test_bench_refuses_what_it_cannot_mix():
    model = tiny_model()
    data = np.frombuffer(text_bytes(), dtype=np.uint8)
    with pytest.raises(ValueError, match="--ngram with sliding inference"):
        score_bytes(model, data, SEQ_LEN, "sliding", 4, mixing=NgramConfig())
    with pytest.raises(ValueError, match="subword"):
        score_bytes(model, data.astype(np.int64), SEQ_LEN, "basic", 4, token_bytes=np.ones(256, np.int64), mixing=NgramConfig())


# ------------------------------------------------------------------------------------------------
# The compressor
# ------------------------------------------------------------------------------------------------


def check_mixed_round_trip(data: bytes, config, adapt):
    """Compress `data` mixed by `config` (4 lanes) and back: exact, the header records the mixing,
    and bench's bits for the same groups are the coder's (the payload within 2 bytes + 0.1%).
    Returns bench's score (for the test's own checks); shared with `test_lpc_mixing`."""
    model = tiny_model()
    blob, stats = compress_bytes(model, data, SEQ_LEN, lanes=4, adapt=adapt, mixing=config)
    restored, restored_stats = decompress_bytes(model, blob, "x.mbac")
    assert restored == data
    header = Header.unpack(blob, "x.mbac")
    assert header.mixing == config and header.version == 6
    size = (ADAPT_HEADER_SIZE if adapt else HEADER_SIZE) + kind(config).block.size
    assert stats.header_bytes == header.size == size
    score = score_bytes(model, np.frombuffer(data, dtype=np.uint8), SEQ_LEN, "basic", 4, adapt=adapt, mixing=config)
    assert score.bits == pytest.approx(stats.model_bits, rel=1e-6)
    assert restored_stats.model_bits == stats.model_bits
    assert abs(8 * (len(blob) - size) - score.bits) <= 16 + 1e-3 * score.bits
    return score


@pytest.mark.parametrize("adapt", [None, ADAPT], ids=["static", "adapted"])
def test_mixed_round_trip_is_exact_and_bench_predicts_it(adapt):
    assert NGRAM_BLOCK_SIZE == 17
    check_mixed_round_trip(text_bytes(), NgramConfig(order=5, learning_rate=1.0, initial_weight=0.4), adapt)


def test_a_corrupt_ngram_block_is_refused():
    import struct
    import zlib

    model = tiny_model()
    blob, _ = compress_bytes(model, text_bytes()[:300], SEQ_LEN, lanes=2, mixing=NgramConfig(order=3))
    fields = bytearray(blob[: HEADER_SIZE + NGRAM_BLOCK_SIZE - 4])
    fields[HEADER_SIZE - 4] = 9  # the order byte: 9 > 6
    crafted = bytes(fields) + struct.pack("<I", zlib.crc32(bytes(fields))) + blob[HEADER_SIZE + NGRAM_BLOCK_SIZE :]
    with pytest.raises(CompressionError, match="corrupt header.*ngram order must lie in 0..6"):
        decompress_bytes(model, crafted, "x.mbac")


def test_a_subword_file_cannot_be_mixed():
    model = tiny_model()
    with pytest.raises(ValueError, match="subword"):
        compress_bytes(model, b"abc", SEQ_LEN, lanes=1, tokenizer=object(), mixing=NgramConfig())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def test_cli_bench_compress_and_decompress_with_ngram(tmp_path, capsys):
    import json

    from multibyte.cli import main

    book = tmp_path / "book.txt"
    book.write_bytes(text_bytes() * 3)
    common = [
        "--model.architecture",
        '{"max_seq_len": 64, "stages": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "patcher": "fixed", '
        '"patch_size": 4}, {"d_model": 16, "n_layers": 1, "n_heads": 2}]}',
        "--trainer.precision", "32-true", "--trainer.logger", "false",
    ]
    data = ["--data", "datamodules.TextDataModule", "--data.seq_len", "64", "--data.cache_dir", str(tmp_path / "cache")]
    main([
        "fit", *common, *data, "--data.data_path", str(book), "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--test_after_fit", "false",
        "--trainer.enable_progress_bar", "false",
    ])
    (checkpoint,) = (tmp_path / "run").rglob("last.ckpt")
    bench = ["bench", *common, *data, "--data.data_path", str(book), "--ckpt_path", str(checkpoint), "--codecs", "false"]
    # Text mixes by default (MIXING_BY_DEFAULT), where it can: basic inference, not sliding.
    main([*bench, "--ngram_options.order", "3", "--output_dir", str(tmp_path / "bench"), "--progress", "false",
          "--inference", "[basic, sliding]"])
    out = capsys.readouterr().out
    assert "| model + adapt + n-gram |" in out and "| model + adapt |" in out
    assert "Mixed with a byte n-gram: order 3" in out
    rows = json.loads((tmp_path / "bench" / "bench-text-test.json").read_text())["results"]
    assert [(row["method"], row["mixing"]) for row in rows] == [
        ("model + adapt", None),
        ("model + adapt + n-gram", "n-gram"),
        ("model + sliding window + adapt", None),
    ]
    main([*bench, "--no-ngram", "--output_dir", str(tmp_path / "off"), "--progress", "false"])
    assert "n-gram" not in capsys.readouterr().out
    with pytest.raises(SystemExit):  # asked for explicitly where it cannot run: one clear error
        main([*bench, "--ngram", "true", "--inference", "[sliding]", "--output_dir", str(tmp_path / "no")])
    assert "--ngram with sliding inference: mixing runs over contiguous windows" in capsys.readouterr().err
    main([
        "compress", *common, *data, "--ckpt_path", str(checkpoint), "--input_file", str(book), "--lanes", "4",
        "--ngram", "true", "--ngram_options.order", "3", "--progress", "false",
    ])
    assert "mixed with a byte n-gram: order 3" in capsys.readouterr().out
    restored = tmp_path / "restored.txt"
    main(["decompress", *common, *data, "--ckpt_path", str(checkpoint), "--input_file", f"{book}.mbac",
          "--output_file", str(restored), "--progress", "false"])
    assert restored.read_bytes() == book.read_bytes()
    assert Header.unpack((tmp_path / "book.txt.mbac").read_bytes(), "x").mixing == NgramConfig(order=3)


def test_version_4_files_still_decode():
    """Format 4 wrote the n-gram's files with the layout version 5 keeps (its mixing byte: 0 or 1)."""
    import struct
    import zlib

    model = tiny_model()
    data = text_bytes()[:400]
    blob, _ = compress_bytes(model, data, SEQ_LEN, lanes=2, mixing=NgramConfig(order=3))
    size = HEADER_SIZE + NGRAM_BLOCK_SIZE
    fields = bytearray(blob[: size - 4])
    fields[4] = 4
    version_4 = bytes(fields) + struct.pack("<I", zlib.crc32(bytes(fields))) + blob[size:]
    assert Header.unpack(version_4, "x").version == 4
    with under_coding_threads():
        assert decompress_bytes(model, version_4, "x.mbac")[0] == data
