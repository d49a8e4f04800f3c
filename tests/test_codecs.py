"""Codecs: every modality converts to bytes and back exactly, in every byte order and encoding."""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from multibyte.codecs import (
    IMAGE_BYTES,
    IMAGE_SIZE,
    as_byte_array,
    bytes_per_sample,
    bytes_to_image,
    bytes_to_png,
    bytes_to_wav,
    bytes_to_waveform,
    decode_text,
    encode_text,
    image_to_bytes,
    load_audio_file,
    load_image_file,
    patch_scan_permutation,
    planar_row_to_hwc,
    waveform_to_bytes,
)

# (order, patch_size) pairs; patch size 3 is one pixel per patch, i.e. the same bytes as raster.
IMAGE_ORDERS = [("raster", 12), ("patch", 3), ("patch", 12), ("patch", 48), ("patch", 192)]

# Images: sparse ones from hypothesis (a fill value plus scattered pixels, which finds layout
# bugs in edge rows and columns) and dense uniformly random ones from a drawn seed.
sparse_images = arrays(np.uint8, (IMAGE_SIZE, IMAGE_SIZE, 3), elements=st.integers(0, 255))
dense_images = st.integers(0, 2**32 - 1).map(
    lambda seed: np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
)
images = st.one_of(sparse_images, dense_images)
image_byte_strings = st.integers(0, 2**32 - 1).map(
    lambda seed: np.random.default_rng(seed).integers(0, 256, IMAGE_BYTES, dtype=np.uint8)
)


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(st.text())
def test_text_round_trip(text: str) -> None:
    data = encode_text(text)
    assert data == text.encode("utf-8")
    assert decode_text(data) == text


@settings(deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_with_replacement(data: bytes) -> None:
    text = decode_text(data)
    try:
        valid = data.decode("utf-8")
    except UnicodeDecodeError:
        valid = None
    if valid is not None:
        assert text == valid and encode_text(text) == data
    else:
        assert "\ufffd" in text


def test_decode_text_accepts_token_tensors_and_arrays() -> None:
    data = encode_text("héllo")
    assert decode_text(torch.tensor(list(data), dtype=torch.int64)) == "héllo"
    assert decode_text(np.frombuffer(data, dtype=np.uint8)) == "héllo"
    with pytest.raises(ValueError, match="0..255"):
        as_byte_array(np.array([1, 256]))


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order,patch_size", IMAGE_ORDERS)
@settings(max_examples=30, deadline=None)
@given(image=images)
def test_image_to_bytes_to_image_identity(order: str, patch_size: int, image: np.ndarray) -> None:
    data = image_to_bytes(image, order, patch_size)
    assert data.shape == (IMAGE_BYTES,) and data.dtype == np.uint8
    np.testing.assert_array_equal(bytes_to_image(data, order, patch_size), image)


@pytest.mark.parametrize("order,patch_size", IMAGE_ORDERS)
@settings(max_examples=30, deadline=None)
@given(data=image_byte_strings)
def test_bytes_to_image_to_bytes_identity(order: str, patch_size: int, data: np.ndarray) -> None:
    image = bytes_to_image(data, order, patch_size)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image_to_bytes(image, order, patch_size), data)


@pytest.mark.parametrize("patch_size", [3, 12, 48, 192])
def test_patch_scan_permutation_is_a_permutation_whose_inverse_restores(patch_size: int) -> None:
    permutation = patch_scan_permutation(patch_size)
    np.testing.assert_array_equal(np.sort(permutation), np.arange(IMAGE_BYTES))
    image = np.random.default_rng(patch_size).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    raster = image.reshape(-1)
    patch_bytes = raster[permutation]
    np.testing.assert_array_equal(patch_bytes, image_to_bytes(image, "patch", patch_size))
    np.testing.assert_array_equal(patch_bytes[np.argsort(permutation)], raster)


def coordinate_image() -> np.ndarray:
    """Pixel (row, col) holds R=row, G=col, B=100+(row+col)%100: every byte says where it came from."""
    rows, cols = np.meshgrid(np.arange(IMAGE_SIZE), np.arange(IMAGE_SIZE), indexing="ij")
    return np.stack([rows, cols, 100 + (rows + cols) % 100], axis=-1).astype(np.uint8)


