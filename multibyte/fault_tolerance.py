"""Callbacks that keep a long run's checkpoints worth resuming from. Both are on by default in the
command line (`multibyte.cli`); in Python, pass them to the Trainer.

`DivergenceGuard` stops `fit` at the first non-finite loss or gradient, before the optimizer
applies it, so no checkpoint is ever written from a diverged state: the last good checkpoint stays
as it was, no "best" checkpoint is named after a NaN score, and the run ends with an error (the
command line exits non-zero) instead of training on NaNs to the end.

`PreemptionCheckpoint` saves `last.ckpt` when the run is told to stop with SIGTERM (what SLURM,
Kubernetes and cloud schedulers send before they kill a job). Lightning 2.x turns SIGTERM into a
`SIGTERMException` at the next batch boundary, on every rank at once, and then exits; by itself it
saves nothing (its `OnExceptionCheckpoint` saves on *any* exception, NaNs included). This callback
saves on SIGTERM only, through the trainer's checkpoint IO, which `multibyte.checkpoints` makes
atomic (temporary file, fsync, rename): a second signal or a kill during the save leaves the
previous `last.ckpt` whole.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the validation score stopped being finite numbers."""


class DivergenceGuard(Callback):
    """Stop `fit` when the loss or the gradients stop being finite, before the optimizer step
    (so the weights stay finite) and before any checkpoint of that step, and when the validation
    score is not finite, before ModelCheckpoint ranks it.

    Each optimizer step costs one fused norm over the gradients and one scalar read (all ranks
    agree through one boolean all-reduce, so no rank is left waiting in a collective).

    Args:
        monitor: the validation metric that must stay finite.
    """

    def __init__(self, monitor: str = "val/bpb") -> None:
        self.monitor = monitor
        self._loss_finite: Optional[torch.Tensor] = None  # over the micro-batches of this step

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        loss_finite, self._loss_finite = self._loss_finite, None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.ones((), dtype=torch.bool, device=pl_module.device) if loss_finite is None else loss_finite
        # A fp16 GradScaler expects overflowing gradients now and then and skips those steps itself.
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
            if hasattr(norm, "full_tensor"):  # sharded (FSDP2) gradients: the norm over every shard
                norm = norm.full_tensor()
            finite = finite & torch.isfinite(norm)
        if not trainer.strategy.reduce_boolean_decision(not bool(finite), all=False):
            return
        what = "the loss" if loss_finite is not None and not bool(loss_finite) else "a gradient"
        lr = optimizer.param_groups[0]["lr"]
        raise TrainingDiverged(
            f"training diverged at step {trainer.global_step}: {what} is not a finite number (learning rate "
            f"{lr:.3g}); stopped before the optimizer applied it. {self._last_good(trainer)} "
            f"Lower --model.learning_rate or lengthen --model.warmup_steps."
        )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Runs before ModelCheckpoint's hook (Lightning calls checkpoint callbacks last).
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is None or math.isfinite(float(score)):
            return
        raise TrainingDiverged(
            f"training diverged at step {trainer.global_step}: {self.monitor} is {float(score)}. "
            f"{self._last_good(trainer)} Lower --model.learning_rate or lengthen --model.warmup_steps."
        )

    @staticmethod
    def _last_good(trainer: Trainer) -> str:
        callback = trainer.checkpoint_callback
        saved = [getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")]
        saved = [path for path in saved if path]
        if not saved:
            return "No checkpoint was written in this run."
        return f"No checkpoint was written from the diverged state; the last good one is {saved[0]}."


class PreemptionCheckpoint(Callback):
    """On SIGTERM during `fit`, save `last.ckpt` (in the ModelCheckpoint folder) before the run
    exits, so that `fit --ckpt_path <that file>` continues where it stopped.

    All ranks take part in the save (`Trainer.save_checkpoint` is collective; rank 0 writes).
    """

    def __init__(self, filename: str = ModelCheckpoint.CHECKPOINT_NAME_LAST) -> None:
        self.filename = filename
        self.saved_path: Optional[Path] = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the whole training state, to resume
        self.saved_path = path
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint):
            callback.last_model_path = str(path)  # so that ckpt_path="last" finds it in this process
        rank_zero_info(
            f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path {path}"
        )

    def checkpoint_path(self, trainer: Trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None)
        if not folder:  # no ModelCheckpoint: where Lightning would have put its checkpoints
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        return Path(folder) / f"{self.filename}{ModelCheckpoint.FILE_EXTENSION}"
