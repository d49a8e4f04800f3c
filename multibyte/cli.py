"""`python -m multibyte` / `multibyte`: LightningCLI over `ByteLM` and the byte-stream datamodules.

    python -m multibyte fit --config image64.yaml --config cpu/image64.yaml
    python -m multibyte test --config text.yaml --ckpt_path runs/.../last.ckpt

A `--config` value that is not an existing file is looked up among the shipped configs (the
repository's configs/ folder, installed as `multibyte.shipped_configs`), so the commands above
work from any folder. After `fit`, the test split is scored and its bits per byte printed.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from datamodules.base import ByteStreamDataModule
from multibyte.trainer import EXTRA_SUBCOMMANDS, MultibyteTrainer
from multibyte.training import ByteLM


def shipped_config_dir() -> Path:
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
    raise SystemExit(
        f"multibyte: config file {value!r} not found, neither here nor among the shipped configs "
        f"({', '.join(available)})"
    )


def resolve_config_arguments(argv: list[str]) -> list[str]:
    """Rewrite every `--config X` / `--config=X` so X points at an existing file."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
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

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        has_best = bool(getattr(self.trainer.checkpoint_callback, "best_model_path", ""))
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)
        if self.trainer.is_global_zero and results:
            bpb = results[0]["test/bpb"]
            unit = "bits/dim" if getattr(self.datamodule, "modality", "") == "image" else "bits/byte"
            print(f"test {unit}: {bpb:.4f}")


def make_cli(args: list[str] | None = None, run: bool = True) -> MultibyteCLI:
    """The CLI over `args` (None: the command line). `run=False` only parses and instantiates."""
    return MultibyteCLI(
        ByteLM,
        ByteStreamDataModule,
        trainer_class=MultibyteTrainer,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "multibyte"},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the command line: rewrite it in place (LightningCLI reads sys.argv)
        sys.argv[1:] = resolve_config_arguments(sys.argv[1:])
        args = None
    else:
        args = resolve_config_arguments(argv)
    # Matmuls in TF32 on Ampere+ GPUs: a free 2-3x there, no effect on CPU.
    torch.set_float32_matmul_precision("high")
    make_cli(args)
