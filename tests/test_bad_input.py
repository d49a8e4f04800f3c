"""Bad input, systematically: random and malformed files fed to every datamodule, codec and prompt reader.

Every case must end in the suite's one clear error naming the file (`DataError` from a datamodule,
`ValueError` from a codec or `prompt_bytes`) or be handled correctly. Never another exception
from inside a library, never a hang (each call runs under an alarm), never an unpickled payload,
and a failed `prepare_data` leaves no file in the cache folder.

The damaged files start from small valid ones (WAV in several sample formats, FLAC, stored and
compressed .npz, PNG/JPEG/GIF/BMP/TIFF/WebP) and are emptied, truncated, or get a few bytes
overwritten (anywhere, or inside the header), next to plain random bytes.
"""

import io
import math
import os
import pickle
import signal
import tempfile
import zipfile
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from PIL import Image

from datamodules import AudioDataModule, ByteStreamDataModule, DataError, ImageNet64DataModule, TextDataModule
from datamodules.base import MANIFEST_NAME, SPLITS
from multibyte.codecs import (
    IMAGE_BYTES,
    as_byte_array,
    bytes_per_sample,
    load_audio_file,
    load_image_file,
    waveform_to_bytes,
)
from multibyte.decoders import SampleFormat, prompt_bytes

# Pillow warns about the damaged TIFFs it is fed (truncated reads, oversized tags) before failing.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")

# Modest: the file runs in well under a minute on a busy 2-core machine. The deadline is per
# example and generous; the alarm in `no_hang` is what turns a real hang into a failure.
FUZZ = settings(
    max_examples=40,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HANG_SECONDS = 30


class Hang(BaseException):
    """Raised by the alarm. A BaseException, so no `except Exception` on the way can swallow it."""


@contextmanager
def no_hang(seconds: float = HANG_SECONDS) -> Iterator[None]:
    def alarm(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def prepare_or_error(dm: ByteStreamDataModule, culprit: Path) -> Optional[DataError]:
    """Run prepare_data: it either builds a complete cache or raises DataError naming `culprit`
    (a file, or the folder) and leaves nothing in the cache folder. Returns the error, if any."""
    cache_root = Path(dm.cache_dir)
    try:
        with no_hang():
            dm.prepare_data()
    except DataError as error:
        assert str(culprit) in str(error), f"the error does not name {culprit}: {error}"
        assert files_under(cache_root) == [], f"a failed prepare_data left files behind: {files_under(cache_root)}"
        return error
    # Complete: the manifest vouches for every split, nothing temporary is left.
    folder = dm.cache_folder
    names = sorted(path.name for path in files_under(cache_root))
    assert MANIFEST_NAME in names and not [name for name in names if name.endswith((".partial", ".lock"))]
    for split in SPLITS:
        assert (folder / f"{split}.bin").stat().st_size == dm.split_num_bytes(split) > 0
    return None


def split_records(dm: ByteStreamDataModule) -> list[bytes]:
    records = []
    for split in SPLITS:
        data = (dm.cache_folder / f"{split}.bin").read_bytes()
        starts = np.load(dm.cache_folder / f"{split}.offsets.npy").tolist()
        records += [data[start:stop] for start, stop in zip(starts, starts[1:] + [len(data)])]
    return records


# ------------------------------------------------------------------------------------------------
# Valid seed files and ways to damage them
# ------------------------------------------------------------------------------------------------


def _wav(subtype: str, channels: int, rate: int = 8000, frames: int = 400, format: str = "WAV") -> bytes:
    wave = np.random.default_rng(channels).uniform(-0.5, 0.5, (frames, channels))
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, subtype=subtype, format=format)
    return buffer.getvalue()


@cache
def audio_seeds() -> dict[str, bytes]:
    """Valid audio files by name: the suffix is what the datamodule looks for."""
    return {
        "pcm16.wav": _wav("PCM_16", 1),
        "stereo24.wav": _wav("PCM_24", 2, rate=44100),
        "float.wav": _wav("FLOAT", 2, rate=22050),
        "ulaw.wav": _wav("ULAW", 1),
        "clip.flac": _wav("PCM_16", 2, rate=48000, format="FLAC"),
    }


@cache
def image_seeds() -> dict[str, bytes]:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    seeds = {}
    for format, suffix in [("PNG", ".png"), ("JPEG", ".jpg"), ("GIF", ".gif"), ("BMP", ".bmp"), ("TIFF", ".tif"),
                           ("WEBP", ".webp")]:  # fmt: skip
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=format)
        seeds[f"image{suffix}"] = buffer.getvalue()
    return seeds


