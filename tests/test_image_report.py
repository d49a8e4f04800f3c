"""The image report (multibyte/image_report.py): codec bits/dim on the very test bytes, completions
that keep their prompt, the colour check's arithmetic, and the callback at the end of `fit`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from multibyte.checkpoints import plain
from multibyte.cli import main, resolve_config_path
from multibyte.codecs import IMAGE_BYTES, image_to_bytes
from multibyte.config import ModelConfig
from multibyte.decoders import SampleFormat
from multibyte.image_report import (
    COMPLETIONS_FILE,
    REPORT_FILE,
    VIEW_SCALE,
    ImageReport,
    codec_bits_per_dim,
    colour_check,
    prompt_rows_for,
    write_image_report,
)
from multibyte.model import HierarchicalByteModel
from multibyte.reference_codecs import image_codecs

PATCH = SampleFormat("image", image_order="patch", image_patch_size=12)


def tiny_image_model(position: str = "grid") -> HierarchicalByteModel:
    """An untrained 2-stage model over 2x2-pixel patches of a 64x64 image (32 x 32 units)."""
    grid = {"position": "grid", "grid": [32, 32]} if position == "grid" else {}
    config = ModelConfig(
        stages=[
            {"mixer": "attention", "d_model": 24, "n_layers": 1, "n_heads": 2, "patcher": "fixed", "patch_size": 12, **grid},
            {"mixer": "attention", "d_model": 16, "n_layers": 1, "n_heads": 2},
        ],
        max_seq_len=IMAGE_BYTES,
        position_embedding=position != "grid",
    )
    torch.manual_seed(0)
    return HierarchicalByteModel(config).eval()


def smooth_images(count: int, seed: int = 0) -> np.ndarray:
    """(count, 64, 64, 3) uint8 gradients with noise: each image its own colours."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, 64)[:, None, None]
    images = [rng.uniform(0, 200, 3) + 50 * ramp + rng.normal(0, 4, (64, 64, 3)) for _ in range(count)]
    return np.clip(np.stack(images), 0, 255).astype(np.uint8)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def test_prompt_rows_are_whole_rows_of_blocks() -> None:
    assert prompt_rows_for(SampleFormat("image")) == 32
    assert prompt_rows_for(PATCH) == 32
    assert prompt_rows_for(SampleFormat("image", image_order="patch", image_patch_size=3 * 64 * 64)) == 0
    assert prompt_rows_for(SampleFormat("image", image_order="patch", image_patch_size=3 * 8 * 8), rows=20) == 16


def test_colour_check_tells_a_continuation_from_another_image() -> None:
    originals = smooth_images(4)
    perfect = colour_check(originals, originals.copy(), 32, 40)
    assert perfect.generated_to_true == 0 and perfect.closer_to_own_image == 4 and perfect.images == 4
    assert perfect.generated_to_other == perfect.true_to_other > 0
    # Completions whose bottom halves come from the next image: nearer the "other" image every time.
    swapped = originals.copy()
    swapped[:, 32:] = np.roll(originals, -1, axis=0)[:, 32:]
    wrong = colour_check(originals, swapped, 32, 64)
    assert wrong.generated_to_other == 0 and wrong.closer_to_own_image == 0
    # A flat image whose bottom half is 10 units brighter in every channel: sqrt(3) * 10 from copying the top.
    flat = np.full((2, 64, 64, 3), 100, dtype=np.uint8)
    flat[:, 32:] += 10
    assert colour_check(flat, flat, 32, 64).prompt_to_true == pytest.approx(10 * np.sqrt(3), abs=0.01)
    with pytest.raises(ValueError, match="two or more"):
        colour_check(originals[:1], originals[:1], 32, 40)
    with pytest.raises(ValueError, match="prompt rows above"):
        colour_check(originals, originals, 8, 40)


def test_codec_scores_are_the_reference_codecs_on_the_same_bytes() -> None:
    data = image_to_bytes(smooth_images(3), "patch", 12).tobytes()
    scores = codec_bits_per_dim(data, SampleFormat("image", image_order="patch", image_patch_size=12))
    expected = {r.name: 8 * r.compressed_bytes / len(data) for r in image_codecs(data, "patch", 12)}
    assert scores == expected and set(scores) == {"PNG (optimised)", "WebP lossless"}
    assert 0 < scores["WebP lossless"] < 8 and 0 < scores["PNG (optimised)"] < 8


