"""Mixing the model with a linear predictor of 16-bit samples: worked examples of the byte laws,
the predictor learns a linear process, the two implementations agree, causality and what a
decoder holds, and the compressor stays exact and is what bench predicts."""

from __future__ import annotations

import math
import struct
import wave
import zlib

import numpy as np
import pytest

from multibyte.bench import score_bytes
from multibyte.compression import (
    HEADER_SIZE,
    CompressionError,
    Header,
    compress_bytes,
    decompress_bytes,
)
from multibyte.lpc_mixing import (
    LpcConfig,
    LpcMixer,
    _byte_probabilities,
    high_byte_probabilities,
    low_byte_probabilities,
    lpc_log2_probabilities,
    mixed_log2_probabilities,
)
from multibyte.mixing import kind
from multibyte.trainer import mixing_wanted
from tests.test_adapt import ADAPT, EMBEDDED, SEQ_LEN, tiny_model
from tests.test_ngram_mixing import check_mixed_round_trip, sequential, windows_of

LPC_BLOCK_SIZE = kind(LpcConfig()).block.size
HALF = 1.0 / math.log(2.0)  # the scale whose decay q = exp(-1/b) is exactly 1/2


def speech(n_bytes: int = 6_000) -> np.ndarray:
    """Real 16-bit speech (three embedded recordings, 8 kHz) as pcm16 bytes."""
    frames = b""
    for name in ("0_george_0.wav", "1_jackson_0.wav", "2_theo_0.wav"):
        with wave.open(str(EMBEDDED / name)) as recording:
            frames += recording.readframes(recording.getnframes())
    return np.frombuffer(frames[:n_bytes], dtype=np.uint8).copy()


# ------------------------------------------------------------------------------------------------
# The byte laws, worked by hand
# ------------------------------------------------------------------------------------------------


def test_low_byte_law_worked_example():
    """Scale 1/ln 2 gives q = 1/2: P(0) = 1 - 2^-1/2, P(+-1) = (1/2)(1/2) 2^-1/2 = 2^-2.5 each,
    P(+-2) = 2^-3.5. Prediction 5: low byte 5 is e = 0 (plus e = +-256, ... of mass ~2^-256), 6 and
    4 are e = +-1, 7 is e = 2; byte 133 is e = 128 or -128: 2 * 2^-128.5 / (1 - 2^-256)."""
    p = low_byte_probabilities(5, HALF)
    assert p[5] == pytest.approx(1 - 2**-0.5, rel=1e-12)
    assert p[6] == pytest.approx(2**-2.5, rel=1e-12) and p[4] == pytest.approx(2**-2.5, rel=1e-12)
    assert p[7] == pytest.approx(2**-3.5, rel=1e-12)
    assert p[133] == pytest.approx(2 * 2**-128.5, rel=1e-12)
    assert p.sum() == pytest.approx(1.0, abs=1e-15)
    # a negative prediction wraps: -1 is 0xFFFF, whose low byte is 255
    assert np.argmax(low_byte_probabilities(-1, HALF)) == 255


def test_high_byte_law_worked_example():
    """Prediction 300 = 0x012C with q = 1/2: knowing the low byte is 0x2C, the high byte is 1 (e = 0)
    or 0 / 2 (e = -+256, mass 2^-256.5 each): almost surely 1. Knowing the low byte is 0x2D
    (e = 1 with high 1), again 1."""
    for low in (0x2C, 0x2D):
        p = high_byte_probabilities(300, HALF, low)
        assert p.sum() == pytest.approx(1.0, abs=1e-15) and p[1] == pytest.approx(1.0, abs=1e-12)
    # a negative sample's high byte is two's complement: -200 = 0xFF38
    p = high_byte_probabilities(-200, 3.0, 0x38)
    assert np.argmax(p) == 0xFF


