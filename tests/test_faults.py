"""Faults: SIGTERM saves a checkpoint, a diverging run stops and leaves its good checkpoints alone,
checkpoints are written atomically, outputs are never replaced unless asked, and a crafted
compressed header cannot make `decompress` allocate or decode without bound."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import TextDataModule
from multibyte.arithmetic_coding import ALPHABET_SIZE, ArithmeticEncoder, cumulative_frequencies
from multibyte.checkpoints import SafeCheckpointIO, load_checkpoint, plain
from multibyte.cli import main
from multibyte.compression import (
    HEADER_SIZE,
    MAX_LENGTH,
    MIN_BITS_PER_SYMBOL,
    CompressionError,
    compress_bytes,
    decompress_bytes,
    max_decodable_length,
)
from multibyte.config import megabyte
from multibyte.fault_tolerance import DivergenceGuard, PreemptionCheckpoint, TrainingDiverged
from multibyte.model import HierarchicalByteModel
from multibyte.trainer import MultibyteTrainer
from multibyte.training import ByteLM

SEQ_LEN = 32
ARCHITECTURE = json.dumps(plain(megabyte(4, SEQ_LEN, 32, 1, 2, 16, 1, 2)))


def text_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "book.txt"
    path.write_bytes(bytes(range(32, 127)) * 40)
    return path


def fit_flags(root: Path) -> list[str]:
    return [
        "--model.architecture", ARCHITECTURE, "--seed_everything", "0",
        "--data", "datamodules.TextDataModule", "--data.data_path", str(text_file(root)),
        "--data.seq_len", str(SEQ_LEN), "--data.batch_size", "2", "--data.cache_dir", str(root / "cache"),
        "--trainer.default_root_dir", str(root), "--trainer.logger", "false", "--trainer.precision", "32-true",
        "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# SIGTERM (preemption)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_last_ckpt_and_the_run_resumes_from_it(tmp_path):
    # No validation and no save_last: any last.ckpt can only come from the SIGTERM.
    flags = fit_flags(tmp_path) + ["--trainer.max_steps", "100000", "--trainer.limit_val_batches", "0",
                                   "--checkpoint.save_last", "false", "--test_after_fit", "false"]
    log = tmp_path / "fit.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "multibyte", "fit", *flags], stdout=out, stderr=subprocess.STDOUT,
                                   cwd=tmp_path, env=env)
        try:
            deadline = time.monotonic() + 300
            while "Total params" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)  # the summary is printed once Lightning's signal handler is in place
            time.sleep(1.0)
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    output = log.read_text()
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"SIGTERM: saved {last}" in output
    step = load_checkpoint(last)["global_step"]
    assert step >= 1
    assert not list((tmp_path / "checkpoints").glob("*.partial")), "a temporary file was left behind"

    # `fit --ckpt_path last.ckpt` continues from that step.
    resumed = tmp_path / "resumed"
    main(["fit", *fit_flags(resumed), "--ckpt_path", str(last), "--trainer.max_steps", str(step + 2),
          "--trainer.limit_val_batches", "0", "--test_after_fit", "false"])
    assert load_checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == step + 2


def test_preemption_checkpoint_saves_only_on_sigterm(tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class Stop(Callback):
        def __init__(self, error):
            self.error = error

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise self.error

    for error, saved in ((SIGTERMException(), True), (RuntimeError("a bug"), False)):
        root = tmp_path / type(error).__name__
        preemption = PreemptionCheckpoint()
        trainer = MultibyteTrainer(default_root_dir=root, logger=False, enable_progress_bar=False, max_steps=10,
                                   limit_val_batches=0, callbacks=[preemption, Stop(error)], accelerator="cpu")
        data = TextDataModule(data_path=str(text_file(tmp_path)), seq_len=SEQ_LEN, batch_size=2, cache_dir=str(tmp_path / "cache"))
        with pytest.raises(type(error)):
            trainer.fit(ByteLM(megabyte(4, SEQ_LEN, 32, 1, 2, 16, 1, 2)), datamodule=data)
        last = root / "checkpoints" / "last.ckpt"
        assert last.exists() == saved
        if saved:
            assert preemption.saved_path == last and load_checkpoint(last)["global_step"] == 2


# ------------------------------------------------------------------------------------------------
# A diverging run
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_learning_rate_1e6_stops_with_a_clear_message_and_keeps_the_good_checkpoints(tmp_path, capsys):
    flags = fit_flags(tmp_path) + ["--model.learning_rate", "1e6", "--model.warmup_steps", "0",
                                   "--trainer.max_steps", "40", "--trainer.val_check_interval", "1",
                                   "--checkpoint.every_n_train_steps", "1"]
    with pytest.raises(SystemExit) as stopped:
        main(["fit", *flags])
    assert stopped.value.code == 2
    message = str(stopped.value)
    assert message.startswith("training diverged at step ") and "Lower --model.learning_rate" in message
    output = capsys.readouterr()
    assert "test bits/byte" not in output.out and "Traceback" not in output.err
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert checkpoints and not [p for p in checkpoints if "nan" in p.name or "inf" in p.name]
    diverged_at = int(message.split("training diverged at step ")[1].split(":")[0])
    for path in checkpoints:  # every checkpoint predates the divergence and holds finite weights
        checkpoint = load_checkpoint(path)
        assert checkpoint["global_step"] <= diverged_at
        assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
        for callback in checkpoint["callbacks"].values():
            score = callback.get("best_model_score")
            assert score is None or torch.isfinite(score)


class NonFiniteAt(ByteLM):
    """ByteLM whose loss (or one gradient) turns non-finite at one step, as a diverging run's does."""

    def __init__(self, *args, step: int, where: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bad_step, self.where = step, where

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.where == "loss" and self.global_step == self.bad_step else loss

    def on_after_backward(self) -> None:
        if self.where == "gradient" and self.global_step == self.bad_step:
            next(self.parameters()).grad[0] = float("inf")


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_divergence_guard_stops_before_the_step_and_before_any_checkpoint(where, tmp_path):
    data = TextDataModule(data_path=str(text_file(tmp_path)), seq_len=SEQ_LEN, batch_size=2, cache_dir=str(tmp_path / "cache"))
    module = NonFiniteAt(megabyte(4, SEQ_LEN, 32, 1, 2, 16, 1, 2), step=3, where=where)
    periodic = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_last=True)
    trainer = MultibyteTrainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_steps=10,
                               limit_val_batches=0, callbacks=[DivergenceGuard(), periodic], accelerator="cpu")
    with pytest.raises(TrainingDiverged, match=f"training diverged at step 3: {'the loss' if where == 'loss' else 'a gradient'}"):
        trainer.fit(module, datamodule=data)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3
    # The optimizer never applied step 3: the weights are those of the last good checkpoint.
    weights = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    assert all(torch.equal(last["state_dict"][name], tensor) for name, tensor in weights.items())


