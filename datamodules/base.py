"""What every byte datamodule shares: the on-disk cache, the window datasets and the batch format.

Flow. `prepare_data()` converts the source (files in some modality) once into a cache folder
`cache_dir/<modality>-<hash>/`:

    train.bin, validation.bin, test.bin   each split as one flat uint8 byte stream
    <split>.offsets.npy                   int64 start offset of every record (image, clip); not for text
    manifest.json                         sizes, counts, SHA-256 of each split, source; written
                                          LAST, so a folder without it is incomplete and gets rebuilt

Subword text (`TextDataModule(tokenizer="bpe")`) adds a folder inside it, `bpe-<hash>/`, holding
`tokenizer.json` and the same three splits as token ids (see datamodules/text.py).

The hash covers the source path, its files' names, sizes and mtimes and every codec parameter,
so changing any of them converts again into a new folder. Every file is written under a temporary
name in the same folder and renamed into place (`os.replace`, atomic), under a lock on
`<folder>.lock`: a failed run deletes its temporaries, a killed one leaves `.partial` files that are
never read and that the next run deletes, and two processes preparing one cache build it once.

`setup()` then builds datasets that memory-map the .bin files lazily (in each worker).

Batch format (what the models consume): `(tokens, lengths)` with tokens uint8 (B, L) and lengths
int64 (B,) = number of real bytes per row; positions >= length are padding (0). Targets are the
tokens themselves: a window of L bytes gives L predictions (the model shifts internally).
A split stored as token ids (`TokenFormat`) gives `(tokens, lengths, byte_counts)` instead: tokens
int64 (B, L) ids, lengths the real tokens per row, byte_counts int64 (B,) the bytes those real
tokens decode to, the denominator of bits per byte (for bytes it would equal lengths).
Which symbols (bytes or tokens) each window covers is decided in `datamodules/windows.py`:
- training: windows of exactly L = seq_len bytes at aligned start offsets drawn by a pure function
  of (seed, epoch, window index); each rank of a distributed run draws its own indices, and the
  position in the stream is saved in checkpoints, so a resumed run draws what an uninterrupted
  one would;
- evaluation: contiguous windows [i*L, min((i+1)*L, N)) covering the split, the last one possibly
  short, shared out between ranks without repeats, so every byte of the split is scored exactly
  once however many processes evaluate.
"""

import errno
import fcntl
import hashlib
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from lightning import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.windows import (
    DrawKey,
    EvalShardSampler,
    TrainPosition,
    TrainWindowSampler,
    contiguous_window,
    num_contiguous_windows,
    train_window_starts,
)
from multibyte.codecs.text import ByteLike, as_byte_array
from multibyte.data_spec import DataSpec

if TYPE_CHECKING:
    from multibyte.bpe import BPETokenizer

SPLITS = ("train", "validation", "test")
MANIFEST_NAME = "manifest.json"
CACHE_FORMAT_VERSION = 1  # bump when the cache layout changes, so old folders are not reused
EMBEDDED_DATA_DIR = Path(__file__).resolve().parent / "embedded"


class DataError(ValueError):
    """The data source is missing, empty or malformed. The message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------


def proportional_split(total: int, source: Path, unit: str) -> tuple[int, int, int]:
    """Sizes of a 90% / 5% / 5% train / validation / test split of `total` items, each at least 1.

    `unit` names the items (bytes, images, audio files) for the error raised when total < 3.
    """
    if total < len(SPLITS):
        raise DataError(
            f"{source}: {total} {unit} cannot be split into train/validation/test (need at least {len(SPLITS)})"
        )
    held_out = max(1, total // 20)
    return total - 2 * held_out, held_out, held_out


def shuffled_split_assignment(total: int, seed: int, source: Path, unit: str) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) of each of `total` records, chosen by a seeded shuffle.

    The shuffle only decides membership: a caller writes each split's records in source order.
    """
    train, validation, _ = proportional_split(total, source, unit)
    order = np.random.default_rng(seed).permutation(total)
    assignment = np.full(total, 2, dtype=np.int8)
    assignment[order[:train]] = 0
    assignment[order[train : train + validation]] = 1
    return assignment


# ---------------------------------------------------------------------------------------------
# Writing the cache
# ---------------------------------------------------------------------------------------------