def test_the_two_bytes_cost_what_the_sample_costs():
    """p(low) p(high | low) = P(e) up to the mass beyond int16 (none here: samples far from the
    edges), and the whole-file path's closed form for p(high | low) equals the normalised sum the
    coder uses."""
    rng = np.random.default_rng(0)
    samples = rng.integers(-20000, 20000, 200)
    rounded = np.clip(samples + rng.integers(-900, 900, 200), -32768, 32767)
    scale = rng.uniform(0.5, 400.0, 200)
    p_low, p_high = _byte_probabilities(samples, rounded, scale)
    for i in range(200):
        low, high = int(samples[i]) & 0xFF, (int(samples[i]) >> 8) & 0xFF
        assert p_low[i] == pytest.approx(low_byte_probabilities(int(rounded[i]), scale[i])[low], rel=1e-12)
        assert p_high[i] == pytest.approx(high_byte_probabilities(int(rounded[i]), scale[i], low)[high], rel=1e-9)
        q = math.exp(-1.0 / scale[i])
        e = abs(int(samples[i]) - int(rounded[i]))
        mass = 1 - math.sqrt(q) if e == 0 else 0.5 * (1 - q) * q ** (e - 0.5)
        assert p_low[i] * p_high[i] == pytest.approx(mass, rel=1e-6, abs=1e-300)


# ------------------------------------------------------------------------------------------------
# The predictor and the mixture
# ------------------------------------------------------------------------------------------------


def test_it_learns_a_linear_process():
    """A sum of two sinusoids obeys an order-4 linear recursion: after the first fit the residuals
    are a few units (rounding, the ridge), so the high byte costs almost nothing and a sample under
    5 bits, where white noise of the same range costs over 13."""
    t = np.arange(8_000)
    x = np.rint(9000 * np.sin(0.05 * t) + 5000 * np.sin(0.31 * t + 1)).astype("<i2")
    data = np.frombuffer(x.tobytes(), dtype=np.uint8)
    bits = -lpc_log2_probabilities(data, windows_of(len(data), 4096), 1, LpcConfig())
    assert bits[1::2][200:].mean() < 0.01  # high bytes, after the first fits
    assert bits[200:].sum() / (len(x) - 100) < 5.0  # per sample
    noise = np.frombuffer(np.random.default_rng(0).integers(-9000, 9000, 8_000).astype("<i2").tobytes(), np.uint8)
    assert -lpc_log2_probabilities(noise, windows_of(len(noise), 4096), 1, LpcConfig()).mean() > 6.5  # per byte


@pytest.mark.parametrize("length, group_size, n", [(512, 1, 6_000), (256, 3, 6_001), (1000, 4, 5_000)])
def test_bench_and_compressor_implementations_agree(length, group_size, n):
    data = speech(n) if n % 2 == 0 else np.concatenate([speech(n - 1), [7]]).astype(np.uint8)
    rng = np.random.default_rng(length)
    p_model = rng.dirichlet(np.full(256, 0.3), size=len(data))
    windows = windows_of(len(data), length)
    config = LpcConfig(order=8, history=100, refit=20, learning_rate=10.0, initial_weight=0.3)
    vectorised = mixed_log2_probabilities(np.log2(p_model[np.arange(len(data)), data]), data, windows, group_size, config)
    np.testing.assert_allclose(sequential(data, p_model, windows, group_size, LpcMixer(config)), vectorised, rtol=0, atol=1e-9)


def test_a_bytes_probability_depends_only_on_what_a_decoder_holds():
    """Causal, and blind to the earlier windows of its own group (decoded side by side with it)."""
    data = speech()
    windows = windows_of(len(data), 1000)  # groups of 3: windows 0-2, 3-5
    before = lpc_log2_probabilities(data, windows, 3, LpcConfig())
    for position in (0, 999, 1000, 2500, len(data) - 1):
        changed = data.copy()
        changed[position] ^= 0x5A
        after = lpc_log2_probabilities(changed, windows, 3, LpcConfig())
        np.testing.assert_array_equal(after[:position], before[:position])
        assert position == len(data) - 1 or not np.array_equal(after[position:], before[position:])
    changed = data.copy()
    changed[10:990] ^= 0x5A  # window 0: unseen by windows 1 and 2
    after = lpc_log2_probabilities(changed, windows, 3, LpcConfig())
    np.testing.assert_array_equal(after[1000:3000], before[1000:3000])
    changed = data.copy()
    changed[2900:2990] ^= 0x5A  # the end of window 2: the next group's history
    after = lpc_log2_probabilities(changed, windows, 3, LpcConfig())
    assert not np.array_equal(after[3000:3100], before[3000:3100])


