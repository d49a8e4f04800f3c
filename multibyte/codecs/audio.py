"""Mono waveforms <-> bytes.

Three byte encodings:
- "pcm16" (MEGABYTE's setting): 16-bit signed little-endian PCM, each sample stored as its two raw
  bytes (low byte first). The model sees the bytes, not the samples.
- "pcm16be": the same samples big-endian (high byte first). Lossless like pcm16, but a byte model
  predicts each sample's coarse value before its fine one: p(high | past) · p(low | high, past),
  where little-endian order asks for the nearly uniform low byte before it knows the high one.
- "pcm16d2": each 16-bit sample's residual from FLAC's fixed second-order predictor,
  r[t] = s[t] - 2 s[t-1] + s[t-2] mod 2**16, stored little-endian. The predictor reads only
  earlier samples, so the bytes are a causal, invertible rewrite of pcm16's: a model's likelihood
  of them is its likelihood of the samples, but smooth audio becomes small numbers (a high byte
  of 0x00 or 0xFF) that a small model learns much faster. A stream starts from silence
  (s[-1] = s[-2] = 0); a datamodule continues one stream through all the clips of a split, so
  the split's bytes decode as one stream (`history` carries the last two samples across calls).
- "mulaw8": 8-bit mu-law companding (256 levels), one byte per sample, as in WaveNet.

Waveforms are float32 numpy arrays in [-1, 1]. The int16 <-> float mapping is x = s / 32768 and
s = clip(round(x * 32768)), which is exact in float32, so bytes -> waveform -> bytes is the identity.

Files come from anywhere, so `load_audio_file` trusts nothing in a header: it reads in blocks (a
header's frame count never sizes an allocation), checks the count it declared, refuses NaN/inf
samples, and bounds what a sample rate can cost (the resampling filter and the resampled length).
"""

import math
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
import soundfile
import torch
import torchaudio.functional

from multibyte.codecs.text import ByteLike, as_byte_array

AUDIO_ENCODINGS = ("pcm16", "pcm16be", "pcm16d2", "mulaw8")
PCM16_DTYPES = {"pcm16": "<i2", "pcm16be": ">i2", "pcm16d2": "<i2"}  # byte order of each 16-bit encoding
SILENCE = (0, 0)  # (s[-2], s[-1]) before the first sample of a stream
MULAW_LEVELS = 256
PCM16_SCALE = 32768.0  # 2**15, int16 full scale
READ_BLOCK_FRAMES = 1 << 16  # frames decoded at a time
# torchaudio's sinc resampler builds a (new, orig + 2·width) filter for the gcd-reduced rates:
# 160 x 475 for 44.1 kHz -> 16 kHz, but 16000 x 44135 (706 M entries) for a 44,101 Hz file.
RESAMPLE_LOWPASS_WIDTH = 6  # torchaudio's defaults, which `resample` is called with
RESAMPLE_ROLLOFF = 0.99
MAX_RESAMPLE_FILTER = 1 << 22  # filter entries (16 MiB of float32); every common rate pair is far below
MAX_RATE_RATIO_ERROR = 1e-4  # a rate ratio approximated to fit the filter is this close: 0.17 cents of pitch
MAX_CLIP_SAMPLES = 1 << 28  # one clip after resampling: 1 GiB as float32 (resampling needs ~3x), 4.7 hours at 16 kHz

Waveform = Union[np.ndarray, torch.Tensor]


def bytes_per_sample(encoding: str) -> int:
    """How many bytes one sample takes in `encoding`: 2 for the 16-bit encodings, 1 for "mulaw8"."""
    if encoding in PCM16_DTYPES:
        return 2
    if encoding == "mulaw8":
        return 1
    raise ValueError(f"encoding must be one of {AUDIO_ENCODINGS}, got {encoding!r}")


def _wav_data_shortfall(file: BinaryIO) -> Optional[tuple[int, int]]:
    """(declared, present) byte counts when a RIFF/WAVE file's data chunk is cut short, else None.

    libsndfile silently reads whatever is there in a truncated WAV, so a cut-off download would
    pass for a shorter clip. The data chunk header says how long the samples should be.
    """
    file.seek(0)
    header = file.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None
    while True:
        chunk_header = file.read(8)
        if len(chunk_header) < 8:
            return None
        chunk_id, declared = chunk_header[:4], int.from_bytes(chunk_header[4:], "little")
        if chunk_id == b"data":
            data_start = file.tell()
            present = file.seek(0, 2) - data_start
            # 0 and 0xFFFFFFFF mean "length unknown" (WAVs written to a pipe); nothing to check.
            if declared not in (0, 0xFFFFFFFF) and declared > present:
                return declared, present
            return None
        file.seek(declared + (declared & 1), 1)  # chunks are padded to an even size


