"""`python -m multibyte` / `multibyte`: LightningCLI over `ByteLM` and the byte-stream datamodules.

    python -m multibyte fit --config image64.yaml --config cpu/image64.yaml
    python -m multibyte test --config text.yaml --ckpt_path runs/.../last.ckpt

A `--config` value that is not an existing file is looked up among the shipped configs (the
repository's configs/ folder, installed as `multibyte.shipped_configs`), so the commands above
work from any folder. After `fit`, the test split is scored and its bits per byte printed.

Bad input (a config value, a data file, a checkpoint, an existing output) ends in one line,
`multibyte: <what and where>`, and exit status 2; a traceback means a bug (MULTIBYTE_DEBUG=1 shows
one for every error). SIGTERM during `fit` saves last.ckpt and exits with 143.

With --ckpt_path, the model is built from the checkpoint's hyperparameters. Settings given on the
command line or in a --config that contradict them are refused, listing the keys: the
architecture always (the weights are made for it), and on a `fit` resume also the optimisation
settings (learning rate, betas, weight decay, warm-up, min_lr_ratio), which the restored optimizer
and schedule would otherwise silently replace. To train on with other optimisation settings,
`export` the weights and start a new run from the export directory. An entropy stage's model
(BLT) travels inside the checkpoint: its architecture, threshold and source are taken from the
checkpoint's hyperparameters, so the entropy model's own export folder is not needed.

`fit` of a model with an entropy stage first trains the entropy model its config names when that
does not exist yet, and `fit --export_dir DIR` exports the best checkpoint when it is done
(multibyte/entropy_training.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

import lightning
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

import datamodules
import multibyte
from datamodules.base import ByteStreamDataModule
from multibyte import cpu_features
from multibyte.checkpoints import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    CheckpointError,
    checkpoint_hparams,
    config_from_dict,
    export_checkpoint,
    load_checkpoint,
    plain,
)
from multibyte.config import ModelConfig
from multibyte.entropy_training import adopt_checkpoint_entropy_models, prepare_entropy_models
from multibyte.fault_tolerance import DivergenceGuard, PreemptionCheckpoint, TrainingDiverged
from multibyte.trainer import EXTRA_SUBCOMMANDS, MultibyteTrainer
from multibyte.data_spec import DataSpec, data_spec_of
from multibyte.training import ByteLM, describe_conflicts, hparam_conflicts

# Subcommands that work without --data (compress / decompress take the window from the model).
DATA_OPTIONAL = ("export", "compress", "decompress")
# Subcommands that run Lightning's loops, where trainer.precision sets the training arithmetic.
LOOP_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# ckpt_path values Lightning resolves itself (its reader, made safe by MultibyteTrainer, reads them).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def shipped_config_dir() -> Path:
    """The shipped configs: the checkout's configs/ when this package is imported from a source
    checkout (beside its pyproject.toml), whatever an editable install made elsewhere maps
    `multibyte.shipped_configs` to; else the installed package `multibyte.shipped_configs`."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs" / "__init__.py").is_file():
        return checkout / "configs"
    return Path(str(resources.files("multibyte.shipped_configs")))


def resolve_config_path(value: str) -> str:
    """`value` itself if it names a file (or is inline YAML), else the shipped config of that name."""
    if Path(value).is_file() or "\n" in value or value.lstrip().startswith("{"):
        return value
    root = shipped_config_dir()
    for candidate in (root / value, root / f"{value}.yaml"):
        if candidate.is_file():
            return str(candidate)
    available = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
    raise ValueError(
        f"config file {value!r} not found, neither here nor among the shipped configs ({', '.join(available)})"
    )


# Switch-style spellings of boolean flags, for the flags users reach for most.
FLAG_ALIASES = {
    "--no-adapt": ["--adapt", "false"],
    "--no_adapt": ["--adapt", "false"],
    "--no-ngram": ["--ngram", "false"],
    "--no_ngram": ["--ngram", "false"],
    "--no-lpc": ["--lpc", "false"],
    "--no_lpc": ["--lpc", "false"],
}