def test_silence_is_predicted_and_cheap():
    """Digital silence (every sample 0) makes the normal equations zero; the ridge keeps them
    solvable. The prediction is 0 and the scale its floor 1/2 (q = e^-2), so the low byte costs
    -log2 P(0) = -log2(1 - e^-1) = 0.6617 bits and the high byte nothing. (Speech right after
    silence can lie beyond so narrow a law, p = 0: the mixture with the model stays finite.)"""
    data = np.concatenate([np.zeros(3_000, np.uint8), speech(2_000), np.zeros(3_000, np.uint8)])
    windows = windows_of(len(data), 1000)
    bits = -lpc_log2_probabilities(data, windows, 2, LpcConfig())
    for silence in (bits[:3_000], bits[-2_000:]):  # from the start; well after the speech
        np.testing.assert_allclose(silence[0::2], -math.log2(1 - math.exp(-1)), rtol=1e-12)
        assert silence[1::2].max() < 1e-12
    assert np.isfinite(mixed_log2_probabilities(np.full(len(data), -8.0), data, windows, 2, LpcConfig())).all()


def test_mixing_with_the_predictor_helps_on_speech():
    """A model that knows nothing (uniform) mixed with the predictor: the predictor's weight grows
    and the mixture costs far less than 8 bits per byte on real speech."""
    data = speech()
    windows = windows_of(len(data), 512)
    mixed = mixed_log2_probabilities(np.full(len(data), -8.0), data, windows, 2, LpcConfig())
    assert -mixed.mean() < 6.0


def test_config_is_checked():
    bad = ({"order": 0}, {"history": 4, "order": 8}, {"refit": 0}, {"scale_window": 0}, {"min_scale": 0.0},
           {"ridge": 0.0}, {"learning_rate": -1.0}, {"initial_weight": 1.0})
    for fields in bad:
        with pytest.raises(ValueError, match="lpc"):
            LpcConfig(**fields)


def test_windows_must_hold_whole_samples():
    with pytest.raises(ValueError, match="even --seq_len"):
        lpc_log2_probabilities(speech(), windows_of(6_000, 999), 1, LpcConfig())


def test_one_second_predictor_at_a_time():
    with pytest.raises(ValueError, match="choose one"):
        mixing_wanted(True, None, True, LpcConfig(), "audio")
    assert mixing_wanted(None, None, None, LpcConfig(), "audio") == (LpcConfig(), False)
    assert mixing_wanted(None, None, False, LpcConfig(), "audio") == (None, False)


# ------------------------------------------------------------------------------------------------
# bench and the compressor
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapt", [None, ADAPT], ids=["static", "adapted"])
def test_mixed_round_trip_is_exact_and_bench_predicts_it(adapt):
    assert LPC_BLOCK_SIZE == 48
    data = speech(1_500).tobytes() + b"\x07"  # odd: the last byte is half a sample
    score = check_mixed_round_trip(data, LpcConfig(order=8, history=64, refit=16), adapt)
    assert score.bits < score.unmixed_bits  # the untrained model alone is near 8 bits per byte