def _resample_filter_size(orig_freq: int, new_freq: int) -> int:
    """Entries of the filter torchaudio's `resample` builds for orig_freq -> new_freq."""
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    width = math.ceil(RESAMPLE_LOWPASS_WIDTH * orig / (RESAMPLE_ROLLOFF * min(orig, new)))
    return new * (orig + 2 * width)


def resampling_rates(file_rate: int, sample_rate: int) -> Optional[tuple[int, int]]:
    """(orig_freq, new_freq) to resample file_rate -> sample_rate with: the rates themselves, or,
    when their exact ratio needs a filter over MAX_RESAMPLE_FILTER entries (coprime rates such as
    44,101 -> 16,000 Hz), the closest ratio of smaller integers that fits, which differs from the
    exact one by at most MAX_RATE_RATIO_ERROR. None when no such ratio exists (absurd rates).
    """
    if _resample_filter_size(file_rate, sample_rate) <= MAX_RESAMPLE_FILTER:
        return file_rate, sample_rate
    exact = Fraction(sample_rate, file_rate)
    max_denominator = min(file_rate, 1 << 16)
    while max_denominator >= 1:
        ratio = exact.limit_denominator(max_denominator)  # new/orig with orig <= max_denominator
        if ratio.numerator and _resample_filter_size(ratio.denominator, ratio.numerator) <= MAX_RESAMPLE_FILTER:
            if abs(ratio / exact - 1) <= MAX_RATE_RATIO_ERROR:
                return ratio.denominator, ratio.numerator
            return None  # smaller denominators only approximate worse
        max_denominator //= 2
    return None


def load_audio_file(path: Union[str, Path], sample_rate: int) -> np.ndarray:
    """Read a WAV/FLAC file as a mono float32 waveform (num_samples,) in [-1, 1] at `sample_rate`.

    Channels are averaged; a file at another rate is resampled (band-limited sinc interpolation);
    float files beyond full scale are clipped to [-1, 1]. Raises ValueError naming the file when
    it is unreadable, corrupt or truncated, holds NaN/inf samples, or has a sample rate that
    cannot be resampled to `sample_rate` or would resample to over MAX_CLIP_SAMPLES samples.
    """
    try:
        handle = open(path, "rb")  # opened here, so that an unreadable file says why
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror or error})") from error
    # libsndfile's failures: SoundFileError (open, decode), ValueError for some malformed headers.
    library_errors = (soundfile.SoundFileError, RuntimeError, OSError, ValueError)
    blocks: list[np.ndarray] = []
    num_frames = num_non_finite = 0
    with handle:
        try:
            file = soundfile.SoundFile(handle)
        except library_errors as error:
            raise ValueError(f"{path}: cannot read audio ({error})") from error
        with file:
            file_rate, declared_frames = file.samplerate, file.frames
            if file_rate < 1:
                raise ValueError(f"{path}: header declares a sample rate of {file_rate} Hz")
            rates = resampling_rates(file_rate, sample_rate) if file_rate != sample_rate else (1, 1)
            if rates is None:
                raise ValueError(f"{path}: cannot resample its {file_rate} Hz audio to {sample_rate} Hz")
            while True:
                try:
                    frames = file.read(READ_BLOCK_FRAMES, dtype="float32", always_2d=True)  # (n, channels)
                except library_errors as error:
                    raise ValueError(f"{path}: cannot read audio ({error})") from error
                if not len(frames):
                    break
                num_frames += len(frames)
                if math.ceil(num_frames * rates[1] / rates[0]) > MAX_CLIP_SAMPLES:
                    raise ValueError(
                        f"{path}: {num_frames}+ frames at {file_rate} Hz make over {MAX_CLIP_SAMPLES} samples at "
                        f"{sample_rate} Hz, more than one clip may hold; split the file"
                    )
                num_non_finite += int(np.count_nonzero(~np.isfinite(frames)))
                if not num_non_finite:  # otherwise the file is refused below, once it has been counted
                    blocks.append(frames.mean(axis=1, dtype=np.float32))  # integer formats arrive as int / full scale
        try:
            shortfall = _wav_data_shortfall(handle)
        except OSError as error:
            raise ValueError(f"{path}: cannot read audio ({error})") from error
    if shortfall is not None:
        raise ValueError(f"{path}: truncated WAV: header declares {shortfall[0]} data bytes, file holds {shortfall[1]}")
    if num_frames != declared_frames:
        raise ValueError(f"{path}: truncated audio: header declares {declared_frames} frames, read {num_frames}")
    if num_non_finite:
        raise ValueError(f"{path}: holds {num_non_finite} NaN or infinite samples; not a usable waveform")
    mono = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    np.clip(mono, -1.0, 1.0, out=mono)  # float files may exceed full scale
    if file_rate != sample_rate and len(mono):
        resampled = torchaudio.functional.resample(torch.from_numpy(mono), orig_freq=rates[0], new_freq=rates[1])
        # Sinc interpolation can overshoot full scale by a little; keep the [-1, 1] contract.
        mono = resampled.clamp_(-1.0, 1.0).numpy()
    return mono


