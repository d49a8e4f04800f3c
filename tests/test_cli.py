"""The command line: every shipped config parses and builds, and `fit` runs end to end."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multibyte.cli import make_cli, resolve_config_arguments, resolve_config_path, shipped_config_dir
from multibyte.config import ModelConfig
from multibyte.training import ByteLM

CONFIGS = shipped_config_dir()
BASE_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
LAYERED_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("cpu/*.yaml"))
LAYERED_ON = re.compile(r"layered on (\S+\.yaml)")


def base_of(layered: str) -> str:
    """The config a CPU preset layers on, as its first comment line says ('layered on X.yaml')."""
    match = LAYERED_ON.search((CONFIGS / layered).read_text())
    assert match, f"{layered} must say in a comment which config it is 'layered on'"
    return match.group(1)


def build(configs: list[str], tmp_path: Path, *overrides: str):
    args = [a for c in configs for a in ("--config", resolve_config_path(c))]
    args += ["--trainer.default_root_dir", str(tmp_path), "--data.init_args.cache_dir", str(tmp_path / "cache")]
    with torch.device("meta"):  # GPU-sized models: shapes only, no gigabytes allocated
        return make_cli(args + list(overrides), run=False)


def test_shipped_configs_exist():
    assert {"text.yaml", "image64.yaml", "audio.yaml"} <= set(BASE_CONFIGS)
    assert {"cpu/text.yaml", "cpu/image64.yaml", "cpu/audio.yaml"} <= set(LAYERED_CONFIGS)


@pytest.mark.parametrize("name", BASE_CONFIGS)
def test_every_base_config_parses_and_builds(name, tmp_path):
    cli = build([name], tmp_path)
    assert isinstance(cli.model, ByteLM)
    assert isinstance(cli.model.architecture, ModelConfig)
    assert cli.model.model.num_parameters() > 1_000_000
    seq_len = cli.datamodule.seq_len
    assert seq_len % cli.model.architecture.patch_size == 0
    assert seq_len <= cli.model.architecture.max_seq_len


@pytest.mark.parametrize("name", LAYERED_CONFIGS)
def test_every_cpu_preset_parses_on_its_base(name, tmp_path):
    cli = build([base_of(name), name], tmp_path)
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert cli.datamodule.seq_len % cli.model.architecture.patch_size == 0


def test_bare_config_names_resolve_to_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder with no configs in it
    assert Path(resolve_config_path("image64.yaml")) == CONFIGS / "image64.yaml"
    assert Path(resolve_config_path("cpu/image64")) == CONFIGS / "cpu" / "image64.yaml"
    (tmp_path / "image64.yaml").write_text("seed_everything: 1\n")
    assert resolve_config_path("image64.yaml") == "image64.yaml"  # a local file wins
    assert resolve_config_arguments(["fit", "--config=text.yaml"]) == ["fit", f"--config={CONFIGS / 'text.yaml'}"]
    with pytest.raises(SystemExit, match="nosuch.yaml"):
        resolve_config_path("nosuch.yaml")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "multibyte", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_help_and_print_config(tmp_path):
    assert "fit" in run_cli("--help", cwd=tmp_path).stdout
    printed = run_cli("fit", "--config", "image64.yaml", "--print_config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert "patch_size: 12" in printed.stdout and "ImageNet64DataModule" in printed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYERED_CONFIGS)
def test_fit_runs_through_the_cli(name, tmp_path):
    # The card's own command shape, from a folder that holds no configs, with tiny overrides.
    result = run_cli(
        "fit", "--config", base_of(name), "--config", name,
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.init_args.cache_dir", str(tmp_path / "cache"),
        "--data.init_args.batch_size", "2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"test bits/(?:dim|byte): (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    assert 0.0 < float(match.group(1)) < 16.0
    assert list((tmp_path / "run").rglob("last.ckpt")), "ModelCheckpoint(save_last=True) wrote no last.ckpt"


def test_seq_len_not_a_multiple_of_the_patch_size_is_one_clear_error(tmp_path):
    result = run_cli(
        "fit", "--config", "text.yaml", "--config", "cpu/text.yaml",
        "--data.init_args.seq_len", "1020",
        "--trainer.max_steps", "1",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.init_args.cache_dir", str(tmp_path / "cache"),
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "seq_len=1020 is not a multiple of the model's patch_size=8" in result.stderr
