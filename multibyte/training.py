"""`ByteLM`: the Lightning module that trains and scores a `HierarchicalByteModel`.

Batches are `(tokens, lengths)`: tokens (B, L) uint8, lengths (B,) int64 real bytes per row (rows
may be right-padded in evaluation). Every real byte is one prediction; the loss is the mean
cross-entropy over 256 byte values, and bits per byte (= bits/dim for images) is that in base 2,
accumulated over a split as a byte-weighted mean so the last short window counts exactly.
"""

from __future__ import annotations

import math
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from multibyte.config import VOCAB_SIZE, ModelConfig
from multibyte.model import HierarchicalByteModel

LN2 = math.log(2.0)


def masked_byte_nll(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood (nats) over real bytes, and how many there were.

    logits (B, L, 256), tokens (B, L), lengths (B,). Computed in fp32 whatever the autocast
    dtype: a 256-way log-softmax in bf16 loses about 2 decimal digits of the loss.
    """
    B, T, _ = logits.shape
    nll = F.cross_entropy(logits.float().reshape(B * T, VOCAB_SIZE), tokens.long().reshape(B * T), reduction="none")
    is_real = torch.arange(T, device=tokens.device)[None, :] < lengths[:, None]  # (B, L)
    return (nll.view(B, T) * is_real).sum(), is_real.sum()


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up from 0 to 1, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ByteLM(L.LightningModule):
    """Trains any `ModelConfig` architecture on byte streams.

    Args:
        architecture: the model (MEGABYTE, MambaByte, hybrid, vanilla byte transformer).
        learning_rate: peak AdamW learning rate, reached after `warmup_steps`.
        weight_decay: AdamW decoupled weight decay on matrices (not on norms, pads, biases, or
            parameters marked `_no_weight_decay` such as Mamba's A_log and D).
        betas: AdamW moment coefficients.
        warmup_steps: linear warm-up length in optimizer steps.
        min_lr_ratio: the cosine decay ends at `min_lr_ratio * learning_rate` on the last step.
        compile: wrap the model in `torch.compile` (worth it on GPU; measure before using on CPU).
    """

    def __init__(
        self,
        architecture: ModelConfig = ModelConfig(),
        learning_rate: float = 6e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.architecture = architecture
        self.model = HierarchicalByteModel(architecture)
        self.train_bpb = MeanMetric()
        self.val_bpb = MeanMetric()
        self.test_bpb = MeanMetric()

    def configure_model(self) -> None:
        if self.hparams.compile and not isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            self.model = torch.compile(self.model)

    def setup(self, stage: str) -> None:
        # Fail early, with the numbers, if the data and the architecture disagree.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is None:
            return
        P, max_len = self.architecture.patch_size, self.architecture.max_seq_len
        if seq_len % P != 0:
            raise ValueError(
                f"data seq_len={seq_len} is not a multiple of the model's patch_size={P}: "
                f"choose a seq_len divisible by {P}"
            )
        if seq_len > max_len:
            raise ValueError(f"data seq_len={seq_len} exceeds the model's max_seq_len={max_len}")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    # ------------------------------------------------------------------ steps
    def _bits_per_byte(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, lengths = batch
        nll_sum, count = masked_byte_nll(self.model(tokens), tokens, lengths)
        loss = nll_sum / count.clamp(min=1)
        return loss, loss / LN2, count

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, bpb, count = self._bits_per_byte(batch)
        self.train_bpb.update(bpb.detach(), weight=count)
        self.log("train/bpb", bpb.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/bpb_epoch", self.train_bpb, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        _, bpb, count = self._bits_per_byte(batch)
        self.val_bpb.update(bpb, weight=count)
        self.log("val/bpb", self.val_bpb, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        _, bpb, count = self._bits_per_byte(batch)
        self.test_bpb.update(bpb, weight=count)
        self.log("test/bpb", self.test_bpb, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.dim() < 2 or getattr(p, "_no_weight_decay", False)
            (no_decay if skip else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, betas=self.hparams.betas, foreach=True)
        total = self._total_steps()
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _total_steps(self) -> int:
        try:
            total = self.trainer.estimated_stepping_batches
        except Exception:  # not attached to a trainer (e.g. a bare optimizer for a benchmark)
            total = float("inf")
        return int(total) if math.isfinite(total) else 100_000


def load_model(checkpoint_path: str, map_location: Optional[str] = "cpu") -> ByteLM:
    """A trained `ByteLM` from a Lightning checkpoint, in eval mode."""
    module = ByteLM.load_from_checkpoint(checkpoint_path, map_location=map_location)
    return module.eval()