def test_report_writes_completions_that_keep_their_prompts(tmp_path: Path) -> None:
    images = smooth_images(3)
    test_bytes = image_to_bytes(images, "patch", 12).reshape(-1)
    folder = tmp_path / "report"
    result = write_image_report(
        tiny_image_model(), PATCH, test_bytes, 7.5, folder, num_samples=1, num_completions=2, seed=3
    )
    assert result.test_images == 3 and result.prompt_rows == 32
    assert result.bits_per_dim["model"] == 7.5
    assert set(result.bits_per_dim) == {"model", "PNG (optimised)", "WebP lossless"}
    # Completions: top row the two originals, bottom row their completions; the prompt half is kept.
    grid = read_png(folder / COMPLETIONS_FILE)[::VIEW_SCALE, ::VIEW_SCALE]
    assert grid.shape == (2 * 64 + 2, 2 * 64 + 2, 3)
    for i in range(2):
        original, completed = grid[:64, i * 66 : i * 66 + 64], grid[66:, i * 66 : i * 66 + 64]
        np.testing.assert_array_equal(original, images[i])
        np.testing.assert_array_equal(completed[:32], images[i][:32])
        assert not np.array_equal(completed[32:], images[i][32:])  # an untrained model does not recall it
    assert [(c.first_row, c.last_row, c.images) for c in result.colours] == [(32, 40, 2), (32, 64, 2)]
    assert read_png(folder / "samples" / "sample_000.png").shape == (64, 64, 3)
    saved = json.loads((folder / REPORT_FILE).read_text())
    assert saved["bits_per_dim"] == result.bits_per_dim and saved["image_order"] == "patch"
    table = result.table()
    assert "PNG (optimised)" in table and "WebP lossless" in table and str(folder / COMPLETIONS_FILE) in table
    with pytest.raises(FileExistsError):  # never writes into an existing report
        write_image_report(tiny_image_model(), PATCH, test_bytes, 7.5, folder, num_samples=0, num_completions=0)


def test_report_refuses_what_is_not_whole_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whole 64x64x3 images"):
        write_image_report(tiny_image_model(), PATCH, np.zeros(100, np.uint8), 7.0, tmp_path / "r")
    with pytest.raises(ValueError, match="needs image data"):
        write_image_report(tiny_image_model(), SampleFormat("text"), np.zeros(IMAGE_BYTES, np.uint8), 7.0, tmp_path / "r")
    with pytest.raises(ValueError, match="num_samples and num_completions"):
        ImageReport(num_samples=-1)


def test_the_cpu_image_preset_ends_with_the_report() -> None:
    config = yaml.safe_load(Path(resolve_config_path("cpu/image64.yaml")).read_text())
    assert any(c["class_path"] == "multibyte.image_report.ImageReport" for c in config["trainer"]["callbacks"])


@pytest.mark.slow
def test_fit_prints_the_table_and_writes_the_report(tmp_path: Path, capsys) -> None:
    """The main job's path with a tiny model: one training step, then test, table and files."""
    architecture = json.dumps(plain(tiny_image_model().config))
    quick = tmp_path / "quick.yaml"
    quick.write_text(
        yaml.safe_dump(
            {"trainer": {"callbacks": [{"class_path": "multibyte.image_report.ImageReport",
                                        "init_args": {"num_samples": 0, "num_completions": 2}}]}}
        )
    )  # fmt: skip
    main([
        "fit", "--config", "image64.yaml", "--config", "cpu/image64.yaml", "--config", str(quick),
        "--model.architecture", architecture, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert "test bits/dim on the 9 test images" in printed and "PNG (optimised)" in printed
    reports = list((tmp_path / "run").rglob(REPORT_FILE))
    assert len(reports) == 1 and (reports[0].parent / COMPLETIONS_FILE).is_file()
    model_bpd = json.loads(reports[0].read_text())["bits_per_dim"]["model"]
    assert f"test bits/dim: {model_bpd:.4f}" in printed
