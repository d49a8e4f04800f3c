"""The command line: every shipped config parses and builds, and `fit` runs end to end."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from multibyte.checkpoints import plain
from cli_errors import one_line_error
from multibyte.cli import main, make_cli, resolve_config_arguments, resolve_config_path, shipped_config_dir
from multibyte.config import ModelConfig, megabyte
from multibyte.training import ByteLM

CONFIGS = shipped_config_dir()
LAYERED_ON = re.compile(r"layered on (\S+\.yaml)")
# multinode.yaml holds trainer settings only, layered on a model config (tests/test_distributed.py)
BASE_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if not LAYERED_ON.search(p.read_text()))
LAYERED_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("cpu/*.yaml"))


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


def untrained_entropy_model(configs: list[str], tmp_path: Path) -> list[str]:
    """A BLT config names an entropy model that `fit` trains first from its entropy_config
    (tests/test_blt.py covers that); here stage 0 gets that config's architecture instead,
    untrained. No flags for other configs."""
    recipe = None
    for name in configs:
        data = yaml.safe_load(Path(resolve_config_path(name)).read_text()) or {}
        for stage in ((data.get("model") or {}).get("architecture") or {}).get("stages") or []:
            recipe = stage.get("entropy_config") or recipe
    if recipe is None:
        return []
    architecture = plain(build(recipe, tmp_path / "entropy").model.architecture)
    return ["--model.architecture.stages", json.dumps([{"entropy_architecture": architecture}, {}])]


def embedded_data_instead_of_shared(configs: list[str]) -> list[str]:
    """A recipe names real data beside the repository (data_path ../shared/data/..., whole files
    held out by name); this smoke test runs it on the embedded sample, as a fresh install would."""
    for name in configs:
        data = yaml.safe_load(Path(resolve_config_path(name)).read_text()) or {}
        init_args = (data.get("data") or {}).get("init_args") or {}
        if init_args.get("data_path"):
            flags = ["--data.init_args.data_path", "null"]
            for key in ("validation_files", "test_files"):
                if key in init_args:
                    flags += [f"--data.init_args.{key}", "null"]
            return flags
    return []


def test_shipped_configs_exist():
    assert {"text.yaml", "image64.yaml", "audio.yaml"} <= set(BASE_CONFIGS)
    assert {"cpu/text.yaml", "cpu/image64.yaml", "cpu/audio.yaml"} <= set(LAYERED_CONFIGS)
    # from a checkout, its own configs/, not what an editable install elsewhere points at
    assert CONFIGS == Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", BASE_CONFIGS)
def test_every_base_config_parses_and_builds(name, tmp_path):
    cli = build([name], tmp_path, *untrained_entropy_model([name], tmp_path))
    assert isinstance(cli.model, ByteLM)
    assert isinstance(cli.model.architecture, ModelConfig)
    assert cli.model.model.num_parameters() > 1_000_000
    seq_len = cli.datamodule.seq_len
    assert seq_len % cli.model.architecture.alignment == 0
    assert seq_len <= cli.model.architecture.max_seq_len


@pytest.mark.parametrize("name", LAYERED_CONFIGS)
def test_every_cpu_preset_parses_on_its_base(name, tmp_path):
    cli = build([base_of(name), name], tmp_path)
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert cli.datamodule.seq_len % cli.model.architecture.alignment == 0


def test_bare_config_names_resolve_to_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder with no configs in it
    assert Path(resolve_config_path("image64.yaml")) == CONFIGS / "image64.yaml"
    assert Path(resolve_config_path("cpu/image64")) == CONFIGS / "cpu" / "image64.yaml"
    (tmp_path / "image64.yaml").write_text("seed_everything: 1\n")
    assert resolve_config_path("image64.yaml") == "image64.yaml"  # a local file wins
    assert resolve_config_arguments(["fit", "--config=text.yaml"]) == ["fit", f"--config={CONFIGS / 'text.yaml'}"]
    with pytest.raises(ValueError, match="nosuch.yaml"):
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
        *untrained_entropy_model([base_of(name), name], tmp_path),
        *embedded_data_instead_of_shared([name]),
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


# ------------------------------------------------------------------------------------------------
# Bad input ends in one line, `multibyte: <message>`, and exit status 2
# ------------------------------------------------------------------------------------------------

TINY = json.dumps(plain(megabyte(4, 32, 32, 1, 2, 16, 1, 2)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A folder with a small text file and an untrained tiny checkpoint (weights only)."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "book.txt").write_bytes(bytes(range(32, 127)) * 40)
    torch.save({"state_dict": ByteLM(megabyte(4, 32, 32, 1, 2, 16, 1, 2)).state_dict()}, root / "tiny.ckpt")
    return root


def tiny_flags(root: Path) -> list[str]:
    return [
        "--model.architecture", TINY, "--data", "datamodules.TextDataModule", "--data.data_path", str(root / "book.txt"),
        "--data.seq_len", "32", "--data.batch_size", "2", "--data.cache_dir", str(root / "cache"),
        "--trainer.default_root_dir", str(root / "run"), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--model.min_lr_ratio", "-0.5"], "--model.min_lr_ratio must lie in [0, 1], got -0.5"),
        (["fit", "--model.learning_rate", "0"], "--model.learning_rate must be a positive number, got 0.0"),
        (["fit", "--model.architecture", json.dumps({"stages": [{"d_model": 32, "n_heads": 0}]})],
         "stage n_heads must be at least 1, got 0"),
        (["fit", "--trainer.val_check_interval", "100000", "--trainer.max_steps", "1"], "`val_check_interval` (100000) must be"),
        (["bench", "--batch_size", "0", "--ckpt_path", "{ckpt}"], "--batch_size must be at least 1, got 0"),
        (["sample", "--top_p", "1.5", "--ckpt_path", "{ckpt}"], "--top_p must lie in (0, 1], got 1.5"),
        (["sample", "--top_p", "0", "--ckpt_path", "{ckpt}"], "--top_p must lie in (0, 1], got 0.0"),
        (["sample", "--temperature", "-1", "--ckpt_path", "{ckpt}"], "--temperature must be >= 0 (0 is greedy), got -1.0"),
        (["sample", "--num_samples", "0", "--ckpt_path", "{ckpt}"], "--num_samples must be at least 1, got 0"),
        (["sample", "--quantize", "int8", "--dtype", "bfloat16", "--ckpt_path", "{ckpt}"],
         "--quantize int8 decodes with fp32 arithmetic: leave --dtype out (or set float32), got --dtype bfloat16"),
        (["compress", "--lanes", "0", "--input_file", "{book}", "--ckpt_path", "{ckpt}"], "--lanes must lie in 1..65535, got 0"),
        (["test", "--ckpt_path", "{root}/nothing.ckpt"], "checkpoint {root}/nothing.ckpt: no such file or directory"),
        (["fit", "--data.data_path", "{root}/nothing.txt"], "nothing.txt"),
    ],
    ids=["min_lr_ratio", "learning_rate", "n_heads", "lightning-flag", "bench-batch", "top_p-high", "top_p-zero",
         "temperature", "num_samples", "quantize-dtype", "lanes", "missing-ckpt", "missing-data"],
)
def test_bad_values_are_one_line_and_exit_2(args, message, tiny_run, capsys):
    def fill(text: str) -> str:
        for name, value in {"ckpt": tiny_run / "tiny.ckpt", "book": tiny_run / "book.txt", "root": tiny_run}.items():
            text = text.replace("{" + name + "}", str(value))
        return text

    args = [fill(a) for a in args]
    flags = tiny_flags(tiny_run)
    if "--model.architecture" in args:  # replace the tiny architecture
        flags = flags[2:]
    assert fill(message) in one_line_error(capsys, args[0], *flags, *args[1:])


def test_bugs_keep_their_traceback(tiny_run, monkeypatch):
    from multibyte.trainer import MultibyteTrainer

    def broken(self, *args, **kwargs):
        return int("not a number")  # a ValueError, but raised by a mistake, not by a check

    monkeypatch.setattr(MultibyteTrainer, "bench", broken)
    with pytest.raises(ValueError, match="invalid literal for int"):
        main(["bench", *tiny_flags(tiny_run)])


def test_multibyte_debug_shows_every_traceback(tiny_run, monkeypatch):
    monkeypatch.setenv("MULTIBYTE_DEBUG", "1")
    with pytest.raises(ValueError, match="--model.min_lr_ratio must lie in"):
        main(["fit", *tiny_flags(tiny_run), "--model.min_lr_ratio", "2"])


@pytest.mark.slow
def test_a_bad_value_in_a_real_process(tiny_run, tmp_path):
    result = run_cli("fit", *tiny_flags(tiny_run), "--model.min_lr_ratio", "-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "multibyte: --model.min_lr_ratio must lie in [0, 1], got -1.0"


@pytest.mark.parametrize(
    "trainer, native, expected",
    [
        ({"precision": "bf16-mixed", "accelerator": "cpu"}, False, "32-true"),
        ({"precision": "bf16", "accelerator": "cpu"}, False, "32-true"),
        ({"precision": "bf16-mixed", "accelerator": "cpu"}, True, None),  # the fast setting there
        ({"precision": "bf16-true", "accelerator": "cpu"}, False, None),  # asked for bf16 weights
        ({"precision": "32-true", "accelerator": "cpu"}, False, None),
        ({"precision": "bf16-mixed", "accelerator": "gpu"}, False, None),
        ({"precision": "bf16-mixed", "accelerator": "cuda"}, False, None),
    ],
)
def test_cpu_precision_fallback(trainer, native, expected):
    from multibyte.cli import cpu_precision_fallback

    assert cpu_precision_fallback(trainer, native) == expected


def test_cpu_precision_fallback_on_auto_follows_the_devices(monkeypatch):
    from multibyte.cli import cpu_precision_fallback

    trainer = {"precision": "bf16-mixed", "accelerator": "auto"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert cpu_precision_fallback(trainer, False) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_precision_fallback(trainer, False) is None


@pytest.mark.parametrize("native, flag, expected", [(False, [], "32-true"), (True, [], "bf16-mixed"),
                                                    (False, ["--cpu_bf16_fallback", "false"], "bf16-mixed")])
def test_cli_trains_bf16_mixed_only_where_the_cpu_has_bf16(tiny_run, monkeypatch, caplog, native, flag, expected):
    # The CPU presets ask for bf16-mixed; on an AVX2-only CPU that would be the slow setting.
    monkeypatch.setattr("multibyte.cpu_features.has_native_bf16", lambda: native)
    args = ["validate", *tiny_flags(tiny_run), "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed",
            "--trainer.limit_val_batches", "1", *flag]
    with caplog.at_level("INFO"):
        cli = make_cli(args)
    assert cli.trainer.precision == expected
    said = "trainer.precision bf16-mixed -> 32-true" in caplog.text
    assert said == (expected == "32-true")
