"""Audio as bytes: every clip resampled to one rate, mono, then 16-bit PCM (2 bytes/sample) or 8-bit mu-law.

Accepted sources (`data_path`): a folder searched recursively for .wav/.flac files of any rate
and channel count, or a single such file. Files are sorted, then assigned to train / validation /
test 90/5/5 by a shuffle seeded with split_seed (each split at least one file, so at least three
files are needed); each split keeps the sorted order of its clips. With `validation_files` and
`test_files` (glob patterns on the path relative to the folder, e.g. "*_theo_*" for one FSDD
speaker) the matching files form those splits instead and every other file trains: whole speakers
can be held out. A record is one clip, and the
clips of a split are concatenated into its byte stream. Training windows start at multiples of
bytes_per_sample, so a 16-bit sample is never cut in half.
"""

import fnmatch
from pathlib import Path
from typing import Any, Optional

import numpy as np

from datamodules.base import (
    EMBEDDED_DATA_DIR,
    SPLITS,
    ByteStreamDataModule,
    CacheWriter,
    DataError,
    shuffled_split_assignment,
)
from multibyte.codecs.audio import SILENCE, bytes_per_sample, load_audio_file, waveform_to_bytes, waveform_to_int16

AUDIO_FILE_SUFFIXES = (".wav", ".flac")
EMBEDDED_AUDIO_DIR = EMBEDDED_DATA_DIR  # the FSDD sample clips sit at the top of the embedded folder


class AudioDataModule(ByteStreamDataModule):
    """Raw audio bytes. See the module docstring for the accepted sources.

    Args:
        data_path: folder of .wav/.flac files (searched recursively) or one such file; None uses
            the embedded sample (200 Free Spoken Digit Dataset clips).
        seq_len: bytes per window; a multiple of bytes_per_sample(encoding).
        sample_rate: every clip is resampled to this rate (Hz).
        encoding: "pcm16" (16-bit little-endian PCM, MEGABYTE's setting), "pcm16be" (the same
            samples big-endian: each sample's high byte first), "pcm16d2" (each sample's residual
            from the second-order predictor 2 s[t-1] - s[t-2], one stream through all the clips
            of a split, in split order) or "mulaw8" (8-bit mu-law).
        batch_size, eval_batch_size, num_workers, cache_dir, train_windows_per_epoch, split_seed:
            see `ByteStreamDataModule`.
        validation_files, test_files: glob patterns (fnmatch, on the path relative to the
            `data_path` folder) of the files that form the validation and test splits; all other
            files train. Give both or neither; a pattern matching no file, or a file matched by
            both, is an error. Without them, files are split 90/5/5 by the seeded shuffle.
    """

    modality = "audio"

    def __init__(
        self,
        data_path: Optional[str] = None,
        seq_len: int = 8192,
        sample_rate: int = 16000,
        encoding: str = "pcm16",
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
        train_windows_per_epoch: Optional[int] = None,
        split_seed: int = 1234,
        validation_files: Optional[list[str]] = None,
        test_files: Optional[list[str]] = None,
    ) -> None:
        if (validation_files is None) != (test_files is None):
            raise ValueError("validation_files and test_files: give both (patterns of held-out files) or neither")
        for flag, patterns in (("validation_files", validation_files), ("test_files", test_files)):
            if patterns is not None and not patterns:
                raise ValueError(f"{flag}: empty list; give at least one glob pattern")
        sample_bytes = bytes_per_sample(encoding)  # raises ValueError for an unknown encoding
        if sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
        if seq_len % sample_bytes:
            raise ValueError(f"seq_len={seq_len} must be a multiple of {sample_bytes} bytes per {encoding} sample")
        super().__init__(
            data_path=data_path,
            seq_len=seq_len,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            cache_dir=cache_dir,
            train_windows_per_epoch=train_windows_per_epoch,
            split_seed=split_seed,
        )
        self.sample_rate = sample_rate
        self.encoding = encoding
        self.validation_files = list(validation_files) if validation_files is not None else None
        self.test_files = list(test_files) if test_files is not None else None

    def _spec_fields(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate, "audio_encoding": self.encoding}

    @property
    def alignment(self) -> int:
        return bytes_per_sample(self.encoding)

    def _default_source(self) -> Path:
        return EMBEDDED_AUDIO_DIR

    def _source_files(self, source: Path) -> list[Path]:
        if source.is_file():
            if source.suffix.lower() not in AUDIO_FILE_SUFFIXES:
                raise DataError(f"{source}: not a .wav or .flac file")
            return [source]
        if not source.is_dir():
            raise DataError(f"{source}: neither a regular file nor a folder")
        files = sorted(
            path for path in source.rglob("*") if path.is_file() and path.suffix.lower() in AUDIO_FILE_SUFFIXES
        )
        if not files:
            raise DataError(f"{source}: no .wav or .flac files (searched recursively)")
        return files

    def _codec_params(self) -> dict[str, Any]:
        params = {"sample_rate": self.sample_rate, "encoding": self.encoding, "split_seed": self.split_seed}
        if self.validation_files is not None:
            params["held_out"] = {"validation": self.validation_files, "test": self.test_files}
        return params

    def _split_assignment(self, source: Path, files: list[Path]) -> list[int]:
        """The split index of each file: from the held-out patterns, else the seeded 90/5/5 shuffle."""
        if self.validation_files is None:
            return shuffled_split_assignment(len(files), self.split_seed, source, "audio files")
        if not source.is_dir():
            raise DataError(f"{source}: validation_files/test_files need data_path to be a folder")
        names = [path.relative_to(source).as_posix() for path in files]
        assignment = []
        for name in names:
            matched = [
                split_id
                for split_id, patterns in ((1, self.validation_files), (2, self.test_files))
                if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
            ]
            if len(matched) > 1:
                raise DataError(f"{source / name}: matched by both validation_files and test_files")
            assignment.append(matched[0] if matched else 0)
        for flag, patterns in (("validation_files", self.validation_files), ("test_files", self.test_files)):
            unmatched = [pattern for pattern in patterns if not any(fnmatch.fnmatch(name, pattern) for name in names)]
            if unmatched:
                raise DataError(f"{source}: {flag} pattern(s) {unmatched} match no audio file")
        if 0 not in assignment:
            raise DataError(f"{source}: every file is held out; nothing is left to train on")
        return assignment

    def _write_splits(self, source: Path, writer: CacheWriter) -> None:
        files = self._source_files(source)
        assignment = self._split_assignment(source, files)
        last_samples = {split: SILENCE for split in SPLITS}  # (s[-2], s[-1]) of each split's stream
        for path, split_id in zip(files, assignment):
            try:
                wave = load_audio_file(path, self.sample_rate)
            except ValueError as error:
                raise DataError(str(error)) from error
            if not len(wave):
                raise DataError(f"{path}: holds no audio samples")  # an empty record could empty a split
            split = SPLITS[split_id]
            writer.append_record(split, waveform_to_bytes(wave, self.encoding, last_samples[split]))
            # Only the last two samples are needed: convert those, not the whole clip again.
            stream_end = np.concatenate([last_samples[split], waveform_to_int16(np.clip(wave[-2:], -1.0, 1.0))])
            last_samples[split] = (int(stream_end[-2]), int(stream_end[-1]))
