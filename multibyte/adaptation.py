"""Dynamic evaluation (Krause et al. 2018; what NNCP and cmix do): the model keeps learning from the
data it has just scored, so it adapts to the file as bzip2 and xz do.

The order, in `bench --adapt` and in `compress --adapt` alike:

    score a batch of windows with the current weights  ->  update the weights on those windows  ->  next batch

A byte's probability therefore depends only on bytes before it in the file (their windows were
scored, and trained on, earlier), so the bits stay an honest code length and a decoder that has
restored a batch can make exactly the update the encoder made.

One update (`Adapter.update`), on a batch of B windows in file order: the windows are taken
`windows_per_step` at a time (1: one optimizer step per window, in order), each group gets `steps`
optimizer steps of loss = mean cross-entropy of the bytes just scored (padding and a sliding
window's context bytes are masked out), with dropout off (the model stays in eval mode), the
forward and backward under `precision`, and the gradient norm clipped to `max_grad_norm`. Only the
parameters `parameters` names are updated; the model given is never modified (the adapter trains
a copy).

Bench batches and compressor groups: `bench` updates after every `--batch_size` windows, `compress`
after every `--lanes` windows; with the same number and the same options both make the same
updates, so `bench` predicts `compress`'s size.

Under torch.distributed (`bench --trainer.strategy ddp`) every rank holds the whole batch; each
computes the gradient of its share of the group's windows (`datamodules.windows.rank_share`),
scaled by the group's total byte count, the gradients are summed over the ranks, and every rank
makes the same step: the updates of one process, up to the order of floating-point sums.

Exactness for the compressor: encoder and decoder must compute bit-identical updates, which needs
the same options, weights, device type, dtype, PyTorch build and intra-op thread count; the
container records them (`multibyte.compression`). On CUDA, `deterministic=True` runs the updates
under `torch.use_deterministic_algorithms` (which needs CUBLAS_WORKSPACE_CONFIG=:4096:8).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import asdict, dataclass
from typing import Iterator, Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from datamodules.windows import rank_share

OPTIMIZERS = ("adam", "sgd")  # index = the compressed header's code
PARAMETER_SETS = ("all", "norms", "last_stage", "head")  # index = the compressed header's code
ADAPT_PRECISIONS = ("32-true", "bf16-mixed")  # index = the compressed header's code

OptimizerName = Literal["adam", "sgd"]
ParameterSet = Literal["all", "norms", "last_stage", "head"]
AdaptPrecision = Literal["32-true", "bf16-mixed"]


@dataclass(frozen=True)
class AdaptConfig:
    """How the model learns from what it has just scored (dynamic evaluation)."""

    optimizer: OptimizerName = "adam"
    """adam (torch.optim.Adam with beta1, beta2, eps 1e-8, no weight decay) or sgd (plain SGD)."""
    learning_rate: float = 3e-4
    """Step size of every update."""
    parameters: ParameterSet = "all"
    """Which parameters adapt: all; norms (every 1-D parameter: the RMSNorm gains and the stages'
    pad vectors; the model has no biases); last_stage (the innermost, byte-level stage and the
    head); head (the output projection only)."""
    steps: int = 1
    """Optimizer steps on each group of windows (more than 1 re-fits the same bytes)."""
    windows_per_step: int = 1
    """Consecutive windows per optimizer step: 1 is one step per window, in file order."""
    precision: AdaptPrecision = "32-true"
    """Arithmetic of the update's forward and backward: 32-true, or bf16-mixed (bf16 autocast)."""
    max_grad_norm: float = 1.0
    """Clip each step's gradient to this L2 norm; 0 turns clipping off."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.999
    """Adam's second-moment decay."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"adapt optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.parameters not in PARAMETER_SETS:
            raise ValueError(f"adapt parameters must be one of {PARAMETER_SETS}, got {self.parameters!r}")
        if self.precision not in ADAPT_PRECISIONS:
            raise ValueError(f"adapt precision must be one of {ADAPT_PRECISIONS}, got {self.precision!r}")
        if not 0.0 < self.learning_rate < float("inf"):
            raise ValueError(f"adapt learning_rate must be a positive number, got {self.learning_rate}")
        if not 1 <= self.steps <= 0xFFFF:
            raise ValueError(f"adapt steps must lie in 1..65535, got {self.steps}")
        if not 1 <= self.windows_per_step <= 0xFFFF:
            raise ValueError(f"adapt windows_per_step must lie in 1..65535, got {self.windows_per_step}")
        if not 0.0 <= self.max_grad_norm < float("inf"):
            raise ValueError(f"adapt max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"adapt {name} must lie in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def adapted_parameter_names(model: torch.nn.Module, parameters: str) -> list[str]:
    """Names of the parameters of `model` (a HierarchicalByteModel) that `parameters` selects."""
    if parameters not in PARAMETER_SETS:
        raise ValueError(f"adapt parameters must be one of {PARAMETER_SETS}, got {parameters!r}")
    last = f"stages.{len(model.stages) - 1}."
    chosen = []
    for name, parameter in model.named_parameters():
        if name.startswith("patchers."):  # an entropy patcher's own model decides boundaries, not bits
            continue
        if (
            parameters == "all"
            or (parameters == "norms" and parameter.dim() == 1)
            or (parameters == "last_stage" and (name.startswith(last) or name.startswith("head.")))
            or (parameters == "head" and name.startswith("head."))
        ):
            chosen.append(name)
    return chosen


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CUDA while updating (CPU kernels here already are, at a fixed thread count)."""
    if not enabled or device.type != "cuda":
        yield
        return
    if not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        raise ValueError(
            "adapting on a GPU while compressing needs deterministic cuBLAS: set CUBLAS_WORKSPACE_CONFIG=:4096:8 "
            "before starting (encoder and decoder alike)"
        )
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


class Adapter:
    """Trains a copy of `model` (`self.model`) on the windows it has scored; see the module docstring.

    `deterministic`: on CUDA, run updates with deterministic kernels (the compressor needs that).
    """

    def __init__(self, model: torch.nn.Module, config: AdaptConfig, deterministic: bool = False) -> None:
        self.config = config
        self.deterministic = deterministic
        with torch.inference_mode(False):  # a copy made under inference mode could never train
            self.model = copy.deepcopy(model).eval()  # eval: dropout stays off while it learns
        names = set(adapted_parameter_names(self.model, config.parameters))
        self.parameters = []
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(name in names)
            if name in names:
                self.parameters.append(parameter)
        if not self.parameters:
            raise ValueError(f"adapt parameters={config.parameters!r} selects no parameter of this model")
        self.device = self.parameters[0].device
        if config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                self.parameters, lr=config.learning_rate, betas=(config.beta1, config.beta2), eps=1e-8
            )
        else:
            self.optimizer = torch.optim.SGD(self.parameters, lr=config.learning_rate)
        self.steps_taken = 0

    def update(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """Learn from a batch of windows just scored: `tokens` (B, L) symbols in file order (rows
        right-padded), `mask` (B, L) bool, the positions whose loss counts (the bytes scored).
        Under torch.distributed every rank passes the same whole batch."""
        if tokens.shape != mask.shape or tokens.dim() != 2:
            raise ValueError(f"tokens and mask must both be (B, L), got {tuple(tokens.shape)} and {tuple(mask.shape)}")
        config = self.config
        with torch.inference_mode(False), torch.enable_grad(), _deterministic(self.deterministic, self.device):
            # Clones: tensors made under inference mode cannot be saved for the backward pass.
            tokens = tokens.to(self.device).clone()
            mask = mask.to(self.device).clone()
            for first in range(0, tokens.shape[0], config.windows_per_step):
                rows = slice(first, first + config.windows_per_step)
                if not bool(mask[rows].any()):
                    continue
                for _ in range(config.steps):
                    self._step(tokens[rows], mask[rows])

    def _step(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """One optimizer step on the mean loss of `mask`ed positions of `tokens` (G, L)."""
        rank, world_size = distributed_rank()
        count = mask.sum()  # every rank sees the whole group: the same normaliser everywhere
        self.optimizer.zero_grad(set_to_none=False)
        mine = list(rank_share(tokens.shape[0], rank, world_size))
        if mine:
            local_tokens, local_mask = tokens[mine], mask[mine]
            with _autocast(self.config.precision, self.device):
                logits = self.model(local_tokens)  # (g, L, V)
            # fp32 log-softmax whatever the autocast dtype, as in training's masked_byte_nll.
            nll = F.cross_entropy(logits.float().flatten(0, -2), local_tokens.reshape(-1), reduction="none")
            loss = (nll.view_as(local_mask) * local_mask).sum() / count
            loss.backward()
        gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        if world_size > 1:  # the group's gradient: the ranks' shares summed
            flat = torch.cat([g.reshape(-1) for g in gradients])
            dist.all_reduce(flat)
            offset = 0
            for parameter, gradient in zip(self.parameters, gradients):
                size = gradient.numel()
                parameter.grad = flat[offset : offset + size].view_as(parameter).clone()
                offset += size
        else:
            for parameter, gradient in zip(self.parameters, gradients):
                parameter.grad = gradient
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm, foreach=False)
        self.optimizer.step()
        self.steps_taken += 1


def adapt_summary(config: Optional[AdaptConfig]) -> str:
    """E.g. "adam lr 0.0003 on all, 1 step per window" (for reports and messages); "off" for None."""
    if config is None:
        return "off"
    per = "window" if config.windows_per_step == 1 else f"{config.windows_per_step} windows"
    steps = f"{config.steps} step{'s' if config.steps > 1 else ''}"
    return (
        f"{config.optimizer} lr {config.learning_rate:g} on {config.parameters}, {steps} per {per}, "
        f"{config.precision}" + (f", clip {config.max_grad_norm:g}" if config.max_grad_norm else "")
    )
