"""Mono waveforms <-> bytes.

Two byte encodings:
- "pcm16" (MEGABYTE's setting): 16-bit signed little-endian PCM, each sample stored as its two raw
  bytes (low byte first). The model sees the bytes, not the samples.
- "mulaw8": 8-bit mu-law companding (256 levels), one byte per sample, as in WaveNet.

Waveforms are float32 numpy arrays in [-1, 1]. The int16 <-> float mapping is x = s / 32768 and
s = clip(round(x * 32768)), which is exact in float32, so bytes -> waveform -> bytes is the identity.
"""

from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
import soundfile
import torch
import torchaudio.functional

from multibyte.codecs.text import ByteLike, as_byte_array

AUDIO_ENCODINGS = ("pcm16", "mulaw8")
MULAW_LEVELS = 256
PCM16_SCALE = 32768.0  # 2**15, int16 full scale

Waveform = Union[np.ndarray, torch.Tensor]


def bytes_per_sample(encoding: str) -> int:
    """How many bytes one sample takes in `encoding`: 2 for "pcm16", 1 for "mulaw8"."""
    if encoding == "pcm16":
        return 2
    if encoding == "mulaw8":
        return 1
    raise ValueError(f"encoding must be one of {AUDIO_ENCODINGS}, got {encoding!r}")


def _wav_data_shortfall(path: Union[str, Path]) -> Optional[tuple[int, int]]:
    """(declared, present) byte counts when a RIFF/WAVE file's data chunk is cut short, else None.

    libsndfile silently reads whatever is there in a truncated WAV, so a cut-off download would
    pass for a shorter clip. The data chunk header says how long the samples should be.
    """
    with open(path, "rb") as file:
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


def load_audio_file(path: Union[str, Path], sample_rate: int) -> np.ndarray:
    """Read a WAV/FLAC file as a mono float32 waveform (num_samples,) in [-1, 1] at `sample_rate`.

    Channels are averaged; a file at another rate is resampled (band-limited sinc interpolation).
    Raises ValueError naming the file when it is unreadable, corrupt or truncated.
    """
    try:
        with soundfile.SoundFile(str(path)) as file:
            file_rate, declared_frames = file.samplerate, file.frames
            frames = file.read(dtype="float32", always_2d=True)  # (num_frames, channels); int16 / 32768
        shortfall = _wav_data_shortfall(path)
    except (soundfile.SoundFileError, RuntimeError, OSError) as error:
        raise ValueError(f"{path}: cannot read audio ({error})") from error
    if shortfall is not None:
        raise ValueError(f"{path}: truncated WAV: header declares {shortfall[0]} data bytes, file holds {shortfall[1]}")
    if len(frames) != declared_frames:
        raise ValueError(f"{path}: truncated audio: header declares {declared_frames} frames, read {len(frames)}")
    mono = frames.mean(axis=1, dtype=np.float32)
    if file_rate != sample_rate and len(mono):
        resampled = torchaudio.functional.resample(torch.from_numpy(mono), orig_freq=file_rate, new_freq=sample_rate)
        # Sinc interpolation can overshoot full scale by a little; keep the [-1, 1] contract.
        mono = resampled.clamp_(-1.0, 1.0).numpy()
    return mono


def _as_waveform(wave: Waveform) -> np.ndarray:
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (num_samples,), got shape {wave.shape}")
    return np.nan_to_num(wave, nan=0.0)


def _waveform_to_int16(wave: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(wave * PCM16_SCALE), -32768, 32767).astype("<i2")


def waveform_to_bytes(wave: Waveform, encoding: str = "pcm16") -> np.ndarray:
    """Mono waveform (num_samples,) in [-1, 1] -> uint8 bytes, `bytes_per_sample(encoding)` per sample."""
    bytes_per_sample(encoding)  # validates the name
    wave = np.clip(_as_waveform(wave), -1.0, 1.0)
    if encoding == "pcm16":
        return _waveform_to_int16(wave).view(np.uint8)
    levels = torchaudio.functional.mu_law_encoding(torch.from_numpy(wave), quantization_channels=MULAW_LEVELS)
    return levels.numpy().astype(np.uint8)


def bytes_to_waveform(data: ByteLike, encoding: str = "pcm16") -> np.ndarray:
    """uint8 bytes -> mono float32 waveform in [-1, 1].

    For "pcm16" a trailing odd byte (half a sample, e.g. from a sample cut short) is dropped.
    """
    bytes_per_sample(encoding)
    data = as_byte_array(data)
    if encoding == "pcm16":
        whole_samples = data[: data.size - data.size % 2]
        return np.ascontiguousarray(whole_samples).view("<i2").astype(np.float32) / np.float32(PCM16_SCALE)
    levels = torch.from_numpy(data.astype(np.int64))
    return torchaudio.functional.mu_law_decoding(levels, quantization_channels=MULAW_LEVELS).numpy().astype(np.float32)


def bytes_to_wav(
    data: ByteLike, path: Union[str, Path, BinaryIO], sample_rate: int, encoding: str = "pcm16"
) -> None:
    """Write the waveform that `data` encodes as a 16-bit PCM WAV file.

    The int16 samples are written as they are (not through libsndfile's float scaling), so for
    "pcm16" the file's sample bytes equal `data` (minus a trailing odd byte).
    """
    samples = _waveform_to_int16(bytes_to_waveform(data, encoding))
    target = str(path) if isinstance(path, Path) else path
    soundfile.write(target, samples, sample_rate, subtype="PCM_16", format="WAV")
