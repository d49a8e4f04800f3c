"""BLT's entropy model, made ready by `fit`: trained on demand, then its threshold calibrated.

An `entropy` stage (multibyte/patchers/entropy.py) needs a trained byte model and a threshold θ.
A config names both ways of getting the model:

    entropy_model: runs/text_entropy/export-cpu                      where it is (or will be)
    entropy_config: [text_entropy.yaml, cpu/text_entropy.yaml]      how to train it

1. Before the model is built (`MultibyteCLI.before_instantiate_classes`, `prepare_entropy_models`),
   each entropy stage is settled in this order:
   - `entropy_architecture` is set (a checkpoint's hyperparameters hold it, with the weights in
     its state dict; or it was set by hand): nothing to do;
   - `entropy_model` exists (an export directory or a checkpoint file): it is loaded when the
     model is built;
   - under `fit`, with `entropy_config`: the entropy model is trained first, in a process of its
     own, by the same command a person would type,

         python -m multibyte fit --config C1 --config C2 ... \\
             --data.init_args.data_path D --data.init_args.cache_dir C --export_dir ENTROPY_MODEL

     on this run's data (same data_path and cache_dir), exported to `entropy_model`, and then the
     run goes on with the main model. A separate process keeps the two runs apart (seed, logger,
     devices: it may itself launch on every GPU of the machine);
   - otherwise one error naming the stage and both keys.

   Multi-process runs: only the process of global rank 0 trains; the others wait until the export
   is complete (its config.yaml is written last), or stop with rank 0's error. The rank comes from
   the launcher's environment (torchrun, SLURM, MPI, or Lightning's own launcher, whose other
   processes start only after this step), because no Trainer exists yet. Waiting ranks need a
   file system that rank 0's export is visible on.

2. At the start of `fit` (`ByteLM.on_fit_start`, `settle_entropy_patchers`), an entropy patcher
   without a threshold (NaN buffer: none configured, none in a checkpoint) gets θ from
   `EntropyPatcher.calibrate` on a fixed sample of training windows (`calibration_windows`: seeded,
   the same on every rank and in every run on the same data); rank 0's θ is broadcast, stored in
   the patcher's buffer (so every checkpoint holds it), printed and logged. The entropy model's
   architecture and θ are then written into the module's hyperparameters, so that a checkpoint
   builds its model without the entropy model's export folder.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from multibyte.checkpoints import EXPORT_CONFIG, EXPORT_WEIGHTS, checkpoint_hparams, config_from_dict, load_checkpoint
from multibyte.config import ModelConfig

CALIBRATION_BYTES = 65_536  # training bytes θ is calibrated on (whole windows, at least one)
CALIBRATION_SEED = 0  # which windows: fixed, so θ depends on the data and the model only
WAIT_POLL_SECONDS = 5.0
FAILURE_SUFFIX = ".failed"  # <entropy_model>.failed: rank 0's error, for the ranks waiting on it
# Launcher variables a nested training process must not inherit: it is a run of its own, not a
# rank of this one.
_LAUNCH_ENV_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMI_", "PL_")
_LAUNCH_ENV = (
    *("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE"),
    *("NODE_RANK", "MASTER_ADDR", "MASTER_PORT"),
)


class EntropyModelError(ValueError):
    """An entropy stage's model is missing, cannot be trained or does not fit the main model."""


# ------------------------------------------------------------------------------------------------
# 1. The entropy model, before the main model is built
# ------------------------------------------------------------------------------------------------


def is_global_rank_zero() -> bool:
    """Whether this process is (or will be) global rank 0, from the launcher's environment
    variables (torchrun, SLURM, MPI, Lightning's launcher): a process none of them marks as
    another rank is rank 0, which is every single-process run."""
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(name, "").strip()
        if value and value != "0":
            return False
    return True


def entropy_model_ready(path: Path) -> bool:
    """A checkpoint file, or an export directory whose files are all written (config.yaml last)."""
    return path.is_file() or ((path / EXPORT_WEIGHTS).is_file() and (path / EXPORT_CONFIG).is_file())


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    """`key` of a jsonargparse Namespace, a dict or a dataclass."""
    if isinstance(namespace, dict):
        return namespace.get(key, default)
    return getattr(namespace, key, default)


def _set(namespace: Any, key: str, value: Any) -> None:
    if isinstance(namespace, dict):
        namespace[key] = value
    else:
        setattr(namespace, key, value)


