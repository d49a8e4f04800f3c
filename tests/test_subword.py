"""The subword baseline: BPE token data in the byte suite's datamodule, bits per BYTE for a model
over tokens, the tokenizer carried by checkpoints and exports, token compression, and every
subcommand (fit, test, bench, sample, compress, decompress, export) on a BPE model."""

import gzip
import json
import math
import os
import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from datamodules import TextDataModule
from datamodules.base import MANIFEST_NAME, SPLITS
from datamodules.text import safe_chunks
from datamodules.windows import EvalShardSampler
from multibyte.bench import run_benchmark, score_bytes
from multibyte.bpe import ENDOFTEXT, TOKENIZER_FILE, BPETokenizer, train_bpe
from multibyte.checkpoints import load_checkpoint
from multibyte.cli import main
from multibyte.compression import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    CompressionError,
    compress_bytes,
    decompress_bytes,
)
from multibyte.config import ModelConfig, StageConfig
from multibyte.model import HierarchicalByteModel
from multibyte.training import ByteLM
from tests.test_adapt import under_coding_threads

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_TEXT = REPO_ROOT / "datamodules" / "embedded" / "gutenberg_books.txt"
VOCAB = 320  # 1 special + 256 bytes + 63 merges: trains in milliseconds on the test texts
SEQ_LEN = 32


def subword_model(vocab_size: int = VOCAB, seed: int = 0) -> HierarchicalByteModel:
    """A tiny GPT-style transformer over tokens (one attention stage), untrained."""
    torch.manual_seed(seed)
    return HierarchicalByteModel(ModelConfig([StageConfig("attention", 32, 1, 2)], vocab_size=vocab_size, max_seq_len=SEQ_LEN)).eval()


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    """40,000 bytes of the embedded books: 90/5/5 leaves 2,000 bytes each to validation and test."""
    path = tmp_path_factory.mktemp("book") / "book.txt"
    path.write_bytes(EMBEDDED_TEXT.read_bytes()[:40_000])
    return path


def bpe_datamodule(source: Path, cache: Path, **overrides) -> TextDataModule:
    settings = dict(seq_len=SEQ_LEN, batch_size=4, eval_batch_size=3, tokenizer="bpe", vocab_size=VOCAB)
    return TextDataModule(data_path=str(source), cache_dir=str(cache), **{**settings, **overrides})