def test_a_corrupt_lpc_block_is_refused():
    model = tiny_model()
    blob, _ = compress_bytes(model, speech(300).tobytes(), SEQ_LEN, lanes=2, mixing=LpcConfig())
    fields = bytearray(blob[: HEADER_SIZE + LPC_BLOCK_SIZE - 4])
    fields[HEADER_SIZE - 4 : HEADER_SIZE] = struct.pack("<I", 0)  # the order: 0
    crafted = bytes(fields) + struct.pack("<I", zlib.crc32(bytes(fields))) + blob[HEADER_SIZE + LPC_BLOCK_SIZE :]
    with pytest.raises(CompressionError, match="corrupt header.*lpc order must be at least 1"):
        decompress_bytes(model, crafted, "x.mbac")
    fields = bytearray(blob[: HEADER_SIZE - 4])  # without the LPC block
    fields[4] = 4  # version 4 knew no predictor but the n-gram: its mixing byte is 0 or 1
    version_4 = bytes(fields) + struct.pack("<I", zlib.crc32(bytes(fields))) + blob[HEADER_SIZE + LPC_BLOCK_SIZE :]
    with pytest.raises(CompressionError, match=r"corrupt header \(mixing 2\)"):
        decompress_bytes(model, version_4, "x.mbac")


def test_what_cannot_be_mixed_is_refused():
    model = tiny_model()
    data = speech(600)
    with pytest.raises(ValueError, match="--lpc with sliding inference"):
        score_bytes(model, data, SEQ_LEN, "sliding", 4, mixing=LpcConfig())
    with pytest.raises(ValueError, match="even --seq_len"):
        compress_bytes(model, data.tobytes(), SEQ_LEN - 1, lanes=2, mixing=LpcConfig())
    from multibyte.mixing import check

    with pytest.raises(ValueError, match=r"pcm16\), not mulaw8"):
        check(LpcConfig(), "basic", False, "mulaw8")


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def test_cli_mixes_audio_with_the_predictor_by_default(tmp_path, capsys):
    import json

    from multibyte.cli import main

    common = [
        "--model.architecture",
        '{"max_seq_len": 64, "stages": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "patcher": "fixed", '
        '"patch_size": 4}, {"d_model": 16, "n_layers": 1, "n_heads": 2}]}',
        "--trainer.precision", "32-true", "--trainer.logger", "false", "--seed_everything", "0",
    ]
    data = ["--data", "datamodules.AudioDataModule", "--data.seq_len", "64", "--data.sample_rate", "8000",
            "--data.cache_dir", str(tmp_path / "cache")]
    main([
        "fit", *common, *data, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--test_after_fit", "false", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
    ])
    (checkpoint,) = (tmp_path / "run").rglob("last.ckpt")
    bench = ["bench", *common, *data, "--ckpt_path", str(checkpoint), "--codecs", "false", "--max_bytes", "2048",
             "--progress", "false"]
    main([*bench, "--output_dir", str(tmp_path / "bench")])  # audio: adapt and LPC by default
    out = capsys.readouterr().out
    assert "| model + adapt + LPC |" in out and "Mixed with a linear predictor: order 16" in out
    rows = json.loads((tmp_path / "bench" / "bench-audio-test.json").read_text())["results"]
    assert [(row["method"], row["mixing"]) for row in rows] == [("model + adapt", None), ("model + adapt + LPC", "LPC")]
    main([*bench, "--no-lpc", "--output_dir", str(tmp_path / "off")])
    assert "LPC" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*bench, "--lpc", "true", "--ngram", "true", "--output_dir", str(tmp_path / "both")])
    assert "choose one" in capsys.readouterr().err
    recording = tmp_path / "speech.pcm"
    recording.write_bytes(speech(1_000).tobytes())
    main(["compress", *common, *data, "--ckpt_path", str(checkpoint), "--input_file", str(recording), "--progress", "false"])
    assert "mixed with a linear predictor: order 16" in capsys.readouterr().out
    restored = tmp_path / "restored.pcm"
    main(["decompress", *common, *data, "--ckpt_path", str(checkpoint), "--input_file", f"{recording}.mbac",
          "--output_file", str(restored), "--progress", "false"])
    assert restored.read_bytes() == recording.read_bytes()
    assert Header.unpack((tmp_path / "speech.pcm.mbac").read_bytes(), "x").mixing == LpcConfig()
