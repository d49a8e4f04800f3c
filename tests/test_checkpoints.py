"""Checkpoints people share: every load path reads them safely (a pickled payload never runs), bad
files get one clear error naming them, `export` round-trips through safetensors + YAML, an export
directory works wherever a checkpoint does, and settings given on a resume apply or are refused."""

import dataclasses
import json
import random
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from datamodules import TextDataModule
from multibyte.checkpoints import (
    CheckpointError,
    allowed_globals,
    byte_model_state,
    checkpoint_hparams,
    config_differences,
    config_from_dict,
    load_byte_model,
    load_checkpoint,
    plain,
)
from multibyte.cli import main, make_cli
from multibyte.config import ModelConfig, StageConfig, megabyte
from multibyte.trainer import MultibyteTrainer
from multibyte.training import ByteLM, hparam_conflicts, load_model

SEQ_LEN = 32


def architecture() -> ModelConfig:
    return megabyte(4, SEQ_LEN, 32, 1, 2, 16, 1, 2)


def data_flags(root: Path) -> list[str]:
    """A small text file (its 5% validation and test splits are a few windows each)."""
    text = root / "book.txt"
    if not text.exists():
        text.write_bytes(bytes(range(32, 127)) * 40)
    return ["--data", "datamodules.TextDataModule", "--data.data_path", str(text), "--data.seq_len", str(SEQ_LEN),
            "--data.batch_size", "2", "--data.cache_dir", str(root / "cache")]