@pytest.fixture(scope="module")
def prepared(book, tmp_path_factory) -> TextDataModule:
    dm = bpe_datamodule(book, tmp_path_factory.mktemp("cache"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def files_under(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in sorted(folder.rglob("*")) if path.is_file()}


# ------------------------------------------------------------------------------------------------
# The datamodule: the tokenizer, the token cache, the windows
# ------------------------------------------------------------------------------------------------


def test_token_splits_decode_to_the_byte_splits_and_are_prepared_once(prepared):
    dm = prepared
    assert dm.spec.vocab_size == VOCAB and dm.spec.seq_len == SEQ_LEN
    folder = dm.token_folder
    assert folder.parent == dm.cache_folder  # inside the byte cache, which bytes mode shares
    assert TextDataModule(data_path=dm.data_path, cache_dir=dm.cache_dir).cache_folder == dm.cache_folder
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [MANIFEST_NAME, TOKENIZER_FILE, "train.bin", "validation.bin", "test.bin"]
    )
    tokenizer = dm.subword_tokenizer()
    assert tokenizer.vocab_size == VOCAB
    manifest = dm.token_manifest
    for split in SPLITS:
        raw = (dm.cache_folder / f"{split}.bin").read_bytes()
        ids = np.fromfile(folder / f"{split}.bin", dtype="<u2")  # the vocabulary fits 16 bits
        assert manifest["splits"][split]["dtype"] == "uint16"
        assert tokenizer.decode(ids) == raw
        assert manifest["splits"][split]["num_tokens"] == len(ids) < len(raw)
        assert manifest["splits"][split]["num_bytes"] == len(raw) == dm.split_num_bytes(split)
    before = files_under(dm.cache_folder)
    dm.prepare_data()
    bpe_datamodule(Path(dm.data_path), Path(dm.cache_dir)).prepare_data()
    assert files_under(dm.cache_folder) == before  # nothing trained or written again


def test_batches_carry_token_ids_and_the_bytes_they_decode_to(prepared):
    dm = prepared
    tokenizer = dm.subword_tokenizer()
    tokens, lengths, byte_counts = next(iter(dm.train_dataloader()))
    assert tokens.dtype == lengths.dtype == byte_counts.dtype == torch.int64
    assert tokens.shape == (4, SEQ_LEN) and (lengths == SEQ_LEN).all()  # seq_len counts tokens
    for row, count in zip(tokens, byte_counts.tolist()):
        assert len(tokenizer.decode(row.numpy())) == count > SEQ_LEN


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_token_and_byte_is_evaluated_once_on_any_number_of_ranks(prepared, world_size, monkeypatch):
    # Each rank's loader, as `_eval_loader` builds it under a trainer with `world_size` processes.
    dm = prepared
    tokenizer = dm.subword_tokenizer()
    for split in ("validation", "test"):
        pieces: dict[int, bytes] = {}  # window index -> the bytes it decodes to
        total_bytes, batches = 0, set()
        for rank in range(world_size):
            monkeypatch.setattr(dm, "_rank_and_world_size", lambda rank=rank: (rank, world_size))
            loader = dm.val_dataloader() if split == "validation" else dm.test_dataloader()
            indices = iter(i for i in EvalShardSampler(len(loader.dataset), rank, world_size))
            batches.add(len(loader))
            for tokens, lengths, byte_counts in loader:
                total_bytes += int(byte_counts.sum())
                for row, length, count in zip(tokens, lengths.tolist(), byte_counts.tolist()):
                    index = next(indices)
                    assert not row[length:].any()
                    if index is None:  # the empty window that evens the ranks out
                        assert length == count == 0
                        continue
                    assert index not in pieces
                    pieces[index] = tokenizer.decode(row[:length].numpy())
                    assert len(pieces[index]) == count
        assert len(batches) == 1  # as many batches on every rank (a sharded model needs it)
        assert sorted(pieces) == list(range(len(pieces)))
        assert b"".join(pieces[i] for i in sorted(pieces)) == bytes(dm.byte_split(split))
        assert total_bytes == dm.split_num_bytes(split)


def test_the_tokenizer_learns_from_the_training_files_only(tmp_path):
    # PG-19 layout: two training files (two documents) and held-out text the tokenizer never sees.
    root = tmp_path / "pg19"
    texts = {
        "train/a.txt": b"the cat sat on the mat. " * 40,
        "train/b.txt": b"a bat and a rat ran. " * 40,
        "validation/c.txt": b"zebras quietly graze. " * 40,
        "test/d.txt": b"quokkas jump joyfully! " * 40,
    }
    for name, data in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    dm = bpe_datamodule(root, tmp_path / "cache", vocab_size=300)
    tokenizer = dm.subword_tokenizer()
    # Exactly the tokenizer of the two training files as two documents: nothing held out was seen.
    expected = train_bpe([texts["train/a.txt"], texts["train/b.txt"]], 300)
    assert tokenizer.fingerprint() == expected.fingerprint()
    # The training text runs out of pairs: fewer ids than configured, the spec keeps the configured size.
    assert tokenizer.vocab_size < 300 and dm.spec.vocab_size == 300


def test_the_token_cache_is_rebuilt_when_its_inputs_change(book, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    dm = bpe_datamodule(book, cache)
    dm.prepare_data()
    first, first_tokenizer = dm.token_folder, dm.subword_tokenizer()
    assert dm.token_manifest["train_sha256"] == dm.manifest["splits"]["train"]["sha256"]

    assert bpe_datamodule(book, cache).token_folder == first
    other_vocab = bpe_datamodule(book, cache, vocab_size=VOCAB + 16)
    assert other_vocab.token_folder != first
    assert other_vocab.subword_tokenizer().vocab_size == VOCAB + 16

    import datamodules.text

    monkeypatch.setattr(datamodules.text.tokenizers, "__version__", "0.0.0-other")
    assert bpe_datamodule(book, cache).token_folder != first
    monkeypatch.undo()

    # Other training bytes under the same byte cache folder (the source rewritten with its size and
    # time kept, and the byte cache rebuilt): a new tokenizer, trained on the new bytes.
    source = tmp_path / "book.txt"
    data = book.read_bytes()
    source.write_bytes(data)
    stat = source.stat()
    dm = bpe_datamodule(source, cache)
    dm.prepare_data()
    before = dm.token_folder
    source.write_bytes(data.replace(b"e", b"E"))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (dm.cache_folder / MANIFEST_NAME).unlink()
    again = bpe_datamodule(source, cache)
    assert again.cache_folder == dm.cache_folder
    again.prepare_data()
    assert again.token_folder != before
    assert b"E" in again.subword_tokenizer().decode(np.fromfile(again.token_folder / "train.bin", dtype="<u2"))
    assert again.subword_tokenizer().fingerprint() != first_tokenizer.fingerprint()


def test_a_failed_token_preparation_leaves_nothing(book, tmp_path, monkeypatch):
    import datamodules.text

    def broken(*args, **kwargs):
        raise RuntimeError("killed while encoding")

    dm = bpe_datamodule(book, tmp_path / "cache")
    monkeypatch.setattr(datamodules.text.CacheWriter, "append_tokens", broken)
    with pytest.raises(RuntimeError, match="killed while encoding"):
        dm.prepare_data()
    assert (dm.cache_folder / MANIFEST_NAME).is_file()  # the byte cache is complete and kept
    assert not dm.token_folder.exists()  # no tokenizer, no partial ids
    monkeypatch.undo()
    dm.prepare_data()
    assert (dm.token_folder / MANIFEST_NAME).is_file()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=400), max_bytes=st.integers(1, 64))