def _as_waveform(wave: Waveform) -> np.ndarray:
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (num_samples,), got shape {wave.shape}")
    non_finite = int(np.count_nonzero(~np.isfinite(wave)))
    if non_finite:
        raise ValueError(f"the waveform holds {non_finite} NaN or infinite samples, which have no byte encoding")
    return wave


def waveform_to_int16(wave: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16 (s = clip(round(x * 32768)))."""
    return np.clip(np.rint(wave * PCM16_SCALE), -32768, 32767).astype("<i2")


def pcm16_to_bytes(samples: np.ndarray, encoding: str = "pcm16", history: tuple[int, int] = SILENCE) -> np.ndarray:
    """int16 samples (n,) -> 2n uint8 bytes in a 16-bit `encoding`; for "pcm16d2", `history` is
    (s[-2], s[-1]), the two samples before these in the stream."""
    values = np.asarray(samples).astype(np.int16)
    if encoding == "pcm16d2":
        stream = np.concatenate([np.asarray(history, dtype=np.int64), values.astype(np.int64)])
        residual = (stream[2:] - 2 * stream[1:-1] + stream[:-2]) & 0xFFFF
        values = residual.astype(np.uint16).view(np.int16)
    return values.astype(PCM16_DTYPES[encoding]).view(np.uint8)


def bytes_to_pcm16(data: ByteLike, encoding: str = "pcm16", history: tuple[int, int] = SILENCE) -> np.ndarray:
    """Bytes in a 16-bit `encoding` -> int16 samples; a trailing odd byte (half a sample) is dropped.
    Inverse of `pcm16_to_bytes` for the same `history`."""
    data = as_byte_array(data)
    whole_samples = np.ascontiguousarray(data[: data.size - data.size % 2])
    values = whole_samples.view(PCM16_DTYPES[encoding]).astype(np.int16)
    if encoding == "pcm16d2":
        # s[t] - s[t-1] = (s[-1] - s[-2]) + r[0] + ... + r[t], and s[t] = s[-1] + the sum of those
        # differences; everything mod 2**16 (int64 wrap-around is a multiple of 2**16 too).
        before, last = (int(value) for value in history)
        slope = ((last - before) + np.cumsum(values.astype(np.int64))) & 0xFFFF
        values = ((last + np.cumsum(slope)) & 0xFFFF).astype(np.uint16).view(np.int16)
    return values


def waveform_to_bytes(wave: Waveform, encoding: str = "pcm16", history: tuple[int, int] = SILENCE) -> np.ndarray:
    """Mono waveform (num_samples,) in [-1, 1] -> uint8 bytes, `bytes_per_sample(encoding)` per sample.

    Samples beyond [-1, 1] are clipped; NaN or infinite samples raise ValueError. `history` (the
    int16 samples s[-2], s[-1] before this waveform) matters only for "pcm16d2".
    """
    bytes_per_sample(encoding)  # validates the name
    wave = np.clip(_as_waveform(wave), -1.0, 1.0)
    if encoding in PCM16_DTYPES:
        return pcm16_to_bytes(waveform_to_int16(wave), encoding, history)
    levels = torchaudio.functional.mu_law_encoding(torch.from_numpy(wave), quantization_channels=MULAW_LEVELS)
    return levels.numpy().astype(np.uint8)


def bytes_to_waveform(data: ByteLike, encoding: str = "pcm16") -> np.ndarray:
    """uint8 bytes -> mono float32 waveform in [-1, 1].

    For the 16-bit encodings a trailing odd byte (half a sample, e.g. from a sample cut short)
    is dropped; "pcm16d2" bytes are decoded as one stream starting from silence.
    """
    bytes_per_sample(encoding)
    data = as_byte_array(data)
    if encoding in PCM16_DTYPES:
        return bytes_to_pcm16(data, encoding).astype(np.float32) / np.float32(PCM16_SCALE)
    levels = torch.from_numpy(data.astype(np.int64))
    return torchaudio.functional.mu_law_decoding(levels, quantization_channels=MULAW_LEVELS).numpy().astype(np.float32)


def bytes_to_wav(
    data: ByteLike, path: Union[str, Path, BinaryIO], sample_rate: int, encoding: str = "pcm16"
) -> None:
    """Write the waveform that `data` encodes as a 16-bit PCM WAV file.

    The int16 samples are written as they are (not through libsndfile's float scaling), so for
    "pcm16" the file's sample bytes equal `data` (minus a trailing odd byte; for "pcm16be", with
    each sample's two bytes swapped).
    """
    samples = waveform_to_int16(bytes_to_waveform(data, encoding))
    target = str(path) if isinstance(path, Path) else path
    soundfile.write(target, samples, sample_rate, subtype="PCM_16", format="WAV")