def pixel_bytes(row: int, col: int) -> list[int]:
    return [row, col, 100 + (row + col) % 100]


def test_patch_order_worked_example() -> None:
    image = coordinate_image()
    # patch_size 12 = 2x2 pixels: the first patch is pixels (0,0), (0,1), (1,0), (1,1).
    data = image_to_bytes(image, "patch", 12)
    expected = [b for row, col in [(0, 0), (0, 1), (1, 0), (1, 1)] for b in pixel_bytes(row, col)]
    assert data[:12].tolist() == expected
    # The second patch is the next block to the right, the 33rd starts the second block row.
    assert data[12:24].tolist() == [b for row, col in [(0, 2), (0, 3), (1, 2), (1, 3)] for b in pixel_bytes(row, col)]
    second_block_row = [b for row, col in [(2, 0), (2, 1), (3, 0), (3, 1)] for b in pixel_bytes(row, col)]
    assert data[32 * 12 : 33 * 12].tolist() == second_block_row
    # patch_size 48 = 4x4 pixels, raster order inside the block.
    data = image_to_bytes(image, "patch", 48)
    assert data[:48].tolist() == [b for row in range(4) for col in range(4) for b in pixel_bytes(row, col)]
    # Raster order: row 0 left to right, then row 1.
    data = image_to_bytes(image, "raster")
    assert data[: 3 * 65].tolist() == [b for col in range(64) for b in pixel_bytes(0, col)] + pixel_bytes(1, 0)


@pytest.mark.parametrize("patch_size", [0, 6, 13, 75, 27])
def test_invalid_patch_size_is_rejected(patch_size: int) -> None:
    # 6 and 13 are not 3*p*p; 75 = 3*5*5 and 27 = 3*3*3 are, but 5 and 3 do not divide 64.
    with pytest.raises(ValueError, match=f"patch_size={patch_size}"):
        patch_scan_permutation(patch_size)
    with pytest.raises(ValueError, match=f"patch_size={patch_size}"):
        image_to_bytes(coordinate_image(), "patch", patch_size)


@pytest.mark.parametrize("order,patch_size", IMAGE_ORDERS)
@settings(max_examples=20, deadline=None)
@given(length=st.integers(0, 2 * IMAGE_BYTES), seed=st.integers(0, 2**32 - 1))
def test_truncated_and_overlong_bytes_decode(order: str, patch_size: int, length: int, seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)
    image = bytes_to_image(data, order, patch_size)
    expected = np.zeros(IMAGE_BYTES, dtype=np.uint8)  # missing bytes are zeros, extra bytes are cut
    kept = min(length, IMAGE_BYTES)
    expected[:kept] = data[:kept]
    np.testing.assert_array_equal(image_to_bytes(image, order, patch_size), expected)


@pytest.mark.parametrize("order,patch_size", [("raster", 12), ("patch", 12)])
def test_png_round_trip(tmp_path: Path, order: str, patch_size: int) -> None:
    data = np.random.default_rng(7).integers(0, 256, IMAGE_BYTES, dtype=np.uint8)
    path = tmp_path / "sample.png"
    bytes_to_png(data, path, order, patch_size)
    with Image.open(path) as reloaded:
        assert reloaded.mode == "RGB" and reloaded.size == (IMAGE_SIZE, IMAGE_SIZE)
        np.testing.assert_array_equal(image_to_bytes(np.asarray(reloaded), order, patch_size), data)
    # load_image_file of an image that is already 64x64 RGB changes nothing.
    np.testing.assert_array_equal(image_to_bytes(load_image_file(path), order, patch_size), data)


def test_load_image_file_converts_mode_and_box_resizes(tmp_path: Path) -> None:
    # A 192x128 grayscale image made of 3x2-pixel blocks of one value each: box-resizing to 64x64
    # averages exactly one block per target pixel, so the result is the block values, in R, G and B.
    block_values = np.random.default_rng(3).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    gray = np.repeat(np.repeat(block_values, 3, axis=0), 2, axis=1)  # (192, 128)
    path = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(path)
    image = load_image_file(path)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.repeat(block_values[..., None], 3, axis=-1))