def test_safe_chunks_tile_the_data_and_encode_like_the_whole(data, max_bytes):
    data = data + b"\nWord one\nword two\n" * 3
    array = np.frombuffer(data, dtype=np.uint8)
    pieces = list(safe_chunks(array, max_bytes))
    assert [start for start, _ in pieces] == [0] + [stop for _, stop in pieces[:-1]]
    assert pieces[-1][1] == len(data) and all(0 < stop - start <= max_bytes for start, stop in pieces)


def test_chunked_encoding_equals_whole_text_encoding(prepared):
    tokenizer = prepared.subword_tokenizer()
    data = EMBEDDED_TEXT.read_bytes()[:30_000]
    chunks = [tokenizer.encode(data[a:b]) for a, b in safe_chunks(np.frombuffer(data, np.uint8), 4096)]
    assert len(chunks) > 5
    assert [i for chunk in chunks for i in chunk] == tokenizer.encode(data)


def test_bad_tokenizer_settings_are_one_clear_error(book, tmp_path):
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        TextDataModule(tokenizer="wordpiece")
    with pytest.raises(ValueError, match="vocab_size must hold the 256 byte tokens"):
        TextDataModule(tokenizer="bpe", vocab_size=256)


# ------------------------------------------------------------------------------------------------
# Bits per byte
# ------------------------------------------------------------------------------------------------


def uniform_module(vocab_size: int) -> ByteLM:
    """A ByteLM whose head is zero: every id gets probability 1 / V, log2(V) bits per token."""
    module = ByteLM(ModelConfig([StageConfig("attention", 32, 1, 2)], vocab_size=vocab_size, max_seq_len=SEQ_LEN))
    with torch.no_grad():
        module.model.head.weight.zero_()
    return module.eval()


