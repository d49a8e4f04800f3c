"""Horizontal-flip augmentation of training images (datamodules/image.py): the mirrored bytes are
the mirrored image in either byte order, the draws are a pure function of the key, and only the
train split is ever mirrored."""

from pathlib import Path

import numpy as np
import pytest

from datamodules import ImageNet64DataModule
from datamodules.image import HorizontalFlips, horizontal_flip_index
from datamodules.windows import DrawKey
from multibyte.codecs.image import bytes_to_image, image_to_bytes


def _random_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("order, patch_size", [("raster", 12), ("patch", 12), ("patch", 48), ("patch", 3)])
def test_flip_index_mirrors_the_image_in_its_byte_order(order: str, patch_size: int) -> None:
    image = _random_image(0)
    data = image_to_bytes(image, order, patch_size)
    flip = horizontal_flip_index(order, patch_size)
    assert sorted(flip.tolist()) == list(range(12288))  # a permutation: nothing lost or repeated
    np.testing.assert_array_equal(bytes_to_image(data[flip], order, patch_size), image[:, ::-1, :])
    np.testing.assert_array_equal(data[flip][flip], data)  # mirroring twice gives the image back


def test_flip_index_rejects_an_unknown_order() -> None:
    with pytest.raises(ValueError, match="order must be one of"):
        horizontal_flip_index("zigzag")


@pytest.mark.parametrize("order", ["raster", "patch"])
def test_train_draws_are_mirrored_half_the_time_and_reproducibly(order: str, tmp_path: Path) -> None:
    plain = ImageNet64DataModule(cache_dir=str(tmp_path), order=order, batch_size=2)
    flipping = ImageNet64DataModule(cache_dir=str(tmp_path), order=order, batch_size=2, hflip=True)
    for dm in (plain, flipping):
        dm.prepare_data()
        dm.setup("fit")
    assert isinstance(flipping._train, HorizontalFlips) and not isinstance(plain._train, HorizontalFlips)
    keys = [DrawKey(7, epoch, index) for epoch in range(2) for index in range(100)]
    flipped = 0
    for key in keys:
        original, seen = plain._train[key].numpy(), flipping._train[key].numpy()
        mirrored = image_to_bytes(bytes_to_image(original, order)[:, ::-1, :], order)
        if HorizontalFlips.is_flipped(key):
            flipped += 1
            np.testing.assert_array_equal(seen, mirrored)
        else:
            np.testing.assert_array_equal(seen, original)
        np.testing.assert_array_equal(flipping._train[key].numpy(), seen)  # the key alone decides
    assert 70 <= flipped <= 130  # about half of 200 draws (binomial sd 7)
    # An integer key means DrawKey(0, 0, i), as for unflipped windows.
    np.testing.assert_array_equal(flipping._train[3].numpy(), flipping._train[DrawKey(0, 0, 3)].numpy())


def test_flips_touch_only_the_train_split(tmp_path: Path) -> None:
    plain = ImageNet64DataModule(cache_dir=str(tmp_path), order="patch")
    flipping = ImageNet64DataModule(cache_dir=str(tmp_path), order="patch", hflip=True)
    flipping.prepare_data()
    flipping.setup("fit")
    assert flipping.cache_folder == plain.cache_folder  # the cache holds unflipped images either way
    for split in ("validation", "test"):
        ours, theirs = flipping.eval_dataset(split), plain.eval_dataset(split)
        assert len(ours) == len(theirs)
        for i in range(len(ours)):
            np.testing.assert_array_equal(ours[i].numpy(), theirs[i].numpy())
