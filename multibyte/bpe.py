"""Byte-level BPE: the subword baseline's tokenizer, exact on any bytes.

The vocabulary is learned by the `tokenizers` library (its BPE trainer and encoder; nothing here
merges pairs by hand) with GPT-4's pre-tokenisation: text is first cut by the cl100k split pattern
(contractions, letter runs with one leading non-letter such as " word", digits in groups of at most
3, punctuation runs, newline runs, other whitespace), each piece's UTF-8 bytes are spelled as
printable characters by the ByteLevel table, and merges never cross a piece. The 256 single-byte
tokens are always in the vocabulary.

The models in this suite read raw bytes, which need not be UTF-8 (the Gutenberg books include
Latin-1 ones). So the byte stream is cut into maximal valid-UTF-8 runs and single invalid bytes:
valid runs go through the tokenizer, an invalid byte becomes its single-byte token. Decoding maps
every token back to its bytes through the inverse ByteLevel table (never through UTF-8), so
decode(encode(x)) == x for every byte string x.

Special tokens (by default `<|endoftext|>`, placed between documents) follow tiktoken: text that
contains a special token's string is refused unless that token is passed in `allowed_special`,
in which case it encodes to the special id.

    tokenizer = train_bpe(documents, vocab_size=4096)      # documents: iterable of bytes
    ids = tokenizer.encode(data)                            # list[int]; encode_array -> np.int32
    assert tokenizer.decode(ids) == data
    tokenizer.save(run_dir / TOKENIZER_FILE); BPETokenizer.load(run_dir / TOKENIZER_FILE)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, Union

import numpy as np
from multibyte.atomic_files import write_atomically
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# GPT-4's (cl100k_base) pre-tokenisation pattern, in the regex dialect `tokenizers` compiles.
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # English contractions
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"  # a letter run with at most one leading non-letter (" word")
    r"|\p{N}{1,3}"  # digits, at most 3 to a piece
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"  # punctuation run (one leading space), trailing newlines
    r"|\s*[\r\n]+"  # whitespace ending in newlines
    r"|\s+(?!\S)"  # whitespace, leaving the last space to the next word
    r"|\s+"
)
ENDOFTEXT = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096
AllowedSpecial = Union[Collection[str], Literal["all"]]  # special tokens encode() may meet in its input
TOKENIZER_FILE = "tokenizer.json"  # the name a run saves its tokenizer under, next to its checkpoints

# Valid text is cut into pieces of about this many characters for `encode_batch` (parallel in Rust,
# one Python call per input); cuts fall only where the split pattern always cuts (see _cut_text).
CHUNK_CHARS = 1 << 14


def _byte_level_table() -> tuple[str, ...]:
    """The ByteLevel byte -> character table (the one GPT-2 introduced and `tokenizers` uses).

    Bytes that are printable Latin-1 characters other than the soft hyphen ('!'..'~', '¡'..'¬',
    '®'..'ÿ') stand for themselves; the other 68 (controls, space, DEL, NBSP, soft hyphen) are
    given the characters U+0100, U+0101, ... in byte order, so every token prints as visible text
    (space is 'Ġ', newline 'Ċ').
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    for extra, byte in enumerate(b for b in range(256) if b not in table):
        table[byte] = chr(256 + extra)
    return tuple(table[byte] for byte in range(256))


BYTE_TO_CHAR: tuple[str, ...] = _byte_level_table()
CHAR_TO_BYTE: dict[str, int] = {char: byte for byte, char in enumerate(BYTE_TO_CHAR)}

# With errors="surrogateescape", every byte that is not part of valid UTF-8 decodes to the lone
# surrogate U+DC00 + byte (always U+DC80..U+DCFF: ASCII bytes are always valid). Valid UTF-8 never
# decodes to a surrogate, so these characters are exactly the invalid bytes.
_INVALID_BYTE = re.compile("[\udc80-\udcff]")
# A newline followed by a word character: no piece of the split pattern contains a newline followed
# by anything but whitespace, so the pattern cuts here whatever surrounds it; as nothing in it looks
# behind, or ahead past such a cut, encoding the two sides separately gives the same tokens as
# encoding them together.
_SAFE_CUT = re.compile(r"\n(?=\w)")


def _cut_text(text: str, start: int, end: int, out: list[Union[str, int]]) -> None:
    """Append text[start:end] to `out` as pieces of about CHUNK_CHARS, cut only at _SAFE_CUT."""
    while end - start > CHUNK_CHARS:
        cut = _SAFE_CUT.search(text, start + CHUNK_CHARS, end)
        if cut is None:
            break
        out.append(text[start : cut.end()])
        start = cut.end()
    if start < end:
        out.append(text[start:end])


def _segments(data: bytes) -> list[Union[str, int]]:
    """`data` in order as valid UTF-8 text (str pieces) and invalid bytes (int, one per byte)."""
    text = data.decode("utf-8", errors="surrogateescape")
    out: list[Union[str, int]] = []
    start = 0
    for invalid in _INVALID_BYTE.finditer(text):
        _cut_text(text, start, invalid.start(), out)
        out.append(ord(invalid.group()) - 0xDC00)
        start = invalid.end()
    _cut_text(text, start, len(text), out)
    return out


