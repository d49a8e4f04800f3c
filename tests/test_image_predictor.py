"""The MED predictor of image bytes (multibyte/codecs/image.py): a worked example derived by hand,
exact round trips in every order, causality (a pixel's residual depends only on pixels written
before it), and everything that turns bytes back into pixels (decoders, prompts, reference codecs,
flips, the datamodule) agreeing with the plain pixels."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from datamodules import ImageNet64DataModule
from datamodules.image import EMBEDDED_IMAGES, HorizontalFlips
from datamodules.windows import DrawKey
from multibyte.codecs import IMAGE_BYTES, bytes_to_image, image_to_bytes, planar_row_to_hwc
from multibyte.codecs.image import med_reconstruct, med_residuals, patch_scan_permutation
from multibyte.decoders import SampleFormat, prompt_bytes
from multibyte.reference_codecs import image_codecs

LAYOUTS = [("raster", 12), ("patch", 3), ("patch", 12), ("patch", 48)]

random_images = st.integers(0, 2**32 - 1).map(
    lambda seed: np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
)


def embedded_images() -> np.ndarray:
    with np.load(EMBEDDED_IMAGES) as archive:
        return planar_row_to_hwc(archive["data"])  # (190, 64, 64, 3)


def test_worked_example_of_the_top_left_corner() -> None:
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[0, 0], image[0, 1] = (10, 20, 30), (12, 20, 30)
    image[1, 0], image[1, 1] = (11, 25, 30), (50, 50, 50)
    residuals = med_residuals(image).astype(int)
    # (0,0): predicted 0, residuals (10, 20, 30), chained (R, G-R, B-G).
    assert residuals[0, 0].tolist() == [10, 10, 10]
    # (0,1): top row, predicted by the left pixel: (2, 0, 0) -> (2, 0-2, 0-0) mod 256.
    assert residuals[0, 1].tolist() == [2, 254, 0]
    # (0,2): black, predicted (12, 20, 30): (-12, -20, -30) -> (244, 236-244, 226-236) mod 256.
    assert residuals[0, 2].tolist() == [244, 248, 246]
    # (1,0): left column, predicted by the pixel above: (1, 5, 0) -> (1, 4, 0-5).
    assert residuals[1, 0].tolist() == [1, 4, 251]
    # (1,1): left (11,25,30), up (12,20,30), up-left (10,20,30). R: c <= min(a,b) -> max = 12,
    # residual 38; G: c = 20 <= min -> max = 25, residual 25; B: all 30 -> 30, residual 20.
    # Chained: (38, 25-38, 20-25) mod 256.
    assert residuals[1, 1].tolist() == [38, 243, 251]
    # (2,0): black below (11,25,30): (245, 231, 226) -> (245, 231-245, 226-231) mod 256.
    assert residuals[2, 0].tolist() == [245, 242, 251]
    assert image_to_bytes(image, "raster", predictor="med")[:9].tolist() == [10, 10, 10, 2, 254, 0, 244, 248, 246]
    np.testing.assert_array_equal(med_reconstruct(residuals.astype(np.uint8)), image)


@pytest.mark.parametrize("order, patch_size", LAYOUTS)
@settings(max_examples=15, deadline=None)
@given(image=random_images)
def test_round_trip_in_every_order(order: str, patch_size: int, image: np.ndarray) -> None:
    data = image_to_bytes(image, order, patch_size, "med")
    assert data.shape == (IMAGE_BYTES,) and data.dtype == np.uint8
    np.testing.assert_array_equal(bytes_to_image(data, order, patch_size, "med"), image)
    # Any 12,288 bytes are the residuals of exactly one image.
    as_residuals = image.reshape(-1)
    decoded = bytes_to_image(as_residuals, order, patch_size, "med")
    np.testing.assert_array_equal(image_to_bytes(decoded, order, patch_size, "med"), as_residuals)


def test_a_batch_round_trips_and_equals_image_by_image() -> None:
    images = embedded_images()[:12]
    batch = image_to_bytes(images, "patch", 12, "med")  # (12, 12288)
    for image, row in zip(images, batch):
        np.testing.assert_array_equal(image_to_bytes(image, "patch", 12, "med"), row)
    np.testing.assert_array_equal(med_reconstruct(med_residuals(images)), images)


@pytest.mark.parametrize("order, patch_size", LAYOUTS)
def test_a_pixel_changes_no_byte_written_before_it(order: str, patch_size: int) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    scan = patch_scan_permutation(patch_size) if order == "patch" else np.arange(IMAGE_BYTES)
    position_of = np.argsort(scan)  # raster byte index -> its position in the byte order
    before = image_to_bytes(image, order, patch_size, "med")
    for row, col in [(0, 0), (0, 63), (1, 0), (17, 30), (63, 63), (40, 1)]:
        changed = image.copy()
        changed[row, col, 1] ^= 0x55  # the G byte of one pixel
        after = image_to_bytes(changed, order, patch_size, "med")
        first = position_of[(row * 64 + col) * 3 + 1]
        np.testing.assert_array_equal(after[:first], before[:first])
        assert after[first] != before[first]


def test_residuals_of_real_images_are_concentrated() -> None:
    images = embedded_images()

    def unigram_entropy(values: np.ndarray) -> float:
        counts = np.bincount(values.reshape(-1), minlength=256).astype(float)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())

    # The embedded sample: 7.92 bits for pixels, 4.69 for residuals.
    assert unigram_entropy(images) > 7.5
    assert unigram_entropy(med_residuals(images)) < 5.0


def test_short_bytes_decode_the_pixels_they_cover() -> None:
    image = embedded_images()[3]
    data = image_to_bytes(image, "raster", predictor="med")
    cut = bytes_to_image(data[: 10 * 64 * 3 + 5], "raster", predictor="med")
    np.testing.assert_array_equal(cut[:10], image[:10])
    np.testing.assert_array_equal(cut[10, 0, :2], image[10, 0, :2])


def test_an_unknown_predictor_is_one_clear_error() -> None:
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="predictor must be one of"):
        image_to_bytes(image, "raster", predictor="paeth")
    with pytest.raises(ValueError, match="predictor must be one of"):
        ImageNet64DataModule(predictor="paeth")
    with pytest.raises(ValueError, match="image_predictor must be one of"):
        SampleFormat("image", image_predictor="paeth")


def test_decoders_and_prompts_read_residual_bytes(tmp_path: Path) -> None:
    image = embedded_images()[5]
    fmt = SampleFormat("image", image_order="patch", image_patch_size=12, image_predictor="med")
    data = image_to_bytes(image, "patch", 12, "med")
    np.testing.assert_array_equal(fmt.image(data), image)
    Image.fromarray(image).save(tmp_path / "prompt.png")
    prompt = prompt_bytes(fmt, file=tmp_path / "prompt.png", image_rows=32)
    np.testing.assert_array_equal(prompt, data[: 32 * 64 * 3])


def test_reference_codecs_compress_the_pixels_not_the_residuals() -> None:
    images = embedded_images()[:4]
    pixels = image_to_bytes(images, "patch", 12).tobytes()
    residuals = image_to_bytes(images, "patch", 12, "med").tobytes()
    plain = {r.name: r.compressed_bytes for r in image_codecs(pixels, "patch", 12)}
    assert {r.name: r.compressed_bytes for r in image_codecs(residuals, "patch", 12, "med")} == plain


def test_datamodule_serves_residuals_of_the_same_images(tmp_path: Path) -> None:
    plain = ImageNet64DataModule(cache_dir=str(tmp_path), order="patch")
    residual = ImageNet64DataModule(cache_dir=str(tmp_path), order="patch", predictor="med", hflip=True)
    for dm in (plain, residual):
        dm.prepare_data()
        dm.setup("fit")
    assert residual.spec.image_predictor == "med" and plain.spec.image_predictor == "none"
    assert residual.cache_folder != plain.cache_folder
    test_plain, test_residual = plain.eval_dataset("test"), residual.eval_dataset("test")
    for i in range(len(test_plain)):
        pixels = bytes_to_image(test_plain[i].numpy(), "patch", 12)
        np.testing.assert_array_equal(test_residual[i].numpy(), image_to_bytes(pixels, "patch", 12, "med"))
    # A mirrored draw is the residuals of the mirrored image, not mirrored residuals.
    assert isinstance(residual._train, HorizontalFlips)
    key = next(DrawKey(3, 0, i) for i in range(50) if HorizontalFlips.is_flipped(DrawKey(3, 0, i)))
    pixels = bytes_to_image(plain._train[key].numpy(), "patch", 12)
    expected = image_to_bytes(np.ascontiguousarray(pixels[:, ::-1]), "patch", 12, "med")
    np.testing.assert_array_equal(residual._train[key].numpy(), expected)