# ------------------------------------------------------------------------------------------------
# Atomic checkpoint writes
# ------------------------------------------------------------------------------------------------


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def dies_half_way(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # as a second signal during the save would

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_the_trainer_reads_and_writes_through_the_safe_io(tmp_path):
    data = TextDataModule(data_path=str(text_file(tmp_path)), seq_len=SEQ_LEN, batch_size=2, cache_dir=str(tmp_path / "cache"))
    trainer = MultibyteTrainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_steps=1,
                               limit_val_batches=0, accelerator="cpu")
    trainer.fit(ByteLM(megabyte(4, SEQ_LEN, 32, 1, 2, 16, 1, 2)), datamodule=data)
    assert type(trainer.strategy.checkpoint_io) is SafeCheckpointIO


# ------------------------------------------------------------------------------------------------
# Outputs are never replaced unless --overwrite true
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    main(["fit", *fit_flags(root), "--trainer.max_steps", "2", "--test_after_fit", "false"])
    return root / "checkpoints" / "last.ckpt"


def refused(*args: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    assert stopped.value.code == 2
    return str(stopped.value)


@pytest.mark.slow
def test_compress_and_decompress_never_replace_a_file_unless_asked(checkpoint, tmp_path):
    original = tmp_path / "notes.txt"
    original.write_bytes(b"the first version of my notes\n" * 4)
    main(["compress", "--ckpt_path", str(checkpoint), "--input_file", str(original), "--lanes", "2"])
    packed = tmp_path / "notes.txt.mbac"
    first = packed.read_bytes()

    original.write_bytes(b"my edited notes, newer than the .mbac\n")
    assert refused("compress", "--ckpt_path", str(checkpoint), "--input_file", str(original)) == (
        f"{packed}: already exists (--overwrite true replaces it)"
    )
    assert packed.read_bytes() == first
    # decompress X.mbac writes X by default: the edited X stays.
    assert refused("decompress", "--ckpt_path", str(checkpoint), "--input_file", str(packed)) == (
        f"{original}: already exists (--overwrite true replaces it)"
    )
    assert original.read_bytes() == b"my edited notes, newer than the .mbac\n"
    main(["decompress", "--ckpt_path", str(checkpoint), "--input_file", str(packed), "--overwrite", "true"])
    assert original.read_bytes() == b"the first version of my notes\n" * 4


@pytest.mark.slow
def test_bench_never_replaces_a_report_unless_asked(checkpoint, tmp_path):
    data = ["--data", "datamodules.TextDataModule", "--data.data_path", str(text_file(tmp_path)), "--data.seq_len",
            str(SEQ_LEN), "--data.cache_dir", str(tmp_path / "cache"), "--trainer.logger", "false"]
    report = tmp_path / "report"
    report.mkdir()
    (report / "bench-text-test.json").write_text("an earlier report\n")
    message = refused("bench", *data, "--ckpt_path", str(checkpoint), "--codecs", "false", "--output_dir", str(report))
    assert message == f"{report / 'bench-text-test.json'}: already exists (--overwrite true replaces it)"
    assert (report / "bench-text-test.json").read_text() == "an earlier report\n"
    main(["bench", *data, "--ckpt_path", str(checkpoint), "--codecs", "false", "--output_dir", str(report), "--overwrite", "true"])
    assert json.loads((report / "bench-text-test.json").read_text())["split"] == "test"


# ------------------------------------------------------------------------------------------------
# decompress bounds what a header can make it do
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> HierarchicalByteModel:
    torch.manual_seed(0)
    return HierarchicalByteModel(megabyte(4, SEQ_LEN, 32, 1, 2, 16, 1, 2)).eval()


def with_length(blob: bytes, length: int) -> bytes:
    """`blob` with another length field and a header checksum that matches it (a crafted file)."""
    fields = bytearray(blob[: HEADER_SIZE - 4])
    struct.pack_into("<Q", fields, 12, length)  # after magic, version, precision, lanes, seq_len
    return bytes(fields) + struct.pack("<I", zlib.crc32(fields)) + blob[HEADER_SIZE:]


def test_a_crafted_length_is_refused_before_anything_is_allocated(model):
    blob, _ = compress_bytes(model, b"a short file", SEQ_LEN, lanes=2)
    payload = len(blob) - HEADER_SIZE
    assert decompress_bytes(model, with_length(blob, 12), "x.mbac")[0] == b"a short file"
    for length, problem in (
        (2**40, f"more than the {MAX_LENGTH:,} this multibyte restores"),
        (max_decodable_length(payload) + 1, f"more than a {payload:,}-byte payload can encode"),
        (int(5e7), f"more than a {payload:,}-byte payload can encode"),
    ):
        with pytest.raises(CompressionError, match=problem) as error:
            decompress_bytes(model, with_length(blob, length), "x.mbac")
        assert str(error.value).startswith(f"x.mbac: corrupt header: it announces {length:,} bytes")


def test_the_length_bound_holds_for_the_most_compressible_stream():
    # The likeliest symbol the quantiser allows, every time: the fewest bits per byte possible.
    weights = np.zeros(ALPHABET_SIZE)
    weights[0] = 1.0
    cumulative = cumulative_frequencies(weights)
    encoder = ArithmeticEncoder()
    count = 400_000  # about 8.8 bits of information: the payload needs 2 bytes
    for _ in range(count):
        encoder.encode(cumulative, 0)
    payload = encoder.finish()
    assert 8 * len(payload) >= count * MIN_BITS_PER_SYMBOL  # what the bound rests on
    assert count <= max_decodable_length(len(payload))