def npz_bytes(compressed: bool = False, rows: int = 3, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    if not arrays:
        arrays = {"data": np.random.default_rng(rows).integers(0, 256, (rows, IMAGE_BYTES), dtype=np.uint8)}
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


@cache
def npz_seeds() -> dict[str, bytes]:
    return {"stored.npz": npz_bytes(), "compressed.npz": npz_bytes(compressed=True)}


@st.composite
def damaged(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` emptied, truncated, with a few bytes overwritten (anywhere or in the first 64), or
    replaced by random bytes."""
    how = draw(st.sampled_from(["random", "empty", "truncated", "overwritten", "header"]))
    if how == "random":
        return draw(st.binary(min_size=1, max_size=2048))
    if how == "empty":
        return b""
    if how == "truncated":
        return seed[: draw(st.integers(1, len(seed) - 1))]
    data = bytearray(seed)
    reach = len(data) if how == "overwritten" else min(64, len(data))
    for position in draw(st.lists(st.integers(0, reach - 1), min_size=1, max_size=6)):
        data[position] = draw(st.integers(0, 255))
    return bytes(data)


def damaged_file(seeds: dict[str, bytes]) -> st.SearchStrategy[tuple[str, bytes]]:
    """(seed name, damaged bytes) for one of `seeds`."""
    return st.sampled_from(sorted(seeds)).flatmap(lambda name: st.tuples(st.just(name), damaged(seeds[name])))


def write_good_audio(folder: Path, count: int = 3) -> None:
    for i in range(count):
        (folder / f"good_{i}.wav").write_bytes(_wav("PCM_16", 1, frames=300 + i))


def write_good_images(folder: Path, count: int = 3) -> None:
    for i in range(count):
        (folder / f"good_{i}.png").write_bytes(image_seeds()["image.png"])


# ------------------------------------------------------------------------------------------------
# Codecs on any file
# ------------------------------------------------------------------------------------------------


@FUZZ
@given(damaged_file(audio_seeds()))
def test_load_audio_file_on_damaged_files(case: tuple[str, bytes]) -> None:
    name, data = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"bad_{name}"
        path.write_bytes(data)
        try:
            with no_hang():
                wave = load_audio_file(path, 16000)
        except ValueError as error:
            assert str(path) in str(error)
            return
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert np.all(np.isfinite(wave)) and np.all(np.abs(wave) <= 1.0)


@FUZZ
@given(damaged_file(image_seeds()))
def test_load_image_file_on_damaged_files(case: tuple[str, bytes]) -> None:
    name, data = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"bad_{name}"
        path.write_bytes(data)
        try:
            with no_hang():
                image = load_image_file(path)
        except ValueError as error:
            assert str(path) in str(error)
            return
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


AUDIO_SUBTYPES = ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW"]
COMMON_RATES = [1, 7, 8000, 11025, 16000, 22050, 44100, 44101, 48000, 96000, 192000]


@FUZZ
@given(
    rate=st.one_of(st.sampled_from(COMMON_RATES), st.integers(1, 2**31 - 1)),
    channels=st.integers(1, 3),
    subtype=st.sampled_from(AUDIO_SUBTYPES),
    frames=st.integers(0, 400),
    level=st.floats(-1.0, 1.0),
)
def test_audio_of_any_rate_channel_count_and_sample_format(
    rate: int, channels: int, subtype: str, frames: int, level: float
) -> None:
    """A constant signal at any rate, channel count and sample format loads as the same constant,
    resampled to the right length; rates that cannot be resampled are one clear error."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.wav"
        try:
            soundfile.write(path, np.full((frames, channels), level), rate, subtype=subtype)
        except (soundfile.SoundFileError, ValueError):
            reject()  # libsndfile will not write this combination
        try:
            with no_hang():
                wave = load_audio_file(path, 16000)
        except ValueError as error:
            assert f"{path}: cannot resample its {rate} Hz audio" in str(error), error
            assert rate > 16000 * 1000  # only absurd rates: 16 MHz and up
            return
        stored = soundfile.read(path, dtype="float32", always_2d=True)[0][:, 0]  # the quantized level
    assert wave.dtype == np.float32 and np.all(np.isfinite(wave)) and np.all(np.abs(wave) <= 1.0)
    expected_length = math.ceil(frames * 16000 / rate)
    assert abs(len(wave) - expected_length) <= 1 + 1e-4 * expected_length
    if frames and rate == 16000:
        np.testing.assert_allclose(wave, stored, rtol=0, atol=1e-6)  # the channel mean rounds in float32
    elif frames >= 64 and len(wave) >= 64:  # a quarter in from the edges (>= 16 samples of either
        # rate, beyond the sinc filter's reach) a resampled constant is the constant
        middle = wave[len(wave) // 4 : 3 * len(wave) // 4]
        np.testing.assert_allclose(middle, stored[0], atol=0.02)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_audio_is_refused(tmp_path: Path, bad: float) -> None:
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, (500, 2)).astype(np.float32)
    wave[123, 1] = bad
    write_good_audio(tmp_path)
    path = tmp_path / "zz_bad.wav"
    soundfile.write(path, wave, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match="zz_bad.wav: holds 1 NaN or infinite samples"):
        load_audio_file(path, 8000)
    error = prepare_or_error(AudioDataModule(data_path=str(tmp_path), cache_dir=str(tmp_path / "cache")), path)
    assert error is not None and "NaN or infinite" in str(error)
    with pytest.raises(ValueError, match="NaN or infinite"):
        waveform_to_bytes(wave[:, 1])


def test_float_audio_beyond_full_scale_is_clipped(tmp_path: Path) -> None:
    path = tmp_path / "loud.wav"
    soundfile.write(path, np.array([3.0, -5.0, 0.25], dtype=np.float32), 16000, subtype="FLOAT")
    assert load_audio_file(path, 16000).tolist() == [1.0, -1.0, 0.25]


@FUZZ
@given(
    mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I"]),
    size=st.one_of(
        st.tuples(st.integers(1, 300), st.integers(1, 300)),
        st.sampled_from([(1, 1), (10000, 10), (10, 10000), (1, 5000)]),
    ),
    colour=st.integers(0, 2**32 - 1),
)
def test_a_solid_image_of_any_size_and_mode_stays_that_colour(mode: str, size: tuple[int, int], colour: int) -> None:
    """Any size (1x1 up, 10000 wide or tall) and mode is resized to 64x64 RGB, and a solid image
    stays solid in the colour Pillow converts it to; 16-bit grey is scaled to 8 bits, not clipped."""
    if mode in ("I;16", "I"):
        value = colour % 65536
        fill, expected = value, [round(value / 257)] * 3
    else:
        fill = Image.new("RGBA", (1, 1), tuple(colour.to_bytes(4, "little"))).convert(mode).getpixel((0, 0))
        expected = list(Image.new(mode, (1, 1), fill).convert("RGB").getpixel((0, 0)))
    suffix = ".tif" if mode in ("CMYK", "I") else ".png"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"solid{suffix}"
        Image.new(mode, size, fill).save(path)
        with no_hang():
            image = load_image_file(path)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert (image == np.array(expected, dtype=np.uint8)).all(), (image[0, 0], expected)


def test_image_folder_of_extreme_sizes_and_depths(tmp_path: Path) -> None:
    """1x1, 10000x10, 10x10000 and 16-bit images all become one solid 64x64 record each."""
    source = tmp_path / "odd_images"
    source.mkdir()
    colours = {"one.png": (10, 20, 30), "wide.png": (200, 0, 100), "tall.jpg": (255, 255, 255)}
    Image.new("RGB", (1, 1), colours["one.png"]).save(source / "one.png")
    Image.new("RGB", (10000, 10), colours["wide.png"]).save(source / "wide.png")
    Image.new("RGB", (10, 10000), colours["tall.jpg"]).save(source / "tall.jpg")
    Image.fromarray(np.full((7, 9), 40000, dtype=np.uint16)).save(source / "grey16.png")
    colours["grey16.png"] = (156,) * 3  # round(40000 / 257)
    dm = ImageNet64DataModule(data_path=str(source), cache_dir=str(tmp_path / "cache"))
    assert prepare_or_error(dm, source) is None
    records = sorted(split_records(dm))
    expected = sorted(np.tile(np.array(colour, dtype=np.uint8), 64 * 64).tobytes() for colour in colours.values())
    assert records == expected


def test_images_without_an_8bit_mapping_are_refused(tmp_path: Path) -> None:
    Image.new("F", (5, 5), 0.5).save(tmp_path / "float.tif")
    Image.new("I", (5, 5), 100_000).save(tmp_path / "wide_ints.tif")
    for name in ("float.tif", "wide_ints.tif"):
        with pytest.raises(ValueError, match=f"{name}: mode [FI] pixels .* have no 8-bit mapping"):
            load_image_file(tmp_path / name)


def test_byte_codecs_refuse_what_has_no_bytes() -> None:
    for bad in (np.array([0.5, 1.0]), np.array([1, 256]), np.array([-1]), np.array(["a"]), np.array([True])):
        with pytest.raises(ValueError):
            as_byte_array(bad)
    with pytest.raises(ValueError, match="mono waveform"):
        waveform_to_bytes(np.zeros((10, 2)))


# ------------------------------------------------------------------------------------------------
# Prompt files
# ------------------------------------------------------------------------------------------------

PROMPT_FORMATS = {
    "text": SampleFormat("text"),
    "image": SampleFormat("image"),
    "patch": SampleFormat("image", image_order="patch", image_patch_size=48),
    "pcm16": SampleFormat("audio", sample_rate=16000, encoding="pcm16"),
    "mulaw8": SampleFormat("audio", sample_rate=8000, encoding="mulaw8"),
}


@FUZZ
@given(
    fmt_name=st.sampled_from(sorted(PROMPT_FORMATS)),
    case=damaged_file({**audio_seeds(), **image_seeds(), "prompt.txt": "héllo wörld\n".encode()}),
)
def test_prompt_files_of_any_content(fmt_name: str, case: tuple[str, bytes]) -> None:
    fmt = PROMPT_FORMATS[fmt_name]
    name, data = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"prompt_{name}"
        path.write_bytes(data)
        try:
            with no_hang():
                prompt = prompt_bytes(fmt, file=path, image_rows=16, audio_seconds=0.01)
        except ValueError as error:
            assert fmt.modality != "text", "a text prompt is any bytes"
            assert str(path) in str(error)
            return
    assert prompt.dtype == np.uint8 and prompt.ndim == 1
    if fmt.modality == "text":
        assert prompt.tobytes() == data
    elif fmt.modality == "image":
        assert len(prompt) == 16 * 64 * 3
    else:
        assert len(prompt) <= round(0.01 * fmt.sample_rate) * bytes_per_sample(fmt.encoding)
        assert len(prompt) % bytes_per_sample(fmt.encoding) == 0


def test_prompt_arguments_and_unusable_paths(tmp_path: Path) -> None:
    audio = PROMPT_FORMATS["pcm16"]
    (tmp_path / "clip.wav").write_bytes(_wav("PCM_16", 1))
    for seconds in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="prompt seconds must be a finite number >= 0"):
            prompt_bytes(audio, file=tmp_path / "clip.wav", audio_seconds=seconds)
    assert prompt_bytes(audio, file=tmp_path / "clip.wav", audio_seconds=0).size == 0
    with pytest.raises(ValueError, match=f"prompt file {tmp_path}: not a regular file"):
        prompt_bytes(PROMPT_FORMATS["text"], file=tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png: cannot decode image"):
        prompt_bytes(PROMPT_FORMATS["image"], file=tmp_path / "empty.png")
    with pytest.raises(ValueError, match="prompt rows must lie in 0..64"):
        prompt_bytes(PROMPT_FORMATS["image"], file=tmp_path / "empty.png", image_rows=65)


# ------------------------------------------------------------------------------------------------
# Datamodules: a damaged file among good ones
# ------------------------------------------------------------------------------------------------


@FUZZ
@given(damaged_file(audio_seeds()))
def test_audio_datamodule_with_a_damaged_file(case: tuple[str, bytes]) -> None:
    name, data = case
    with tempfile.TemporaryDirectory() as root:
        source = Path(root) / "clips"
        source.mkdir()
        write_good_audio(source)
        bad = source / f"zz_{name}"
        bad.write_bytes(data)
        dm = AudioDataModule(data_path=str(source), seq_len=64, cache_dir=f"{root}/cache")
        if prepare_or_error(dm, bad) is None:
            records = split_records(dm)
            assert len(records) == 4 and all(len(record) % 2 == 0 and record for record in records)


@FUZZ
@given(damaged_file(image_seeds()))
def test_image_folder_datamodule_with_a_damaged_file(case: tuple[str, bytes]) -> None:
    name, data = case
    with tempfile.TemporaryDirectory() as root:
        source = Path(root) / "photos"
        source.mkdir()
        write_good_images(source)
        bad = source / f"zz_{name}"
        bad.write_bytes(data)
        dm = ImageNet64DataModule(data_path=str(source), cache_dir=f"{root}/cache")
        if prepare_or_error(dm, bad) is None:
            assert [len(record) for record in split_records(dm)] == [IMAGE_BYTES] * 4


@FUZZ
@given(damaged_file(npz_seeds()))
def test_npz_datamodule_with_a_damaged_file(case: tuple[str, bytes]) -> None:
    name, data = case
    with tempfile.TemporaryDirectory() as root:
        source = Path(root) / "npz"
        source.mkdir()
        (source / "a_good.npz").write_bytes(npz_seeds()["stored.npz"])
        bad = source / f"b_{name}"
        bad.write_bytes(data)
        dm = ImageNet64DataModule(data_path=str(source), cache_dir=f"{root}/cache")
        if prepare_or_error(dm, bad) is None:
            # Only damage that zip and npy ignore can pass (say in a zip comment): the rows are intact.
            with np.load(bad) as arrays:
                rows = len(arrays["data"])
            assert len(split_records(dm)) == 3 + rows


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4), st.booleans())
def test_text_datamodule_takes_any_bytes(contents: list[bytes], one_file: bool) -> None:
    """Text is copied, never decoded: any bytes (invalid UTF-8, NULs, empty files) form the stream,
    split 90/5/5 in order, and too few bytes is one error naming the source."""
    with tempfile.TemporaryDirectory() as root:
        source = Path(root) / ("corpus.txt" if one_file else "corpus")
        if one_file:
            contents = contents[:1]
            source.write_bytes(contents[0])
        else:
            source.mkdir()
            for i, content in enumerate(contents):
                (source / f"part_{i}.txt").write_bytes(content)
        dm = TextDataModule(data_path=str(source), seq_len=1, cache_dir=f"{root}/cache")
        error = prepare_or_error(dm, source)
        if error is not None:
            assert sum(map(len, contents)) < 3 and "cannot be split" in str(error)
            return
        stream = b"".join((dm.cache_folder / f"{split}.bin").read_bytes() for split in SPLITS)
    assert stream == b"".join(contents)


class Tripwire:
    """Unpickling one creates the folder `marker`: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return os.mkdir, (self.marker,)


def npy_member(header: dict, body: bytes) -> bytes:
    """An .npz holding one `data.npy` with a hand-written header."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zip_file:
        zip_file.writestr("data.npy", member.getvalue() + body)
    return archive.getvalue()


NPZ_DTYPES = [np.uint8, np.int8, np.uint16, np.int64, np.float32, np.float64, np.bool_, np.complex64]


@st.composite
def wrong_npz(draw: st.DrawFn, marker: Path) -> tuple[bytes, str]:
    """(an .npz whose `data` is wrong, the problem the error must name)."""
    kind = draw(st.sampled_from(["dtype", "shape", "no data", "object", "pickle body", "huge rows"]))
    rows = draw(st.integers(0, 4))
    if kind == "dtype":
        dtype = draw(st.sampled_from(NPZ_DTYPES[1:]))
        return npz_bytes(data=np.zeros((rows, IMAGE_BYTES), dtype=dtype)), f"dtype {np.dtype(dtype)}"
    if kind == "shape":  # small dimensions, and maybe one of 12288 in the wrong place
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        if draw(st.booleans()):
            shape.insert(draw(st.integers(0, len(shape))), IMAGE_BYTES)
        if len(shape) == 2 and shape[1] == IMAGE_BYTES:
            shape[1] = 3072  # rows of one 32x32 image: the wrong length
        return npz_bytes(data=np.zeros(shape, dtype=np.uint8)), "shape"
    if kind == "no data":
        return npz_bytes(images=np.zeros((3, IMAGE_BYTES), dtype=np.uint8)), "no 'data' array"
    if kind == "object":  # np.savez pickles object arrays: loading with allow_pickle would run it
        payload = np.empty(draw(st.integers(1, 3)), dtype=object)
        payload[:] = [Tripwire(marker)] * len(payload)
        return npz_bytes(data=payload), "dtype object"
    if kind == "pickle body":  # an object-dtype header of the right shape over a pickle
        body = pickle.dumps([Tripwire(marker)])
        fortran = draw(st.booleans())
        return npy_member({"descr": "|O", "fortran_order": fortran, "shape": (1, IMAGE_BYTES)}, body), "dtype object"
    # A header declaring 10^9 rows (12 TB) over 3 rows: nothing may size an allocation from it.
    fortran = draw(st.booleans())
    body = bytes(3 * IMAGE_BYTES)
    return npy_member({"descr": "|u1", "fortran_order": fortran, "shape": (10**9, IMAGE_BYTES)}, body), "truncated"


@FUZZ
@given(st.data())
def test_npz_with_wrong_contents_is_refused_and_never_unpickled(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as root:
        marker = Path(root) / "pickle_ran"
        content, problem = data.draw(wrong_npz(marker))
        source = Path(root) / "b_wrong.npz"
        source.write_bytes(content)
        dm = ImageNet64DataModule(data_path=str(source), cache_dir=f"{root}/cache")
        error = prepare_or_error(dm, source)
        assert error is not None and problem in str(error), error
        assert not marker.exists(), "a pickled payload ran"


def test_the_tripwire_does_fire(tmp_path: Path) -> None:
    """The control for the test above: unpickling a Tripwire does leave its marker."""
    pickle.loads(pickle.dumps(Tripwire(tmp_path / "ran")))
    assert (tmp_path / "ran").is_dir()


# ------------------------------------------------------------------------------------------------
# Folders with nothing usable, empty, unreadable and special files
# ------------------------------------------------------------------------------------------------

MODULES = {"text": TextDataModule, "image": ImageNet64DataModule, "audio": AudioDataModule}
SUFFIX = {"text": ".txt", "image": ".png", "audio": ".wav"}


@pytest.mark.parametrize("modality", sorted(MODULES))
def test_folders_without_usable_files(modality: str, tmp_path: Path) -> None:
    make = MODULES[modality]
    cache = tmp_path / "cache"
    folders = {name: tmp_path / name for name in ("empty", "other_suffixes", "zero_length", "special")}
    for folder in folders.values():
        folder.mkdir()
    for name in ("notes.md", "data.bin", "clip.mp3", "photo.raw"):
        (folders["other_suffixes"] / name).write_bytes(b"something")
    for i in range(3):
        (folders["zero_length"] / f"f{i}{SUFFIX[modality]}").write_bytes(b"")
    # Neither a directory nor a FIFO with the right suffix is a data file: never opened, never waited on.
    (folders["special"] / f"dir{SUFFIX[modality]}").mkdir()
    os.mkfifo(folders["special"] / f"pipe{SUFFIX[modality]}")
    for name, folder in folders.items():
        error = prepare_or_error(make(data_path=str(folder), cache_dir=str(cache)), folder)
        assert error is not None, name
    assert files_under(cache) == []


@pytest.mark.parametrize("modality", sorted(MODULES))
def test_a_fifo_as_the_source_is_refused_without_waiting(modality: str, tmp_path: Path) -> None:
    fifo = tmp_path / f"pipe{SUFFIX[modality]}"
    os.mkfifo(fifo)
    error = prepare_or_error(MODULES[modality](data_path=str(fifo), cache_dir=str(tmp_path / "cache")), fifo)
    assert error is not None


@pytest.mark.parametrize("modality", sorted(MODULES))
def test_zero_length_file_among_good_ones(modality: str, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    if modality == "audio":
        write_good_audio(source)
    elif modality == "image":
        write_good_images(source)
    else:
        for i in range(3):
            (source / f"good_{i}.txt").write_bytes(b"some text " * 10)
    empty = source / f"zz_empty{SUFFIX[modality]}"
    empty.write_bytes(b"")
    sizes = {} if modality == "image" else {"seq_len": 2}  # an image window is one whole image
    dm = MODULES[modality](data_path=str(source), cache_dir=str(tmp_path / "cache"), **sizes)
    error = prepare_or_error(dm, empty)
    # An empty .txt adds nothing to the stream; an empty image or clip is a broken file.
    assert (error is None) == (modality == "text")


@pytest.mark.parametrize("modality", sorted(MODULES))
def test_unreadable_file(modality: str, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    if modality == "audio":
        write_good_audio(source)
        (source / "zz_locked.wav").write_bytes(_wav("PCM_16", 1))
    elif modality == "image":
        write_good_images(source)
        (source / "zz_locked.png").write_bytes(image_seeds()["image.png"])
    else:
        for i in range(3):
            (source / f"good_{i}.txt").write_bytes(b"some text " * 10)
        (source / "zz_locked.txt").write_bytes(b"locked text")
    locked = source / f"zz_locked{SUFFIX[modality]}"
    locked.chmod(0)
    try:
        try:
            locked.open("rb").close()
            pytest.skip("this user reads files whatever their permissions (root)")
        except PermissionError:
            pass
        error = prepare_or_error(MODULES[modality](data_path=str(source), cache_dir=str(tmp_path / "cache")), locked)
        assert error is not None and "ermission denied" in str(error), error
    finally:
        locked.chmod(0o644)
