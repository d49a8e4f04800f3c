"""Checkpoints that people share: read them safely, write them atomically, export the weights.

A checkpoint is untrusted input. A Lightning `.ckpt` is a pickle, and a pickle can name any
function to call while it is read. Every read here goes through `torch.load(weights_only=True)`,
whose unpickler builds only tensors, containers, primitives and the globals allowed below (the
config dataclasses of `multibyte.config`, which `save_hyperparameters` stores for a `ByteLM` built
in Python). A checkpoint that names anything else is refused before that thing runs, with one
error naming the file; so is a truncated or foreign file. The advice torch attaches to such
failures (retry with weights_only=False, i.e. run the payload) is never passed on.

Two layouts are read:

    run/.../checkpoints/last.ckpt      Lightning's checkpoint: weights, optimizer, loops, hparams
                                       (and a subword model's tokenizer JSON under "tokenizer")
    DIR/model.safetensors              `python -m multibyte export`: the byte model's weights
    DIR/config.yaml                    ... and the `ByteLM` hyperparameters under `model:` (so it
                                       also works as `--config DIR/config.yaml`)
    DIR/tokenizer.json                 ... and a subword model's tokenizer

`load_checkpoint` returns both as a Lightning-style dict, so every command that takes
`--ckpt_path` takes either; `checkpoint_tokenizer` reads the tokenizer out of it. `SafeCheckpointIO` puts the same reader under Lightning (resume,
validate, test, predict) and writes checkpoints through a temporary file in the same folder,
fsync and `os.replace`, so a kill mid-save leaves the previous file whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import re
import typing
import zipfile
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Iterator, Optional, Union

import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from multibyte.atomic_files import write_atomically

from multibyte.bpe import TOKENIZER_FILE

if typing.TYPE_CHECKING:
    from multibyte.bpe import BPETokenizer

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
MODULE_PREFIX = "model."  # ByteLM holds its HierarchicalByteModel as `.model`
EXPORT_FORMAT = "multibyte-export-1"  # stored in the safetensors metadata
TOKENIZER_KEY = "tokenizer"  # a subword model's tokenizer JSON, in the checkpoint dict

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint cannot be used. The message names the file and the problem."""


# ------------------------------------------------------------------------------------------------
# What a checkpoint may name
# ------------------------------------------------------------------------------------------------


def allowed_globals() -> list[type]:
    """The classes a checkpoint may name besides tensors and containers: every dataclass defined in
    `multibyte.config` (the model configuration `save_hyperparameters` keeps)."""
    import multibyte.config as config

    return [
        value
        for value in vars(config).values()
        if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == config.__name__
    ]


@contextlib.contextmanager
def safe_globals() -> Iterator[None]:
    """Within this context `torch.load(weights_only=True)` also accepts the config dataclasses."""
    with torch.serialization.safe_globals(allowed_globals()):
        yield


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def is_export_dir(path: PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / EXPORT_WEIGHTS).is_file()


