"""BLT end to end: one `fit` command trains the entropy model its config names, then the BLT model;
the threshold is calibrated on training bytes; the checkpoint carries the whole entropy model.

The CLI tests run the shipped configs (text_blt.yaml + cpu/text_blt.yaml, entropy model from
text_entropy.yaml + cpu/text_entropy.yaml) on the embedded Gutenberg sample with tiny sizes given on
the command line (and one tiny layer on the entropy configs), so that they take seconds.
"""

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from multibyte.checkpoints import checkpoint_hparams, config_from_dict, load_checkpoint
from cli_errors import one_line_error
from multibyte.cli import main
from multibyte.config import ModelConfig, StageConfig
from multibyte.entropy_training import (
    EntropyModelError,
    calibration_windows,
    is_global_rank_zero,
    mean_unit_length,
    wait_for_entropy_model,
)
from multibyte.patchers import unit_starts
from multibyte.patchers.entropy import EntropyPatcher
from multibyte.training import load_model

EMBEDDED_TEXT = Path(__file__).resolve().parents[1] / "datamodules" / "embedded" / "gutenberg_books.txt"
SEQ_LEN = 128
TARGET = 4.0  # bytes per patch the tiny BLT model calibrates for
# Layered on text_entropy.yaml + cpu/text_entropy.yaml: a tiny entropy model, trained briefly.
TINY_ENTROPY = {
    "trainer": {"max_steps": 40, "val_check_interval": 40, "limit_val_batches": 2, "enable_progress_bar": False},
    "model": {
        "architecture": {
            "max_seq_len": SEQ_LEN,
            "stages": [{"mixer": "attention", "d_model": 32, "n_layers": 1, "n_heads": 2}],
        },
        "warmup_steps": 5,
    },
    "data": {"init_args": {"seq_len": SEQ_LEN, "batch_size": 8}},
}


