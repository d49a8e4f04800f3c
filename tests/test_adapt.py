"""Dynamic evaluation (`bench --adapt`, `compress --adapt`): exact round trips on every modality's
bytes, determinism, what the container records and refuses, a real gain on repetitive data, and
the same bits from bench and compress."""

import json
import re
import struct
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from multibyte.adaptation import AdaptConfig, Adapter, adapted_parameter_names
from multibyte.bench import score_bytes
from multibyte.cli import main
from multibyte.compression import (
    _HEADER,
    _HEADER_V2,
    _HEADER_V3,
    CODING_THREADS,
    FORMAT_VERSION,
    ADAPT_HEADER_SIZE,
    HEADER_SIZE,
    CompressionError,
    Header,
    compress_bytes,
    decompress_bytes,
    weights_hash,
)
from multibyte.config import megabyte
from multibyte.model import HierarchicalByteModel
from multibyte.sampling import decoding_threads
from multibyte.trainer import ADAPT_BY_DEFAULT, adapt_wanted

EMBEDDED = Path(__file__).resolve().parents[1] / "datamodules" / "embedded"
SEQ_LEN = 64
ADAPT = AdaptConfig(learning_rate=3e-3)


def tiny_model(seed: int = 0) -> HierarchicalByteModel:
    torch.manual_seed(seed)
    return HierarchicalByteModel(megabyte(4, SEQ_LEN, 32, 1, 2, 16, 1, 2)).eval()


@pytest.fixture(scope="module")
def model() -> HierarchicalByteModel:
    return tiny_model()


def under_coding_threads():
    """Decode a new payload relabelled as a file before version 6, which decodes under the caller's
    threads, under the threads it was coded with (CODING_THREADS)."""
    return decoding_threads(torch.device("cpu"), CODING_THREADS)


def text_bytes() -> bytes:
    return (EMBEDDED / "gutenberg_books.txt").read_bytes()[20_000:21_500]


def image_bytes() -> bytes:
    with np.load(EMBEDDED / "imagenet64_sample.npz") as archive:
        key = "data" if "data" in archive else archive.files[0]
        return np.asarray(archive[key][0], dtype=np.uint8).tobytes()[:1_500]


def audio_bytes() -> bytes:
    with wave.open(str(EMBEDDED / "0_george_0.wav")) as recording:
        return recording.readframes(recording.getnframes())[:1_500]  # 16-bit PCM samples


# ------------------------------------------------------------------------------------------------
# The compressor stays exact
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("load", [text_bytes, image_bytes, audio_bytes], ids=["text", "image", "audio"])
def test_adaptive_round_trip_is_exact_on_every_modality(model, load):
    data = load()
    before = weights_hash(model)
    blob, stats = compress_bytes(model, data, SEQ_LEN, lanes=4, adapt=ADAPT)
    restored, _ = decompress_bytes(model, blob, "x.mbac")
    assert restored == data
    assert weights_hash(model) == before  # the adapter trains a copy
    header = Header.unpack(blob, "x.mbac")
    assert header.adapt == ADAPT and header.version == FORMAT_VERSION == 6
    assert header.device_type == "cpu" and header.threads == torch.get_num_threads()
    assert header.torch_version == torch.__version__


def test_sgd_subsets_and_several_steps_round_trip_too(model):
    data = text_bytes()
    for options in (
        AdaptConfig(optimizer="sgd", learning_rate=0.05, parameters="last_stage"),
        AdaptConfig(parameters="norms", steps=2, windows_per_step=3, precision="bf16-mixed", max_grad_norm=0.0),
        AdaptConfig(parameters="head", learning_rate=1e-3),
    ):
        blob, _ = compress_bytes(model, data, SEQ_LEN, lanes=5, adapt=options)
        assert decompress_bytes(model, blob, "x.mbac")[0] == data, options


def test_two_runs_are_identical(model):
    data = text_bytes()
    first, _ = compress_bytes(model, data, SEQ_LEN, lanes=4, adapt=ADAPT)
    second, _ = compress_bytes(model, data, SEQ_LEN, lanes=4, adapt=ADAPT)
    assert first == second
    symbols = np.frombuffer(data, dtype=np.uint8)
    runs = [score_bytes(model, symbols, SEQ_LEN, "basic", 4, adapt=ADAPT).bits for _ in range(2)]
    assert runs[0] == runs[1]


