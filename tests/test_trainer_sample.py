"""`MultibyteTrainer.sample` checks the prompt and the bytes asked for against the model's
context by the model's own length rule (`length_limited`): learned tables sized by max_seq_len,
the byte position table or the outermost stage's unit positions, limit it; rotary does not."""

import json
from pathlib import Path

import pytest
import torch

from datamodules import TextDataModule
from multibyte.config import ModelConfig, StageConfig
from multibyte.trainer import MultibyteTrainer
from multibyte.training import ByteLM

MAX_SEQ_LEN = 32


def architecture(outer_position: str) -> ModelConfig:
    """A tiny MEGABYTE without the byte position table; its outermost stage's units are placed by
    `outer_position`."""
    return ModelConfig(
        stages=[
            StageConfig("attention", 32, 1, 2, patcher="fixed", patch_size=4, position=outer_position),
            StageConfig("attention", 16, 1, 2),
        ],
        max_seq_len=MAX_SEQ_LEN,
        position_embedding=False,
    )


def saved(module: ByteLM, path: Path) -> Path:
    """`module`'s weights and hyperparameters in a Lightning-format checkpoint file."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def sample(outer_position: str, tmp_path: Path, prompt: str, max_new_bytes: int) -> dict:
    """Sample once from an untrained model; returns the run's sample_info.json."""
    torch.manual_seed(0)
    module = ByteLM(architecture(outer_position))
    module.configure_model()
    ckpt = saved(module, tmp_path / f"{outer_position}.ckpt")
    trainer = MultibyteTrainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                               enable_model_summary=False, accelerator="cpu")
    output = tmp_path / f"samples-{outer_position}"
    data = TextDataModule(seq_len=MAX_SEQ_LEN, cache_dir=str(tmp_path / "cache"))
    trainer.sample(module, datamodule=data, ckpt_path=str(ckpt), output_dir=str(output), num_samples=1,
                   prompt=prompt, max_new_bytes=max_new_bytes, dtype="float32")
    return json.loads((output / "sample_info.json").read_text())


def test_a_learned_outermost_table_limits_the_sample_length(tmp_path):
    with pytest.raises(ValueError, match=rf"sample: the prompt holds 30 bytes; with max_new_bytes=8 that exceeds "
                                         rf"the model's max_seq_len={MAX_SEQ_LEN}"):
        sample("learned", tmp_path, "x" * 30, 8)
    info = sample("learned", tmp_path, "x" * 30, 2)  # fits: 32 positions
    assert (info["prompt_bytes"], info["new_bytes"]) == (30, 2)


def test_rotary_outermost_positions_sample_past_max_seq_len(tmp_path):
    info = sample("rotary", tmp_path, "x" * 30, 8)
    assert (info["prompt_bytes"], info["new_bytes"]) == (30, 8)
