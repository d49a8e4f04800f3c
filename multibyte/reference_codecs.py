"""The codecs people use today, run on exactly the bytes a model is scored on.

Every modality gets the general-purpose compressors at their strongest settings, on the whole
byte stream at once: gzip -9, bzip2 -9, xz -9e and zstd -19 (the `zstandard` module when
importable, else the `zstd` command, else skipped with the reason). On top of that:

- images: PNG (optimised) and WebP lossless (effort 6), one file per 64x64 image, summed — each
  12,288-byte record is turned back into its image first (raster or patch-scan order, pixels or
  MED residuals); the general-purpose codecs see the bytes as the model does (with a predictor:
  the residuals, which they compress better than raw pixels);
- audio: FLAC at its highest compression level on the split's PCM16 samples as one mono stream
  (µ-law bytes are not linear PCM, so FLAC is skipped for them with the reason).

Every codec's output is decoded again and compared with the input, so a reported size is the
size of a real, lossless encoding.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import soundfile
from PIL import Image

from multibyte.codecs.audio import PCM16_DTYPES, bytes_to_pcm16, pcm16_to_bytes
from multibyte.codecs.image import IMAGE_BYTES, bytes_to_image


@dataclass(frozen=True)
class CodecResult:
    name: str
    compressed_bytes: Optional[int]  # None: not run (see `note`)
    seconds: float
    note: str = ""  # how it was applied, or why it was skipped

    @property
    def skipped(self) -> bool:
        return self.compressed_bytes is None


class CodecRoundTripError(RuntimeError):
    """A reference codec did not give back its input: its size would not be a lossless one."""


def _measure(
    name: str,
    data: bytes,
    compress: Callable[[bytes], bytes],
    decompress: Callable[[bytes], bytes],
    note: str = "",
) -> CodecResult:
    began = time.perf_counter()
    packed = compress(data)
    seconds = time.perf_counter() - began
    if decompress(packed) != data:
        raise CodecRoundTripError(f"{name}: decoding its output did not give back the {len(data)} input bytes")
    return CodecResult(name, len(packed), seconds, note)


# ------------------------------------------------------------------------------------------------
# General-purpose compressors
# ------------------------------------------------------------------------------------------------


def _zstd_functions() -> tuple[Optional[Callable[[bytes], bytes]], Optional[Callable[[bytes], bytes]], str]:
    """(compress, decompress, how) for zstd -19, or (None, None, why not)."""
    try:
        import zstandard

        return (
            lambda data: zstandard.ZstdCompressor(level=19).compress(data),
            lambda packed: zstandard.ZstdDecompressor().decompress(packed),
            "zstandard module",
        )
    except ImportError:
        pass
    command = shutil.which("zstd")
    if command is None:
        return None, None, "zstd not installed (neither the zstandard module nor the zstd command)"

    def run(arguments: list[str], data: bytes) -> bytes:
        return subprocess.run([command, *arguments, "-c", "-q"], input=data, capture_output=True, check=True).stdout

    return (lambda data: run(["-19"], data), lambda packed: run(["-d"], packed), "zstd command")


def general_purpose_codecs(data: bytes) -> list[CodecResult]:
    """gzip -9, bzip2 -9, xz -9e and zstd -19 on `data` as one stream."""
    results = [
        _measure("gzip -9", data, lambda d: gzip.compress(d, compresslevel=9, mtime=0), gzip.decompress),
        _measure("bzip2 -9", data, lambda d: bz2.compress(d, compresslevel=9), bz2.decompress),
        _measure(
            "xz -9e",
            data,
            lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME),
            lzma.decompress,
        ),
    ]
    compress, decompress, how = _zstd_functions()
    if compress is None:
        results.append(CodecResult("zstd -19", None, 0.0, how))
    else:
        results.append(_measure("zstd -19", data, compress, decompress, how))
    return results


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def _image_records(data: bytes) -> list[bytes]:
    if len(data) % IMAGE_BYTES:
        raise ValueError(f"image bytes must be whole 64x64x3 images ({IMAGE_BYTES} bytes each), got {len(data)} bytes")
    return [data[i : i + IMAGE_BYTES] for i in range(0, len(data), IMAGE_BYTES)]


def _per_image(name: str, images: list[np.ndarray], save_options: dict, note: str) -> CodecResult:
    total, seconds = 0, 0.0
    for pixels in images:  # (64, 64, 3) uint8 each
        began = time.perf_counter()
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="RGB").save(buffer, **save_options)
        seconds += time.perf_counter() - began
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            if not np.array_equal(np.asarray(decoded.convert("RGB")), pixels):
                raise CodecRoundTripError(f"{name}: an image did not decode back to its pixels")
        total += buffer.tell()
    return CodecResult(name, total, seconds, note)


def image_codecs(
    data: bytes, order: str = "raster", patch_size: int = 12, predictor: str = "none"
) -> list[CodecResult]:
    """PNG (optimised) and WebP lossless, one file per 12,288-byte image record (the pixels it
    encodes, whatever its order and predictor), sizes summed."""
    # Each record is decoded to pixels once, for both codecs.
    images = [bytes_to_image(record, order, patch_size, predictor) for record in _image_records(data)]
    webp = {"format": "WEBP", "lossless": True, "quality": 100, "method": 6}
    return [
        _per_image("PNG (optimised)", images, {"format": "PNG", "optimize": True}, "one file per image"),
        _per_image("WebP lossless", images, webp, "one file per image, effort 6"),
    ]


# ------------------------------------------------------------------------------------------------
# Audio
# ------------------------------------------------------------------------------------------------


def audio_codecs(data: bytes, sample_rate: int, encoding: str = "pcm16") -> list[CodecResult]:
    """FLAC (highest compression level) on the 16-bit samples of `data` (pcm16: little-endian,
    pcm16be: big-endian, pcm16d2: decoded from its residuals) as one mono stream."""
    if encoding not in PCM16_DTYPES:
        return [CodecResult("FLAC", None, 0.0, f"FLAC codes linear PCM; not applicable to {encoding} bytes")]
    samples = bytes_to_pcm16(data, encoding)  # (n,) int16
    leftover = len(data) % 2  # half a sample (a stream cut mid-sample) is stored as it is

    def compress(_: bytes) -> bytes:
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, sample_rate, format="FLAC", subtype="PCM_16", compression_level=1.0)
        return buffer.getvalue() + data[len(data) - leftover :]

    def decompress(packed: bytes) -> bytes:
        flac = packed[: len(packed) - leftover]
        decoded, _ = soundfile.read(io.BytesIO(flac), dtype="int16")
        return pcm16_to_bytes(decoded, encoding).tobytes() + packed[len(packed) - leftover :]

    return [_measure("FLAC", data, compress, decompress, "level 8 (max), one mono stream")]


def reference_codecs(data: bytes, modality: str, **params) -> list[CodecResult]:
    """The general-purpose codecs, plus the modality's own: images take `order`, `patch_size` and `predictor`,
    audio `sample_rate` and `encoding` (as the datamodule that produced the bytes)."""
    results = general_purpose_codecs(data)
    if modality == "image":
        results += image_codecs(
            data, params.get("order", "raster"), params.get("patch_size", 12), params.get("predictor", "none")
        )
    elif modality == "audio":
        results += audio_codecs(data, params["sample_rate"], params.get("encoding", "pcm16"))
    return results