def test_bits_per_byte_is_total_bits_over_total_bytes_by_hand():
    V = 500
    module = uniform_module(V)
    # Two batches: rows padded past `lengths`, decoding to very different byte counts.
    batches = [
        (torch.randint(0, V, (2, SEQ_LEN)), torch.tensor([SEQ_LEN, 10]), torch.tensor([100, 7])),
        (torch.randint(0, V, (1, SEQ_LEN)), torch.tensor([5]), torch.tensor([40])),
    ]
    with torch.no_grad():
        loss, bpb, num_bytes = module._bits_per_byte(batches[0])
        assert float(loss) == pytest.approx(math.log(V), rel=1e-6)  # the training loss is per token
        assert int(num_bytes) == 107
        assert float(bpb) == pytest.approx(math.log2(V) * (SEQ_LEN + 10) / 107, rel=1e-6)
        with warnings.catch_warnings():  # self.log without a trainer warns; the metric is what counts
            warnings.simplefilter("ignore")
            for index, batch in enumerate(batches):
                module.validation_step(batch, index)
    tokens, total_bytes = SEQ_LEN + 10 + 5, 107 + 40
    assert float(module.val_bpb.compute()) == pytest.approx(math.log2(V) * tokens / total_bytes, rel=1e-6)
    # A byte batch (tokens, lengths): every real symbol is one byte, as before.
    byte_module = uniform_module(256)
    with torch.no_grad():
        _, bpb, num_bytes = byte_module._bits_per_byte((torch.randint(0, 256, (2, SEQ_LEN)), torch.tensor([SEQ_LEN, 3])))
    assert int(num_bytes) == SEQ_LEN + 3 and float(bpb) == pytest.approx(8.0, rel=1e-6)


def test_validation_of_a_split_scores_its_bytes(prepared, tmp_path):
    # Through Lightning: the uniform model's val/bpb on the whole split is log2(V) tokens / bytes.
    from multibyte.trainer import MultibyteTrainer

    dm = prepared
    module = uniform_module(VOCAB)
    trainer = MultibyteTrainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                               enable_model_summary=False, accelerator="cpu", precision="32-true")
    (result,) = trainer.validate(module, datamodule=dm, verbose=False)
    expected = math.log2(VOCAB) * dm.split_num_tokens("validation") / dm.split_num_bytes("validation")
    assert result["val/bpb"] == pytest.approx(expected, rel=1e-5)
    assert module.tokenizer.fingerprint() == dm.subword_tokenizer().fingerprint()  # adopted at setup


def test_bench_scores_every_token_once_and_reports_bits_per_byte(prepared):
    dm = prepared
    model = uniform_module(VOCAB).model
    tokens = dm.eval_dataset("test").symbols()
    token_bytes = dm.subword_tokenizer().token_byte_lengths()
    score = score_bytes(model, tokens, SEQ_LEN, "basic", batch_size=5, token_bytes=token_bytes)
    assert score.scored_symbols == len(tokens) and score.scored_bytes == dm.split_num_bytes("test")
    assert score.bits == pytest.approx(math.log2(VOCAB) * len(tokens), rel=1e-6)
    assert score.bits_per_byte == pytest.approx(math.log2(VOCAB) * len(tokens) / score.scored_bytes, rel=1e-6)

    report = run_benchmark(model, dm, "test", modes=["basic", "sliding"], max_bytes=1500)
    rows = {row["method"]: row for row in report["results"]}
    scored = rows["model"]["scored_bytes"]
    assert report["num_bytes"] == scored <= 1500 and scored > 1500 - 20  # whole tokens only
    assert rows["model + sliding window"]["scored_bytes"] == scored
    assert rows["model"]["scored_tokens"] == report["model"]["tokenizer"]["num_tokens"]
    assert rows["model"]["tokens_per_byte"] == pytest.approx(rows["model"]["scored_tokens"] / scored)
    assert rows["model"]["bits_per_byte"] == pytest.approx(math.log2(VOCAB) * rows["model"]["tokens_per_byte"], rel=1e-6)
    # The codecs compress exactly the bytes the scored tokens decode to.
    raw = bytes(dm.byte_split("test")[:scored])
    assert rows["gzip -9"]["compressed_bytes"] == len(gzip.compress(raw, compresslevel=9, mtime=0))


# ------------------------------------------------------------------------------------------------
# Compression over token ids
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(prepared) -> BPETokenizer:
    return prepared.subword_tokenizer()


@pytest.fixture(scope="module")
def coder() -> HierarchicalByteModel:
    return subword_model(VOCAB + 40)  # more ids than the tokenizer has: the coder takes any alphabet