def test_bench_predicts_the_adaptive_compressor(model):
    data = text_bytes()
    blob, stats = compress_bytes(model, data, SEQ_LEN, lanes=4, adapt=ADAPT)
    # bench updates after every batch_size windows, compress after every lanes: the same updates.
    score = score_bytes(model, np.frombuffer(data, dtype=np.uint8), SEQ_LEN, "basic", 4, adapt=ADAPT)
    assert score.bits == pytest.approx(stats.model_bits, rel=1e-4)
    assert stats.header_bytes == ADAPT_HEADER_SIZE
    assert abs(8 * (len(blob) - ADAPT_HEADER_SIZE) - score.bits) <= 16 + 1e-3 * score.bits


def test_adaptation_helps_on_repetitive_data():
    """A real effect: text that repeats is learned as it is read (8 bits/byte for a fresh model)."""
    model = tiny_model(1)
    line = b"Dynamic evaluation keeps learning from what it has already coded. "
    data = np.frombuffer((line * 60)[:3_840], dtype=np.uint8)
    static = score_bytes(model, data, SEQ_LEN, "basic", 4)
    adapted = score_bytes(model, data, SEQ_LEN, "basic", 4, adapt=ADAPT)
    assert static.bits_per_byte > 7.5
    assert adapted.bits_per_byte < static.bits_per_byte - 1.5
    blob, _ = compress_bytes(model, data.tobytes(), SEQ_LEN, lanes=4, adapt=ADAPT)
    plain, _ = compress_bytes(model, data.tobytes(), SEQ_LEN, lanes=4)
    assert len(blob) < 0.85 * len(plain)