def load_checkpoint(path: PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint as Lightning's dict: `state_dict` (ByteLM keys, "model.*") and
    `hyper_parameters`, plus the training state for a `.ckpt`.

    `path` is a Lightning checkpoint file or an `export` directory. `mmap=True` maps the tensor
    data instead of reading it (a cheap look at the hyperparameters of a big file). Raises
    CheckpointError naming the file when it is missing, unreadable, unsafe or not a checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        return _load_export_dir(path, map_location)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    checkpoint = _torch_load(path, map_location, mmap)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        hint = f" (for an export, pass its folder, {path.parent})" if path.name == EXPORT_WEIGHTS else ""
        raise CheckpointError(f"checkpoint {path}: holds no state_dict (not a Lightning checkpoint){hint}")
    return checkpoint


def _torch_load(path: Path, map_location: Any, mmap: bool) -> Any:
    # mmap needs torch's zip layout; an old-style (or foreign) file is read plainly, equally safely.
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with safe_globals():
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        if named:
            raise CheckpointError(
                f"checkpoint {path}: refused: loading it would call {named.group(1)}, and a checkpoint "
                f"holds only tensors and configs. Nothing in it was run."
            ) from None
        raise CheckpointError(f"checkpoint {path}: cannot be read: not a PyTorch checkpoint (or corrupted)") from None
    except Exception as error:  # noqa: BLE001 - garbage bytes reach pickle opcodes that raise anything
        # (IndexError, TypeError, struct.error, UnicodeDecodeError...): all mean "not a checkpoint".
        raise CheckpointError(
            f"checkpoint {path}: cannot be read: truncated, corrupted or not a PyTorch checkpoint ({_reason(error)})"
        ) from None


def _reason(error: BaseException) -> str:
    """The first sentence of a loader's error, for the message (never torch's weights_only advice)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().split("\n")[0].split(". ")[0]
    if not text or "weights_only" in text:
        return type(error).__name__
    return text[:160]


def _load_export_dir(folder: Path, map_location: Any) -> dict[str, Any]:
    weights_path, config_path = folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG
    for needed in (weights_path, config_path):
        if not needed.is_file():
            raise CheckpointError(
                f"checkpoint {folder}: a folder without {needed.name} (not a `multibyte export` directory)"
            )
    import lightning
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        weights = load_file(weights_path, device=device)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {weights_path}: cannot be read: truncated or corrupted ({_reason(error)})") from None
    try:
        config = yaml.safe_load(config_path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {config_path}: cannot be read as YAML ({_reason(error)})") from None
    hparams = config.get("model") if isinstance(config, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("architecture"), dict):
        raise CheckpointError(f"checkpoint {config_path}: no model.architecture in it")
    checkpoint = {
        "state_dict": {MODULE_PREFIX + name: tensor for name, tensor in weights.items()},
        "hyper_parameters": hparams,
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    tokenizer_path = folder / TOKENIZER_FILE
    if tokenizer_path.is_file():
        try:
            checkpoint[TOKENIZER_KEY] = tokenizer_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CheckpointError(f"checkpoint {tokenizer_path}: cannot be read ({_reason(error)})") from None
    return checkpoint


def checkpoint_tokenizer(checkpoint: dict[str, Any], path: Optional[PathLike] = None) -> Optional["BPETokenizer"]:
    """The subword tokenizer a checkpoint (or export directory) carries; None for a byte model.
    CheckpointError naming `path` when what it carries is not a usable tokenizer."""
    from multibyte.bpe import BPETokenizer

    text = checkpoint.get(TOKENIZER_KEY)
    if text is None:
        return None
    source = Path(path) / TOKENIZER_FILE if path is not None and Path(path).is_dir() else f"checkpoint {path}"
    if not isinstance(text, str):
        raise CheckpointError(f"{source}: its tokenizer is not JSON text")
    try:
        return BPETokenizer.from_json(text, source=str(source))
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def check_same_tokenizer(model_tokenizer: Optional["BPETokenizer"], data_tokenizer: Optional["BPETokenizer"], where: str) -> None:
    """Refuse data encoded by another tokenizer than the model was trained with (fingerprints).
    `where` names the checkpoint. Either side being None (bytes, or unknown) is not a conflict."""
    if model_tokenizer is None or data_tokenizer is None:
        return
    if model_tokenizer.fingerprint() != data_tokenizer.fingerprint():
        raise CheckpointError(
            f"{where} was trained with another tokenizer than the data's (--data): tokenizer fingerprint "
            f"{model_tokenizer.fingerprint()[:16]} ({model_tokenizer.vocab_size} ids), the data's "
            f"{data_tokenizer.fingerprint()[:16]} ({data_tokenizer.vocab_size} ids). Its scores on this data would "
            f"be meaningless: point --data at the text and vocab_size the model was trained on"
        )


def checkpoint_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The `ByteLM` hyperparameters of a checkpoint as plain data (config dataclasses as dicts,
    tuples as lists), without Lightning's private keys (`_instantiator`, `_class_path`)."""
    raw = checkpoint.get("hyper_parameters") or {}
    return {name: plain(value) for name, value in dict(raw).items() if not str(name).startswith("_")}


def plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings as dicts, lists and primitives (what YAML and JSON hold)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        value = to_dict() if callable(to_dict) else {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def byte_model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The `HierarchicalByteModel` weights of a checkpoint (ByteLM's "model." prefix removed; a model
    trained with compile=True saved them under "model._orig_mod.")."""
    state = {}
    for name, tensor in checkpoint["state_dict"].items():
        if name.startswith(MODULE_PREFIX):
            name = name[len(MODULE_PREFIX) :]
            state[name.removeprefix("_orig_mod.")] = tensor
    return state


def load_module_weights(module: torch.nn.Module, path: PathLike, checkpoint: Optional[dict] = None) -> None:
    """Load a checkpoint's weights into a `ByteLM` (strictly); CheckpointError when they do not fit."""
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(path)
    target = getattr(module, "model", None)
    if target is None:
        raise CheckpointError(f"checkpoint {path}: the module has no byte model to load it into")
    target = getattr(target, "_orig_mod", target)  # under torch.compile, the module it wraps
    try:
        target.load_state_dict(byte_model_state(checkpoint))
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {path} does not fit the configured architecture: {_summarise_load_error(error)}"
        ) from None


def load_byte_model(path: PathLike, map_location: Any = "cpu") -> torch.nn.Module:
    """The `HierarchicalByteModel` of a checkpoint or export directory, built from its
    architecture, with its weights, in eval mode (e.g. an entropy patcher's byte model)."""
    from multibyte.config import ModelConfig
    from multibyte.model import HierarchicalByteModel

    checkpoint = load_checkpoint(path, map_location=map_location)
    architecture = checkpoint_hparams(checkpoint).get("architecture")
    if not isinstance(architecture, dict):
        raise CheckpointError(f"checkpoint {path}: no model architecture among its hyperparameters")
    model = HierarchicalByteModel(config_from_dict(ModelConfig, architecture))
    try:
        model.load_state_dict(byte_model_state(checkpoint))
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its own architecture: {_summarise_load_error(error)}") from None
    return model.eval()


def _summarise_load_error(error: RuntimeError) -> str:
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    text = " ".join(lines) or str(error)
    return text if len(text) <= 600 else text[:600] + " ..."


# ------------------------------------------------------------------------------------------------
# Comparing configurations
# ------------------------------------------------------------------------------------------------


_STAGE_PATH = re.compile(r"(?:^|\.)stages\[\d+\]$")


def config_differences(given: Any, stored: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, given, stored) for every leaf where two plain configurations disagree.

    Keys present on one side only are not differences (a field added or removed since the
    checkpoint was written keeps its default); lists of different lengths differ as a whole. A
    stage's compute-only fields (`COMPUTE_ONLY_STAGE_FIELDS`, e.g. activation checkpointing) are
    no difference either, wherever a list of stages sits (an entropy model's included).
    """
    from multibyte.config import COMPUTE_ONLY_STAGE_FIELDS

    if isinstance(given, dict) and isinstance(stored, dict):
        in_stage = _STAGE_PATH.search(prefix) is not None  # prefix ends in `stages[i]`
        found = []
        for key in given:
            if in_stage and key in COMPUTE_ONLY_STAGE_FIELDS:
                continue
            if key in stored:
                found += config_differences(given[key], stored[key], f"{prefix}.{key}" if prefix else str(key))
        return found
    if isinstance(given, (list, tuple)) and isinstance(stored, (list, tuple)) and len(given) == len(stored):
        found = []
        for index, (a, b) in enumerate(zip(given, stored)):
            found += config_differences(a, b, f"{prefix}[{index}]")
        return found
    return [] if plain(given) == plain(stored) else [(prefix, given, stored)]


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build the dataclass `cls` from plain data, nested dataclasses (also in lists and Optionals)
    included. Keys `cls` does not have are passed on, so that its own validation names them."""
    hints = typing.get_type_hints(cls)
    return cls(**{key: _build(hints.get(key), value) for key, value in data.items()})


def _build(hint: Any, value: Any) -> Any:
    if value is None or hint is None:
        return value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return config_from_dict(hint, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        for option in args:
            if dataclasses.is_dataclass(option) and isinstance(value, dict):
                return config_from_dict(option, value)
        return value
    if origin is list and args and isinstance(value, (list, tuple)):
        return [_build(args[0], item) for item in value]
    return value


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader and writer, made safe: reads through `load_checkpoint`
    (weights_only, the config dataclasses allowed, export directories accepted, one clear error),
    writes local files through `write_atomically`. Remote URLs keep Lightning's fsspec path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(path, lambda file: torch.save(checkpoint, file))

    def load_checkpoint(
        self, path: PathLike, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
    ) -> dict[str, Any]:
        # weights_only is always True here, whatever the caller asks.
        if "://" in str(path):
            with safe_globals():
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def export_checkpoint(ckpt_path: PathLike, output_dir: PathLike, overwrite: bool = False) -> list[Path]:
    """Write `model.safetensors` (the byte model's weights), `config.yaml` (the `ByteLM`
    hyperparameters under `model:`) and, for a subword model, `tokenizer.json` into `output_dir`.
    Existing files are never replaced unless `overwrite` (a stale tokenizer.json is then removed
    for a byte model). An entropy patcher's byte model is part of the weights and its architecture
    part of the config, so the directory is self-contained. Returns the paths written."""
    from safetensors.torch import save

    folder = Path(output_dir)
    targets = [folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG]
    if not overwrite:
        for target in [*targets, folder / TOKENIZER_FILE]:
            if target.exists():
                raise FileExistsError(f"{target}: already exists (--overwrite true replaces it)")
    checkpoint = load_checkpoint(ckpt_path)
    tokenizer = checkpoint_tokenizer(checkpoint, ckpt_path)
    hparams = checkpoint_hparams(checkpoint)
    if not isinstance(hparams.get("architecture"), dict):
        raise CheckpointError(f"checkpoint {ckpt_path}: no model architecture among its hyperparameters")
    for stage in hparams["architecture"].get("stages") or []:
        if isinstance(stage, dict) and stage.get("entropy_architecture") is not None:
            stage["entropy_model"] = None  # its weights travel inside model.safetensors
    # safetensors refuses tensors that share storage (tied weights): every tensor gets its own copy.
    weights = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in byte_model_state(checkpoint).items()}
    blob = save(weights, metadata={"format": EXPORT_FORMAT})
    header = (
        f"# multibyte export of {Path(ckpt_path).name}: {EXPORT_WEIGHTS} beside this file holds the weights.\n"
        f"# Use: python -m multibyte sample --config DIR/{EXPORT_CONFIG} --ckpt_path DIR ...\n"
    )
    text = header + yaml.safe_dump({"model": hparams}, sort_keys=False)
    write_atomically(targets[0], lambda file: file.write(blob))
    write_atomically(targets[1], lambda file: file.write(text.encode("utf-8")))
    if tokenizer is not None:
        targets.append(folder / TOKENIZER_FILE)
        write_atomically(targets[2], lambda file: file.write(tokenizer.to_json().encode("utf-8")))
    else:
        (folder / TOKENIZER_FILE).unlink(missing_ok=True)  # an earlier export's, replaced by --overwrite
    return targets
