"""`ByteLM`: the Lightning module that trains and scores a `HierarchicalByteModel`.

Batches are `(tokens, lengths)`: tokens (B, L) uint8, lengths (B,) int64 real bytes per row (rows
may be right-padded in evaluation). Every real byte is one prediction; the loss is the mean
cross-entropy over 256 byte values, and bits per byte (= bits/dim for images) is that in base 2,
accumulated over a split as a byte-weighted mean so the last short window counts exactly.

A subword model (the BPE baseline: the same core with the tokenizer's vocabulary) reads
`(tokens, lengths, byte_counts)`: ids (B, L), real tokens per row, and the bytes those tokens
decode to. Its loss is the mean cross-entropy per token, but every `*/bpb` metric is bits per
BYTE, total NLL bits over the total bytes of the scored text (summed over batches and ranks), so
byte and subword models share one table. The tokenizer travels with the model: it is stored in
every checkpoint, written as tokenizer.json next to them, and data encoded by another tokenizer
is refused.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from multibyte.bpe import TOKENIZER_FILE, BPETokenizer
from multibyte.checkpoints import (
    TOKENIZER_KEY,
    CheckpointError,
    check_same_tokenizer,
    checkpoint_hparams,
    checkpoint_tokenizer,
    config_differences,
    config_from_dict,
    plain,
)
from multibyte.chunked_loss import real_positions
from multibyte.data_spec import DataSpec, check_model_fits_data, data_spec_of
from multibyte.config import ModelConfig
from multibyte.host_memory import reuse_freed_memory
from multibyte.model import HierarchicalByteModel

LN2 = math.log(2.0)


def masked_byte_nll(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood (nats) over real symbols (bytes or tokens), and how many there were.

    logits (B, L, V), tokens (B, L), lengths (B,). Computed in fp32 whatever the autocast
    dtype: a 256-way log-softmax in bf16 loses about 2 decimal digits of the loss. Training and
    evaluation use `model(tokens, loss_mask=...)` instead, the same sum without full logits.
    """
    B, T, _ = logits.shape
    nll = F.cross_entropy(logits.float().reshape(B * T, -1), tokens.long().reshape(B * T), reduction="none")
    is_real = real_positions(tokens, lengths)
    return (nll.view(B, T) * is_real).sum(), is_real.sum()


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float, time_fraction: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up from 0 to 1, then cosine decay to `min_ratio`.

    The decay's progress is the share of the post-warm-up steps done, or `time_fraction` (the
    share of a time budget used, see ByteLM's `schedule_by_time`) when that is further along."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max((step - warmup_steps) / max(1, total_steps - warmup_steps), time_fraction))
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
        schedule_by_time: with `trainer.max_time`, the decay also follows the time budget: its
            progress is the share of the steps or of the training time used, whichever is
            larger, so a run that the time limit stops (a slower machine) still ends near the
            minimum learning rate instead of mid-decay. The learning rate then depends on the
            machine's speed, so runs are not bit-reproducible. Under DDP rank 0's clock is used.
        compile: wrap the model in `torch.compile` (worth it on GPU; measure before using on CPU).
        data_spec: the data's `DataSpec`, linked in by the CLI from --data (not set by hand): a
            model that does not fit the data is refused at construction.
    """

    def __init__(
        self,
        architecture: ModelConfig = ModelConfig(),
        learning_rate: float = 6e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.1,
        schedule_by_time: bool = False,
        compile: bool = False,
        data_spec: Optional[DataSpec] = None,
    ) -> None:
        super().__init__()
        check_optimisation_hparams(learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio)
        if data_spec is not None:
            check_model_fits_data(architecture, data_spec)
        # The data's spec is linked in by the CLI for every run; it is not a model setting.
        self.save_hyperparameters(ignore=["data_spec"])
        self.architecture = architecture
        # The network itself is built by `configure_model`, which Lightning calls inside the
        # strategy's device, dtype and sharding contexts. Outside a Trainer, first use builds it
        # on the device that was the default here (e.g. under `with torch.device("meta")`).
        self._init_device = torch.get_default_device()
        self.tokenizer: Optional[BPETokenizer] = None
        """A subword model's tokenizer: the data's (at setup) or the checkpoint's; None for bytes."""
        self.train_bpb = MeanMetric()
        self.val_bpb = MeanMetric()
        self.test_bpb = MeanMetric()

    @property
    def model(self) -> HierarchicalByteModel:
        """The byte model (under compile=True, its `torch.compile` wrapper); built on first use."""
        self._build_on_demand()
        return self._modules["model"]

    def _build_on_demand(self) -> None:
        if "model" not in self._modules:
            with torch.device(self._init_device):
                self.configure_model()

    def configure_model(self) -> None:
        """Build the model, then shard it (FSDP2, when a strategy gives a device mesh) and compile it.

        Idempotent: Lightning calls it before every fit/validate/test (before restoring a
        checkpoint) and `load_from_checkpoint` calls it too. Under `ModelParallelStrategy` every
        block of every stack becomes one FSDP unit, all-gathered only while it runs, and the
        embeddings and head are sharded with the root; each rank holds 1/N of the weights and
        optimizer state. (Lightning's FSDPStrategy wraps the module itself, at setup.)
        """
        if "model" in self._modules:
            return
        model = HierarchicalByteModel(self.architecture)
        if self.device_mesh is not None:  # set by ModelParallelStrategy
            model = _fully_shard(model, self.device_mesh)
        if self.hparams.compile:
            model = torch.compile(model)
        self.model = model  # nn.Module.__setattr__ registers it in self._modules

    def state_dict(self, *args, **kwargs):
        self._build_on_demand()  # a module fresh from __init__ has its weights built first
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, *args, **kwargs):
        self._build_on_demand()  # the weights need a model to go into
        return super().load_state_dict(state_dict, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._build_on_demand()  # `.to(device)` / `.double()` before first use move the model too
        return super()._apply(fn, *args, **kwargs)

    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.strategy.root_device.type == "cpu":
            reuse_freed_memory()  # activation-sized blocks are reused across steps, not re-faulted
        # Fail early, with the numbers, if the data and the architecture disagree (the CLI
        # already checked at construction; this covers a Trainer driven from Python).
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        spec = getattr(datamodule, "spec", None)  # a datamodule of another library has none
        if spec is not None:
            check_model_fits_data(self.architecture, data_spec_of(datamodule))
        subword = getattr(datamodule, "subword_tokenizer", None)
        data_tokenizer = subword() if callable(subword) else None
        check_same_tokenizer(self.tokenizer, data_tokenizer, "the model")  # e.g. started from an export
        self._adopt_tokenizer(data_tokenizer)

    def _adopt_tokenizer(self, tokenizer: Optional[BPETokenizer]) -> None:
        """Take `tokenizer` as the model's (None changes nothing)."""
        if tokenizer is None:
            return
        if tokenizer.vocab_size > self.architecture.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                f"{self.architecture.vocab_size}: set model.architecture.vocab_size to at least {tokenizer.vocab_size}"
            )
        self.tokenizer = tokenizer

    def on_train_start(self) -> None:
        # tokenizer.json next to the run's checkpoints (each checkpoint holds it too), so that the
        # folder alone says how its models read text.
        trainer = self.trainer
        if self.tokenizer is None or not trainer.is_global_zero:
            return
        for callback in trainer.checkpoint_callbacks:
            folder = getattr(callback, "dirpath", None)
            if folder and "://" not in str(folder):
                self.tokenizer.save(Path(folder) / TOKENIZER_FILE)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer.to_json()

    def on_fit_start(self) -> None:
        # BLT: an entropy patcher without a threshold gets one calibrated on training bytes, the
        # same on every rank, kept in its buffer; the entropy model's architecture and θ go into
        # the hyperparameters, so every checkpoint from here on carries the whole entropy model.
        from multibyte.entropy_training import settle_entropy_patchers

        settle_entropy_patchers(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning restores weights, optimizer and schedule from the checkpoint; settings given
        # for this run that the checkpoint contradicts would be silently lost, so they are refused.
        trainer = self._trainer
        resuming = trainer is not None and trainer.state.fn == "fit"
        conflicts = hparam_conflicts(plain(dict(self.hparams)), checkpoint_hparams(checkpoint), resuming)
        path = trainer.ckpt_path if trainer is not None else None
        if conflicts:
            raise CheckpointError(describe_conflicts(path, conflicts, resuming))
        # The checkpoint's tokenizer; data encoded by another one (adopted at setup) is refused.
        stored = checkpoint_tokenizer(checkpoint, path)
        check_same_tokenizer(stored, self.tokenizer, f"checkpoint {path}" if path else "the checkpoint")
        self._adopt_tokenizer(stored)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    # ------------------------------------------------------------------ steps
    def _bits_per_byte(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss: mean nats per real symbol, bits per byte of the batch, bytes of the batch).

        A byte batch is (tokens, lengths): every real symbol is one byte. A token batch is
        (tokens, lengths, byte_counts): the bits of its real tokens over the bytes they decode to.
        Metrics weight each batch's bits per byte by its bytes, so a split's score is its total
        bits over its total bytes.
        """
        tokens, lengths, *byte_counts = batch
        # The model takes the head and the loss in chunks of positions: no full (B, L, V) logits.
        nll_sum, count = self.model(tokens, loss_mask=real_positions(tokens, lengths))
        num_bytes = byte_counts[0].sum() if byte_counts else count
        loss = nll_sum / count.clamp(min=1)
        bpb = nll_sum / LN2 / num_bytes.clamp(min=1)
        return loss, bpb, num_bytes

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, bpb, num_bytes = self._bits_per_byte(batch)
        self.train_bpb.update(bpb.detach(), weight=num_bytes)
        self.log("train/bpb", bpb.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/bpb_epoch", self.train_bpb, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        _, bpb, num_bytes = self._bits_per_byte(batch)
        self.val_bpb.update(bpb, weight=num_bytes)
        self.log("val/bpb", self.val_bpb, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        _, bpb, num_bytes = self._bits_per_byte(batch)
        self.test_bpb.update(bpb, weight=num_bytes)
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
            lambda step: warmup_cosine(step, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio, self._time_fraction()),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _time_fraction(self) -> float:
        """The share of trainer.max_time's training budget used so far (0.0 without
        `schedule_by_time`, a trainer or a time limit), the same on every rank."""
        if not self.hparams.get("schedule_by_time") or self._trainer is None:
            return 0.0
        from lightning.pytorch.callbacks import Timer

        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None:
            return 0.0
        elapsed, remaining = timer.time_elapsed("train"), timer.time_remaining("train")
        if remaining is None:
            return 0.0
        fraction = min(1.0, elapsed / max(elapsed + remaining, 1e-9))
        if self.trainer.world_size > 1:  # the ranks' clocks differ a little; their learning rates must not
            fraction = self.trainer.strategy.broadcast(fraction, src=0)
        return fraction

    def _total_steps(self) -> int:
        try:
            total = self.trainer.estimated_stepping_batches
        except Exception:  # not attached to a trainer (e.g. a bare optimizer for a benchmark)
            total = float("inf")
        return int(total) if math.isfinite(total) else 100_000


def _fully_shard(model: HierarchicalByteModel, mesh) -> HierarchicalByteModel:
    """FSDP2 over the mesh's data-parallel dimension: every block (an entry, with parameters, of an
    nn.ModuleList that holds no further ModuleList: the layers of each stack) one unit, all-gathered
    while its forward runs; then the root, holding the embeddings, pads, patchers and head."""
    from torch.distributed.fsdp import fully_shard

    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "multibyte shards with FSDP only: give ModelParallelStrategy data_parallel_size=<processes> "
            "and tensor_parallel_size=1"
        )
    data_parallel = mesh["data_parallel"] if "data_parallel" in names else mesh
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList):
            continue
        if any(isinstance(inner, torch.nn.ModuleList) for block in module for inner in block.modules()):
            continue  # e.g. the list of stages: its blocks are sharded one by one instead
        for block in module:
            if any(True for _ in block.parameters()):
                fully_shard(block, mesh=data_parallel)
    fully_shard(model, mesh=data_parallel)
    return model


# ----------------------------------------------------------------------------------------------
# Hyperparameters: what is valid, and what a checkpoint must agree with
# ----------------------------------------------------------------------------------------------

# Restored with the optimizer and scheduler state when a fit resumes (AdamW's param groups carry
# lr, betas and weight decay; the schedule's base learning rate comes back with it).
OPTIMISATION_HPARAMS = ("learning_rate", "weight_decay", "betas", "warmup_steps", "min_lr_ratio")


def check_optimisation_hparams(
    learning_rate: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int, min_lr_ratio: float
) -> None:
    """One ValueError naming the flag for a value AdamW or the schedule cannot use."""
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"--model.learning_rate must be a positive number, got {learning_rate}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"--model.weight_decay must be >= 0, got {weight_decay}")
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"--model.betas must be two numbers in [0, 1), got {list(betas)}")
    if warmup_steps < 0:
        raise ValueError(f"--model.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"--model.min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")


def hparam_conflicts(given: dict, stored: dict, resuming: bool) -> list[tuple[str, object, object]]:
    """(key, given, stored) where configured hyperparameters contradict a checkpoint's: the
    architecture always (the weights are made for it), and when a fit resumes also the
    optimisation settings (the restored optimizer and schedule would silently replace them).
    `compile`, a stage's activation checkpointing (see `config_differences`) and anything else
    may differ: the given value applies."""
    keys = ("architecture",) + (OPTIMISATION_HPARAMS if resuming else ())
    return config_differences({k: given[k] for k in keys if k in given}, {k: stored[k] for k in keys if k in stored})


def describe_conflicts(path: Optional[object], conflicts: list[tuple[str, object, object]], resuming: bool) -> str:
    where = f"checkpoint {path}" if path else "the checkpoint"
    listed = "; ".join(f"model.{key}: given {given!r}, checkpoint {stored!r}" for key, given, stored in conflicts)
    advice = "Leave these settings out (the checkpoint's are used) or give the checkpoint's values"
    if resuming and any(key.split(".")[0].split("[")[0] in OPTIMISATION_HPARAMS for key, _, _ in conflicts):
        advice += (
            "; to go on with other optimisation settings, start a new run from its weights "
            "(`python -m multibyte export`, then `fit --ckpt_path EXPORT_DIR`)"
        )
    return f"{where} holds another model than the one configured: {listed}. {advice}"


def load_model(checkpoint_path: str, map_location: Optional[str] = "cpu") -> ByteLM:
    """A trained `ByteLM` from a Lightning checkpoint or an `export` directory, in eval mode.

    Read with `torch.load(weights_only=True)` (or safetensors); the architecture and the other
    hyperparameters come from the checkpoint."""
    from multibyte.checkpoints import load_checkpoint, load_module_weights

    checkpoint = load_checkpoint(checkpoint_path, map_location=map_location or "cpu")
    hparams = checkpoint_hparams(checkpoint)
    if not isinstance(hparams.get("architecture"), dict):
        raise CheckpointError(f"checkpoint {checkpoint_path}: no model architecture among its hyperparameters")
    known = inspect.signature(ByteLM.__init__).parameters
    kwargs = {name: value for name, value in hparams.items() if name in known}
    kwargs["architecture"] = config_from_dict(ModelConfig, hparams["architecture"])
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    module = ByteLM(**kwargs)
    load_module_weights(module, checkpoint_path, checkpoint)
    module.tokenizer = checkpoint_tokenizer(checkpoint, checkpoint_path)
    return module.eval()