class CacheWriter:
    """Streams the three splits of one cache folder into temporary files, then moves them into place.

    Use as a context manager: leaving it by an exception deletes every temporary file; `commit()`
    renames the split streams and record offsets into place and writes the manifest last.
    Temporaries are `.<final name>.<random>.partial`; a process killed before `commit()` finishes
    leaves them (and maybe some renamed splits) in a folder without a manifest, which
    `clear_incomplete` empties. Write only while holding the folder's `CacheLock`.

    A byte writer (dtype uint8, the default) takes `append_bytes` / `append_record`; a token writer
    (dtype uint16 or int32, little-endian) takes `append_tokens`, with the number of bytes the ids
    decode to, and its manifest records both counts per split.
    """

    TEMPORARY_SUFFIX = ".partial"

    def __init__(self, folder: Path, dtype: str = "uint8") -> None:
        if dtype not in ("uint8", "uint16", "int32"):
            raise ValueError(f"cache dtype must be uint8, uint16 or int32, got {dtype!r}")
        self.folder = folder
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._temporaries: dict[str, Path] = {}  # final file name -> temporary path
        self._num_bytes = {split: 0 for split in SPLITS}  # bytes the split holds (decoded, for tokens)
        self._num_tokens = {split: 0 for split in SPLITS}  # token writers only
        self._digests = {split: hashlib.sha256() for split in SPLITS}  # of each split file's contents
        self._record_starts: dict[str, list[int]] = {split: [] for split in SPLITS}
        self._streams: dict[str, Any] = {}
        try:
            for split in SPLITS:
                self._streams[split] = open(self._new_temporary(f"{split}.bin"), "wb")
        except BaseException:
            self.discard()
            raise

    def _new_temporary(self, final_name: str) -> Path:
        handle, name = tempfile.mkstemp(prefix=f".{final_name}.", suffix=self.TEMPORARY_SUFFIX, dir=self.folder)
        os.close(handle)
        self._temporaries[final_name] = Path(name)
        return Path(name)

    @property
    def holds_tokens(self) -> bool:
        return self.dtype != np.uint8

    def append_bytes(self, split: str, data: ByteLike) -> None:
        """Continue `split`'s byte stream with `data` (no record boundary)."""
        if self.holds_tokens:
            raise TypeError("a token cache takes append_tokens, not bytes")
        data = np.ascontiguousarray(as_byte_array(data))
        self._streams[split].write(data.data)
        self._digests[split].update(data.data)
        self._num_bytes[split] += data.size

    def append_tokens(self, split: str, ids: np.ndarray, num_bytes: int) -> None:
        """Continue `split`'s token stream with `ids` (1-D integers), which decode to `num_bytes` bytes."""
        if not self.holds_tokens:
            raise TypeError("a byte cache takes append_bytes, not token ids")
        ids = np.asarray(ids)
        limits = np.iinfo(self.dtype)
        if ids.ndim != 1 or (ids.size and (int(ids.min()) < 0 or int(ids.max()) > limits.max)):
            raise ValueError(f"token ids must be a 1-D array of values 0..{limits.max} for a {self.dtype.name} cache")
        data = np.ascontiguousarray(ids.astype(self.dtype, copy=False))
        self._streams[split].write(data.data)
        self._digests[split].update(data.data)
        self._num_tokens[split] += data.size
        self._num_bytes[split] += int(num_bytes)

    def append_record(self, split: str, record: ByteLike) -> None:
        """Append one record (an image, a clip) to `split` and remember where it starts."""
        self._record_starts[split].append(self._num_bytes[split])
        self.append_bytes(split, record)

    def num_bytes(self, split: str) -> int:
        """Bytes written to `split` so far (for a token writer: the bytes its ids decode to)."""
        return self._num_bytes[split]

    def num_tokens(self, split: str) -> int:
        """Token ids written to `split` so far (0 for a byte writer)."""
        return self._num_tokens[split]

    def num_records(self, split: str) -> Optional[int]:
        """How many records `split` holds, or None for a plain byte stream (text)."""
        return len(self._record_starts[split]) if self._has_records else None

    @property
    def _has_records(self) -> bool:
        return any(self._record_starts.values())

    def _close_streams(self) -> None:
        for stream in self._streams.values():
            stream.close()

    def commit(self, description: dict[str, Any]) -> None:
        """Finish: offsets and split streams into place, then manifest.json = description + split sizes."""
        for stream in self._streams.values():
            stream.flush()
            os.fsync(stream.fileno())  # the bytes reach the disk before the manifest vouches for them
        self._close_streams()
        if self._has_records:
            for split in SPLITS:
                with open(self._new_temporary(f"{split}.offsets.npy"), "wb") as file:
                    np.save(file, np.asarray(self._record_starts[split], dtype=np.int64))
                    file.flush()
                    os.fsync(file.fileno())
        sizes = {
            split: {
                "num_bytes": self.num_bytes(split),
                "num_records": self.num_records(split),
                "sha256": self._digests[split].hexdigest(),
                **({"num_tokens": self._num_tokens[split], "dtype": self.dtype.name} if self.holds_tokens else {}),
            }
            for split in SPLITS
        }
        manifest = {**description, "splits": sizes}
        with open(self._new_temporary(MANIFEST_NAME), "w", encoding="utf-8") as file:
            json.dump(manifest, file, indent=2, sort_keys=True)
            file.flush()
            os.fsync(file.fileno())
        # Manifest last: its presence is what marks the folder complete.
        for final_name in sorted(self._temporaries, key=lambda name: name == MANIFEST_NAME):
            os.replace(self._temporaries[final_name], self.folder / final_name)
            del self._temporaries[final_name]
        folder = os.open(self.folder, os.O_RDONLY)  # the renames themselves reach the disk
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    @classmethod
    def clear_incomplete(cls, folder: Path) -> None:
        """Delete what unfinished preparations left in `folder`, a cache folder without a manifest:
        temporaries of writers that died, and split files a killed `commit()` had moved into place.

        Only under the folder's `CacheLock`: a live writer's temporaries would go too.
        """
        if not folder.is_dir() or (folder / MANIFEST_NAME).exists():
            return
        final_names = [name for split in SPLITS for name in (f"{split}.bin", f"{split}.offsets.npy")]
        for path in [*folder.glob(f".*{cls.TEMPORARY_SUFFIX}"), *(folder / name for name in final_names)]:
            path.unlink(missing_ok=True)

    def discard(self) -> None:
        """Delete every temporary file written so far."""
        self._close_streams()
        for path in self._temporaries.values():
            path.unlink(missing_ok=True)
        self._temporaries.clear()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], traceback: Any) -> None:
        if exc_type is not None:
            self.discard()


