"""Progress bars of `bench`, `compress` and `decompress`: on stderr only, when asked or when stderr is
a terminal, and never mixed into stdout."""

import io
import sys

import numpy as np
import pytest
import torch

from multibyte.bench import score_bytes
from multibyte.cli import main
from multibyte.compression import compress_bytes, decompress_bytes
from multibyte.config import megabyte
from multibyte.model import HierarchicalByteModel
from multibyte.progress import progress_bar, progress_wanted

SEQ_LEN = 32
DATA = bytes(range(256)) * 2


@pytest.fixture(scope="module")
def model() -> HierarchicalByteModel:
    torch.manual_seed(0)
    return HierarchicalByteModel(megabyte(4, SEQ_LEN, 32, 1, 2, 16, 1, 2)).eval()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_means_stderr_is_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_wanted(None)
    assert progress_wanted(True) and not progress_wanted(False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress_wanted(None)
    bar = progress_bar(10, "test", "B", None)
    bar.update(10)
    bar.close()
    assert "test" in terminal.getvalue() and "10.0/10.0" in terminal.getvalue()


def test_compress_and_decompress_draw_on_stderr_only_when_asked(model, capfd):
    blob, _ = compress_bytes(model, DATA, SEQ_LEN, lanes=4, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "compress" in err and "512/512" in err
    assert decompress_bytes(model, blob, "x", progress=True)[0] == DATA
    out, err = capfd.readouterr()
    assert out == "" and "decompress" in err and "512/512" in err
    compress_bytes(model, DATA, SEQ_LEN, lanes=4, progress=None)  # stderr is captured, not a terminal
    decompress_bytes(model, blob, "x", progress=False)
    assert capfd.readouterr() == ("", "")


def test_bench_scoring_draws_per_window(model, capfd):
    data = np.frombuffer(DATA, dtype=np.uint8)
    plain = score_bytes(model, data, SEQ_LEN, "basic", 4, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "bench basic" in err and "16/16" in err
    assert score_bytes(model, data, SEQ_LEN, "basic", 4, progress=False).bits == plain.bits  # no effect on scores
    assert capfd.readouterr() == ("", "")


def test_cli_compress_keeps_stdout_clean(tmp_path, capfd):
    original = tmp_path / "data.bin"
    original.write_bytes(DATA)
    common = [
        "--model.architecture",
        '{"max_seq_len": 32, "stages": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "patcher": "fixed", '
        '"patch_size": 4}, {"d_model": 16, "n_layers": 1, "n_heads": 2}]}',
        *("--trainer.precision", "32-true", "--trainer.logger", "false"),
    ]
    main(["fit", *common, "--data", "datamodules.TextDataModule", "--data.seq_len", "32",
          "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "1", "--test_after_fit", "false",
          "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"])
    (checkpoint,) = (tmp_path / "run").rglob("last.ckpt")
    capfd.readouterr()
    main(["compress", *common, "--ckpt_path", str(checkpoint), "--input_file", str(original), "--progress", "true",
          "--seq_len", "32", "--adapt", "false"])
    out, err = capfd.readouterr()
    assert out.count("\n") == 1 and out.startswith(f"{original}: 512 -> ")  # the summary line alone
    assert "compress" in err and "512/512" in err
    main(["decompress", *common, "--ckpt_path", str(checkpoint), "--input_file", f"{original}.mbac",
          "--output_file", str(tmp_path / "back.bin"), "--progress", "true"])
    out, err = capfd.readouterr()
    assert "512/512" in err and "512/512" not in out
    assert (tmp_path / "back.bin").read_bytes() == DATA