MIXED = "café naïve ".encode("latin-1") + b"\xff\xfe\x80 " + ENDOFTEXT.encode() + " 東京 text\n".encode() * 3


@pytest.mark.parametrize("data", [b"", b"a", MIXED], ids=["empty", "one-byte", "mixed"])
def test_token_compression_round_trips_and_matches_the_bench_prediction(coder, tokenizer, data):
    blob, stats = compress_bytes(coder, data, SEQ_LEN, lanes=3, tokenizer=tokenizer)
    assert blob[:4] == MAGIC and blob[4] == FORMAT_VERSION == 6
    assert stats.num_symbols == len(tokenizer.encode(data, allowed_special="all"))
    restored, _ = decompress_bytes(coder, blob, "x.mbac", tokenizer=tokenizer)
    assert restored == data
    if data:
        ids = tokenizer.encode_array(data, allowed_special="all")
        predicted = score_bytes(coder, ids, SEQ_LEN, token_bytes=tokenizer.token_byte_lengths())
        assert abs(8 * (len(blob) - HEADER_SIZE) - predicted.bits) <= 16 + 1e-3 * predicted.bits
        assert stats.model_bits == pytest.approx(predicted.bits, rel=1e-4)


@settings(max_examples=8, deadline=None)
@given(data=st.binary(max_size=120))
def test_token_compression_round_trips_any_bytes(coder, tokenizer, data):
    blob, _ = compress_bytes(coder, data, SEQ_LEN, lanes=2, tokenizer=tokenizer)
    assert decompress_bytes(coder, blob, "x.mbac", tokenizer=tokenizer)[0] == data


def test_decompress_refuses_another_tokenizer_and_mixed_up_containers(coder, tokenizer):
    blob, _ = compress_bytes(coder, MIXED, SEQ_LEN, lanes=2, tokenizer=tokenizer)
    other = train_bpe([b"entirely different training text " * 30], VOCAB)
    with pytest.raises(CompressionError, match="x.mbac: compressed with another tokenizer"):
        decompress_bytes(coder, blob, "x.mbac", tokenizer=other)
    with pytest.raises(CompressionError, match="this model has none"):
        decompress_bytes(coder, blob, "x.mbac")
    with pytest.raises(ValueError, match="compresses through its tokenizer"):
        compress_bytes(coder, MIXED, SEQ_LEN)
    byte_model = subword_model(256)
    byte_blob, _ = compress_bytes(byte_model, MIXED, SEQ_LEN)
    with pytest.raises(CompressionError, match="compressed as bytes by a byte model"):
        decompress_bytes(byte_model, byte_blob, "x.mbac", tokenizer=tokenizer)


def test_sampling_decodes_tokens_and_never_draws_ids_the_tokenizer_lacks(coder, tokenizer, tmp_path):
    # The untrained coder spreads 40 of its 360 ids' worth of probability over ids the tokenizer
    # does not have: unmasked, 2 x 24 draws would all but surely hit one (decode would refuse it).
    from multibyte.decoders import SampleFormat, sample_to_files

    prompt = tokenizer.encode_array(b"It was the")
    run = sample_to_files(coder, SampleFormat("text"), tmp_path, num_samples=2, batch_size=2, max_new_bytes=24,
                          prompt=prompt, temperature=1.5, seed=3, progress=False, tokenizer=tokenizer)
    assert all(bytes(sample).startswith(b"It was the") for sample in run.samples)
    assert run.info["new_tokens"] == 48 and run.new_bytes == sum(len(sample) - 10 for sample in run.samples)
    assert (tmp_path / "sample_000.txt").is_file()
    assert coder.head._forward_hooks == {}  # the mask is gone after sampling


