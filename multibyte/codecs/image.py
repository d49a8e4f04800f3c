"""64x64 RGB images <-> 12,288 bytes, in raster order or MEGABYTE's patch-scan order.

Raster order is the plain row-major HWC layout: pixel (0,0) R,G,B, then pixel (0,1) ... then row 1.
Patch-scan order (MEGABYTE, section on image modelling) cuts the image into p x p pixel blocks and
emits block after block in raster order of blocks, each block's p*p pixels in raster order inside
it (RGB interleaved). A block is `patch_size = 3 * p * p` bytes, so a model whose patch size equals
that many bytes sees exactly one square of the image per patch.

Both orders are one fixed permutation of the same 12,288 bytes, so encoding and decoding are exact.

Optionally (`predictor="med"`) each pixel is written as its residual from a prediction made of
pixels written before it, as lossless image coders do (LOCO-I / JPEG-LS): per channel, the median
edge detector MED(a, b, c) of the left (a), upper (b) and upper-left (c) pixel, then the channels
of one pixel chained (G's residual minus R's, B's minus G's), all mod 256. The three neighbours
come before the pixel in both orders, so the residual bytes are a causal, invertible function of
the pixel bytes: a model's likelihood of the residuals is exactly its likelihood of the pixels,
while the bytes it sees are concentrated near 0 (the unigram entropy of the embedded sample falls
from 7.9 to 4.7 bits) and "the same as above/left" costs the model nothing to express.
"""

import struct
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from multibyte.codecs.text import ByteLike, as_byte_array

IMAGE_SIZE = 64
IMAGE_CHANNELS = 3
IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * IMAGE_CHANNELS  # 12288
IMAGE_ORDERS = ("raster", "patch")
IMAGE_PREDICTORS = ("none", "med")


def patch_side(patch_size: int) -> int:
    """The side p (in pixels) of the square block that `patch_size` = 3*p*p bytes covers.

    Raises ValueError unless patch_size is 3*p*p for a p that divides 64 (3, 12, 48, 192, ...).
    """
    side = int(round((patch_size / IMAGE_CHANNELS) ** 0.5)) if patch_size > 0 else 0
    if side < 1 or IMAGE_CHANNELS * side * side != patch_size:
        raise ValueError(
            f"patch_size={patch_size} is not 3*p*p bytes for a square p x p pixel block "
            f"(valid: 3, 12, 48, 192, 768, 3072, 12288)"
        )
    if IMAGE_SIZE % side:
        raise ValueError(
            f"patch_size={patch_size} covers {side}x{side} pixels, and {side} does not divide {IMAGE_SIZE}"
        )
    return side


@lru_cache(maxsize=None)
def _cached_permutation(patch_size: int) -> np.ndarray:
    side = patch_side(patch_size)
    blocks = IMAGE_SIZE // side
    # Raster byte index of every (row, col, channel), regrouped as
    # (block_row, row_in_block, block_col, col_in_block, channel) -> blocks first, then pixels inside.
    raster_index = np.arange(IMAGE_BYTES, dtype=np.int64).reshape(blocks, side, blocks, side, IMAGE_CHANNELS)
    permutation = raster_index.transpose(0, 2, 1, 3, 4).reshape(-1)
    permutation.flags.writeable = False
    return permutation


def patch_scan_permutation(patch_size: int) -> np.ndarray:
    """Index array `perm` (12288,) with `raster_bytes[perm] == patch_bytes`.

    `perm[k]` is the raster position of the k-th byte in patch-scan order. Its inverse,
    `np.argsort(perm)`, maps patch-scan bytes back: `patch_bytes[np.argsort(perm)] == raster_bytes`.
    """
    return _cached_permutation(patch_size).copy()


def _check_order(order: str, patch_size: int, predictor: str = "none") -> None:
    if order not in IMAGE_ORDERS:
        raise ValueError(f"order must be one of {IMAGE_ORDERS}, got {order!r}")
    if order == "patch":
        patch_side(patch_size)
    if predictor not in IMAGE_PREDICTORS:
        raise ValueError(f"predictor must be one of {IMAGE_PREDICTORS}, got {predictor!r}")