def resolve_config_arguments(argv: list[str]) -> list[str]:
    """Rewrite every `--config X` / `--config=X` so X points at an existing file, and the
    FLAG_ALIASES (`--no-adapt` is `--adapt false`, `--no-ngram` is `--ngram false`, `--no-lpc` is `--lpc false`)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in FLAG_ALIASES:
            out += FLAG_ALIASES[arg]
            i += 1
            continue
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, resolve_config_path(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config_path(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


class MultibyteCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **EXTRA_SUBCOMMANDS}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
        if subcommand == "fit":
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            parser.add_argument(
                "--export_dir",
                type=Optional[str],
                default=None,
                help="After fit, export the best checkpoint (the last without validation) to this folder "
                "(model.safetensors + config.yaml, as `export` writes them); existing files are refused.",
            )
            return parser
        if subcommand not in DATA_OPTIONAL:
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # LightningCLI makes --data optional when it is given no datamodule class; pretend so here.
        datamodule_class, self.datamodule_class = self.datamodule_class, None
        try:
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        finally:
            self.datamodule_class = datamodule_class

    def parse_arguments(self, parser, args) -> None:
        self._given_args = args  # parsed again in _parse_ckpt_path
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Read --ckpt_path safely before anything else does, and build the model from its
        hyperparameters with what was given on top, refusing what contradicts them.

        (Replaces LightningCLI's version, which reads the file with torch.load itself, so a bad
        file fails deep inside Lightning, and silently lets the checkpoint's values replace
        --model flags.)
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        path = Path(str(ckpt_path))
        if not path.exists():
            if str(ckpt_path).split(":")[0] in SPECIAL_CKPT_PATHS or "://" in str(ckpt_path):
                return
            raise CheckpointError(f"checkpoint {path}: no such file or directory")
        stored = checkpoint_hparams(load_checkpoint(path, mmap=True))
        parser = self._parser(subcommand)
        configured = parser.get_defaults().get("model")
        known = set(vars(configured)) if configured is not None else set()
        stored = {name: value for name, value in stored.items() if name in known}
        if not stored:  # weights without hyperparameters: the configured model is used as it is
            return
        if isinstance(stored.get("architecture"), dict):
            try:  # the config's own checks, so that their message names the checkpoint
                config_from_dict(ModelConfig, stored["architecture"])
            except (ValueError, TypeError) as error:
                raise CheckpointError(f"checkpoint {path}: its architecture does not fit this multibyte: {error}") from None
        # Parse the command line again with the checkpoint's values as the defaults: what comes
        # out is the checkpoint's model with exactly the given settings on top.
        try:
            parser.set_defaults({f"model.{name}": value for name, value in stored.items()})
            self.parse_arguments(self.parser, self._given_args)
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointError(
                f"checkpoint {path}: its hyperparameters do not fit this version of multibyte ({error})"
            ) from None
        if isinstance(stored.get("architecture"), dict):  # its entropy models travel inside it
            adopt_checkpoint_entropy_models(self.config[subcommand]["model"]["architecture"], stored["architecture"])
        given = plain(self.config[subcommand]["model"].as_dict())
        conflicts = hparam_conflicts(given, stored, resuming=subcommand == "fit")
        if conflicts:
            raise CheckpointError(describe_conflicts(path, conflicts, resuming=subcommand == "fit"))

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:  # make_cli(run=False): parse and build only
            return
        config = self.config[self.subcommand]
        export_dir = config.get("export_dir") if self.subcommand == "fit" else None
        if export_dir:  # refused now, not after the training
            _writable_export(Path(export_dir))
        if self.subcommand in LOOP_SUBCOMMANDS and config.get("cpu_bf16_fallback", True):
            replacement = cpu_precision_fallback(config["trainer"], cpu_features.has_native_bf16())
            if replacement is not None:
                lightning.pytorch.utilities.rank_zero_info(
                    f"multibyte: trainer.precision {config['trainer']['precision']} -> {replacement}: this CPU has no "
                    "native bf16 (AVX512-BF16 or AMX), where bf16 matmuls run several times slower than fp32 "
                    "(--cpu_bf16_fallback false keeps it)"
                )
                config["trainer"]["precision"] = replacement
        prepare_entropy_models(config, self.subcommand)  # BLT: train what the config names, first

    def instantiate_classes(self) -> None:
        if self.subcommand == "export":  # reads the checkpoint itself: the model needs no memory
            with torch.device("meta"):
                return super().instantiate_classes()
        return super().instantiate_classes()

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/bpb",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-step{step}-bpb{val/bpb:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, score the test split with the best checkpoint and print its bits per byte.",
        )
        parser.add_argument(
            "--cpu_bf16_fallback",
            type=bool,
            default=True,
            help="On a CPU without native bf16 (AVX512-BF16 or AMX), run fit/validate/test/predict of a "
            "bf16-mixed trainer in 32-true: there bf16 matmuls are emulated, several times slower than fp32. "
            "false keeps bf16-mixed.",
        )
        # The typed data contract: the model receives the datamodule's DataSpec when both are
        # built, and refuses a window length, vocabulary or patch size that does not fit it.
        parser.link_arguments("data", "model.data_spec", compute_fn=_spec_or_none, apply_on="instantiate")

    def after_fit(self) -> None:
        export_dir = self.config[self.subcommand].get("export_dir")
        if export_dir and self.trainer.is_global_zero:
            callback = self.trainer.checkpoint_callback
            best = getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")
            if not best:
                raise ValueError(f"--export_dir {export_dir}: this run saved no checkpoint to export")
            paths = export_checkpoint(best, export_dir)
            print(f"exported {best} to " + ", ".join(str(p) for p in paths))
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        has_best = bool(getattr(self.trainer.checkpoint_callback, "best_model_path", ""))
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)
        if self.trainer.is_global_zero and results:
            bpb = results[0]["test/bpb"]
            unit = data_spec_of(self.datamodule).unit
            print(f"test {unit}: {bpb:.4f}")


def cpu_precision_fallback(trainer: dict, native_bf16: bool) -> Optional[str]:
    """The precision to train in instead of the trainer config's, or None to keep it: "32-true" for
    bf16 autocast ("bf16-mixed", "bf16") on a CPU without native bf16. The CPU presets ask for
    bf16-mixed because it is the fast setting where the CPU has bf16 arithmetic; elsewhere fp32 is
    the fast one, and the model's loss is fp32 either way. "bf16-true" (bf16 weights, for memory)
    is kept. The trainer is on the CPU when its accelerator is "cpu", or "auto" with no GPU."""
    if native_bf16 or str(trainer.get("precision")) not in ("bf16-mixed", "bf16"):
        return None
    accelerator = trainer.get("accelerator", "auto")
    if accelerator == "auto":
        on_cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    else:
        on_cpu = accelerator == "cpu"
    return "32-true" if on_cpu else None


def _spec_or_none(datamodule) -> "DataSpec | None":
    return None if datamodule is None else data_spec_of(datamodule)


def _writable_export(folder: Path) -> None:
    for name in (EXPORT_WEIGHTS, EXPORT_CONFIG):
        if (folder / name).exists():
            raise FileExistsError(f"--export_dir {folder}: {folder / name} already exists; choose another folder")


class CommandLineError(SystemExit):
    """Exit status 2 for bad input; str() is the message (already printed as `multibyte: ...`)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