def test_version_1_files_are_still_read_and_unknown_versions_refused():
    model = subword_model(256)
    blob, _ = compress_bytes(model, MIXED, SEQ_LEN, lanes=2)
    # The same file in format 1: the fields up to payload_crc, then their checksum.
    fields = bytearray(blob[:52])
    fields[4] = 1
    version_1 = bytes(fields) + struct.pack("<I", zlib.crc32(bytes(fields))) + blob[HEADER_SIZE:]
    with under_coding_threads():
        assert decompress_bytes(model, version_1, "old.mbac")[0] == MIXED
    fields[4] = 9
    with pytest.raises(CompressionError, match="old.mbac: compressed with format version 9; this multibyte reads versions 1, 2, 3, 4"):
        decompress_bytes(model, bytes(fields) + blob[52:], "old.mbac")


# ------------------------------------------------------------------------------------------------
# The command line, end to end, on the CPU preset
# ------------------------------------------------------------------------------------------------


def cli(root: Path, *configs: str) -> list[str]:
    """The shipped BPE configs, shrunk (320 ids, 64-token windows, 2 layers of 64), on the test book."""
    return [
        *(arg for config in configs for arg in ("--config", config)),
        *("--data.init_args.data_path", str(root / "book.txt"), "--data.init_args.cache_dir", str(root / "cache")),
        *("--data.init_args.vocab_size", str(VOCAB), "--model.architecture.vocab_size", str(VOCAB)),
        *("--data.init_args.seq_len", "64", "--model.architecture.max_seq_len", "64"),
        *("--model.architecture.stages", '[{"mixer": "attention", "d_model": 64, "n_layers": 2, "n_heads": 2}]'),
        *("--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "8"),
        *("--trainer.default_root_dir", str(root / "run"), "--trainer.logger", "false"),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
        *("--trainer.precision", "32-true"),
    ]


PRESET = ("text_bpe.yaml", "cpu/text_bpe.yaml")


def printed_test_bpb(printed: str) -> float:
    """test/bpb from the table `test` prints."""
    return float(re.search(r"test/bpb\D*?(\d+\.\d+)", printed).group(1))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, book) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "book.txt").write_bytes(book.read_bytes())
    main([
        "fit", *cli(root, *PRESET),
        *("--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--model.warmup_steps", "2"),
        *("--trainer.callbacks+=multibyte.callbacks.SampleCallback", "--trainer.callbacks.num_samples", "2"),
        "--trainer.callbacks.max_new_bytes=6",
    ])
    return root


@pytest.mark.slow
def test_fit_writes_the_tokenizer_with_the_checkpoints_and_decoded_samples(fitted, capsys):
    checkpoints = fitted / "run" / "checkpoints"
    dm = bpe_datamodule(fitted / "book.txt", fitted / "cache", seq_len=64)
    expected = dm.subword_tokenizer().fingerprint()
    assert BPETokenizer.load(checkpoints / TOKENIZER_FILE).fingerprint() == expected
    last = load_checkpoint(checkpoints / "last.ckpt")
    assert BPETokenizer.from_json(last["tokenizer"]).fingerprint() == expected
    samples = sorted(fitted.rglob("samples/validation_*/sample_000.txt"))
    assert samples and json.loads((samples[0].parent / "sample_info.json").read_text())["new_tokens"] == 2 * 6


