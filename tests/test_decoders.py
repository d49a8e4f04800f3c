"""Decoders: any byte string becomes a readable file (truncated images, odd-length audio, invalid
UTF-8), nothing is overwritten silently, and prompts come back as the right bytes."""

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from multibyte.codecs import IMAGE_BYTES, image_to_bytes, waveform_to_bytes
from multibyte.decoders import (
    SampleFormat,
    cut_at_stop_byte,
    image_grid,
    prompt_bytes,
    sample_paths,
    write_samples,
)

TEXT = SampleFormat("text")
IMAGE = SampleFormat("image")
PATCH_IMAGE = SampleFormat("image", image_order="patch", image_patch_size=12)
PCM16 = SampleFormat("audio", sample_rate=8000, encoding="pcm16")
MULAW = SampleFormat("audio", sample_rate=8000, encoding="mulaw8")


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image).copy()


# ------------------------------------------------------------------------------------------------
# Any byte string
# ------------------------------------------------------------------------------------------------


def test_truncated_and_overlong_images_are_padded_black_and_cut(tmp_path):
    data = bytes((7 * i) % 256 for i in range(100))  # 33 pixels and one channel of the 34th
    overlong = bytes(range(256)) * 50  # 12,800 bytes: the last 512 are ignored
    write_samples([data, overlong, b""], IMAGE, tmp_path)
    # Raster order: byte k is row k // 192, column (k % 192) // 3, channel k % 3.
    expected = np.zeros(IMAGE_BYTES, dtype=np.uint8)
    expected[:100] = np.frombuffer(data, dtype=np.uint8)
    assert np.array_equal(read_png(tmp_path / "sample_000.png"), expected.reshape(64, 64, 3))
    full = np.frombuffer(overlong[:IMAGE_BYTES], dtype=np.uint8).reshape(64, 64, 3)
    assert np.array_equal(read_png(tmp_path / "sample_001.png"), full)
    assert not read_png(tmp_path / "sample_002.png").any()


def test_patch_order_puts_the_first_bytes_in_the_top_left_block(tmp_path):
    # Patch size 12 = 2x2-pixel blocks: the first 12 bytes are pixels (0,0), (0,1), (1,0), (1,1).
    data = bytes(range(1, 13))
    write_samples([data], PATCH_IMAGE, tmp_path)
    image = read_png(tmp_path / "sample_000.png")
    assert image[0, 0].tolist() == [1, 2, 3] and image[0, 1].tolist() == [4, 5, 6]
    assert image[1, 0].tolist() == [7, 8, 9] and image[1, 1].tolist() == [10, 11, 12]
    assert image.sum() == sum(range(1, 13))


def test_odd_length_pcm16_drops_the_half_sample(tmp_path):
    data = bytes([0x01, 0x00, 0xFF, 0x7F, 0x00, 0x80, 0x2A])  # 1, 32767, -32768, then half a sample
    write_samples([data, b"", b"\x05"], PCM16, tmp_path)
    samples, rate = soundfile.read(tmp_path / "sample_000.wav", dtype="int16")
    assert rate == 8000
    assert samples.tolist() == list(struct.unpack("<3h", data[:6])) == [1, 32767, -32768]
    assert soundfile.info(tmp_path / "sample_001.wav").frames == 0
    assert soundfile.info(tmp_path / "sample_002.wav").frames == 0


def test_mulaw_gives_one_sample_per_byte(tmp_path):
    write_samples([bytes([0, 127, 128, 255, 64])], MULAW, tmp_path)
    samples, _ = soundfile.read(tmp_path / "sample_000.wav", dtype="int16")
    assert len(samples) == 5
    # mu-law level 0 is full negative scale, 255 full positive, 127/128 the two levels around zero.
    assert samples[0] < -32000 and samples[3] > 32000 and abs(int(samples[1])) < 100 and abs(int(samples[2])) < 100


def test_invalid_utf8_becomes_replacement_characters(tmp_path):
    data = b"ab\xffcd\xe2\x82"  # a stray byte, then a 3-byte sequence cut after 2 bytes
    write_samples([data, "naïve ✓".encode()], TEXT, tmp_path)
    assert (tmp_path / "sample_000.txt").read_text(encoding="utf-8") == "ab\ufffdcd\ufffd"
    assert (tmp_path / "sample_001.txt").read_text(encoding="utf-8") == "naïve ✓"