class BPETokenizer:
    """A trained byte-level BPE tokenizer: ids 0..vocab_size-1, each standing for a fixed byte string.

    Wraps a `tokenizers.Tokenizer` whose vocabulary holds all 256 single-byte tokens, with no
    normaliser; build one with `train_bpe` or `BPETokenizer.load`.
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "the tokenizer") -> None:
        # `source` names the tokenizer in errors (the file it was loaded from).
        config = json.loads(tokenizer.to_str())
        problem = _unsupported(config)
        if problem:
            raise ValueError(f"{source}: not a byte-level BPE tokenizer this suite can use: {problem}")
        self._tokenizer = tokenizer
        self._json = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

        added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken
        self.special_tokens: dict[str, int] = {token.content: i for i, token in sorted(added.items())}
        """Special token string -> id."""
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        """Number of ids; they are 0..vocab_size-1 (may be below the size asked of `train_bpe` when
        the training text runs out of pairs to merge)."""

        # id -> the bytes it stands for; (256,) id of each single-byte token.
        token_bytes: list[bytes] = []
        for token_id in range(self.vocab_size):
            token = tokenizer.id_to_token(token_id)
            if token is None:
                raise ValueError(f"{source}: no token has id {token_id} (ids must run 0..{self.vocab_size - 1})")
            if token_id in added:
                token_bytes.append(token.encode("utf-8"))
            elif all(char in CHAR_TO_BYTE for char in token):
                token_bytes.append(bytes(CHAR_TO_BYTE[char] for char in token))
            else:
                raise ValueError(f"{source}: token {token_id} ({token!r}) is not spelled in the ByteLevel alphabet")
        self._token_bytes = token_bytes
        missing = [byte for byte in range(256) if tokenizer.token_to_id(BYTE_TO_CHAR[byte]) is None]
        if missing:
            raise ValueError(f"{source}: the vocabulary lacks single-byte tokens for bytes {missing[:8]}...")
        self._byte_ids = [tokenizer.token_to_id(BYTE_TO_CHAR[byte]) for byte in range(256)]

    # ---- encoding -------------------------------------------------------------------------------

    def encode(self, data: bytes, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of `data` (any bytes); decode(encode(data)) == data.

        `data` containing the string of a special token raises ValueError unless that token is in
        `allowed_special` (or it is "all"), in which case the string encodes to the special id.
        """
        return list(itertools.chain.from_iterable(self._encode_pieces(data, allowed_special)))

    def encode_array(self, data: bytes, allowed_special: AllowedSpecial = ()) -> np.ndarray:
        """`encode` as an (n_tokens,) int32 array, without an intermediate list of the whole text."""
        pieces = self._encode_pieces(data, allowed_special)
        total = sum(len(piece) for piece in pieces)
        return np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=total)

    def _encode_pieces(self, data: bytes, allowed_special: AllowedSpecial) -> list[list[int]]:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"BPETokenizer.encode takes bytes, not {type(data).__name__}")
        data = bytes(data)
        self._check_special(data, allowed_special)
        segments = _segments(data)
        # All valid-text pieces in one encode_batch call; invalid bytes map to their byte token.
        texts = [segment for segment in segments if isinstance(segment, str)]
        encodings = iter(self._tokenizer.encode_batch(texts, add_special_tokens=False))
        return [
            next(encodings).ids if isinstance(segment, str) else [self._byte_ids[segment]]
            for segment in segments
        ]

    def _check_special(self, data: bytes, allowed_special: AllowedSpecial) -> None:
        """Raise ValueError when `data` holds a special token's string that is not allowed."""
        if isinstance(allowed_special, str) and allowed_special != "all":
            raise ValueError(f"allowed_special must be 'all' or a collection of token strings, not {allowed_special!r}")
        allowed = self.special_tokens.keys() if allowed_special == "all" else set(allowed_special)
        unknown = sorted(set(allowed) - self.special_tokens.keys())
        if unknown:
            raise ValueError(
                f"allowed_special names {unknown}, which are not special tokens of this tokenizer "
                f"({list(self.special_tokens)})"
            )
        for token in self.special_tokens:
            if token in allowed:
                continue
            at = data.find(token.encode("utf-8"))
            if at >= 0:
                raise ValueError(
                    f"the input contains the special token {token!r} (at byte {at}); pass "
                    f"allowed_special={{{token!r}}} to encode it as id {self.special_tokens[token]}, "
                    f"or remove it from the text"
                )

    def pre_tokenize(self, data: bytes) -> list[bytes]:
        """The pieces BPE merges within, as bytes: split-pattern pieces of each valid UTF-8 run and
        each invalid byte alone (special token strings are not set apart here)."""
        pieces: list[bytes] = []
        for segment in _segments(data):
            if isinstance(segment, int):
                pieces.append(bytes([segment]))
                continue
            for piece, _ in self._tokenizer.pre_tokenizer.pre_tokenize_str(segment):
                pieces.append(bytes(CHAR_TO_BYTE[char] for char in piece))
        return pieces

    # ---- decoding -------------------------------------------------------------------------------

    def decode(self, ids: Union[Sequence[int], np.ndarray]) -> bytes:
        """The bytes the ids stand for, concatenated (special tokens give their string's bytes)."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if len(ids) and not (0 <= min(ids) and max(ids) < self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return b"".join([self._token_bytes[i] for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for (what it adds to a decoded text; scoring counts these)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._token_bytes[token_id]

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: len(token_bytes(i)) per id i, so lengths[ids].sum() is the byte count
        of a decoded id sequence (the denominator of bits per byte)."""
        return np.array([len(token) for token in self._token_bytes], dtype=np.int64)

    # ---- persistence ----------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the tokenizer's JSON in a canonical form: equal for equal tokenizers,
        across save/load, so it can key caches of encoded data."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        """The tokenizer as `tokenizers` JSON text (what `save` writes; `from_json` reads it back),
        e.g. to store it inside a model checkpoint."""
        return self._tokenizer.to_str()

    @classmethod
    def from_json(cls, text: str, source: str = "the tokenizer") -> BPETokenizer:
        """A tokenizer from `to_json` text; ValueError naming `source` when it is not one."""
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as error:  # the Rust side raises plain Exception for any parse error
            raise ValueError(f"{source}: not a valid tokenizer.json ({error})") from None
        return cls(tokenizer, source=source)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the tokenizer's JSON (the `tokenizers` format) to `path` atomically (see
        `multibyte.atomic_files`); parent folders are created."""
        write_atomically(path, self._tokenizer.to_str().encode("utf-8"))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> BPETokenizer:
        """Read a tokenizer written by `save`; a missing file raises FileNotFoundError, a file that
        is not such a tokenizer raises ValueError, both naming the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: tokenizer file not found") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: cannot read the tokenizer file ({error})") from None
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as error:  # the Rust side raises plain Exception for any parse error
            raise ValueError(f"{path}: not a valid tokenizer.json ({error})") from None
        return cls(tokenizer, source=str(path))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, special_tokens={list(self.special_tokens)})"


def _unsupported(config: dict) -> str:
    """Why a tokenizer's JSON config breaks exact byte round trips ('' when it does not)."""
    model = config.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')!r}, not BPE"
    if model.get("dropout"):
        return "it uses BPE dropout (encoding would be random)"
    if config.get("normalizer") is not None:
        return "it has a normalizer (text would not survive encoding unchanged)"
    # Exactly train_bpe's pre-tokenizer: encode()'s chunking is exact only for the cl100k pattern.
    pre_tokenizer = config.get("pre_tokenizer") or {}
    stages = pre_tokenizer.get("pretokenizers") or [{}, {}]
    split, byte_level = stages if pre_tokenizer.get("type") == "Sequence" and len(stages) == 2 else ({}, {})
    if not (
        split.get("type") == "Split"
        and split.get("pattern") == {"Regex": CL100K_PATTERN}
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("add_prefix_space")
        and not byte_level.get("use_regex")
    ):
        return "its pre-tokenizer is not the cl100k split pattern followed by ByteLevel (no prefix space, no regex)"
    if any(not token.get("special") for token in config.get("added_tokens") or []):
        return "it has added tokens that are not special tokens"
    return ""