@pytest.mark.slow
def test_test_bench_sample_compress_and_export_take_the_checkpoints_tokenizer(fitted, tmp_path, capsys):
    last = str(fitted / "run" / "checkpoints" / "last.ckpt")
    common = cli(fitted, *PRESET)
    main(["test", *common, "--ckpt_path", last])
    bpb = printed_test_bpb(capsys.readouterr().out)
    assert 0.5 < bpb < 8.0  # bits per BYTE (a 320-id model starts near log2(320) / 2.2 bits per byte)

    main(["bench", *common, "--ckpt_path", last, "--max_bytes", "800", "--output_dir", str(tmp_path / "bench")])
    report = json.loads((tmp_path / "bench" / "bench-text-test.json").read_text())
    (model_row,) = [row for row in report["results"] if row["kind"] == "model"]
    assert model_row["scored_bytes"] == report["num_bytes"] <= 800 and report["model"]["seq_unit"] == "tokens"
    assert "tokens per byte" in capsys.readouterr().out

    main(["sample", *common, "--ckpt_path", last, "--prompt", "It was the", "--max_new_bytes", "5",
          "--num_samples", "2", "--output_dir", str(tmp_path / "samples")])
    info = json.loads((tmp_path / "samples" / "sample_info.json").read_text())
    assert info["prompt_tokens"] < info["prompt_bytes"] == 10 and info["new_tokens"] == 10
    assert (tmp_path / "samples" / "sample_000.txt").read_bytes().startswith(b"It was the")
    with pytest.raises(SystemExit, match="--stop_byte: a subword model generates tokens"):
        main(["sample", *common, "--ckpt_path", last, "--stop_byte", "10", "--output_dir", str(tmp_path / "s2")])

    original = tmp_path / "mixed.bin"
    original.write_bytes(MIXED * 4)
    main(["compress", *common, "--ckpt_path", last, "--input_file", str(original), "--lanes", "3"])
    restored = tmp_path / "restored.bin"
    # No --data: the tokenizer and the window come from the checkpoint and the file.
    main(["decompress", "--ckpt_path", last, "--input_file", f"{original}.mbac", "--output_file", str(restored),
          "--trainer.logger", "false"])
    assert restored.read_bytes() == original.read_bytes()

    export = tmp_path / "export"
    main(["export", "--ckpt_path", last, "--output_dir", str(export)])
    assert sorted(path.name for path in export.iterdir()) == ["config.yaml", "model.safetensors", TOKENIZER_FILE]
    main(["test", *common, "--ckpt_path", str(export)])
    assert printed_test_bpb(capsys.readouterr().out) == pytest.approx(bpb, rel=1e-6)
    restored.unlink()
    main(["decompress", "--ckpt_path", str(export), "--input_file", f"{original}.mbac", "--output_file", str(restored),
          "--trainer.logger", "false"])
    assert restored.read_bytes() == original.read_bytes()
    main(["sample", *common, "--ckpt_path", str(export), "--prompt", "It was the", "--max_new_bytes", "5",
          "--num_samples", "2", "--output_dir", str(tmp_path / "samples-export")])
    assert (tmp_path / "samples-export" / "sample_000.txt").read_bytes() == (tmp_path / "samples" / "sample_000.txt").read_bytes()


@pytest.mark.slow
def test_data_of_another_tokenizer_is_refused(fitted, tmp_path):
    last = str(fitted / "run" / "checkpoints" / "last.ckpt")
    other = tmp_path / "other.txt"
    other.write_bytes(EMBEDDED_TEXT.read_bytes()[-40_000:])  # another text: another tokenizer, same size
    flags = cli(fitted, *PRESET) + ["--data.init_args.data_path", str(other)]
    for command in (["test"], ["bench", "--output_dir", str(tmp_path / "bench")]):
        with pytest.raises(SystemExit, match="trained with another tokenizer than the data's"):
            main([*command, *flags, "--ckpt_path", last])


@pytest.mark.slow
def test_validation_under_ddp_scores_every_token_once(fitted):
    # Two gloo processes share the token windows out between them and val/bpb sums bits and bytes
    # over both: one process's number. 56-token windows cut the validation split's 1,241 tokens
    # into 23, an odd number: the second rank evens out with an empty window, which scores nothing.
    last = str(fitted / "run" / "checkpoints" / "last.ckpt")
    scores = {}
    for name, devices in (("ddp", ("--trainer.strategy", "ddp", "--trainer.devices", "2")), ("single", ())):
        folder = fitted / f"validate-{name}"
        result = subprocess.run(
            [sys.executable, "-m", "multibyte", "validate", *cli(fitted, *PRESET), *devices, "--ckpt_path", last,
             "--trainer.accelerator", "cpu", "--data.init_args.eval_batch_size", "3", "--data.init_args.seq_len", "56",
             "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(folder)],
            cwd=fitted, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        (metrics,) = folder.rglob("metrics.csv")
        header, row = metrics.read_text().splitlines()[:2]
        scores[name] = float(dict(zip(header.split(","), row.split(",")))["val/bpb"])
    assert scores["ddp"] == pytest.approx(scores["single"], rel=1e-6, abs=0)