@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=13_000))
def test_any_byte_string_writes_a_readable_file_of_each_kind(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("any")
    write_samples([data], TEXT, folder, prefix="t")
    write_samples([data], IMAGE, folder, prefix="i")
    write_samples([data], PCM16, folder, prefix="a")
    assert (folder / "t_000.txt").read_bytes() == data.decode("utf-8", errors="replace").encode("utf-8")
    assert read_png(folder / "i_000.png").shape == (64, 64, 3)
    assert soundfile.info(folder / "a_000.wav").frames == len(data) // 2


# ------------------------------------------------------------------------------------------------
# Grid, file names, no silent overwrite
# ------------------------------------------------------------------------------------------------


def test_grid_places_images_row_by_row_on_white():
    images = [np.full((64, 64, 3), 10 * (i + 1), dtype=np.uint8) for i in range(5)]
    grid = image_grid(images)  # ceil(sqrt(5)) = 3 columns, 2 rows, 2-pixel gaps
    assert grid.shape == (2 * 66 - 2, 3 * 66 - 2, 3)
    for i in range(5):
        top, left = (i // 3) * 66, (i % 3) * 66
        assert np.all(grid[top : top + 64, left : left + 64] == 10 * (i + 1))
    assert np.all(grid[64:66] == 255) and np.all(grid[:, 64:66] == 255)
    assert np.all(grid[66:, 132:] == 255)  # the empty sixth cell


def test_image_samples_come_with_a_grid(tmp_path):
    paths = write_samples([b"\x80" * IMAGE_BYTES] * 3, IMAGE, tmp_path)
    assert [p.name for p in paths] == ["sample_000.png", "sample_001.png", "sample_002.png", "sample_grid.png"]
    assert read_png(tmp_path / "sample_grid.png").shape == (2 * 66 - 2, 2 * 66 - 2, 3)
    assert sample_paths(TEXT, tmp_path, 2) == [tmp_path / "sample_000.txt", tmp_path / "sample_001.txt"]


def test_audio_samples_come_with_a_waveform_picture(tmp_path):
    fmt = SampleFormat(modality="audio", sample_rate=8000, encoding="pcm16")
    t = np.arange(16000) / 8000  # 20 samples per pixel column, more than the tone's period (18.2)
    loud = waveform_to_bytes(0.9 * np.sin(2 * np.pi * 440 * t), "pcm16")
    quiet = waveform_to_bytes(np.zeros(16000), "pcm16")
    paths = write_samples([loud, quiet], fmt, tmp_path)
    assert [p.name for p in paths] == ["sample_000.wav", "sample_001.wav", "sample_waveforms.png"]
    picture = read_png(tmp_path / "sample_waveforms.png")
    assert picture.shape == (2 * 100 + 2, 800, 3)  # two strips, one grid gap between them
    dark = (picture.sum(axis=2) < 300)
    assert dark[:100].sum(axis=0).min() > 80  # the loud tone fills nearly every column's height
    assert dark[102:].sum(axis=0).max() == 1  # silence is one pixel on the zero line


def test_nothing_is_overwritten_unless_asked(tmp_path):
    write_samples([b"first", b"second"], TEXT, tmp_path)
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'sample_000.txt'}: already exists"):
        write_samples([b"third"], TEXT, tmp_path)
    assert (tmp_path / "sample_000.txt").read_bytes() == b"first"
    write_samples([b"third"], TEXT, tmp_path, overwrite=True)
    assert (tmp_path / "sample_000.txt").read_bytes() == b"third"
    # A clash on the last file stops before the first one is written.
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "sample_grid.png").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="sample_grid.png"):
        write_samples([b"x"], IMAGE, tmp_path / "new")
    assert not (tmp_path / "new" / "sample_000.png").exists()


def test_cut_at_stop_byte_keeps_the_prompt_and_the_first_stop_after_it():
    row = np.array([10, 1, 2, 10, 3, 10, 10], dtype=np.uint8)  # prompt: the first 2 bytes
    assert cut_at_stop_byte(row, 2, 10).tolist() == [10, 1, 2, 10]
    assert cut_at_stop_byte(row, 2, 99).tolist() == row.tolist()
    assert cut_at_stop_byte(row, 2, None).tolist() == row.tolist()


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------


def test_image_prompt_is_the_top_rows_in_either_order(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "prompt.png")
    raster = prompt_bytes(IMAGE, file=tmp_path / "prompt.png", image_rows=10)
    assert np.array_equal(raster, pixels[:10].reshape(-1))
    patch = prompt_bytes(PATCH_IMAGE, file=tmp_path / "prompt.png", image_rows=10)
    # The same 10 rows, in patch-scan order: the first 10 rows' bytes of the patch-ordered image.
    assert np.array_equal(patch, image_to_bytes(pixels, "patch", 12)[: 10 * 192])
    assert sorted(patch.tolist()) == sorted(raster.tolist())
    with pytest.raises(ValueError, match="multiple of the 2-pixel block"):
        prompt_bytes(PATCH_IMAGE, file=tmp_path / "prompt.png", image_rows=9)


def test_audio_prompt_is_resampled_and_trimmed(tmp_path):
    wave = (np.sin(np.arange(16000) / 10) * 0.5).astype(np.float32)  # 1 s at 16 kHz
    soundfile.write(tmp_path / "prompt.wav", wave, 16000, subtype="PCM_16")
    data = prompt_bytes(PCM16, file=tmp_path / "prompt.wav", audio_seconds=0.25)
    assert data.size == 2 * 2000  # 0.25 s at the format's 8 kHz, 2 bytes a sample
    assert prompt_bytes(MULAW, file=tmp_path / "prompt.wav").size == 8000


def test_text_prompts_and_bad_prompts(tmp_path):
    assert prompt_bytes(TEXT, text="héllo").tobytes() == "héllo".encode()
    (tmp_path / "p.txt").write_bytes(b"\xffraw")
    assert prompt_bytes(TEXT, file=tmp_path / "p.txt").tobytes() == b"\xffraw"
    assert prompt_bytes(IMAGE).size == 0
    with pytest.raises(ValueError, match="missing.png: no such file"):
        prompt_bytes(IMAGE, file=tmp_path / "missing.png")
    with pytest.raises(ValueError, match="not both"):
        prompt_bytes(TEXT, text="a", file=tmp_path / "p.txt")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png: cannot decode image"):
        prompt_bytes(IMAGE, file=tmp_path / "broken.png")