def _training_texts(texts: Iterable[bytes], special_tokens: Sequence[str]) -> Iterator[str]:
    """The valid-UTF-8 pieces of every document, with special token strings cut out (a document
    that contains one is treated as two documents)."""
    pattern = b"|".join(re.escape(token.encode("utf-8")) for token in special_tokens)
    separator = re.compile(pattern) if special_tokens else None
    for text in texts:
        if not isinstance(text, (bytes, bytearray, memoryview)):
            raise TypeError(f"train_bpe takes documents as bytes, not {type(text).__name__} (encode text first)")
        for document in separator.split(bytes(text)) if separator else [bytes(text)]:
            yield from (segment for segment in _segments(document) if isinstance(segment, str))


def train_bpe(
    texts: Iterable[bytes],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
) -> BPETokenizer:
    """Learn a byte-level BPE vocabulary of `vocab_size` ids from `texts` (one bytes per document).

    Ids: special tokens first (0, 1, ... in the given order), then the 256 single-byte tokens, then
    one per learned merge, most frequent pair first (ties go to the pair of smaller ids, as the
    `tokenizers` trainer orders them). Merges never cross a document, a pre-tokenisation piece, a
    special token's string or an invalid UTF-8 byte; special tokens are never merged.
    """
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens) or not all(isinstance(t, str) and t for t in special_tokens):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the 256 byte tokens and {len(special_tokens)} special tokens "
            f"need {256 + len(special_tokens)}"
        )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),  # cl100k pieces
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # spell their bytes
    ])
    tokenizer.decoder = decoders.ByteLevel()  # for other users of tokenizer.json; decode() here never uses it
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_texts(texts, special_tokens), trainer=trainer)
    return BPETokenizer(tokenizer)
