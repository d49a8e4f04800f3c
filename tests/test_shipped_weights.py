"""The main job's weights shipped in samples/weights/image64 (an `export` of the checkpoint the
README's figures come from) load, score the embedded test images as the README says (4.373
bits/dim under the preset's bf16 autocast; fp32 here), and sample an image."""

from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import ImageNet64DataModule
from multibyte.bench import score_bytes
from multibyte.codecs import IMAGE_BYTES
from multibyte.decoders import SampleFormat
from multibyte.sampling import generate
from multibyte.training import load_model

WEIGHTS = Path(__file__).resolve().parents[1] / "samples" / "weights" / "image64"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model(str(WEIGHTS)).model.eval()


def test_shipped_weights_score_the_embedded_test_images(model: torch.nn.Module, tmp_path_factory) -> None:
    dm = ImageNet64DataModule(order="patch", patch_size=12, predictor="med", cache_dir=str(tmp_path_factory.mktemp("cache")))
    dm.prepare_data()
    test = (dm.cache_folder / "test.bin").read_bytes()
    assert len(test) == 9 * IMAGE_BYTES
    score = score_bytes(model, np.frombuffer(test, dtype=np.uint8), IMAGE_BYTES, "basic")
    assert score.bits_per_byte == pytest.approx(4.373, abs=0.01)


def test_shipped_weights_sample_an_image(model: torch.nn.Module) -> None:
    fmt = SampleFormat("image", image_order="patch", image_patch_size=12, image_predictor="med")
    out = generate(model, torch.zeros(1, 0, dtype=torch.long), 192, temperature=0.8, seed=0)  # one row of blocks
    image = fmt.image(out[0].numpy().astype(np.uint8))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
