"""Text as raw bytes: files are copied byte for byte, never decoded (any encoding, even binary, works).

Accepted sources (`data_path`):
- one file, e.g. enwik8. A file of at least STANDARD_SPLIT_MIN_BYTES (100 MB) gets the standard
  enwik8 split: the last 2 x 5 MB are validation then test, everything before is train (exactly
  90M / 5M / 5M for enwik8's 100M bytes). A smaller file is split 90% / 5% / 5%, contiguous, in
  that order.
- a folder of .txt files: sorted by name, concatenated, then split 90% / 5% / 5% as above.
- a folder with train/, validation/ and test/ subfolders (the PG-19 layout): each split is the
  concatenation of its subfolder's .txt files, sorted by name.
- a folder of .txt files with `validation_files` and `test_files` naming whole files of it: those
  files are the validation and test splits, every other .txt file trains. This holds out whole
  books (e.g. of genres absent from training) without copying them into a PG-19 layout.

Subword text (`tokenizer="bpe"`, the baseline the byte models are measured against). After the
byte splits above, `prepare_data` trains a byte-level BPE tokenizer (`multibyte.bpe`) of
`vocab_size` ids on the TRAINING split only, one document per source file (merges never cross
files; `<|endoftext|>` is the separator token), and encodes every split into a folder inside the
byte cache:

    <byte cache>/bpe-<hash>/tokenizer.json                     the tokenizer (written atomically)
    <byte cache>/bpe-<hash>/{train,validation,test}.bin        token ids, uint16 (int32 above 65,536 ids)
    <byte cache>/bpe-<hash>/manifest.json                      per split: tokens, the bytes they decode
                                                               to, SHA-256; written last

The hash covers what the tokenizer and the ids depend on: the SHA-256 of the training split's
bytes, vocab_size, the special tokens, the split pattern and the `tokenizers` version, so a change
to any of them trains and encodes again. Each split's ids decode to exactly its bytes (checked as
they are written), so a subword model is scored on the same bytes as a byte model; the literal
string `<|endoftext|>` in the text encodes to the special id (it decodes to the same bytes).
Windows count tokens (`seq_len`), and batches carry the bytes each window's real tokens decode to.
"""

import hashlib
import json
import string
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import numpy as np
import tokenizers

from datamodules.base import (
    EMBEDDED_DATA_DIR,
    MANIFEST_NAME,
    SPLITS,
    ByteStreamDataModule,
    CacheLock,
    CacheWriter,
    DataError,
    TokenFormat,
    proportional_split,
)
from multibyte.bpe import CL100K_PATTERN, ENDOFTEXT, TOKENIZER_FILE, BPETokenizer, train_bpe

STANDARD_SPLIT_MIN_BYTES = 100_000_000  # a single file this large gets the fixed-size enwik8 split
STANDARD_EVAL_SPLIT_BYTES = 5_000_000  # validation and test size in that split
COPY_CHUNK_BYTES = 1 << 24  # 16 MiB read at a time: large corpora never sit in memory whole
EMBEDDED_TEXT = EMBEDDED_DATA_DIR / "gutenberg_books.txt"
TOKEN_CACHE_FORMAT_VERSION = 1  # bump when the token cache layout changes
TOKENIZERS = ("bytes", "bpe")
SPECIAL_TOKENS = (ENDOFTEXT,)  # the document separator; its id is 0
_WORD_BYTES = frozenset(f"{string.ascii_letters}{string.digits}_".encode())


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