def _med_prediction(pixels: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """MED prediction (..., k, 3) int16 of the pixels at (rows[i], cols[i]) of `pixels` (..., 64, 64, 3).

    Only the left, upper and upper-left pixels are read. On the top row the prediction is the left
    pixel, in the left column the upper pixel, and at (0, 0) zero.
    """
    left = pixels[..., rows, np.maximum(cols - 1, 0), :].astype(np.int16)  # a
    up = pixels[..., np.maximum(rows - 1, 0), cols, :].astype(np.int16)  # b
    up_left = pixels[..., np.maximum(rows - 1, 0), np.maximum(cols - 1, 0), :].astype(np.int16)  # c
    top, first_col = (rows == 0)[:, None], (cols == 0)[:, None]  # (k, 1): broadcast over channels
    left = np.where(first_col, up, left)  # left column: a = b = c = the pixel above
    up_left = np.where(first_col, up, up_left)
    up = np.where(top, left, up)  # top row: a = b = c = the pixel to the left
    up_left = np.where(top, left, up_left)
    origin = top & first_col
    high, low = np.maximum(left, up), np.minimum(left, up)
    prediction = np.where(up_left >= high, low, np.where(up_left <= low, high, left + up - up_left))
    return np.where(origin, 0, prediction)


def med_residuals(image: np.ndarray) -> np.ndarray:
    """Pixels (..., 64, 64, 3) uint8 -> their residuals (same shape, uint8); see the module docstring."""
    rows, cols = np.divmod(np.arange(IMAGE_SIZE * IMAGE_SIZE), IMAGE_SIZE)
    prediction = _med_prediction(image, rows, cols).reshape(image.shape)
    residual = (image.astype(np.int16) - prediction) & 0xFF
    chained = residual.copy()
    chained[..., 1:] = (residual[..., 1:] - residual[..., :-1]) & 0xFF  # G - R, B - G
    return chained.astype(np.uint8)


def med_reconstruct(residuals: np.ndarray) -> np.ndarray:
    """Inverse of `med_residuals`: residuals (..., 64, 64, 3) uint8 -> the pixels.

    Each pixel needs its left and upper neighbours first, so pixels are rebuilt one anti-diagonal
    (row + col = d) at a time, all pixels of a diagonal (and all images of a batch) at once.
    """
    residual = np.cumsum(residuals.astype(np.int16), axis=-1) & 0xFF  # undo the channel chain
    pixels = np.zeros(residuals.shape, dtype=np.int16)
    for diagonal in range(2 * IMAGE_SIZE - 1):
        rows = np.arange(max(0, diagonal - IMAGE_SIZE + 1), min(diagonal, IMAGE_SIZE - 1) + 1)
        cols = diagonal - rows
        prediction = _med_prediction(pixels, rows, cols)  # (..., k, 3)
        pixels[..., rows, cols, :] = (prediction + residual[..., rows, cols, :]) & 0xFF
    return pixels.astype(np.uint8)


def image_to_bytes(
    image: np.ndarray, order: str = "raster", patch_size: int = 12, predictor: str = "none"
) -> np.ndarray:
    """Flatten a 64x64x3 uint8 image to its 12,288 bytes in `order`, as pixels or MED residuals.

    A batch (..., 64, 64, 3) is accepted too and gives (..., 12288). `patch_size` is only used by
    the "patch" order; `predictor="med"` writes each pixel's residual (module docstring).
    """
    _check_order(order, patch_size, predictor)
    image = np.asarray(image)
    if image.shape[-3:] != (IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image of shape (64, 64, 3), got {image.dtype} {image.shape}")
    if predictor == "med":
        image = med_residuals(image)
    raster = image.reshape(*image.shape[:-3], IMAGE_BYTES)
    if order == "raster":
        return np.ascontiguousarray(raster)
    return raster[..., _cached_permutation(patch_size)]


def bytes_to_image(data: ByteLike, order: str = "raster", patch_size: int = 12, predictor: str = "none") -> np.ndarray:
    """Rebuild a 64x64x3 uint8 image from bytes in `order` (pixels, or MED residuals).

    Any length is accepted, so a sample cut short still shows: missing bytes (the end of the scan
    order) are zeros, i.e. black pixels, or with a predictor zero residuals (the prediction carries
    on), and bytes beyond 12,288 are ignored.
    """
    _check_order(order, patch_size, predictor)
    data = as_byte_array(data)[:IMAGE_BYTES]
    scan = np.zeros(IMAGE_BYTES, dtype=np.uint8)
    scan[: data.size] = data
    if order == "raster":
        raster = scan
    else:
        raster = np.empty_like(scan)
        raster[_cached_permutation(patch_size)] = scan  # inverse of raster[perm] == scan
    image = raster.reshape(IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS)
    return med_reconstruct(image) if predictor == "med" else image


def bytes_to_png(
    data: ByteLike,
    path_or_fileobj: Union[str, Path, BinaryIO],
    order: str = "raster",
    patch_size: int = 12,
    predictor: str = "none",
) -> None:
    """Write the image that `data` encodes as a (lossless) PNG file."""
    Image.fromarray(bytes_to_image(data, order, patch_size, predictor), mode="RGB").save(path_or_fileobj, format="PNG")


def _high_depth_to_8bit(image: Image.Image, path: Union[str, Path]) -> Image.Image:
    """An image with more than 8 bits per pixel value, as 8-bit ("L"); other modes pass through.

    Pillow reads 16-bit grayscale (PNG, TIFF, PGM) as mode "I;16*" or "I", whose `convert("RGB")`
    clips every value above 255 to white instead of scaling; 0..65535 maps to 0..255 here. "I"
    values outside 0..65535 and floating-point ("F") pixels have no fixed range to scale from.
    """
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image)  # (H, W) int32, uint16 or float32
    low, high = values.min(), values.max()
    if image.mode == "F" or low < 0 or high > 65535:
        raise ValueError(
            f"{path}: mode {image.mode} pixels ({low}..{high}) have no 8-bit mapping; save it as 8- or 16-bit"
        )
    scaled = (values.astype(np.uint32) * 255 + 32767) // 65535  # round(v * 255 / 65535)
    return Image.fromarray(scaled.astype(np.uint8))  # (H, W) uint8 -> mode "L"


def load_image_file(path: Union[str, Path]) -> np.ndarray:
    """Read an image file of any size and mode as 64x64x3 uint8: converted to RGB, box-resized.

    Box filtering averages the source pixels under each target pixel, which is how the official
    downsampled ImageNet was made; 16-bit images are scaled to 8 bits first. Raises ValueError
    naming the file when it cannot be read or decoded.
    """
    try:
        file = open(path, "rb")
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror or error})") from error
    with file:
        try:
            image = Image.open(file)
            image.load()  # decodes the (first) frame: malformed data fails here
        except UnidentifiedImageError as error:
            raise ValueError(f"{path}: cannot decode image (not an image format Pillow recognises)") from error
        # Pillow's decoders report malformed data with any of these (OSError covers unidentified
        # formats and truncated data); each is this file's problem, reported as one error.
        except (
            OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, MemoryError,
            Image.DecompressionBombError,
        ) as error:  # fmt: skip
            raise ValueError(f"{path}: cannot decode image ({error})") from error
    with image:
        image = _high_depth_to_8bit(image, path)
        try:
            rgb = image.convert("RGB")
        except ValueError as error:  # a mode Pillow cannot convert
            raise ValueError(f"{path}: cannot convert its mode {image.mode} pixels to RGB ({error})") from error
        small = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def planar_row_to_hwc(row: np.ndarray) -> np.ndarray:
    """Official downsampled-ImageNet row (4096 R, 4096 G, 4096 B bytes) -> 64x64x3 HWC image.

    Rows (N, 12288) are accepted too and give (N, 64, 64, 3).
    """
    row = np.asarray(row, dtype=np.uint8)
    if row.shape[-1] != IMAGE_BYTES:
        raise ValueError(f"expected rows of {IMAGE_BYTES} bytes, got shape {row.shape}")
    planar = row.reshape(*row.shape[:-1], IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    return np.moveaxis(planar, -3, -1)