def test_only_the_chosen_parameters_move(model):
    tokens = torch.from_numpy(np.frombuffer(text_bytes()[: 2 * SEQ_LEN], dtype=np.uint8).astype(np.int64)).view(2, -1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    for parameters in ("head", "last_stage", "norms", "all"):
        adapter = Adapter(model, AdaptConfig(parameters=parameters, learning_rate=1e-2))
        adapter.update(tokens, mask)
        chosen = set(adapted_parameter_names(model, parameters))
        original = dict(model.named_parameters())
        moved = {name for name, p in adapter.model.named_parameters() if not torch.equal(p, original[name])}
        assert moved and moved <= chosen, parameters
        assert adapter.steps_taken == 2  # one step per window
    assert set(adapted_parameter_names(model, "head")) == {"head.weight"}
    assert all(name.startswith(("stages.1.", "head.")) for name in adapted_parameter_names(model, "last_stage"))


def test_bad_options_are_one_clear_error(model):
    for kwargs, message in (
        ({"learning_rate": 0.0}, "learning_rate must be a positive number"),
        ({"optimizer": "lion"}, "optimizer must be one of"),
        ({"parameters": "some"}, "parameters must be one of"),
        ({"steps": 0}, "steps must lie in 1..65535"),
        ({"beta2": 1.0}, r"beta2 must lie in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=message):
            AdaptConfig(**kwargs)
    data = np.frombuffer(text_bytes(), dtype=np.uint8)
    with pytest.raises(ValueError, match="--adapt with strided inference"):
        score_bytes(model, data, SEQ_LEN, "strided", 4, adapt=ADAPT)


def test_sliding_windows_adapt_and_score_every_byte_once(model):
    data = np.frombuffer(text_bytes(), dtype=np.uint8)
    score = score_bytes(model, data, SEQ_LEN, "sliding", 4, adapt=ADAPT)
    static = score_bytes(model, data, SEQ_LEN, "sliding", 4)
    assert score.scored_bytes == len(data) and score.bits < static.bits


# ------------------------------------------------------------------------------------------------
# What the container records, and refuses
# ------------------------------------------------------------------------------------------------


def test_another_thread_count_is_refused_before_decoding(model):
    data = text_bytes()[:400]
    threads = torch.get_num_threads()
    blob, _ = compress_bytes(model, data, SEQ_LEN, lanes=4, adapt=ADAPT)
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(CompressionError, match=(
            rf"x\.mbac: compressed with --adapt \(adam lr 0\.003 .*\) on cpu, {threads} threads?, PyTorch .*; "
            rf"this decoder runs on cpu, {threads + 1} threads, .*OMP_NUM_THREADS={threads}"
        )):
            decompress_bytes(model, blob, "x.mbac")
    finally:
        torch.set_num_threads(threads)
    assert decompress_bytes(model, blob, "x.mbac")[0] == data


def with_field(blob: bytes, offset: int, fmt: str, value) -> bytes:
    """`blob` with one header field replaced and a header checksum that matches (a crafted file)."""
    fields = bytearray(blob[: ADAPT_HEADER_SIZE - 4])
    struct.pack_into(fmt, fields, offset, value)
    return bytes(fields) + struct.pack("<I", zlib.crc32(fields)) + blob[ADAPT_HEADER_SIZE:]


BLOCK = _HEADER.size  # where the adapt block starts


def test_another_pytorch_or_device_is_refused_and_corrupt_options_too(model):
    blob, _ = compress_bytes(model, text_bytes()[:300], SEQ_LEN, lanes=4, adapt=ADAPT)
    # Version 4's 82 bytes end with the adapt and ngram flags; the block follows: optimizer 82, ...,
    # device 121, threads 129, torch 131.
    with pytest.raises(CompressionError, match="on cuda, .*this decoder runs on cpu"):
        decompress_bytes(model, with_field(blob, BLOCK + 39, "8s", b"cuda"), "x.mbac")
    with pytest.raises(CompressionError, match="PyTorch 1.0.0; this decoder runs on cpu, .*PyTorch " + re.escape(torch.__version__)):
        decompress_bytes(model, with_field(blob, BLOCK + 49, "32s", b"1.0.0"), "x.mbac")
    with pytest.raises(CompressionError, match=r"x\.mbac: corrupt header \(adapt optimizer 7"):
        decompress_bytes(model, with_field(blob, BLOCK + 0, "B", 7), "x.mbac")
    with pytest.raises(CompressionError, match=r"x\.mbac: corrupt header \(adapt learning_rate must be a positive"):
        decompress_bytes(model, with_field(blob, BLOCK + 7, "<d", -1.0), "x.mbac")


def test_a_file_coded_without_adaptation_decodes_under_another_thread_count(model):
    data = text_bytes()[:300]
    blob, stats = compress_bytes(model, data, SEQ_LEN, lanes=4)
    assert Header.unpack(blob, "x").adapt is None and stats.header_bytes == HEADER_SIZE == 86
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert decompress_bytes(model, blob, "x.mbac")[0] == data
    finally:
        torch.set_num_threads(threads)


def test_decoding_steps_run_on_coding_threads_and_updates_on_the_callers(model, monkeypatch):
    # CPU kernels (scaled_dot_product_attention among them) split sums by the thread count, so the
    # steps of a version 6 file always run on CODING_THREADS; the updates of --adapt run on the
    # caller's threads, which the file records.
    seen_in_steps, seen_in_updates = set(), set()

    def step_hook(*_):  # the adapted copy carries the hook too: its training forwards are updates
        if not torch.is_grad_enabled():
            seen_in_steps.add(torch.get_num_threads())

    hook = model.head.register_forward_hook(step_hook)
    update = Adapter.update
    monkeypatch.setattr(Adapter, "update", lambda self, *a: (seen_in_updates.add(torch.get_num_threads()), update(self, *a))[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(CODING_THREADS + 1)
    try:
        blob, _ = compress_bytes(model, text_bytes()[:600], SEQ_LEN, lanes=4, adapt=ADAPT)
        assert torch.get_num_threads() == CODING_THREADS + 1  # restored
        assert Header.unpack(blob, "x").threads == CODING_THREADS + 1
    finally:
        torch.set_num_threads(threads)
        hook.remove()
    assert seen_in_steps == {CODING_THREADS} and seen_in_updates == {CODING_THREADS + 1}


def test_a_file_of_one_group_is_coded_without_adaptation(model):
    data = text_bytes()[: 4 * SEQ_LEN]  # lanes windows: coded side by side, no update would follow
    blob, stats = compress_bytes(model, data, SEQ_LEN, lanes=4, adapt=ADAPT)
    assert Header.unpack(blob, "x").adapt is None and stats.header_bytes == HEADER_SIZE
    assert blob == compress_bytes(model, data, SEQ_LEN, lanes=4)[0]


def test_version_2_files_are_still_read(model):
    data = text_bytes()[:300]
    blob, _ = compress_bytes(model, data, SEQ_LEN, lanes=4)
    fields = bytearray(blob[: _HEADER_V2.size])
    fields[4] = 2
    version_2 = bytes(fields) + struct.pack("<I", zlib.crc32(bytes(fields))) + blob[HEADER_SIZE:]
    with under_coding_threads():
        restored, stats = decompress_bytes(model, version_2, "old.mbac")
    assert restored == data and stats.header_bytes == 84
    assert Header.unpack(version_2, "old.mbac").adapt is None


@pytest.mark.parametrize("adapt", [None, ADAPT], ids=["plain", "adapted"])
def test_version_3_files_are_still_read(model, adapt):
    """Version 3 ends its fields with the adapt flag (no ngram flag): 85 bytes, 166 with the block."""
    data = text_bytes()[:600]
    blob, _ = compress_bytes(model, data, SEQ_LEN, lanes=4, adapt=adapt)
    header = Header.unpack(blob, "x")
    fields = bytearray(blob[: _HEADER_V3.size]) + blob[_HEADER.size : header.size - 4]  # drop the ngram flag
    fields[4] = 3
    version_3 = bytes(fields) + struct.pack("<I", zlib.crc32(bytes(fields))) + blob[header.size :]
    with under_coding_threads():
        restored, stats = decompress_bytes(model, version_3, "old.mbac")
    assert restored == data and stats.header_bytes == (166 if adapt else 85)
    old = Header.unpack(version_3, "old.mbac")
    assert old.version == 3 and old.adapt == adapt and old.mixing is None


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def test_adapt_defaults_by_modality():
    assert adapt_wanted(True, "image") and not adapt_wanted(False, "text")
    assert adapt_wanted(None, "text") == ADAPT_BY_DEFAULT["text"]
    assert adapt_wanted(None, "image") == ADAPT_BY_DEFAULT["image"]
    assert not adapt_wanted(None, None)  # compress without --data: off


def test_cli_bench_and_compress_adapt(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_bytes(text_bytes() * 2)
    architecture = (
        "--model.architecture",
        '{"max_seq_len": 64, "stages": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "patcher": "fixed", '
        '"patch_size": 4}, {"d_model": 16, "n_layers": 1, "n_heads": 2}]}',
    )
    data = ("--data", "datamodules.TextDataModule", "--data.seq_len", "64", "--data.cache_dir", str(tmp_path / "cache"))
    common = [*architecture, *("--trainer.precision", "32-true", "--trainer.logger", "false")]
    main([
        "fit", *common, *data, "--data.data_path", str(book), "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--test_after_fit", "false",
        "--trainer.enable_progress_bar", "false",
    ])
    (checkpoint,) = (tmp_path / "run").rglob("last.ckpt")
    for name, flags in (("on", ["--adapt", "true"]), ("off", ["--no-adapt"])):
        main([
            "bench", *common, *data, "--data.data_path", str(book), "--ckpt_path", str(checkpoint),
            "--codecs", "false", *flags, "--adapt_options.learning_rate", "0.003", "--no-ngram",
            "--output_dir", str(tmp_path / f"bench-{name}"), "--progress", "false",
        ])
    out = capsys.readouterr().out
    assert "| model + adapt |" in out and "Adapted while scoring (dynamic evaluation): adam lr 0.003" in out
    methods = {
        name: [row["method"] for row in json.loads((tmp_path / f"bench-{name}" / "bench-text-test.json").read_text())["results"]]
        for name in ("on", "off")
    }
    assert methods == {"on": ["model + adapt"], "off": ["model"]}
    main([
        "compress", *common, *data, "--ckpt_path", str(checkpoint), "--input_file", str(book), "--lanes", "4",
        "--adapt", "true", "--adapt_options.learning_rate", "0.003", "--progress", "false", "--no-ngram",
    ])
    assert "adapted while coding: adam lr 0.003" in capsys.readouterr().out
    restored = tmp_path / "restored.txt"
    main(["decompress", *common, *data, "--ckpt_path", str(checkpoint), "--input_file", f"{book}.mbac",
          "--output_file", str(restored), "--progress", "false"])
    assert restored.read_bytes() == book.read_bytes()
    assert Header.unpack((tmp_path / "book.txt.mbac").read_bytes(), "x").adapt.learning_rate == 0.003
    # An input of one group of windows is coded before any update could be used: the file stores
    # no adaptation, and the message says so instead of claiming one.
    tiny = tmp_path / "tiny.txt"
    tiny.write_bytes(book.read_bytes()[:200])
    main(["compress", *common, *data, "--ckpt_path", str(checkpoint), "--input_file", str(tiny), "--lanes", "4",
          "--adapt", "true", "--progress", "false"])
    out = capsys.readouterr().out
    assert "not adapted: the input fits in one group of windows" in out and "adapted while coding" not in out
    assert Header.unpack((tmp_path / "tiny.txt.mbac").read_bytes(), "x").adapt is None