def prepare_entropy_models(config: Any, subcommand: str) -> None:
    """Settle every entropy stage of the parsed `config` of `subcommand` (see the module
    docstring, 1.): train missing entropy models under `fit`, or raise EntropyModelError."""
    architecture = _get(_get(config, "model"), "architecture")
    stages = _get(architecture, "stages") or []
    data = _get(_get(config, "data"), "init_args")
    for i, stage in enumerate(stages):
        if _get(stage, "patcher") != "entropy" or _get(stage, "entropy_architecture") is not None:
            continue
        where, recipe = _get(stage, "entropy_model"), _get(stage, "entropy_config")
        if where is None:
            continue  # ModelConfig's own check names the missing key
        path = Path(where).expanduser()
        if not entropy_model_ready(path):
            if subcommand != "fit" or not recipe:
                raise EntropyModelError(_missing_message(i, path, recipe, subcommand))
            if is_global_rank_zero():
                train_entropy_model(i, path, list(recipe), data)
            else:
                wait_for_entropy_model(i, path)
        if subcommand == "fit":
            check_entropy_context(i, path, _get(architecture, "max_seq_len"))


def _missing_message(i: int, path: Path, recipe: Optional[list], subcommand: str) -> str:
    where = f"stages[{i}].entropy_model {path}"
    if path.exists():
        return (
            f"{where}: neither a checkpoint file nor a complete export directory ({EXPORT_WEIGHTS} and "
            f"{EXPORT_CONFIG}); delete it to train the entropy model anew"
        )
    if subcommand != "fit" and recipe:
        return (
            f"{where} does not exist: `fit` trains it first from stages[{i}].entropy_config; to use a "
            f"trained model without it, pass that model's --ckpt_path (it holds the entropy model)"
        )
    return (
        f"{where} does not exist and stages[{i}].entropy_config names no config to train it from: set "
        f"entropy_config (e.g. [text_entropy.yaml, cpu/text_entropy.yaml]) or point entropy_model at a "
        f"trained byte model (a checkpoint or an `export` directory)"
    )


def training_command(configs: list[str], data: Any, export_dir: Path) -> list[str]:
    """The `fit` command that trains an entropy model from `configs` on the data of `data` (the
    main run's datamodule init_args) and exports it to `export_dir`."""
    from multibyte.cli import resolve_config_path

    command = [sys.executable, "-m", "multibyte", "fit"]
    for name in configs:
        command += ["--config", resolve_config_path(str(name))]
    for key in ("data_path", "cache_dir"):  # the same bytes, the same cache
        value = _get(data, key) if data is not None else None
        command.append(f"--data.init_args.{key}={'null' if value is None else value}")
    return command + ["--export_dir", str(export_dir), "--test_after_fit", "false"]


def _nested_run_env() -> dict[str, str]:
    # PL_GLOBAL_SEED among them: the nested run seeds itself from its own config.
    return {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and not k.startswith(_LAUNCH_ENV_PREFIXES)}


def train_entropy_model(i: int, path: Path, configs: list[str], data: Any) -> None:
    """Train stage i's entropy model with `fit` from `configs` and export it to `path`."""
    if path.suffix == ".ckpt":
        raise EntropyModelError(
            f"stages[{i}].entropy_model {path}: `fit` exports the entropy model it trains to a directory; "
            f"name a directory (e.g. runs/text_entropy/export)"
        )
    try:
        command = training_command(configs, data, path)
    except ValueError as error:  # a config that is neither a file nor a shipped config
        raise EntropyModelError(f"stages[{i}].entropy_config: {error}") from None
    failure = Path(str(path) + FAILURE_SUFFIX)
    failure.unlink(missing_ok=True)
    shown = " ".join(shlex.quote(part) for part in ["python", *command[1:]])
    print(f"stages[{i}].entropy_model {path} does not exist: training it first with\n  {shown}", flush=True)
    status = subprocess.run(command, env=_nested_run_env()).returncode
    if status != 0 or not entropy_model_ready(path):
        message = (
            f"stages[{i}]: training the entropy model failed (exit status {status}; its output is above). "
            f"The command was: {shown}"
        )
        failure.parent.mkdir(parents=True, exist_ok=True)
        failure.write_text(message + "\n")
        raise EntropyModelError(message)
    print(f"stages[{i}]: entropy model exported to {path}; training the main model", flush=True)


