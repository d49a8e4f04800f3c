"""Training callbacks. `SampleCallback` shows what the model generates while it trains.

Enable it on any `fit` run (it is not in the shipped configs):

    python -m multibyte fit --config image64.yaml --config cpu/image64.yaml \
        --trainer.callbacks+=multibyte.callbacks.SampleCallback \
        --trainer.callbacks.every_n_validations=1 --trainer.callbacks.num_samples=4
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from multibyte.codecs import IMAGE_BYTES
from multibyte.data_spec import data_spec_of
from multibyte.decoders import SampleFormat, SampleRun, sample_to_files
from multibyte.model import HierarchicalByteModel


class SampleCallback(Callback):
    """Every `every_n_validations` validation runs, sample a few outputs on rank 0 and write them
    (PNG / WAV / text, by the datamodule's modality) into `<log_dir>/samples/validation_<n>_step_<s>/`,
    and to TensorBoard (add_images / add_audio / add_text) when a TensorBoard logger is attached.

    Args:
        every_n_validations: sample after every n-th validation run (sanity checks excluded).
        num_samples: samples per run, generated as one batch.
        max_new_bytes: bytes per sample; None means a whole image for images, else the
            datamodule's seq_len (capped by the model's max_seq_len).
        temperature, top_k, top_p: as in `multibyte.sampling.sample_next_byte`.
        seed: the same seed gives the same draws at every run, so samples from successive
            validations differ only because the model changed.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        num_samples: int = 4,
        max_new_bytes: Optional[int] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: int = 0,
    ) -> None:
        if every_n_validations < 1 or num_samples < 1:
            raise ValueError(
                f"every_n_validations and num_samples must be at least 1, got {every_n_validations} and {num_samples}"
            )
        self.every_n_validations = every_n_validations
        self.num_samples = num_samples
        self.max_new_bytes = max_new_bytes
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        self.validations = 0  # completed validation runs (kept in checkpoints, so resuming continues the count)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_validations:
            return
        # From here every rank takes part: `log_dir` is a broadcast from rank 0, and gathering a
        # sharded model's weights is a collective. Only rank 0 generates and writes.
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        folder = folder / f"validation_{self.validations:04d}_step_{trainer.global_step}"
        model = self._whole_model(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        fmt = SampleFormat.from_datamodule(trainer.datamodule)
        try:
            run = sample_to_files(
                model,
                fmt,
                folder,
                num_samples=self.num_samples,
                batch_size=self.num_samples,
                max_new_bytes=self._max_new_bytes(fmt, trainer, model.config.max_seq_len),
                prompt=np.zeros(0, dtype=np.uint8),
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                seed=self.seed,
                progress=False,
                info={"global_step": trainer.global_step},
                tokenizer=getattr(pl_module, "tokenizer", None),  # a subword model's: its samples are decoded
            )
        except FileExistsError as error:  # never let a sampling side show stop the training
            rank_zero_warn(f"SampleCallback: skipped ({error})")
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                self._log_to_tensorboard(logger.experiment, fmt, run, trainer.global_step)

    @staticmethod
    def _whole_model(trainer: Trainer, pl_module: LightningModule) -> Optional[torch.nn.Module]:
        """The model to sample from on rank 0 (None on other ranks).

        Unsharded (one process, DDP): the training model itself; its forward has no collectives,
        so rank 0 samples alone while the others wait at the next step's all-reduce. Sharded
        (FSDPStrategy, ModelParallelStrategy): every rank joins in gathering the full weights,
        which land on rank 0 only (on the CPU), in a fresh unsharded copy; the training model's
        shards are untouched.
        """
        if not isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            model = pl_module.model
            return getattr(model, "_orig_mod", model)  # under torch.compile, the module it wraps
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full weights on rank 0 only
        weights = get_model_state_dict(trainer.strategy.model, options=options)
        if not trainer.is_global_zero:
            return None
        prefix = "model."
        weights = {
            name[len(prefix) :].replace("_orig_mod.", ""): value
            for name, value in weights.items()
            if name.startswith(prefix)
        }
        model = HierarchicalByteModel(pl_module.architecture)
        model.load_state_dict(weights)
        return model.to(trainer.strategy.root_device).eval()

    def _max_new_bytes(self, fmt: SampleFormat, trainer: Trainer, max_seq_len: int) -> int:
        if self.max_new_bytes is not None:
            return self.max_new_bytes
        if fmt.modality == "image":
            return IMAGE_BYTES
        return min(data_spec_of(trainer.datamodule).seq_len, max_seq_len)

    @staticmethod
    def _log_to_tensorboard(writer: Any, fmt: SampleFormat, run: SampleRun, step: int) -> None:
        if fmt.modality == "image":
            images = np.stack([fmt.image(sample) for sample in run.samples])  # (N, 64, 64, 3) uint8
            writer.add_images("samples/images", images, step, dataformats="NHWC")
        elif fmt.modality == "audio":
            for i, sample in enumerate(run.samples):
                wave = torch.from_numpy(fmt.waveform(sample))[None]  # (1, num_samples) in [-1, 1]
                writer.add_audio(f"samples/audio_{i}", wave, step, sample_rate=fmt.sample_rate)
        else:
            for i, sample in enumerate(run.samples):
                # Indented: TensorBoard renders text as Markdown, and sampled bytes are not Markdown.
                verbatim = "    " + fmt.text(sample).replace("\n", "\n    ")
                writer.add_text(f"samples/text_{i}", verbatim, step)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict.get("validations", 0)