def trainer_flags(root: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(root), "--trainer.logger", "false", "--trainer.precision", "32-true",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.limit_predict_batches", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real `fit` of a tiny MEGABYTE for 4 steps: <run>/checkpoints/last.ckpt and a best one."""
    root = tmp_path_factory.mktemp("fit")
    main(["fit", "--seed_everything", "0", "--model.architecture", json.dumps(plain(architecture())),
          *data_flags(root), *trainer_flags(root), "--trainer.max_steps", "4",
          "--trainer.val_check_interval", "2", "--test_after_fit", "false"])
    assert (root / "checkpoints" / "last.ckpt").is_file()
    return root


@pytest.fixture(scope="module")
def last(run) -> Path:
    return run / "checkpoints" / "last.ckpt"


def common(run: Path, tmp: Path) -> list[str]:
    return [*data_flags(run), *trainer_flags(tmp)]


def refused(*args: str) -> str:
    """Run the command line; it must stop with exit status 2. Returns the message."""
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    assert stopped.value.code == 2, stopped.value
    return str(stopped.value)


def datamodule(run: Path) -> TextDataModule:
    return TextDataModule(data_path=str(run / "book.txt"), seq_len=SEQ_LEN, batch_size=2, cache_dir=str(run / "cache"))


def trainer(tmp: Path) -> MultibyteTrainer:
    return MultibyteTrainer(default_root_dir=tmp, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, limit_val_batches=1, limit_test_batches=1, max_steps=1,
                            precision="32-true", accelerator="cpu")


# ------------------------------------------------------------------------------------------------
# A checkpoint carrying a pickled payload
# ------------------------------------------------------------------------------------------------


class Payload:
    """Unpickled, it creates `marker` (pickle calls open(marker, "w")): the stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def poisoned(last: Path, folder: Path, marker: Path) -> Path:
    """A working checkpoint (weights, hyperparameters, training state) plus a payload."""
    checkpoint = load_checkpoint(last)
    checkpoint["hyper_parameters"]["note"] = Payload(marker)
    path = folder / "poisoned.ckpt"
    torch.save(checkpoint, path)
    return path


def test_the_payload_is_real(last, tmp_path):
    # Guard against a test that cannot fail: an unsafe load of the file does run the payload.
    marker = tmp_path / "ran"
    path = poisoned(last, tmp_path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_only_the_config_dataclasses_are_allowed():
    assert set(allowed_globals()) == {ModelConfig, StageConfig}


LOAD_PATHS = {
    "fit": ["fit", "--trainer.max_steps", "1"],
    "validate": ["validate"],
    "test": ["test"],
    "predict": ["predict"],
    "sample": ["sample", "--max_new_bytes", "4"],
    "bench": ["bench", "--codecs", "false"],
    "compress": ["compress", "--input_file", "{input}"],
    "decompress": ["decompress", "--input_file", "{input}.mbac"],
    "export": ["export", "--output_dir", "{tmp}/export"],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", LOAD_PATHS)
def test_command_line_refuses_a_pickled_payload_before_anything_reads_it(command, run, last, tmp_path, capsys):
    marker = tmp_path / "ran"
    path = poisoned(last, tmp_path, marker)
    (tmp_path / "input.txt").write_bytes(b"some bytes")
    words = [w.format(input=tmp_path / "input.txt", tmp=tmp_path) for w in LOAD_PATHS[command]]
    if command == "sample":
        words += ["--output_dir", str(tmp_path / "samples")]
    message = refused(*words, *common(run, tmp_path), "--ckpt_path", str(path))
    assert message.startswith(f"checkpoint {path}: refused: loading it would call io.open")
    assert "weights_only" not in message
    assert not marker.exists()
    assert not (tmp_path / "samples").exists() and not (tmp_path / "export").exists()
    assert not (tmp_path / "input.txt.mbac").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"multibyte: {message}"


@pytest.mark.parametrize("method", ["fit", "validate", "test", "predict"])
def test_lightnings_own_read_is_safe(method, run, last, tmp_path, monkeypatch):
    # Past the command line (ckpt_path="last" or Python code): Lightning's reader itself refuses,
    # even where the environment asks torch to default to unsafe loads.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    path = poisoned(last, tmp_path, marker)
    module = ByteLM(architecture())
    kwargs = {"datamodule": datamodule(run)} if method != "predict" else {"dataloaders": [torch.zeros(1, SEQ_LEN)]}
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: refused"):
        getattr(trainer(tmp_path), method)(module, ckpt_path=path, **kwargs)
    assert not marker.exists()


@pytest.mark.parametrize("method", ["sample", "bench", "compress", "decompress", "export", "load_model", "load_byte_model"])
def test_every_other_reader_is_safe(method, run, last, tmp_path):
    marker = tmp_path / "ran"
    path = poisoned(last, tmp_path, marker)
    (tmp_path / "input.txt").write_bytes(b"some bytes")
    calls = {
        "sample": lambda t, m: t.sample(m, str(path), datamodule=datamodule(run), output_dir=str(tmp_path / "s")),
        "bench": lambda t, m: t.bench(m, datamodule(run), ckpt_path=str(path), codecs=False, output_dir=str(tmp_path)),
        "compress": lambda t, m: t.compress(m, str(tmp_path / "input.txt"), ckpt_path=str(path)),
        "decompress": lambda t, m: t.decompress(m, str(tmp_path / "input.txt"), ckpt_path=str(path)),
        "export": lambda t, m: t.export(m, str(path), str(tmp_path / "export")),
        "load_model": lambda t, m: load_model(str(path)),
        "load_byte_model": lambda t, m: load_byte_model(path),
    }
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: refused"):
        calls[method](trainer(tmp_path), ByteLM(architecture()))
    assert not marker.exists()


def test_lightning_gets_no_weights_only_false(run, last, tmp_path):
    with pytest.raises(ValueError, match="--weights_only false is not supported"):
        trainer(tmp_path).test(ByteLM(architecture()), datamodule=datamodule(run), ckpt_path=last, weights_only=False)


# ------------------------------------------------------------------------------------------------
# Bad files: one clear error naming the file
# ------------------------------------------------------------------------------------------------


BAD_FILES = {
    "truncated": lambda good: good[: len(good) // 2],
    "cut-short": lambda good: good[:-100],
    "empty": lambda good: b"",
    # garbage reaches pickle opcodes that fail in many ways (IndexError, TypeError, ...): seeded, so a
    # failure names the seed that reproduces it
    **{f"random-{seed}": partial(lambda seed, good: random.Random(seed).randbytes(4096), seed) for seed in range(40)},
    "good-head-random-tail": lambda good: good[:2000] + random.Random(1).randbytes(4096),
    "text": lambda good: b"model weights, honest\n",
    "a-list": None,  # a valid torch file that is no checkpoint
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_are_one_clear_error(kind, last, tmp_path):
    path = tmp_path / f"{kind}.ckpt"
    if BAD_FILES[kind] is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(BAD_FILES[kind](last.read_bytes()))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"checkpoint {path}: ")
    assert "weights_only" not in message and "\n" not in message
    assert ("cannot be read" in message) or ("holds no state_dict" in message)


def test_missing_checkpoint_and_foreign_folder(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nope.ckpt'}: no such file or directory"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="a folder without model.safetensors"):
        load_checkpoint(tmp_path)


@pytest.mark.slow
def test_a_truncated_checkpoint_on_the_command_line_is_one_line(run, last, tmp_path, capsys):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(last.read_bytes()[:5000])
    message = refused("test", *common(run, tmp_path), "--ckpt_path", str(path))
    assert message.startswith(f"checkpoint {path}: cannot be read: truncated, corrupted or not a PyTorch checkpoint")
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"multibyte: {message}"


# ------------------------------------------------------------------------------------------------
# export: safetensors + YAML, usable wherever a checkpoint is
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(run, last) -> Path:
    folder = run / "export"
    main(["export", "--ckpt_path", str(last), "--output_dir", str(folder)])
    return folder


def test_export_round_trip(exported, last):
    assert sorted(p.name for p in exported.iterdir()) == ["config.yaml", "model.safetensors"]
    with safe_open(exported / "model.safetensors", "pt") as weights:
        assert weights.metadata()["format"] == "multibyte-export-1"
    config = yaml.safe_load((exported / "config.yaml").read_text())
    assert config_from_dict(ModelConfig, config["model"]["architecture"]) == architecture()
    assert config["model"]["learning_rate"] == checkpoint_hparams(load_checkpoint(last))["learning_rate"]

    original, restored = load_model(str(last)), load_model(str(exported))
    assert restored.architecture == original.architecture
    for name, tensor in byte_model_state(load_checkpoint(last)).items():
        assert torch.equal(restored.model.state_dict()[name], tensor), name
    tokens = torch.randint(0, 256, (2, SEQ_LEN))
    assert torch.equal(original(tokens), restored(tokens))
    assert torch.equal(load_byte_model(exported)(tokens), restored(tokens))


@pytest.mark.slow
def test_export_never_replaces_files_unless_asked(exported, last, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.yaml").write_text("mine\n")
    message = refused("export", "--ckpt_path", str(last), "--output_dir", str(folder))
    assert message == f"{folder / 'config.yaml'}: already exists (--overwrite true replaces it)"
    assert (folder / "config.yaml").read_text() == "mine\n" and not (folder / "model.safetensors").exists()
    main(["export", "--ckpt_path", str(last), "--output_dir", str(folder), "--overwrite", "true"])
    assert (folder / "config.yaml").read_bytes() == (exported / "config.yaml").read_bytes()
    assert (folder / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["validate", "test"])
def test_an_export_directory_scores_as_its_checkpoint(command, run, last, exported, tmp_path):
    scores = []
    for ckpt in (last, exported):
        cli = make_cli([command, *common(run, tmp_path), "--ckpt_path", str(ckpt)])
        scores.append(float(cli.trainer.callback_metrics[f"{'val' if command == 'validate' else 'test'}/bpb"]))
    assert scores[0] == scores[1]
    # config.yaml is also a --config: the same model, named twice, is no conflict.
    cli = make_cli([command, *common(run, tmp_path), "--config", str(exported / "config.yaml"), "--ckpt_path", str(exported)])
    assert cli.model.architecture == architecture()


@pytest.mark.slow
def test_an_export_directory_samples_and_codes_as_its_checkpoint(run, last, exported, tmp_path):
    main(["sample", *common(run, tmp_path), "--ckpt_path", str(exported), "--output_dir", str(tmp_path / "a"),
          "--max_new_bytes", "8", "--num_samples", "2"])
    main(["sample", *common(run, tmp_path), "--ckpt_path", str(last), "--output_dir", str(tmp_path / "b"),
          "--max_new_bytes", "8", "--num_samples", "2"])
    for name in ("sample_000.txt", "sample_001.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    original = tmp_path / "book.txt"
    original.write_bytes(b"It was a bright cold day in April, and the clocks were striking thirteen." * 3)
    main(["compress", "--ckpt_path", str(exported), "--input_file", str(original), "--lanes", "2"])
    restored = tmp_path / "restored.txt"
    main(["decompress", "--ckpt_path", str(last), "--input_file", f"{original}.mbac", "--output_file", str(restored)])
    assert restored.read_bytes() == original.read_bytes()


def test_fit_from_an_export_directory_starts_a_new_run_from_its_weights(run, exported, tmp_path):
    from lightning import Callback

    class FirstWeights(Callback):
        def on_train_start(self, trainer, module):
            self.step = trainer.global_step
            self.weights = {k: v.clone() for k, v in module.model.state_dict().items()}

    seen = FirstWeights()
    fit = MultibyteTrainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                           enable_model_summary=False, max_steps=1, limit_val_batches=0, callbacks=[seen], accelerator="cpu")
    fit.fit(ByteLM(architecture()), datamodule=datamodule(run), ckpt_path=exported)
    assert seen.step == 0
    expected = byte_model_state(load_checkpoint(exported))
    assert all(torch.equal(seen.weights[name], tensor) for name, tensor in expected.items())
    # The architecture must still be the one the weights were trained for.
    other = dataclasses.replace(architecture(), dropout=0.1)
    with pytest.raises(ValueError, match=r"model\.architecture\.dropout: given 0\.1, checkpoint 0\.0"):
        fit.fit(ByteLM(other), datamodule=datamodule(run), ckpt_path=exported)


# ------------------------------------------------------------------------------------------------
# Settings given with --ckpt_path apply or are refused
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_architecture_flags_that_contradict_the_checkpoint_are_refused(run, last, tmp_path):
    message = refused("test", *common(run, tmp_path), "--ckpt_path", str(last), "--model.architecture.dropout", "0.1")
    assert "model.architecture.dropout: given 0.1, checkpoint 0.0" in message and str(last) in message
    # Given explicitly, even when it equals the built-in default (8192), a contradiction is refused.
    message = refused("validate", *common(run, tmp_path), "--ckpt_path", str(last), "--model.architecture.max_seq_len", "8192")
    assert f"model.architecture.max_seq_len: given 8192, checkpoint {SEQ_LEN}" in message


@pytest.mark.slow
def test_optimisation_flags_are_refused_on_resume_and_apply_elsewhere(run, last, tmp_path):
    message = refused("fit", *common(run, tmp_path), "--ckpt_path", str(last), "--model.learning_rate", "0.1",
                      "--trainer.max_steps", "6")
    assert "model.learning_rate: given 0.1, checkpoint 0.0006" in message and "python -m multibyte export" in message
    cli = make_cli(["test", *common(run, tmp_path), "--ckpt_path", str(last), "--model.learning_rate", "0.1"])
    assert cli.model.hparams.learning_rate == 0.1  # scoring does not use it: it applies, harmlessly


@pytest.mark.slow
def test_resume_without_flags_builds_the_checkpoints_model_and_continues(run, last, tmp_path):
    root = tmp_path / "resumed"
    cli = make_cli(["fit", *data_flags(run), *trainer_flags(root), "--ckpt_path", str(last),
                    "--trainer.max_steps", "6", "--trainer.val_check_interval", "2", "--test_after_fit", "false"])
    assert cli.model.architecture == architecture()  # not ByteLM's default 8192-byte model
    assert cli.trainer.global_step == 6
    assert load_checkpoint(root / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_lightnings_restore_refuses_another_architecture(run, last, tmp_path):
    # ckpt_path="last"/"best" and Python code never pass the command line's check: the module does.
    other = dataclasses.replace(architecture(), init_std=0.5)
    with pytest.raises(CheckpointError, match=r"model\.architecture\.init_std: given 0\.5, checkpoint 0\.02"):
        trainer(tmp_path).test(ByteLM(other), datamodule=datamodule(run), ckpt_path=last)
    with pytest.raises(CheckpointError, match=r"model\.warmup_steps: given 7, checkpoint 200"):
        trainer(tmp_path).fit(ByteLM(architecture(), warmup_steps=7), datamodule=datamodule(run), ckpt_path=last)
    trainer(tmp_path).test(ByteLM(architecture(), warmup_steps=7), datamodule=datamodule(run), ckpt_path=last)


def checkpointed(config: ModelConfig) -> ModelConfig:
    """`config` with activation checkpointing in every stage: the same weights, the same results."""
    return dataclasses.replace(config, stages=[dataclasses.replace(s, checkpoint=True) for s in config.stages])


def test_activation_checkpointing_is_no_conflict_but_the_architecture_still_is():
    stored = {"architecture": plain(architecture()), "learning_rate": 6e-4}
    stored["architecture"]["stages"][0]["entropy_architecture"] = plain(architecture())  # a nested stage list
    given = json.loads(json.dumps(stored))
    outer = given["architecture"]["stages"]
    for stages in (outer, outer[0]["entropy_architecture"]["stages"]):
        for stage in stages:
            stage["checkpoint"] = True
    assert hparam_conflicts(given, stored, resuming=True) == []
    # Only a stage's field of that name is exempt; the rest of the stage is still compared.
    given["architecture"]["stages"][0]["entropy_architecture"]["stages"][1]["d_model"] = 8
    assert config_differences(given, stored) == [
        ("architecture.stages[0].entropy_architecture.stages[1].d_model", 8, 16)
    ]
    assert config_differences({"checkpoint": True}, {"checkpoint": False}) == [("checkpoint", True, False)]


def test_a_checkpoint_resumes_and_scores_with_activation_checkpointing_switched(run, last, tmp_path):
    fit = MultibyteTrainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                           enable_checkpointing=False, max_steps=5, limit_val_batches=0, precision="32-true",
                           accelerator="cpu")
    module = ByteLM(checkpointed(architecture()))
    fit.fit(module, datamodule=datamodule(run), ckpt_path=last)
    assert fit.global_step == 5  # resumed at step 4 and trained one step with checkpointing on
    assert all(stage.checkpoint for stage in module.architecture.stages)  # the given setting applies
    trainer(tmp_path).test(ByteLM(checkpointed(architecture())), datamodule=datamodule(run), ckpt_path=last)


@pytest.mark.slow
def test_the_command_line_takes_activation_checkpointing_from_the_flags(run, last, tmp_path):
    cli = make_cli(["test", *common(run, tmp_path), "--ckpt_path", str(last),
                    "--model.architecture", json.dumps(plain(checkpointed(architecture())))])
    assert cli.model.architecture == checkpointed(architecture())
    assert "test/bpb" in cli.trainer.callback_metrics