class CacheLock:
    """An exclusive lock on one cache folder across processes: `with CacheLock(folder): ...`.

    An flock on the sibling file `<folder>.lock`. The kernel drops an flock when its holder exits,
    killed or not, so a dead preparer never blocks the next one. The file is deleted on release,
    while still held, so nothing stays next to the caches; a waiter that then gets the lock of the
    deleted file finds that the name leads elsewhere (or nowhere) and locks the name's new file.
    On a file system without flock (some network mounts) it warns and does not lock.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder.parent / f"{folder.name}.lock"
        self._fd: Optional[int] = None

    def _holds_current_file(self, fd: int) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def _lock(self, fd: int) -> bool:
        """Block until `fd` is locked; False when the file system cannot lock."""
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process to finish preparing {self.folder}", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"{self.path}: the file system cannot lock ({error.strerror}); preparing unlocked", file=sys.stderr)
            return False
        return True

    def __enter__(self) -> "CacheLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    if not self._lock(fd) or self._holds_current_file(fd):
                        self._fd = fd
                        return self
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)  # locked a file its holder has since deleted: lock the new one
        except OSError as error:
            raise DataError(f"{self.path}: cannot lock the cache folder ({error.strerror or error})") from error

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], traceback: Any) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: see the class docstring
            os.close(self._fd)  # releases the flock
            self._fd = None


# ---------------------------------------------------------------------------------------------
# Datasets over a cached split
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenFormat:
    """A split stored as token ids rather than bytes: `num_tokens` ids of `dtype` (little-endian);
    id i decodes to `token_bytes[i]` bytes ((V,) int64), which is what bits per byte divides by."""

    num_tokens: int
    dtype: str
    token_bytes: np.ndarray


class CachedSplit(Dataset):
    """Base of the window datasets: one split's .bin file, memory-mapped on first use.

    `num_bytes` is the bytes the split holds. Without `token_format` the file is those bytes and a
    window is a uint8 tensor of them; with it the file holds `token_format.num_tokens` token ids,
    windows count tokens, and a window is (int64 ids, the bytes they decode to).

    Only the path travels when a DataLoader worker receives the dataset (pickling drops the
    memmap), and each worker maps the file itself.
    """

    def __init__(self, path: Union[str, Path], num_bytes: int, token_format: Optional[TokenFormat] = None) -> None:
        self.path = str(path)
        self.num_bytes = num_bytes
        self.token_format = token_format
        self.length = token_format.num_tokens if token_format is not None else num_bytes  # symbols in the file
        self._symbols: Optional[np.memmap] = None

    @property
    def unit(self) -> str:
        return "bytes" if self.token_format is None else "tokens"

    def symbols(self) -> np.memmap:
        """The whole split file as a read-only (length,) array: uint8 bytes, or token ids."""
        if self._symbols is None:
            dtype = np.uint8 if self.token_format is None else np.dtype(self.token_format.dtype).newbyteorder("<")
            self._symbols = np.memmap(self.path, dtype=dtype, mode="r", shape=(self.length,))
        return self._symbols

    def _window(self, start: int, stop: int) -> Union[torch.Tensor, tuple[torch.Tensor, int]]:
        if self.token_format is None:
            return torch.from_numpy(np.array(self.symbols()[start:stop]))  # a copy: memmap pages stay read-only
        ids = np.array(self.symbols()[start:stop], dtype=np.int64)
        return torch.from_numpy(ids), int(self.token_format.token_bytes[ids].sum())

    def _empty_window(self) -> Union[torch.Tensor, tuple[torch.Tensor, int]]:
        if self.token_format is None:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.zeros(0, dtype=torch.int64), 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_symbols"] = None
        return state


class RandomWindows(CachedSplit):
    """Training windows: `seq_len` symbols starting at a multiple of `alignment`, drawn uniformly.

    Item `DrawKey(seed, epoch, index)` is the window `train_window_starts` assigns to that key, a
    pure function of it; a plain integer i means DrawKey(0, 0, i). `TrainWindowSampler` decides
    which keys a rank reads; an epoch is `num_windows` of them.
    """

    def __init__(
        self,
        path: Union[str, Path],
        num_bytes: int,
        seq_len: int,
        alignment: int,
        num_windows: int,
        token_format: Optional[TokenFormat] = None,
    ) -> None:
        super().__init__(path, num_bytes, token_format)
        if self.length < seq_len:
            raise ValueError(f"{path}: {self.length} {self.unit} cannot hold one window of seq_len={seq_len}")
        self.seq_len = seq_len
        self.alignment = alignment
        self.num_windows = num_windows

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, key: Union[int, DrawKey]) -> Union[torch.Tensor, tuple[torch.Tensor, int]]:
        if isinstance(key, (int, np.integer)):
            if not 0 <= key < self.num_windows:
                raise IndexError(key)
            key = DrawKey(0, 0, int(key))
        seed, epoch, index = key
        (start,) = train_window_starts(seed, epoch, np.asarray([index]), self.length, self.seq_len, self.alignment)
        start = int(start)
        return self._window(start, start + self.seq_len)


class ContiguousWindows(CachedSplit):
    """Evaluation windows: [i*seq_len, min((i+1)*seq_len, length)) of the split's symbols, the last
    one possibly short; item None is an empty window."""

    def __init__(
        self, path: Union[str, Path], num_bytes: int, seq_len: int, token_format: Optional[TokenFormat] = None
    ) -> None:
        super().__init__(path, num_bytes, token_format)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return num_contiguous_windows(self.length, self.seq_len)

    def __getitem__(self, index: Optional[int]) -> Union[torch.Tensor, tuple[torch.Tensor, int]]:
        if index is None:  # an empty window: evens out the ranks' shares (EvalShardSampler), scores nothing
            return self._empty_window()
        return self._window(*contiguous_window(index, self.length, self.seq_len))


def pad_windows(windows: list, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Collate windows into a batch.

    Byte windows (uint8 tensors) -> (tokens uint8 (B, seq_len) zero-padded, lengths int64 (B,)).
    Token windows ((int64 ids, byte count) pairs) -> (tokens int64 (B, seq_len) zero-padded,
    lengths int64 (B,), byte_counts int64 (B,)).
    """
    byte_counts = None
    if windows and isinstance(windows[0], tuple):
        byte_counts = torch.tensor([count for _, count in windows], dtype=torch.int64)
        windows = [ids for ids, _ in windows]
    dtype = torch.uint8 if byte_counts is None else torch.int64
    tokens = torch.zeros(len(windows), seq_len, dtype=dtype)
    lengths = torch.tensor([len(window) for window in windows], dtype=torch.int64)
    for row, window in enumerate(windows):
        tokens[row, : len(window)] = window
    return (tokens, lengths) if byte_counts is None else (tokens, lengths, byte_counts)