def token_dtype(vocab_size: int) -> str:
    """The narrowest dtype a cache stores ids 0..vocab_size-1 in."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def safe_chunks(data: np.ndarray, max_bytes: int = COPY_CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    """[start, stop) pieces of `data` (uint8, e.g. a memory-mapped split) of at most `max_bytes`.

    Cuts fall after a newline that is followed by an ASCII word character: the cl100k split
    pattern always cuts there and looks no further across it (see `multibyte.bpe`), so encoding
    the pieces one by one gives exactly the ids of encoding the whole. A stretch of `max_bytes`
    without such a place is cut before a UTF-8 lead byte instead (still an exact round trip;
    only the ids at that one place may differ from a whole-text encoding).
    """
    total, start = len(data), 0
    while total - start > max_bytes:
        window = bytes(data[start : start + max_bytes + 1])  # one byte more: what follows a newline
        cut = window.rfind(b"\n", 0, max_bytes)
        while cut >= 0 and window[cut + 1] not in _WORD_BYTES:
            cut = window.rfind(b"\n", 0, cut)
        if cut >= 0:
            stop = cut + 1
        else:  # before the last byte that is not a UTF-8 continuation byte (10xxxxxx)
            stop = next((i for i in range(max_bytes, 0, -1) if window[i] & 0xC0 != 0x80), max_bytes)
        yield start, start + stop
        start += stop
    if start < total:
        yield start, total


class TextDataModule(ByteStreamDataModule):
    """UTF-8 (or any) text as a byte stream, or as BPE token ids. See the module docstring for the
    accepted layouts and the token cache.

    Args:
        data_path: a text file, a folder of .txt files, or a folder with train/, validation/ and
            test/ subfolders of .txt files; None uses the embedded sample (two Gutenberg books).
        seq_len: symbols per window: bytes, or tokens with tokenizer="bpe".
        batch_size, eval_batch_size, num_workers, cache_dir, train_windows_per_epoch, split_seed:
            see `ByteStreamDataModule` (split_seed is unused: text splits are contiguous).
        tokenizer: "bytes" serves the raw bytes (256 symbols); "bpe" trains a byte-level BPE
            tokenizer on the training split and serves token ids, batches (tokens, lengths,
            byte_counts).
        vocab_size: with "bpe", the tokenizer's vocabulary (special token and 256 byte tokens
            included), and the data's `spec.vocab_size`, which the model's vocab_size must equal.
            The spec is known before any data is read, so it is this configured size even when the
            training text runs out of pairs to merge first: the trained tokenizer is then smaller,
            and the ids it never produces are rows of the model's embedding and head that training
            never sees (sampling never draws them). Unused with "bytes".
        validation_files, test_files: names of .txt files directly inside the `data_path` folder
            that form the validation and test splits (whole files, in the order given); all other
            .txt files of the folder are the training split. Give both or neither.
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
        tokenizer: Literal["bytes", "bpe"] = "bytes",
        vocab_size: int = 4096,
        validation_files: Optional[list[str]] = None,
        test_files: Optional[list[str]] = None,
    ) -> None:
        if (validation_files is None) != (test_files is None):
            raise ValueError("validation_files and test_files: give both (whole held-out files) or neither")
        for flag, names in (("validation_files", validation_files), ("test_files", test_files)):
            if names is not None and not names:
                raise ValueError(f"{flag}: empty list; name at least one .txt file of data_path")
        if validation_files is not None and set(validation_files) & set(test_files):
            overlap = sorted(set(validation_files) & set(test_files))
            raise ValueError(f"validation_files and test_files both name {overlap}")
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
        if tokenizer == "bpe" and not 256 + len(SPECIAL_TOKENS) <= vocab_size < 1 << 31:
            raise ValueError(
                f"vocab_size must hold the 256 byte tokens and {len(SPECIAL_TOKENS)} special token "
                f"(at least {256 + len(SPECIAL_TOKENS)}), got {vocab_size}"
            )
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
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.validation_files = list(validation_files) if validation_files is not None else None
        self.test_files = list(test_files) if test_files is not None else None
        self._train_sha256: Optional[str] = None
        self._token_folder: Optional[Path] = None
        self._token_manifest: Optional[dict[str, Any]] = None
        self._subword: Optional[BPETokenizer] = None

    def _spec_fields(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size} if self.tokenizer == "bpe" else {}

    def _default_source(self) -> Path:
        return EMBEDDED_TEXT

    def _layout(self, source: Path) -> Union[list[Path], dict[str, list[Path]]]:
        """Files of one stream to split (a list), or each split's own files (a dict, PG-19 layout)."""
        if self.validation_files is not None:
            return self._held_out_layout(source)
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

    def _held_out_layout(self, source: Path) -> dict[str, list[Path]]:
        """Each split's files when validation_files / test_files name whole files of `source`."""
        if not source.is_dir():
            raise DataError(f"{source}: validation_files/test_files need data_path to be a folder of .txt files")
        files = text_files_in(source)
        by_name = {path.name: path for path in files}
        layout = {}
        for split, flag, names in (
            ("validation", "validation_files", self.validation_files),
            ("test", "test_files", self.test_files),
        ):
            missing = [name for name in names if name not in by_name]
            if missing:
                raise DataError(f"{source}: {flag} names {missing}, not .txt files of this folder")
            layout[split] = [by_name[name] for name in names]
        held_out = set(self.validation_files) | set(self.test_files)
        layout["train"] = [path for path in files if path.name not in held_out]
        if not layout["train"]:
            raise DataError(f"{source}: every .txt file is held out; nothing is left to train on")
        return {split: layout[split] for split in SPLITS}

    def _source_files(self, source: Path) -> list[Path]:
        layout = self._layout(source)
        return layout if isinstance(layout, list) else [path for split in SPLITS for path in layout[split]]

    def _codec_params(self) -> dict[str, Any]:
        # No codec: bytes are copied. The split rule's constants decide which bytes go where.
        params = {
            "standard_split_min_bytes": STANDARD_SPLIT_MIN_BYTES,
            "standard_eval_split_bytes": STANDARD_EVAL_SPLIT_BYTES,
        }
        if self.validation_files is not None:
            params["held_out"] = {"validation": self.validation_files, "test": self.test_files}
        return params

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

    # -- subword text: the tokenizer and the token cache ------------------------------------------

    def prepare_data(self) -> None:
        """The byte splits (see `ByteStreamDataModule.prepare_data`), then with tokenizer="bpe" the
        tokenizer and the token splits, under the same guarantees (a lock, atomic files, the
        manifest last)."""
        super().prepare_data()
        if self.tokenizer == "bpe":
            self._prepare_tokens()

    def train_sha256(self) -> str:
        """SHA-256 (hex) of the training split's bytes: from the cache's manifest, or (a cache
        written before manifests held it) read once from train.bin."""
        if self._train_sha256 is None:
            recorded = self.manifest["splits"]["train"].get("sha256")
            if recorded is None:
                digest = hashlib.sha256()
                data = self.byte_split("train")
                for start in range(0, len(data), COPY_CHUNK_BYTES):
                    digest.update(data[start : start + COPY_CHUNK_BYTES])
                recorded = digest.hexdigest()
            self._train_sha256 = recorded
        return self._train_sha256

    def tokenizer_inputs(self) -> dict[str, Any]:
        """Everything the tokenizer and the token ids depend on besides the byte splits themselves
        (the token folder lives inside their cache folder): its hash names the token folder."""
        return {
            "format_version": TOKEN_CACHE_FORMAT_VERSION,
            "train_sha256": self.train_sha256(),
            "vocab_size": self.vocab_size,
            "special_tokens": list(SPECIAL_TOKENS),
            "split_pattern": CL100K_PATTERN,
            "tokenizers_version": tokenizers.__version__,
        }

    @property
    def token_folder(self) -> Path:
        """`<byte cache folder>/bpe-<hash of tokenizer_inputs()>` (needs the byte cache)."""
        if self.tokenizer != "bpe":
            raise ValueError("token_folder: this TextDataModule serves bytes (tokenizer='bytes')")
        if self._token_folder is None:
            inputs = json.dumps(self.tokenizer_inputs(), sort_keys=True).encode("utf-8")
            self._token_folder = self.cache_folder / f"bpe-{hashlib.sha256(inputs).hexdigest()[:16]}"
        return self._token_folder

    def _train_documents(self) -> Iterator[bytes]:
        """The training split as the tokenizer learns from it: one document per source file (a
        file cut by the split counts up to the cut), each in `safe_chunks`."""
        data = self.byte_split("train")
        starts = self._train_document_starts(len(data))
        for start, stop in zip(starts, starts[1:] + [len(data)]):
            for first, last in safe_chunks(data[start:stop]):
                yield bytes(data[start + first : start + last])

    def _train_document_starts(self, train_bytes: int) -> list[int]:
        """Offsets in the training split where a source file begins ([0] for a single file)."""
        source = self.source
        layout = self._layout(source)
        if isinstance(layout, dict):
            sizes, total = [path.stat().st_size for path in layout["train"]], train_bytes
        elif source.is_dir():
            sizes, total = [path.stat().st_size for path in layout], sum(map(self.split_num_bytes, SPLITS))
        else:
            return [0]
        if sum(sizes) != total:  # the files changed since the cache was written: one document
            return [0]
        starts = np.cumsum([0] + sizes[:-1]).tolist()
        return sorted({start for start in starts if start < train_bytes} | {0})

    def _prepare_tokens(self) -> None:
        folder = self.token_folder
        if (folder / MANIFEST_NAME).is_file():
            return
        with CacheLock(folder):
            if (folder / MANIFEST_NAME).is_file():
                return  # another process completed it while this one waited
            folder.mkdir(exist_ok=True)
            _clear_token_folder(folder)
            try:
                tokenizer = train_bpe(self._train_documents(), self.vocab_size, SPECIAL_TOKENS)
                if tokenizer.vocab_size > self.vocab_size:  # train_bpe never grows past what it is asked
                    raise RuntimeError(f"trained {tokenizer.vocab_size} ids, more than vocab_size={self.vocab_size}")
                tokenizer.save(folder / TOKENIZER_FILE)
                with CacheWriter(folder, token_dtype(self.vocab_size)) as writer:
                    for split in SPLITS:
                        data = self.byte_split(split)
                        for start, stop in safe_chunks(data):
                            chunk = bytes(data[start:stop])
                            ids = tokenizer.encode_array(chunk, allowed_special="all")
                            if tokenizer.decode(ids) != chunk:  # the tokenizer's promise, checked on the data
                                raise DataError(
                                    f"{self.cache_folder / f'{split}.bin'}: bytes {start}..{stop} do not survive "
                                    f"BPE encoding and decoding"
                                )
                            writer.append_tokens(split, ids, len(chunk))
                    writer.commit(
                        {
                            **self.tokenizer_inputs(),
                            "source": str(self.source),
                            "byte_cache": str(self.cache_folder),
                            "tokenizer": {"vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint()},
                        }
                    )
            except BaseException:
                _clear_token_folder(folder)
                try:
                    folder.rmdir()  # only succeeds when empty
                except OSError:
                    pass
                raise

    @property
    def token_manifest(self) -> dict[str, Any]:
        """The token folder's manifest.json (preparing the data first if needed)."""
        if self._token_manifest is None:
            path = self.token_folder / MANIFEST_NAME
            if not path.is_file():
                self.prepare_data()
            self._token_manifest = json.loads(path.read_text(encoding="utf-8"))
        return self._token_manifest

    def subword_tokenizer(self) -> Optional[BPETokenizer]:
        if self.tokenizer != "bpe":
            return None
        if self._subword is None:
            self.token_manifest  # prepares the data when needed
            path = self.token_folder / TOKENIZER_FILE
            try:
                tokenizer = BPETokenizer.load(path)
            except (OSError, ValueError) as error:
                raise DataError(f"{error}; delete {self.token_folder} to rebuild it") from None
            if tokenizer.fingerprint() != self.token_manifest["tokenizer"]["fingerprint"]:
                raise DataError(f"{path}: not the tokenizer the cache was encoded with; delete {self.token_folder}")
            self._subword = tokenizer
        return self._subword

    def prepared_subword_tokenizer(self) -> Optional[BPETokenizer]:
        if self.tokenizer != "bpe" or not (self.cache_folder / MANIFEST_NAME).is_file():
            return None
        if not (self.token_folder / MANIFEST_NAME).is_file():
            return None
        return self.subword_tokenizer()

    def split_num_tokens(self, split: str) -> int:
        """Token ids in `split` (tokenizer="bpe")."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return int(self.token_manifest["splits"][split]["num_tokens"])

    def _split_file(self, split: str) -> tuple[Path, Optional[TokenFormat]]:
        if self.tokenizer != "bpe":
            return super()._split_file(split)
        entry = self.token_manifest["splits"][split]
        if entry["num_bytes"] != self.split_num_bytes(split):
            raise DataError(
                f"{self.token_folder}: its {split} ids decode to {entry['num_bytes']} bytes, the split holds "
                f"{self.split_num_bytes(split)}; delete {self.token_folder} to rebuild it"
            )
        path = self.token_folder / f"{split}.bin"
        expected = entry["num_tokens"] * np.dtype(entry["dtype"]).itemsize
        on_disk = path.stat().st_size if path.is_file() else None
        if on_disk != expected:
            raise DataError(
                f"{path}: holds {on_disk} bytes but the manifest says {entry['num_tokens']} {entry['dtype']} ids; "
                f"delete {self.token_folder} to rebuild it"
            )
        lengths = self.subword_tokenizer().token_byte_lengths()
        return path, TokenFormat(int(entry["num_tokens"]), entry["dtype"], lengths)


def _clear_token_folder(folder: Path) -> None:
    """What an unfinished token-cache preparation left in `folder` (a folder without a manifest):
    split temporaries and files, and the tokenizer (also a temporary of `BPETokenizer.save`)."""
    CacheWriter.clear_incomplete(folder)
    if folder.is_dir() and not (folder / MANIFEST_NAME).exists():
        for path in [folder / TOKENIZER_FILE, *folder.glob(f".{TOKENIZER_FILE}.*.tmp")]:
            path.unlink(missing_ok=True)