def test_undecodable_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image_file(path)


def test_planar_row_to_hwc() -> None:
    image = coordinate_image()
    # Channel-planar: all 4096 R bytes (row-major), then all G, then all B.
    planar = np.concatenate([image[..., channel].reshape(-1) for channel in range(3)])
    np.testing.assert_array_equal(planar_row_to_hwc(planar), image)
    np.testing.assert_array_equal(planar_row_to_hwc(np.stack([planar, planar])), np.stack([image, image]))


# ------------------------------------------------------------------------------------------------
# Audio
# ------------------------------------------------------------------------------------------------


def test_bytes_per_sample() -> None:
    assert bytes_per_sample("pcm16") == 2 and bytes_per_sample("pcm16be") == 2 and bytes_per_sample("mulaw8") == 1
    assert bytes_per_sample("pcm16d2") == 2
    with pytest.raises(ValueError, match="'pcm24'"):
        bytes_per_sample("pcm24")


@pytest.mark.parametrize("encoding", ["pcm16", "pcm16be", "pcm16d2"])
@settings(deadline=None)
@given(data=st.binary(max_size=4096))
def test_pcm16_bytes_to_waveform_to_bytes_identity(encoding: str, data: bytes) -> None:
    data = data[: len(data) - len(data) % 2]
    wave = bytes_to_waveform(data, encoding)
    assert wave.dtype == np.float32 and len(wave) == len(data) // 2
    assert np.all(np.abs(wave) <= 1.0)
    assert waveform_to_bytes(wave, encoding).tobytes() == data


def test_pcm16_is_signed_little_endian() -> None:
    # Bytes 0x01 0x80 are the int16 0x8001 = -32767; 0xff 0x7f is 32767; 0x00 0x80 is -32768.
    wave = bytes_to_waveform(bytes([0x01, 0x80, 0xFF, 0x7F, 0x00, 0x80]), "pcm16")
    np.testing.assert_array_equal(wave, np.array([-32767, 32767, -32768], dtype=np.float32) / 32768)


def test_pcm16be_is_signed_big_endian_and_the_byte_swap_of_pcm16() -> None:
    # Bytes 0x80 0x01 are the int16 0x8001 = -32767; 0x7f 0xff is 32767; 0x80 0x00 is -32768.
    wave = bytes_to_waveform(bytes([0x80, 0x01, 0x7F, 0xFF, 0x80, 0x00]), "pcm16be")
    np.testing.assert_array_equal(wave, np.array([-32767, 32767, -32768], dtype=np.float32) / 32768)
    little = waveform_to_bytes(wave, "pcm16")
    assert waveform_to_bytes(wave, "pcm16be").tolist() == little.reshape(-1, 2)[:, ::-1].ravel().tolist()


@settings(deadline=None)
@given(st.binary(min_size=1, max_size=1001).filter(lambda data: len(data) % 2 == 1))
def test_pcm16_odd_length_drops_the_trailing_byte(data: bytes) -> None:
    wave = bytes_to_waveform(data, "pcm16")
    assert len(wave) == len(data) // 2
    assert waveform_to_bytes(wave, "pcm16").tobytes() == data[:-1]


def test_mulaw_every_level_round_trips_and_is_monotonic() -> None:
    levels = np.arange(256, dtype=np.uint8)
    wave = bytes_to_waveform(levels, "mulaw8")
    assert np.all(np.diff(wave) > 0) and wave[0] == pytest.approx(-1.0) and wave[-1] == pytest.approx(1.0)
    np.testing.assert_array_equal(waveform_to_bytes(wave, "mulaw8"), levels)


@settings(deadline=None)
@given(st.binary(max_size=2048))
def test_mulaw_bytes_to_waveform_to_bytes_identity(data: bytes) -> None:
    wave = bytes_to_waveform(data, "mulaw8")
    assert len(wave) == len(data)
    assert waveform_to_bytes(wave, "mulaw8").tobytes() == data