# Errors about the input: raised on purpose by multibyte's own checks (DataError, CheckpointError,
# CompressionError and the flag checks are ValueErrors), or by Lightning's checks of its flags.
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, TrainingDiverged, MisconfigurationException)
_CHECKING_CODE = tuple(str(Path(package.__file__).parent) + os.sep for package in (multibyte, datamodules, lightning))


def is_user_error(error: BaseException) -> bool:
    """Bad input, not a bug, so one line says it all: one of USER_ERRORS raised by multibyte's or
    Lightning's own code. The same types raised inside torch or numpy mean multibyte called them
    wrongly, and keep their traceback."""
    if not isinstance(error, USER_ERRORS):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(_CHECKING_CODE)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input becomes `multibyte: <message>` on stderr and exit status 2 (CommandLineError);
    SIGTERM becomes exit status 143; anything else keeps its traceback. MULTIBYTE_DEBUG=1 keeps
    every traceback."""
    try:
        yield
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as error:
        if os.environ.get("MULTIBYTE_DEBUG", "") not in ("", "0") or not is_user_error(error):
            raise
        message = str(error).strip() or type(error).__name__
        print(f"multibyte: {message}", file=sys.stderr, flush=True)
        raise CommandLineError(message) from None


def make_cli(args: Optional[list[str]] = None, run: bool = True) -> MultibyteCLI:
    """The CLI over `args` (None: the command line). `run=False` only parses and instantiates."""
    with one_line_errors():
        return MultibyteCLI(
            ByteLM,
            ByteStreamDataModule,
            trainer_class=MultibyteTrainer,
            # Always on, not configurable away: a diverged run stops, a preempted one saves.
            trainer_defaults={"callbacks": [DivergenceGuard(), PreemptionCheckpoint()]},
            subclass_mode_data=True,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "multibyte"},
            auto_configure_optimizers=False,
        )


def main(argv: Optional[list[str]] = None) -> None:
    with one_line_errors():
        if argv is None:  # the command line: rewrite it in place (LightningCLI reads sys.argv)
            sys.argv[1:] = resolve_config_arguments(sys.argv[1:])
            args = None
        else:
            args = resolve_config_arguments(argv)
    # Matmuls in TF32 on Ampere+ GPUs: a free 2-3x there, no effect on CPU.
    torch.set_float32_matmul_precision("high")
    make_cli(args)
    # Each rank leaves its process group while the interpreter is whole: otherwise Gloo's worker
    # threads may still hold finished work whose tensors are freed during finalization, and the
    # process aborts ("terminate called without an active exception"). Only after success: after
    # an error other ranks may be inside a collective, where tearing down could hang.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