def blt_flags(root: Path, entropy_stage: dict) -> list[str]:
    """The shipped CPU BLT preset with tiny sizes; `entropy_stage` is merged into its stage 0."""
    stages = [
        {"d_model": 64, "n_layers": 1, "n_heads": 2, "patch_size": 8, "target_patch_length": TARGET, **entropy_stage},
        {"d_model": 32, "n_layers": 1, "n_heads": 2},
    ]
    return [
        "--config", "text_blt.yaml", "--config", "cpu/text_blt.yaml",
        "--model.architecture.stages", json.dumps(stages),
        "--model.architecture.max_seq_len", str(SEQ_LEN),
        "--data.init_args.seq_len", str(SEQ_LEN),
        "--data.init_args.batch_size", "4",
        "--data.init_args.cache_dir", str(root / "cache"),
        "--trainer.default_root_dir", str(root / "run"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def trained_stage(root: Path) -> dict:
    return {
        "entropy_model": str(root / "entropy" / "export"),
        "entropy_config": ["text_entropy.yaml", "cpu/text_entropy.yaml", str(root / "tiny_entropy.yaml")],
    }


@pytest.fixture(scope="module")
def blt_run(tmp_path_factory) -> dict:
    """`fit --config text_blt.yaml --config cpu/text_blt.yaml` (tiny) on a fresh folder, run as a
    person would; then the entropy model's export folder is read and deleted."""
    root = tmp_path_factory.mktemp("blt")
    (root / "tiny_entropy.yaml").write_text(yaml.safe_dump(TINY_ENTROPY))
    flags = blt_flags(root, trained_stage(root))
    flags += ["--trainer.max_steps", "6", "--trainer.val_check_interval", "6"]
    flags += ["--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "multibyte", "fit", *flags], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    export = root / "entropy" / "export"
    run = {
        "root": root,
        "flags": blt_flags(root, trained_stage(root)),
        "stdout": result.stdout,
        "export_files": sorted(p.name for p in export.iterdir()),
        "export_weights": load_file(export / "model.safetensors"),
        "export_config": yaml.safe_load((export / "config.yaml").read_text()),
        "checkpoint": next((root / "run").rglob("last.ckpt")),
    }
    shutil.rmtree(export)  # from here on, only the BLT checkpoint holds the entropy model
    return run


# ------------------------------------------------------------------------------------------------
# One command: the entropy model first, then the BLT model
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_fit_command_trains_the_entropy_model_then_the_blt_model(blt_run):
    out, root = blt_run["stdout"], blt_run["root"]
    steps = [
        "entropy_model " + str(root / "entropy" / "export") + " does not exist: training it first",
        "entropy model exported to",
        "entropy threshold calibrated",
        "test bits/byte:",
    ]
    positions = [out.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), out[-3000:]
    # The entropy model is the layered entropy configs' (the tiny layer applied), trained by its
    # own fit in the run's folder, on the same data through the same cache.
    assert blt_run["export_files"] == ["config.yaml", "model.safetensors"]
    entropy_architecture = blt_run["export_config"]["model"]["architecture"]
    assert [(s["d_model"], s["n_layers"]) for s in entropy_architecture["stages"]] == [(32, 1)]
    assert list((root / "runs" / "text_entropy").rglob("last.ckpt"))
    assert len(list((root / "cache").glob("text-*"))) == 1
    # The BLT checkpoint holds that very model, frozen through the BLT model's training.
    checkpoint = load_checkpoint(blt_run["checkpoint"])
    stage = checkpoint_hparams(checkpoint)["architecture"]["stages"][0]
    assert stage["entropy_architecture"] == config_from_dict(ModelConfig, entropy_architecture).to_dict()
    prefix = "model.patchers.0.model."
    held = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    assert held.keys() == blt_run["export_weights"].keys()
    for name, tensor in blt_run["export_weights"].items():
        assert torch.equal(held[name], tensor), name


@pytest.mark.slow
def test_calibration_lands_on_the_target_patch_length(blt_run):
    match = re.search(r"θ = (-?\d+\.\d+) bits \(global\); (\d+\.\d+) bytes per patch \(target 4,", blt_run["stdout"])
    assert match, blt_run["stdout"][-2000:]
    printed_theta, printed_length = float(match.group(1)), float(match.group(2))
    checkpoint = load_checkpoint(blt_run["checkpoint"])
    theta = float(checkpoint["state_dict"]["model.patchers.0.threshold"])
    assert theta == pytest.approx(printed_theta, abs=1e-4)
    assert checkpoint_hparams(checkpoint)["architecture"]["stages"][0]["entropy_threshold"] == theta
    assert printed_length == pytest.approx(TARGET, rel=0.02)

    # Measured again here, from the checkpoint alone, on real text: the training windows θ was
    # calibrated on, and held-out windows of the test split it never saw.
    from datamodules import TextDataModule

    model = load_model(str(blt_run["checkpoint"])).model
    data = TextDataModule(seq_len=SEQ_LEN, cache_dir=str(blt_run["root"] / "cache"))
    data.prepare_data()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the run's precision (bf16-mixed)
        calibrated = mean_unit_length(model, calibration_windows(data), 0)
        test = data.eval_dataset("test")
        held_out = torch.stack([test[i] for i in range(len(test) - 1)]).long()
        unseen = mean_unit_length(model, held_out, 0)
    assert calibrated == pytest.approx(TARGET, rel=0.03)
    assert unseen == pytest.approx(TARGET, rel=0.15)


# ------------------------------------------------------------------------------------------------
# The checkpoint alone: the entropy model's export folder is gone
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sample_from_the_checkpoint_without_the_entropy_folder(blt_run, capsys):
    output = blt_run["root"] / "samples"
    main(["sample", *blt_run["flags"], "--ckpt_path", str(blt_run["checkpoint"]), "--prompt", "The ",
          "--max_new_bytes", "48", "--num_samples", "2", "--batch_size", "2", "--output_dir", str(output)])  # fmt: skip
    texts = sorted(output.glob("sample_*.txt"))
    assert len(texts) == 2 and all(path.read_bytes().startswith(b"The ") for path in texts)
    assert json.loads((output / "sample_info.json").read_text())["new_bytes"] == 2 * 48


@pytest.mark.slow
def test_compress_round_trips_exactly_without_the_entropy_folder(blt_run, tmp_path, capsys):
    original = tmp_path / "book.txt"
    original.write_bytes(EMBEDDED_TEXT.read_bytes()[200_000:203_000])  # real text, 23 windows and a bit
    packed, restored = tmp_path / "book.mbac", tmp_path / "restored.txt"
    checkpoint = str(blt_run["checkpoint"])
    # compress needs no config (the checkpoint has the model); decompress gets the BLT config too.
    main(["compress", "--ckpt_path", checkpoint, "--input_file", str(original), "--output_file", str(packed),
          "--lanes", "8"])  # fmt: skip
    main(["decompress", *blt_run["flags"], "--ckpt_path", checkpoint, "--input_file", str(packed),
          "--output_file", str(restored)])  # fmt: skip
    assert restored.read_bytes() == original.read_bytes()
    assert 0 < packed.stat().st_size


@pytest.mark.slow
def test_test_and_bench_score_the_checkpoint_without_the_entropy_folder(blt_run, tmp_path, capsys):
    checkpoint = str(blt_run["checkpoint"])
    main(["test", *blt_run["flags"], "--ckpt_path", checkpoint, "--trainer.limit_test_batches", "2"])
    main(["bench", *blt_run["flags"], "--ckpt_path", checkpoint, "--max_bytes", "1024", "--codecs", "false",
          "--output_dir", str(tmp_path)])  # fmt: skip
    # Lightning's results table: plain text, or drawn with box characters where `rich` is installed
    assert re.search(r"test/bpb[\s│|]+\d+\.\d+", capsys.readouterr().out)
    report = json.loads((tmp_path / "bench-text-test.json").read_text())
    (model,) = [r for r in report["results"] if r["kind"] == "model" and not r["mixing"]]
    assert model["scored_bytes"] == 1024 and 0.0 < model["bits_per_byte"] < 8.5


# ------------------------------------------------------------------------------------------------
# Many processes: one trains the entropy model, all calibrate the same θ, FSDP2 included
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_one_rank_trains_the_entropy_model_and_fsdp_calibrates(tmp_path):
    shorter = {**TINY_ENTROPY, "trainer": {**TINY_ENTROPY["trainer"], "max_steps": 10, "val_check_interval": 10}}
    (tmp_path / "tiny_entropy.yaml").write_text(yaml.safe_dump(shorter))
    flags = blt_flags(tmp_path, trained_stage(tmp_path))
    flags += ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--test_after_fit", "false"]
    flags += ["--trainer.precision", "32-true", "--trainer.devices", "2"]
    flags += ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy"]
    flags += ["--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, "-m", "multibyte", "fit", *flags], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("waiting for global rank 0 to train the entropy model") == 1
    assert output.count("training it first") == 1
    assert len(list((tmp_path / "runs" / "text_entropy" / "lightning_logs").iterdir())) == 1  # one run
    match = re.search(r"entropy threshold calibrated .*; (\d+\.\d+) bytes per patch \(target 4,", output)
    assert match and float(match.group(1)) == pytest.approx(TARGET, rel=0.03), output[-3000:]


# ------------------------------------------------------------------------------------------------
# Neither a model nor a recipe: one clear error, before anything is prepared
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_missing_entropy_model_and_config_is_one_clear_error(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    flags = blt_flags(tmp_path, {"entropy_model": str(nowhere), "entropy_config": None})
    message = one_line_error(capsys, "fit", *flags)
    assert f"stages[0].entropy_model {nowhere} does not exist and stages[0].entropy_config names no config" in message
    # a recipe that names no config file
    flags = blt_flags(tmp_path, {"entropy_model": str(nowhere), "entropy_config": ["nosuch_entropy.yaml"]})
    message = one_line_error(capsys, "fit", *flags)
    assert "stages[0].entropy_config: config file 'nosuch_entropy.yaml' not found" in message
    # only fit trains: other commands say how to get the model
    flags = blt_flags(tmp_path, {"entropy_model": str(nowhere), "entropy_config": ["text_entropy.yaml"]})
    assert "`fit` trains it first from stages[0].entropy_config" in one_line_error(capsys, "validate", *flags)
    assert not nowhere.exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------------
# Pieces: calibration with the length limit, ranks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, target, limit", [("global", 3.0, 8), ("global", 6.0, 8), ("monotonic", 5.0, 16)])
def test_calibrate_counts_the_length_limit(mode, target, limit):
    # An untrained entropy model still ranks positions; the limit adds starts that calibration
    # must count (a plain quantile of the scores would give patches shorter than the target).
    torch.manual_seed(0)
    entropy = ModelConfig(stages=[StageConfig(d_model=16, n_layers=1, n_heads=2)], max_seq_len=64)
    stage = StageConfig(patcher="entropy", patch_size=limit, entropy_architecture=entropy.to_dict(),
                        entropy_mode=mode, target_patch_length=target)  # fmt: skip
    patcher = EntropyPatcher(stage)
    text = np.frombuffer(EMBEDDED_TEXT.read_bytes()[:64 * 64], dtype=np.uint8)
    tokens = torch.from_numpy(text.copy()).long().view(64, 64)
    theta = patcher.calibrate(tokens)
    assert float(patcher.threshold) == theta
    starts = unit_starts(patcher.rule(tokens), None, limit, 64, 64, tokens.device)
    assert tokens.numel() / int(starts.sum()) == pytest.approx(target, rel=0.02)


def test_calibration_windows_are_fixed_whole_training_windows(tmp_path):
    from datamodules import TextDataModule

    (tmp_path / "book.txt").write_bytes(EMBEDDED_TEXT.read_bytes()[:300_000])
    data = TextDataModule(data_path=str(tmp_path / "book.txt"), seq_len=1000, cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    windows = calibration_windows(data, num_bytes=20_000)
    assert windows.shape == (20, 1000) and windows.dtype == torch.int64
    assert torch.equal(windows, calibration_windows(data, num_bytes=20_000))  # every rank, every run
    train = (data.cache_folder / "train.bin").read_bytes()
    for row in windows:
        assert bytes(row.tolist()) in train  # real training bytes, whole windows
    assert len({bytes(row.tolist()) for row in windows}) == 20


def test_only_global_rank_zero_trains(monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert is_global_rank_zero()  # a single process
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "0")
    assert is_global_rank_zero()
    monkeypatch.setenv("NODE_RANK", "1")  # Lightning's launcher, second node
    assert not is_global_rank_zero()
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("RANK", "3")  # torchrun
    assert not is_global_rank_zero()


def test_other_ranks_wait_for_the_export_or_rank_zeros_error(tmp_path):
    export = tmp_path / "export"

    def write_export():
        time.sleep(0.2)
        export.mkdir()
        (export / "model.safetensors").write_bytes(b"weights")
        time.sleep(0.1)  # config.yaml is written last: the export is complete only then
        (export / "config.yaml").write_text("model: {}\n")

    writer = threading.Thread(target=write_export)
    writer.start()
    wait_for_entropy_model(0, export, poll_seconds=0.02)
    writer.join()
    assert (export / "config.yaml").is_file()

    failing = tmp_path / "failing"
    threading.Timer(0.1, lambda: Path(str(failing) + ".failed").write_text("stages[0]: training failed\n")).start()
    with pytest.raises(EntropyModelError, match="stages\\[0\\]: training failed"):
        wait_for_entropy_model(0, failing, poll_seconds=0.02)
