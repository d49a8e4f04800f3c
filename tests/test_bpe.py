"""The byte-level BPE tokenizer: hand-derived merges, cl100k pre-tokenisation, special tokens,
exact round trips on arbitrary bytes, persistence, and real books."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from multibyte import bpe
from multibyte.bpe import (
    BYTE_TO_CHAR,
    CHUNK_CHARS,
    ENDOFTEXT,
    BPETokenizer,
    train_bpe,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SPECIAL = ENDOFTEXT.encode()

# ---- the ByteLevel table ------------------------------------------------------------------------


def test_byte_level_table_matches_the_library():
    assert len(set(BYTE_TO_CHAR)) == 256
    assert set(BYTE_TO_CHAR) == set(pre_tokenizers.ByteLevel.alphabet())
    # Every byte that can occur in valid UTF-8 (all but C0, C1, F5..FF): the library spells it the
    # same way. Code points 0..0x7FF cover ASCII, the 2-byte leads C2..DF and all continuation
    # bytes; one character per 3- and 4-byte lead covers E0..EF and F0..F4.
    chars = [chr(c) for c in range(0x800)] + [chr(max(lead << 12, 0x800)) for lead in range(16)]
    chars += [chr(c) for c in (0x10000, 0x40000, 0x80000, 0xC0000, 0x100000)]
    text = "".join(chars)
    [(spelled, _)] = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert spelled == "".join(BYTE_TO_CHAR[b] for b in text.encode())
    assert {b for c in chars for b in c.encode()} == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}


# ---- a worked example ---------------------------------------------------------------------------
#
# Corpus: one-word documents "cat" x10, "cats" x5, "bat" x12, "bad" x4 (each word is one
# pre-tokenisation piece: letters only, no leading space). Initial pair counts:
#   c-a 10+5 = 15    a-t 10+5+12 = 27    t-s 5    b-a 12+4 = 16    a-d 4
# merge 1: (a, t) -> "at"   (27)  words: c|at x10, c|at|s x5, b|at x12, b|a|d x4
#   pairs: c-at 15, at-s 5, b-at 12, b-a 4, a-d 4
# merge 2: (c, at) -> "cat" (15)  words: cat x10, cat|s x5, b|at x12, b|a|d x4
#   pairs: cat-s 5, b-at 12, b-a 4, a-d 4
# merge 3: (b, at) -> "bat" (12)  pairs: cat-s 5, b-a 4, a-d 4
# merge 4: (cat, s) -> "cats" (5) pairs: b-a 4, a-d 4  <- the first tie
# Every choice up to here is strict, so the vocabulary of 1 special + 256 bytes + 4 merges = 261
# is fixed by the counts alone. Ids: <|endoftext|> 0, bytes 1..256, then at 257, cat 258, bat 259,
# cats 260 (in merge order).
# Encoding "cats bat bad": cl100k pieces "cats", " bat", " bad"; merges apply by rank:
#   "cats": c a t s -> c at s -> cat s -> cats                       = [cats]
#   " bat": ' ' b a t -> ' ' b at -> ' ' bat                         = [' ', bat]
#   " bad": ' ' b a d (no learned pair)                              = [' ', b, a, d]
WORKED_CORPUS = [b"cat"] * 10 + [b"cats"] * 5 + [b"bat"] * 12 + [b"bad"] * 4


def test_worked_example_merges_and_encoding():
    tokenizer = train_bpe(WORKED_CORPUS, vocab_size=261)
    assert tokenizer.vocab_size == 261
    assert tokenizer.special_tokens == {ENDOFTEXT: 0}
    assert [tokenizer.token_bytes(id) for id in range(257, 261)] == [b"at", b"cat", b"bat", b"cats"]
    assert sorted(tokenizer.token_bytes(id) for id in range(1, 257)) == [bytes([b]) for b in range(256)]

    ids = tokenizer.encode(b"cats bat bad")
    assert [tokenizer.token_bytes(id) for id in ids] == [b"cats", b" ", b"bat", b" ", b"b", b"a", b"d"]
    assert ids[0] == 260 and ids[2] == 259


def test_ties_are_broken_deterministically():
    # A fifth merge must choose between the tied pairs (b, a) and (a, d), 4 each. The `tokenizers`
    # trainer orders equal counts by the pair's ids, smaller first: id(a) < id(b), so (a, d) wins.
    first = train_bpe(WORKED_CORPUS, vocab_size=262)
    second = train_bpe(list(reversed(WORKED_CORPUS)), vocab_size=262)
    assert first.token_bytes(261) == second.token_bytes(261) == b"ad"
    assert first.fingerprint() == second.fingerprint()


def test_small_corpus_stops_short_of_the_requested_vocabulary():
    tokenizer = train_bpe([b"abab"], vocab_size=1000)
    assert tokenizer.vocab_size == 257 + 2  # a-b, then ab-ab: nothing else to merge
    assert tokenizer.token_bytes(tokenizer.vocab_size - 1) == b"abab"


def test_training_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size=200 is too small"):
        train_bpe([b"abc"], vocab_size=200)
    with pytest.raises(ValueError, match="distinct non-empty"):
        train_bpe([b"abc"], special_tokens=[ENDOFTEXT, ENDOFTEXT])
    with pytest.raises(TypeError, match="bytes, not str"):
        train_bpe(["abc"])


# ---- pre-tokenisation ---------------------------------------------------------------------------


def test_cl100k_pre_tokenisation():
    tokenizer = train_bpe(WORKED_CORPUS, vocab_size=261)
    cases = {
        b"Hello world 1234567": [b"Hello", b" world", b" ", b"123", b"456", b"7"],
        b"I'm here  now\r\n\r\nNext": [b"I", b"'m", b" here", b" ", b" now", b"\r\n\r\n", b"Next"],
        b"They'LL go... Done!\nOK": [b"They", b"'LL", b" go", b"...", b" Done", b"!\n", b"OK"],
        # Invalid UTF-8 (Latin-1 e-acute) stands alone; valid text around it is split as usual.
        b"caf\xe9 ok": [b"caf", b"\xe9", b" ok"],
        " 中文 über".encode(): [" 中文".encode(), " über".encode()],
    }
    for text, pieces in cases.items():
        assert tokenizer.pre_tokenize(text) == pieces, text


# ---- special tokens -----------------------------------------------------------------------------


def test_special_token_is_never_merged_and_must_be_allowed():
    # 300 documents joined by the separator: without cutting it out of the training text, its
    # pieces "<|", "endoftext", "|>" would be among the most frequent and get merged.
    documents = [f"Document {i} says hello to the reader.".encode() for i in range(300)]
    tokenizer = train_bpe([SPECIAL.join(documents)], vocab_size=400)
    assert tokenizer.vocab_size == 400
    for id in range(tokenizer.vocab_size):
        if id != tokenizer.special_tokens[ENDOFTEXT]:
            token = tokenizer.token_bytes(id)
            assert b"<|" not in token and b"|>" not in token and b"endof" not in token, token

    data = b"first<|endoftext|> second"
    with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>' \(at byte 5\)"):
        tokenizer.encode(data)
    for allowed in ({ENDOFTEXT}, [ENDOFTEXT], "all"):
        ids = tokenizer.encode(data, allowed_special=allowed)
        assert ids.count(tokenizer.special_tokens[ENDOFTEXT]) == 1
        assert tokenizer.decode(ids) == data
    with pytest.raises(ValueError, match="not special tokens"):
        tokenizer.encode(data, allowed_special={"<|bos|>"})
    with pytest.raises(ValueError, match="must be 'all' or a collection"):
        tokenizer.encode(data, allowed_special=ENDOFTEXT)  # a bare string is not a set of tokens
    assert tokenizer.special_tokens[ENDOFTEXT] not in tokenizer.encode(b"<|endoftext| is not it")


# ---- exact round trips on arbitrary bytes -------------------------------------------------------

# A small multilingual corpus so that merges include multi-byte characters, digits, newlines.
MIXED_TEXT = (
    "The quick brown fox jumps over the lazy dog. Über naïve café crème, 12345 + 678 = 13023!\n"
    "中文文本的字节对编码。中文很好。\r\nEmoji 😀😀 and tabs\tand  spaces   here.\n"
)


@pytest.fixture(scope="module")
def mixed_tokenizer() -> BPETokenizer:
    embedded = (REPO_ROOT / "datamodules" / "embedded" / "gutenberg_books.txt").read_bytes()[:50_000]
    return train_bpe([MIXED_TEXT.encode() * 200, embedded, b"caf\xe9 na\xefve"], vocab_size=600)


ALPHABET = "ab Üü中文😀\n\r\t'0123.<|>endoftext\x00\ufeff"
BYTE_STRINGS = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    st.text(alphabet=ALPHABET, max_size=100).map(str.encode),
    # Valid text, invalid bytes, NULs and the special token's string interleaved.
    st.lists(
        st.one_of(
            st.binary(max_size=8),
            st.text(alphabet=ALPHABET, max_size=20).map(str.encode),
            st.just(SPECIAL),
            st.just(b"\xed\xa0\x80"),  # a UTF-16 surrogate in UTF-8 form: invalid
            st.just(b"\x00"),
        ),
        max_size=12,
    ).map(b"".join),
)


@settings(max_examples=300, deadline=None)
@given(data=BYTE_STRINGS)
def test_round_trip_on_arbitrary_bytes(mixed_tokenizer, data):
    special_id = mixed_tokenizer.special_tokens[ENDOFTEXT]
    ids = mixed_tokenizer.encode(data, allowed_special="all")
    assert mixed_tokenizer.decode(ids) == data
    assert ids.count(special_id) == data.count(SPECIAL)
    assert all(0 <= id < mixed_tokenizer.vocab_size for id in ids)
    array = mixed_tokenizer.encode_array(data, allowed_special="all")
    assert array.dtype == np.int32 and array.tolist() == ids
    assert mixed_tokenizer.decode(array) == data
    assert mixed_tokenizer.token_byte_lengths()[array].sum() == len(data)
    if SPECIAL in data:
        with pytest.raises(ValueError, match="special token"):
            mixed_tokenizer.encode(data)
    else:
        assert mixed_tokenizer.encode(data) == ids


def test_merges_shorten_mixed_text(mixed_tokenizer):
    data = MIXED_TEXT.encode()
    ids = mixed_tokenizer.encode(data)
    assert len(ids) < 0.5 * len(data)
    # Multi-byte characters of the hypothesis alphabet below are single tokens.
    for text in ["中文", "😀", "Ü"]:
        assert len(mixed_tokenizer.encode(text.encode())) == 1, text


def test_decode_rejects_ids_outside_the_vocabulary(mixed_tokenizer):
    with pytest.raises(ValueError, match="token id 600 is outside"):
        mixed_tokenizer.decode([1, 600])
    with pytest.raises(ValueError, match="token id -1 is outside"):
        mixed_tokenizer.decode(np.array([-1]))
    with pytest.raises(ValueError, match="outside"):
        mixed_tokenizer.token_bytes(600)
    assert mixed_tokenizer.decode([]) == b"" and mixed_tokenizer.encode(b"") == []


@pytest.mark.parametrize("chunk_chars", [1, CHUNK_CHARS])
def test_chunked_encoding_equals_one_call(monkeypatch, chunk_chars):
    # encode() hands the library pieces of about CHUNK_CHARS, cut after a newline before a word
    # character; the result must equal encoding the whole text in one call. With chunk_chars=1 it
    # cuts at every such newline. Blank, space-only and CR lines, indentation, punctuation, CJK,
    # digits and contractions put the candidate cuts in every context.
    monkeypatch.setattr(bpe, "CHUNK_CHARS", chunk_chars)
    lines = ["  indented", "...dots", "中文行", "42 lines", "Word\r", "", "\tTab", "   ", "'s it", "\r", "x"]
    n_lines = 3 * CHUNK_CHARS // 8 if chunk_chars == CHUNK_CHARS else 200
    numbered = [lines[i % len(lines)] + (f" {i}" if lines[i % len(lines)].strip() else "") for i in range(n_lines)]
    text = "\n".join(numbered)
    assert len(text) > 2 * chunk_chars
    # Trained on this text, the vocabulary holds its whitespace runs ("\n\n", "   \n", ...), so a
    # cut that splits a pre-tokenisation piece changes the ids.
    tokenizer = train_bpe([text.encode()], vocab_size=400)
    whole = tokenizer._tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.encode(text.encode()) == whole


# ---- persistence --------------------------------------------------------------------------------


def test_save_load_round_trip(mixed_tokenizer, tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    mixed_tokenizer.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]  # no temporary left
    loaded = BPETokenizer.load(path)
    assert loaded.fingerprint() == mixed_tokenizer.fingerprint()
    assert loaded.vocab_size == mixed_tokenizer.vocab_size
    assert loaded.special_tokens == mixed_tokenizer.special_tokens
    data = MIXED_TEXT.encode() + b"\xff\xfe" + SPECIAL
    assert loaded.encode(data, allowed_special="all") == mixed_tokenizer.encode(data, allowed_special="all")
    smaller = train_bpe(WORKED_CORPUS, vocab_size=260)
    assert smaller.fingerprint() != train_bpe(WORKED_CORPUS, vocab_size=261).fingerprint()


def test_failed_save_leaves_the_old_file(mixed_tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("previous")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        mixed_tokenizer.save(path)
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: tokenizer file not found")):
        BPETokenizer.load(missing)
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"model": ')
    with pytest.raises(ValueError, match=re.escape(f"{malformed}: not a valid tokenizer.json")):
        BPETokenizer.load(malformed)
    # A well-formed tokenizer of another kind (word-level, no ByteLevel stage) cannot round-trip bytes.
    other = tmp_path / "wordlevel.json"
    Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(str(other))
    with pytest.raises(ValueError, match=re.escape(f"{other}: not a byte-level BPE tokenizer") + ".*WordLevel"):
        BPETokenizer.load(other)
    # GPT-2's layout (ByteLevel with its own regex) encodes differently: refused, not half-supported.
    gpt2 = tmp_path / "gpt2.json"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.save(str(gpt2))
    with pytest.raises(ValueError, match=re.escape(f"{gpt2}: not a byte-level BPE tokenizer") + ".*cl100k"):
        BPETokenizer.load(gpt2)


# ---- real books (../shared/data; skipped when absent) -------------------------------------------

TRAINING_BOOKS = ["devils_dictionary", "jack_sheppard", "news_from_nowhere", "pride_and_prejudice"]


@pytest.fixture(scope="module")
def book_tokenizer(shared_data) -> BPETokenizer:
    return train_bpe([(shared_data / "text" / f"{name}.txt").read_bytes() for name in TRAINING_BOOKS], vocab_size=4096)


def test_held_out_book_compresses_to_well_below_one_token_per_byte(book_tokenizer, shared_data):
    assert book_tokenizer.vocab_size == 4096
    data = (shared_data / "text" / "katrine.txt").read_bytes()
    ids = book_tokenizer.encode_array(data)
    tokens_per_byte = len(ids) / len(data)
    assert tokens_per_byte < 0.4, tokens_per_byte
    # The bytes a scorer counts are exactly the book's.
    assert book_tokenizer.token_byte_lengths()[ids].sum() == len(data)
    # Pieces never straddle: every pre-tokenisation boundary is a token boundary.
    head = data[:20_000]
    token_ends = set(np.cumsum([len(book_tokenizer.token_bytes(id)) for id in book_tokenizer.encode(head)]).tolist())
    piece_ends = set(np.cumsum([len(piece) for piece in book_tokenizer.pre_tokenize(head)]).tolist())
    assert piece_ends <= token_ends


def test_round_trip_on_every_book(book_tokenizer, shared_data):
    paths = sorted((shared_data / "text").glob("*.txt")) + [shared_data / "text_zh" / "tang_poems.txt"]
    assert any(b"\xe9" in path.read_bytes() for path in paths)  # a Latin-1 book is among them
    for path in paths:
        data = path.read_bytes()
        assert book_tokenizer.decode(book_tokenizer.encode_array(data)) == data, path.name