# ---------------------------------------------------------------------------------------------
# The datamodule
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$MULTIBYTE_CACHE, or ~/.cache/multibyte."""
    return Path(os.environ.get("MULTIBYTE_CACHE") or "~/.cache/multibyte").expanduser()


class ByteStreamDataModule(LightningDataModule):
    """Base of the text, image and audio datamodules: cache, splits, datasets and loaders.

    Subclasses set `modality` and implement `_default_source`, `_source_files`, `_codec_params`
    and `_write_splits`; audio and images also override `alignment`.

    Args:
        data_path: file or folder with the source data; None uses the small sample shipped in
            `datamodules/embedded/`.
        seq_len: symbols per window (L of the (B, L) batches): bytes, or tokens for subword text.
        batch_size: windows per training batch.
        eval_batch_size: windows per validation/test batch; None means batch_size.
        num_workers: DataLoader worker processes (0 loads in the main process).
        cache_dir: where converted splits are kept; None means $MULTIBYTE_CACHE or ~/.cache/multibyte.
        train_windows_per_epoch: random training windows per epoch, shared out between all
            processes; None means train symbols // seq_len (at least 1), i.e. about one pass over
            the train split. The windows are keyed by the run's seed (`seed_everything`).
        split_seed: seed of the shuffle that assigns records (images, clips) to splits.
    """

    modality: str = ""

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
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1, got {eval_batch_size}")
        if train_windows_per_epoch is not None and train_windows_per_epoch < 1:
            raise ValueError(f"train_windows_per_epoch must be at least 1, got {train_windows_per_epoch}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {num_workers}")
        self.save_hyperparameters()  # also records the subclass's own arguments
        self.data_path = data_path
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.train_windows_per_epoch = train_windows_per_epoch
        self.split_seed = split_seed
        self._cache_folder: Optional[Path] = None
        self._manifest: Optional[dict[str, Any]] = None
        self._train: Optional[RandomWindows] = None
        self._train_sampler: Optional[TrainWindowSampler] = None
        self._resume: Optional[TrainPosition] = None  # from a checkpoint, for the next train_dataloader()

    # -- what a modality provides ----------------------------------------------------------------

    @property
    def spec(self) -> DataSpec:
        """The typed contract (`multibyte.data_spec.DataSpec`): what the model and the decoders
        need to know about this data."""
        return DataSpec(modality=self.modality, seq_len=self.seq_len, **self._spec_fields())

    def _spec_fields(self) -> dict[str, Any]:
        """The modality's own DataSpec fields (image order, audio rate, vocabulary, ...)."""
        return {}

    @property
    def alignment(self) -> int:
        """Training windows start at multiples of this many bytes (e.g. 2 keeps 16-bit samples whole)."""
        return 1

    def subword_tokenizer(self) -> Optional["BPETokenizer"]:
        """The tokenizer whose ids the data is served as (preparing the cache if needed); None for
        byte data."""
        return None

    def prepared_subword_tokenizer(self) -> Optional["BPETokenizer"]:
        """`subword_tokenizer()` when the cache already holds it, else None: never trains or converts
        anything (for commands that only check a checkpoint's tokenizer against the data's)."""
        return None

    def _default_source(self) -> Path:
        """The embedded sample used when data_path is None."""
        raise NotImplementedError

    def _source_files(self, source: Path) -> list[Path]:
        """The files the cache is built from (their names, sizes and mtimes enter the cache hash)."""
        raise NotImplementedError

    def _codec_params(self) -> dict[str, Any]:
        """Every parameter that changes the cached bytes or the split (enters the cache hash)."""
        raise NotImplementedError

    def _write_splits(self, source: Path, writer: CacheWriter) -> None:
        """Convert `source` into the three splits through `writer`; raise DataError on bad input."""
        raise NotImplementedError

    # -- the cache -------------------------------------------------------------------------------

    @property
    def source(self) -> Path:
        """The resolved data source: data_path, or the embedded sample."""
        if self.data_path is None:
            return self._default_source().resolve()
        path = Path(self.data_path).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        return path.resolve()

    @property
    def cache_folder(self) -> Path:
        """`cache_dir/<modality>-<hash>`; computed once per instance (it stats every source file)."""
        if self._cache_folder is None:
            source = self.source
            files = []
            for path in self._source_files(source):
                stat = path.stat()
                name = path.relative_to(source).as_posix() if source.is_dir() else path.name
                files.append([name, stat.st_size, stat.st_mtime_ns])
            fingerprint = {
                "format_version": CACHE_FORMAT_VERSION,
                "modality": self.modality,
                "source": str(source),
                "files": files,
                "params": self._codec_params(),
            }
            digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()[:16]
            root = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
            self._cache_folder = root / f"{self.modality}-{digest}"
        return self._cache_folder

    def prepare_data(self) -> None:
        """Convert the source into the cache folder, unless a complete one (with manifest) exists.

        Safe under concurrent processes and kills: conversion runs under the folder's `CacheLock`,
        so a second process waits, then finds the cache complete; a folder without a manifest is
        never read, and the next preparation deletes what a killed one left in it. A failure
        leaves no file behind.
        """
        folder = self.cache_folder
        if (folder / MANIFEST_NAME).is_file():
            return
        source = self.source
        with CacheLock(folder):
            if (folder / MANIFEST_NAME).is_file():
                return  # another process completed it while this one waited
            folder.mkdir(exist_ok=True)
            CacheWriter.clear_incomplete(folder)
            try:
                with CacheWriter(folder) as writer:
                    self._write_splits(source, writer)
                    for split in SPLITS:
                        if writer.num_bytes(split) == 0:
                            raise DataError(f"{source}: the {split} split would be empty (no bytes)")
                    writer.commit(
                        {
                            "format_version": CACHE_FORMAT_VERSION,
                            "modality": self.modality,
                            "source": str(source),
                            "num_source_files": len(self._source_files(source)),
                            "params": self._codec_params(),
                        }
                    )
            except BaseException:
                CacheWriter.clear_incomplete(folder)  # splits a failed commit() had moved into place
                try:
                    folder.rmdir()  # only succeeds when empty, i.e. nothing of ours is left
                except OSError:
                    pass
                raise

    @property
    def manifest(self) -> dict[str, Any]:
        """The cache's manifest.json (preparing the cache first if needed)."""
        if self._manifest is None:
            path = self.cache_folder / MANIFEST_NAME
            if not path.is_file():
                self.prepare_data()
            self._manifest = json.loads(path.read_text(encoding="utf-8"))
        return self._manifest

    def split_num_bytes(self, split: str) -> int:
        """Size in bytes of `split` ("train", "validation" or "test")."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return int(self.manifest["splits"][split]["num_bytes"])

    def _split_path(self, split: str) -> Path:
        # The manifest first: reading it prepares the cache when `setup` runs before (or without)
        # `prepare_data`, so the file is looked at only once it should be there.
        expected = self.split_num_bytes(split)
        path = self.cache_folder / f"{split}.bin"
        if not path.is_file():
            raise DataError(
                f"{path}: missing, though the cache's {MANIFEST_NAME} lists it with {expected} bytes; "
                f"delete {self.cache_folder} to rebuild the cache"
            )
        on_disk = path.stat().st_size
        if on_disk != expected:
            raise DataError(
                f"{path}: holds {on_disk} bytes but the cache's {MANIFEST_NAME} says {expected}; "
                f"delete {self.cache_folder} to rebuild the cache"
            )
        return path

    def byte_split(self, split: str) -> np.memmap:
        """The bytes of `split`, memory-mapped read-only (also for data served as tokens: the
        bytes the token ids decode to)."""
        return np.memmap(self._split_path(split), dtype=np.uint8, mode="r", shape=(self.split_num_bytes(split),))

    def _split_file(self, split: str) -> tuple[Path, Optional[TokenFormat]]:
        """The file the windows of `split` read, and how it stores tokens (None: it is the bytes).
        A datamodule that serves token ids overrides this."""
        return self._split_path(split), None

    # -- datasets and loaders --------------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the training dataset (evaluation datasets come from `eval_dataset`)."""
        path, token_format = self._split_file("train")
        train_bytes = self.split_num_bytes("train")
        length, unit = (train_bytes, "bytes") if token_format is None else (token_format.num_tokens, "tokens")
        if length < self.seq_len:
            raise DataError(f"{self.source}: the train split has {length} {unit}, fewer than seq_len={self.seq_len}")
        num_windows = self.train_windows_per_epoch or max(1, length // self.seq_len)
        self._train = RandomWindows(path, train_bytes, self.seq_len, self.alignment, num_windows, token_format)

    def eval_dataset(self, split: str) -> ContiguousWindows:
        """Contiguous windows covering every symbol (byte or token) of `split` exactly once."""
        path, token_format = self._split_file(split)
        return ContiguousWindows(path, self.split_num_bytes(split), self.seq_len, token_format)

    def _rank_and_world_size(self) -> tuple[int, int]:
        """(global rank, number of processes) of the attached trainer; (0, 1) without one."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            # Lightning would wrap these rank-aware samplers in a DistributedSampler: each rank
            # would see a fraction of its own share, and evaluation would count windows twice.
            raise ValueError(
                "the byte datamodules shard their windows between processes themselves: "
                "run with --trainer.use_distributed_sampler false (the multibyte CLI's default)"
            )
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: Dataset, sampler: Sampler, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,  # in order: training keys are random draws already, evaluation keeps stream order
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=partial(pad_windows, seq_len=self.seq_len),
        )

    def train_dataloader(self) -> DataLoader:
        """This rank's training windows; a run resumed from a checkpoint continues where it stopped."""
        if self._train is None:
            self.setup("fit")
        rank, world_size = self._rank_and_world_size()
        resume, self._resume = self._resume, None
        # Draws are keyed by the run's seed (`seed_everything`, LightningCLI's --seed_everything),
        # or, on a resumed run, by the seed the checkpoint's run used.
        seed = resume.seed if resume is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self._train_sampler = TrainWindowSampler(self._train.num_windows, seed, rank, world_size)
        if resume is not None:
            self._train_sampler.resume(resume.epoch, self._windows_done(resume, world_size))
        return self._loader(self._train, self._train_sampler, self.batch_size)

    def _windows_done(self, position: TrainPosition, world_size: int) -> int:
        """Local windows of `position.epoch` already trained, for this run's batch and world size."""
        if (position.batch_size, position.world_size) == (self.batch_size, world_size):
            return position.batches_done * self.batch_size
        trained = position.batches_done * position.batch_size * position.world_size  # windows, all ranks
        per_step = self.batch_size * world_size
        if trained % per_step:
            rank_zero_warn(
                f"resuming with batch_size={self.batch_size} on {world_size} processes from a checkpoint made with "
                f"batch_size={position.batch_size} on {position.world_size}: the data position is rounded down "
                f"to a whole step, so up to {per_step - 1} windows are drawn again"
            )
        return trained // per_step * self.batch_size

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.eval_dataset(split)
        return self._loader(dataset, EvalShardSampler(len(dataset), *self._rank_and_world_size()), self.eval_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # -- the data position in checkpoints ---------------------------------------------------------

    def train_position(self) -> Optional[TrainPosition]:
        """Where training is in its stream of windows now: the epoch and the batches of it already
        trained (optimizer steps taken, as the trainer counts them), or None outside `fit`."""
        trainer = self.trainer
        if trainer is None or self._train_sampler is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        # `processed` counts this epoch's batches whose training step has run; a checkpoint saved
        # at the end of batch k holds their weights. (The loader itself has already prefetched
        # batch k + 1, so counting what it yielded would skip a batch.)
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return TrainPosition(
            seed=self._train_sampler.seed,
            epoch=trainer.current_epoch,
            batches_done=batches_done,
            batch_size=self.batch_size,
            world_size=self._train_sampler.world_size,
        )

    def state_dict(self) -> dict[str, Any]:
        position = self.train_position()
        return {} if position is None else {"train_position": position.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_position" in state_dict:
            self._resume = TrainPosition.from_state_dict(state_dict["train_position"])
            # Lightning warns that a mid-epoch resume replays data unless the DataLoader object
            # itself is stateful; the position is restored here instead, so that warning is wrong.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