def wait_for_entropy_model(i: int, path: Path, poll_seconds: float = WAIT_POLL_SECONDS) -> None:
    """Wait (a rank other than 0) until rank 0 has exported stage i's entropy model to `path`;
    EntropyModelError when rank 0 reports a failure."""
    failure = Path(str(path) + FAILURE_SUFFIX)
    began = time.time()
    print(f"stages[{i}]: waiting for global rank 0 to train the entropy model into {path}", file=sys.stderr, flush=True)
    while not entropy_model_ready(path):
        try:
            failed = failure.stat().st_mtime >= began - 1.0  # a failure of this run, not an old one
        except FileNotFoundError:
            failed = False
        if failed:
            raise EntropyModelError(failure.read_text().strip())
        time.sleep(poll_seconds)


def check_entropy_context(i: int, path: Path, max_seq_len: Optional[int]) -> None:
    """The entropy model scores whole windows of the main model: with a position table, its
    max_seq_len must cover the main model's."""
    if max_seq_len is None:
        return
    try:
        stored = checkpoint_hparams(load_checkpoint(path, mmap=True)).get("architecture") or {}
    except ValueError as error:
        raise EntropyModelError(f"stages[{i}].entropy_model: {error}") from None
    try:
        limited = config_from_dict(ModelConfig, stored).length_limited
    except (ValueError, TypeError) as error:
        raise EntropyModelError(f"stages[{i}].entropy_model {path}: its architecture does not fit this multibyte: {error}") from None
    context = stored.get("max_seq_len")
    if limited and context is not None and context < max_seq_len:
        raise EntropyModelError(
            f"stages[{i}].entropy_model {path}: its max_seq_len={context} is shorter than this model's "
            f"max_seq_len={max_seq_len}, whose windows it must score whole; train it on windows that long"
        )


def adopt_checkpoint_entropy_models(given: Any, stored: dict) -> None:
    """Take each entropy stage's model from the checkpoint's hyperparameters `stored`
    (architecture), in place into the parsed `given` architecture: `entropy_architecture` and
    `entropy_threshold` where the given config leaves them unset, `entropy_model` and
    `entropy_config` always. The checkpoint holds that model's weights, so where it was trained
    from is history, not a setting that could contradict it; the export folder may be gone."""
    given_stages = _get(given, "stages") or []
    stored_stages = stored.get("stages") or []
    if len(given_stages) != len(stored_stages):
        return  # another layout: the architecture conflict is reported as such
    for mine, theirs in zip(given_stages, stored_stages):
        if not isinstance(theirs, dict) or theirs.get("entropy_architecture") is None:
            continue
        if _get(mine, "patcher") != "entropy" or theirs.get("patcher") != "entropy":
            continue
        for key in ("entropy_architecture", "entropy_threshold"):
            if _get(mine, key) is None:
                _set(mine, key, theirs.get(key))
        for key in ("entropy_model", "entropy_config"):
            if key in theirs:
                _set(mine, key, theirs[key])


# ------------------------------------------------------------------------------------------------
# 2. The threshold, at the start of fit
# ------------------------------------------------------------------------------------------------


def calibration_windows(
    datamodule: Any, num_bytes: int = CALIBRATION_BYTES, seed: int = CALIBRATION_SEED
) -> torch.Tensor:
    """(n, seq_len) int64: whole training windows of `datamodule` holding about `num_bytes` bytes
    (at least one window), chosen by `seed` among the contiguous windows of its train split."""
    if datamodule is None or not hasattr(datamodule, "eval_dataset"):
        raise EntropyModelError(
            "entropy threshold: fit calibrates it on a byte datamodule's train split and this run has none; "
            "set entropy_threshold in the stage config or call EntropyPatcher.calibrate"
        )
    split = datamodule.eval_dataset("train")  # contiguous windows [k·L, (k+1)·L) of the train split
    whole = split.num_bytes // split.seq_len
    if whole < 1:
        raise EntropyModelError(
            f"entropy threshold: the train split holds {split.num_bytes} bytes, less than one window of "
            f"seq_len={split.seq_len} to calibrate on"
        )
    count = min(whole, max(1, math.ceil(num_bytes / split.seq_len)))
    chosen = np.sort(np.random.default_rng(seed).choice(whole, size=count, replace=False))
    return torch.stack([split[int(k)] for k in chosen]).long()


