"""Text as raw bytes: files are copied byte for byte, never decoded (any encoding, even binary, works).

Accepted sources (`data_path`):
- one file, e.g. enwik8. A file of at least STANDARD_SPLIT_MIN_BYTES (100 MB) gets the standard
  enwik8 split: the last 2 x 5 MB are validation then test, everything before is train (exactly
  90M / 5M / 5M for enwik8's 100M bytes). A smaller file is split 90% / 5% / 5%, contiguous, in
  that order.
- a folder of .txt files: sorted by name, concatenated, then split 90% / 5% / 5% as above.
- a folder with train/, validation/ and test/ subfolders (the PG-19 layout): each split is the
  concatenation of its subfolder's .txt files, sorted by name.
"""

from pathlib import Path
from typing import Any, Iterator, Optional, Union

from datamodules.base import (
    EMBEDDED_DATA_DIR,
    SPLITS,
    ByteStreamDataModule,
    CacheWriter,
    DataError,
    proportional_split,
)

STANDARD_SPLIT_MIN_BYTES = 100_000_000  # a single file this large gets the fixed-size enwik8 split
STANDARD_EVAL_SPLIT_BYTES = 5_000_000  # validation and test size in that split
COPY_CHUNK_BYTES = 1 << 24  # 16 MiB read at a time: large corpora never sit in memory whole
EMBEDDED_TEXT = EMBEDDED_DATA_DIR / "gutenberg_books.txt"


def text_split_sizes(total: int, source: Path) -> tuple[int, int, int]:
    """(train, validation, test) byte counts of a single stream of `total` bytes."""
    if total >= STANDARD_SPLIT_MIN_BYTES:
        return total - 2 * STANDARD_EVAL_SPLIT_BYTES, STANDARD_EVAL_SPLIT_BYTES, STANDARD_EVAL_SPLIT_BYTES
    return proportional_split(total, source, "bytes")


def text_files_in(folder: Path) -> list[Path]:
    """The .txt files directly inside `folder`, sorted by name."""
    try:
        entries = list(folder.iterdir())
    except OSError as error:
        raise DataError(f"{folder}: cannot list the folder ({error.strerror})") from error
    return sorted(path for path in entries if path.is_file() and path.suffix.lower() == ".txt")


def read_chunks(path: Path) -> Iterator[bytes]:
    """The bytes of `path`, COPY_CHUNK_BYTES at a time; a file that cannot be read raises DataError."""
    try:
        with open(path, "rb") as file:
            while chunk := file.read(COPY_CHUNK_BYTES):
                yield chunk
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from error


def copy_concatenation(files: list[Path], portions: list[tuple[str, int]], writer: CacheWriter) -> None:
    """Stream the concatenation of `files` into the splits: the first n_0 bytes to split_0, and so on.

    `portions` = [(split, n), ...] must add up to the files' total size; a file that changed size
    since it was listed raises DataError.
    """
    remaining = [size for _, size in portions]
    current = 0
    for path in files:
        for chunk in read_chunks(path):
            view = memoryview(chunk)
            while view:
                while current < len(portions) and remaining[current] == 0:
                    current += 1
                if current == len(portions):
                    raise DataError(f"{path}: grew while it was being read")
                take = min(remaining[current], len(view))
                writer.append_bytes(portions[current][0], view[:take])
                remaining[current] -= take
                view = view[take:]
    if any(remaining):
        raise DataError(f"{files[-1]}: the files shrank while they were being read")


class TextDataModule(ByteStreamDataModule):
    """UTF-8 (or any) text as a byte stream. See the module docstring for the accepted layouts.

    Args:
        data_path: a text file, a folder of .txt files, or a folder with train/, validation/ and
            test/ subfolders of .txt files; None uses the embedded sample (two Gutenberg books).
        seq_len: bytes per window.
        batch_size, eval_batch_size, num_workers, cache_dir, train_windows_per_epoch, split_seed:
            see `ByteStreamDataModule` (split_seed is unused: text splits are contiguous).
    """

    modality = "text"

    def __init__(
        self,
        data_path: Optional[str] = None,
        seq_len: int = 8192,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
        train_windows_per_epoch: Optional[int] = None,
        split_seed: int = 1234,
    ) -> None:
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

    def _default_source(self) -> Path:
        return EMBEDDED_TEXT

    def _layout(self, source: Path) -> Union[list[Path], dict[str, list[Path]]]:
        """Files of one stream to split (a list), or each split's own files (a dict, PG-19 layout)."""
        if source.is_file():
            return [source]
        if not source.is_dir():
            raise DataError(f"{source}: neither a regular file nor a folder")
        split_folders = {split: source / split for split in SPLITS}
        present = [split for split, folder in split_folders.items() if folder.is_dir()]
        if present:
            missing = [split for split in SPLITS if split not in present]
            if missing:
                raise DataError(
                    f"{source}: has {'/'.join(present)} subfolders but no {'/'.join(missing)} (need all three)"
                )
            layout = {split: text_files_in(folder) for split, folder in split_folders.items()}
            for split, files in layout.items():
                if not files:
                    raise DataError(f"{split_folders[split]}: no .txt files")
            return layout
        files = text_files_in(source)
        if not files:
            raise DataError(f"{source}: no .txt files")
        return files

    def _source_files(self, source: Path) -> list[Path]:
        layout = self._layout(source)
        return layout if isinstance(layout, list) else [path for split in SPLITS for path in layout[split]]

    def _codec_params(self) -> dict[str, Any]:
        # No codec: bytes are copied. The split rule's constants decide which bytes go where.
        return {
            "standard_split_min_bytes": STANDARD_SPLIT_MIN_BYTES,
            "standard_eval_split_bytes": STANDARD_EVAL_SPLIT_BYTES,
        }

    def _write_splits(self, source: Path, writer: CacheWriter) -> None:
        layout = self._layout(source)
        if isinstance(layout, dict):
            for split, files in layout.items():
                copy_concatenation(files, [(split, sum(path.stat().st_size for path in files))], writer)
            return
        if source.is_file():
            sizes = text_split_sizes(source.stat().st_size, source)
        else:
            sizes = proportional_split(sum(path.stat().st_size for path in layout), source, "bytes")
        copy_concatenation(layout, list(zip(SPLITS, sizes)), writer)
