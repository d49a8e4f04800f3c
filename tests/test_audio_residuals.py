"""The pcm16d2 audio encoding (multibyte/codecs/audio.py): second-order residuals of 16-bit
samples. A worked example derived by hand, exact inverses with any history, one stream through
a split's clips (the split's bytes decode as one stream to the same samples as pcm16's), and
causality (a sample changes no byte before its own)."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datamodules import AudioDataModule
from multibyte.codecs.audio import bytes_to_pcm16, pcm16_to_bytes


def test_worked_example() -> None:
    samples = np.array([100, 103, 110, -20, 32767, -32768], dtype=np.int16)
    # r[t] = s[t] - 2 s[t-1] + s[t-2], from silence: 100; 103-200 = -97; 110-206+100 = 4;
    # -20-220+103 = -137; 32767+40+110 = 32917 -> 32917-65536 = -32619;
    # -32768-65534-20 = -98322 -> -98322+131072 = 32750.
    residuals = np.array([100, -97, 4, -137, -32619, 32750], dtype="<i2")
    assert pcm16_to_bytes(samples, "pcm16d2").tobytes() == residuals.tobytes()
    np.testing.assert_array_equal(bytes_to_pcm16(residuals.view(np.uint8), "pcm16d2"), samples)
    # With the two samples before: s[-2] = 90, s[-1] = 95 -> r[0] = 100 - 190 + 90 = 0.
    assert pcm16_to_bytes(samples[:1], "pcm16d2", (90, 95)).view("<i2").tolist() == [0]


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    length=st.integers(0, 3000),
    history=st.tuples(st.integers(-32768, 32767), st.integers(-32768, 32767)),
)
def test_inverse_with_any_history(seed: int, length: int, history: tuple[int, int]) -> None:
    samples = np.random.default_rng(seed).integers(-32768, 32768, length).astype(np.int16)
    data = pcm16_to_bytes(samples, "pcm16d2", history)
    assert data.dtype == np.uint8 and data.size == 2 * length
    np.testing.assert_array_equal(bytes_to_pcm16(data, "pcm16d2", history), samples)


def test_split_points_continue_one_stream() -> None:
    samples = np.random.default_rng(3).integers(-32768, 32768, 1000).astype(np.int16)
    whole = pcm16_to_bytes(samples, "pcm16d2")
    for cut in (1, 2, 517):
        history = tuple(int(v) for v in np.concatenate([[0, 0], samples[:cut]])[-2:])
        head, tail = pcm16_to_bytes(samples[:cut], "pcm16d2"), pcm16_to_bytes(samples[cut:], "pcm16d2", history)
        parts = np.concatenate([head, tail])
        np.testing.assert_array_equal(parts, whole)


def test_a_sample_changes_no_earlier_byte() -> None:
    samples = np.random.default_rng(4).integers(-2000, 2000, 400).astype(np.int16)
    before = pcm16_to_bytes(samples, "pcm16d2")
    changed = samples.copy()
    changed[250] += 7
    after = pcm16_to_bytes(changed, "pcm16d2")
    np.testing.assert_array_equal(after[:500], before[:500])
    assert not np.array_equal(after[500:502], before[500:502])


def test_smooth_audio_becomes_small_residuals() -> None:
    t = np.arange(8000)
    samples = (8000 * np.sin(2 * np.pi * 220 * t / 8000)).astype(np.int16)
    residuals = pcm16_to_bytes(samples, "pcm16d2").view("<i2")
    # A 220 Hz sine at 8 kHz: |r| <= 8000 * 4 sin^2(pi 220 / 8000) = 238.2, plus at most 4 from
    # truncating each of three samples to an integer.
    assert np.abs(residuals[2:]).max() <= 242 < np.abs(samples).max()


@pytest.mark.slow
def test_datamodule_split_decodes_to_the_pcm16_samples(tmp_path: Path) -> None:
    plain = AudioDataModule(sample_rate=8000, seq_len=4096, encoding="pcm16", cache_dir=str(tmp_path))
    residual = AudioDataModule(sample_rate=8000, seq_len=4096, encoding="pcm16d2", cache_dir=str(tmp_path))
    for dm in (plain, residual):
        dm.prepare_data()
    assert residual.spec.audio_encoding == "pcm16d2"
    for split in ("train", "validation", "test"):
        pcm = (plain.cache_folder / f"{split}.bin").read_bytes()
        d2 = (residual.cache_folder / f"{split}.bin").read_bytes()
        assert len(pcm) == len(d2)
        # The split is one stream: decoded from silence, it is every clip's samples in order.
        np.testing.assert_array_equal(bytes_to_pcm16(d2, "pcm16d2"), np.frombuffer(pcm, "<i2"))