def test_waveform_to_bytes_clips_out_of_range_and_accepts_tensors() -> None:
    wave = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    expected_ints = np.array([-32768, -32768, 0, 16384, 32767, 32767], dtype="<i2")
    assert waveform_to_bytes(wave, "pcm16").tobytes() == expected_ints.tobytes()
    # mu-law maps -1 to level 0, 0 to the middle level 128 and +1 to 255; beyond +-1 is clipped.
    assert waveform_to_bytes(wave[[0, 1, 2, 4, 5]], "mulaw8").tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("encoding", ["pcm16", "pcm16be", "pcm16d2", "mulaw8"])
@pytest.mark.parametrize("suffix", [".wav", ".flac"])
@settings(max_examples=15, deadline=None)
@given(data=st.binary(min_size=2, max_size=3000))
def test_audio_file_round_trip(encoding: str, suffix: str, data: bytes) -> None:
    data = data[: len(data) - len(data) % bytes_per_sample(encoding)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"clip{suffix}"
        if suffix == ".wav":
            bytes_to_wav(data, path, 16000, encoding)
        else:  # FLAC is lossless too: write the same int16 samples through soundfile
            samples = np.frombuffer(waveform_to_bytes(bytes_to_waveform(data, encoding), "pcm16").tobytes(), "<i2")
            soundfile.write(path, samples, 16000, subtype="PCM_16", format="FLAC")
        info = soundfile.info(str(path))
        assert info.samplerate == 16000 and info.subtype == "PCM_16" and info.channels == 1
        wave = load_audio_file(path, 16000)
    assert waveform_to_bytes(wave, encoding).tobytes() == data


def test_wav_holds_the_pcm16_bytes_verbatim(tmp_path: Path) -> None:
    data = np.random.default_rng(5).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    bytes_to_wav(data, tmp_path / "clip.wav", 8000)
    samples, rate = soundfile.read(tmp_path / "clip.wav", dtype="int16")
    assert rate == 8000 and samples.astype("<i2").tobytes() == data


@pytest.mark.parametrize("file_rate,target_rate", [(8000, 16000), (16000, 8000), (44100, 16000)])
def test_resampling_scales_length_by_the_rate_ratio(tmp_path: Path, file_rate: int, target_rate: int) -> None:
    seconds = 0.25
    num_samples = int(file_rate * seconds)
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(num_samples) / file_rate)
    path = tmp_path / "tone.wav"
    soundfile.write(path, tone, file_rate, subtype="PCM_16")
    wave = load_audio_file(path, target_rate)
    assert len(wave) == math.ceil(num_samples * target_rate / file_rate)
    # Away from the edges the resampled tone is the same tone sampled at the new rate.
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(wave)) / target_rate)
    middle = slice(len(wave) // 4, 3 * len(wave) // 4)
    assert np.max(np.abs(wave[middle] - expected[middle])) < 0.01


def test_stereo_is_downmixed_by_mean(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    left, right = rng.integers(-32768, 32768, (2, 500)).astype(np.int16)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 16000, subtype="PCM_16")
    wave = load_audio_file(path, 16000)
    # (l + r) / 2 / 32768 has a 17-bit numerator: exact in float32.
    expected = (left.astype(np.float64) + right.astype(np.float64)) / 65536
    np.testing.assert_array_equal(wave, expected.astype(np.float32))


def test_corrupt_and_truncated_audio_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(ValueError, match="garbage.wav"):
        load_audio_file(garbage, 16000)

    whole = tmp_path / "whole.wav"
    bytes_to_wav(np.random.default_rng(1).bytes(4000), whole, 16000)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(whole.read_bytes()[:2000])  # header intact, half the samples missing
    with pytest.raises(ValueError, match="truncated.wav.*truncated"):
        load_audio_file(truncated, 16000)

    with pytest.raises(ValueError, match="missing.wav"):
        load_audio_file(tmp_path / "missing.wav", 16000)