def mean_unit_length(model: torch.nn.Module, tokens: torch.Tensor, stage: int) -> float:
    """Average bytes per unit of `stage` that `model`'s patchers cut in (B, T) `tokens`."""
    with torch.no_grad():
        starts = model.unit_starts(tokens)[stage]
    return tokens.numel() / max(1, int(starts.sum()))


@contextlib.contextmanager
def patchers_alone(model: torch.nn.Module, patchers: list, sample: torch.Tensor) -> Iterator[None]:
    """Lets the patchers' entropy models run outside the model's forward. Under FSDP2 that needs
    two things: the root has run a forward first (FSDP2 makes the first module to run forward its
    root; an entropy model's block run before would take that role), and the root's own
    parameters (the entropy models' embeddings and heads among them) are gathered: outside the
    root's forward they are shards. `sample`: (1, n) bytes for that first forward."""
    if not (hasattr(model, "unshard") and hasattr(model, "reshard")):  # not an FSDP2 module
        yield
        return
    saved = [patcher.threshold.clone() for patcher in patchers]
    for patcher in patchers:
        patcher.threshold.fill_(math.inf)  # a forward that needs no θ: no rule fires
    with torch.no_grad():
        model(sample)
    for patcher, theta in zip(patchers, saved):
        patcher.threshold.copy_(theta)
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def settle_entropy_patchers(module: Any) -> list[tuple[int, float, float]]:
    """At the start of a `ByteLM`'s fit: calibrate every entropy patcher that has no threshold yet
    (see the module docstring, 2.), then record each entropy stage's model and θ in the module's
    hyperparameters; returns (stage, θ, measured mean patch length) for each calibrated one.

    The recording matters under LightningCLI, whose hyperparameters are the parsed config (plain
    data) rather than the `ModelConfig` the model was built from: without it a checkpoint would
    name only the entropy model's path, and need that folder to be loaded."""
    from multibyte.checkpoints import plain
    from multibyte.patchers.entropy import EntropyPatcher

    model = getattr(module.model, "_orig_mod", module.model)  # under torch.compile, the model it wraps
    entropy_stages = [i for i, p in enumerate(model.patchers) if isinstance(p, EntropyPatcher)]
    pending = [i for i in entropy_stages if math.isnan(float(model.patchers[i].threshold))]
    done = []
    if pending:
        windows = calibration_windows(module.trainer.datamodule).to(module.device)
        with patchers_alone(model, [model.patchers[i] for i in pending], windows[:1, :8]):
            for i in pending:  # outermost first: an inner stage's units live inside the outer's
                done.append(calibrate_stage(module, model, i, windows))
    for i in entropy_stages:
        module.architecture.stages[i].entropy_threshold = float(model.patchers[i].threshold)
    if entropy_stages and module.hparams.get("architecture") is not module.architecture:  # the CLI's plain copy
        module.hparams["architecture"] = plain(module.architecture)
    return done


def calibrate_stage(module: Any, model: torch.nn.Module, i: int, windows: torch.Tensor) -> tuple[int, float, float]:
    """θ of stage i's entropy patcher on (n, L) `windows`, the same on every rank; printed, logged,
    stored in its buffer. Returns (i, θ, measured mean patch length)."""
    trainer, patcher = module.trainer, model.patchers[i]
    context = patcher.model.config.max_seq_len
    if patcher.model.length_limited and windows.shape[1] > context:
        raise EntropyModelError(
            f"stages[{i}]: the entropy model's max_seq_len={context} is shorter than the data's "
            f"seq_len={windows.shape[1]}, the windows it must score"
        )
    with trainer.precision_plugin.forward_context():  # the entropies training will see
        theta = patcher.calibrate(windows)
    theta = float(trainer.strategy.broadcast(theta, src=0))  # one θ, bit for bit, on every rank
    patcher.threshold.fill_(theta)
    with trainer.precision_plugin.forward_context():
        measured = mean_unit_length(model, windows, i)
    if trainer.is_global_zero:
        print(
            f"stages[{i}]: entropy threshold calibrated on {windows.numel():,} training bytes: θ = {theta:.4f} "
            f"bits ({patcher.mode}); {measured:.2f} bytes per patch (target {patcher.target_patch_length:g}, "
            f"at most {patcher.max_length})",
            flush=True,
        )
    for logger in module.loggers:
        logger.log_metrics(
            {f"entropy/stage{i}_threshold": theta, f"entropy/stage{i}_patch_length": measured}, step=trainer.global_step
        )
    return i, theta, measured
