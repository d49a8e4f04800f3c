"""64x64 ImageNet images as bytes: one record = one image = 12,288 bytes in raster or patch-scan order,
as pixels or (`predictor="med"`) as each pixel's residual from its left and upper neighbours.

Accepted sources (`data_path`):
- the official downsampled-ImageNet folder: train_data_batch_1.npz .. train_data_batch_10.npz
  become train, except their last 10,000 images (2% when that is fewer), held out as validation;
  val_data.npz becomes test (ImageNet's validation set is the usual test set for this benchmark).
- one .npz file, or a folder of other .npz files, in the official layout (key `data`: uint8 rows of
  12,288 channel-planar bytes): images are assigned to train/validation/test 90/5/5 by a shuffle
  seeded with split_seed.
- a folder (searched recursively) of image files of any size and mode: converted to RGB and
  box-resized to 64x64, then assigned 90/5/5 by the same seeded shuffle.

Each split keeps the source order of its images. Training draws one whole random image per
example (seq_len = alignment = 12,288); evaluation scores each image once. With `hflip`, each
training draw is mirrored left-right with probability 1/2 (`HorizontalFlips`); validation and test
images never are.
"""

import re
import struct
import tokenize
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

import numpy as np

import torch

from datamodules.base import (
    EMBEDDED_DATA_DIR,
    SPLITS,
    ByteStreamDataModule,
    CacheWriter,
    DataError,
    RandomWindows,
    shuffled_split_assignment,
)
from datamodules.windows import DrawKey, window_hash
from multibyte.codecs.image import (
    IMAGE_BYTES,
    IMAGE_CHANNELS,
    IMAGE_ORDERS,
    IMAGE_PREDICTORS,
    IMAGE_SIZE,
    bytes_to_image,
    image_to_bytes,
    load_image_file,
    patch_scan_permutation,
    patch_side,
    planar_row_to_hwc,
)

OFFICIAL_TRAIN_FILE = re.compile(r"train_data_batch_(\d+)\.npz")
OFFICIAL_TEST_FILE = "val_data.npz"
OFFICIAL_VALIDATION_IMAGES = 10_000  # held out from the end of the train files...
OFFICIAL_VALIDATION_PERCENT = 2  # ...or this share of them when that is fewer images
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")
ROWS_PER_CHUNK = 1024  # 12.6 MB of rows converted at a time
EMBEDDED_IMAGES = EMBEDDED_DATA_DIR / "imagenet64_sample.npz"

FLIP_SALT = 0x666C6970  # keys the flip draws apart from the image draws of the same window

_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class NpzImageRows:
    """The `data` array of one .npz file in the downsampled-ImageNet layout, validated on opening.

    `chunks()` streams the rows out of the zip member, so a 1.5 GB training batch is never held
    in memory whole. Any problem (not a zip, truncated, no `data`, wrong dtype or row length)
    raises DataError naming the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._reading_errors(), zipfile.ZipFile(path) as archive:
            if "data.npy" not in archive.namelist():
                arrays = [name.removesuffix(".npy") for name in archive.namelist()]
                raise DataError(f"{path}: has no 'data' array (arrays found: {arrays})")
            member = archive.getinfo("data.npy")
            with archive.open(member) as stream:
                self.num_rows, self._fortran_order = self._read_header(stream)
                header_bytes = stream.tell()
        # The header's shape is checked against the member's size before anything is converted
        # (or, for column-major files, allocated): a wrong row count is a damaged file.
        declared, present = self.num_rows * IMAGE_BYTES, member.file_size - header_bytes
        if declared != present:
            raise DataError(
                f"{path}: 'data' declares {self.num_rows} rows ({declared} bytes) but holds {present} bytes; "
                f"the file is truncated or corrupt"
            )

    @contextmanager
    def _reading_errors(self) -> Iterator[None]:
        """Turn the many ways a damaged zip/npy fails into one DataError naming the file."""
        try:
            yield
        except DataError:
            raise
        except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
            raise DataError(f"{self.path}: cannot read ({error.strerror})") from error
        except MemoryError as error:  # only the column-major path loads a whole array
            raise DataError(f"{self.path}: 'data' is too large to load into memory ({error})") from error
        except (
            zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError,
            RuntimeError, struct.error, SyntaxError, tokenize.TokenError, TypeError, KeyError, IndexError,
        ) as error:  # fmt: skip
            # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method;
            # SyntaxError, TokenError: numpy parsing a damaged header (a Python literal).
            raise DataError(f"{self.path}: not a readable .npz file, corrupt or truncated ({error})") from error

    def _read_header(self, stream: BinaryIO) -> tuple[int, bool]:
        version = np.lib.format.read_magic(stream)
        if version not in _NPY_HEADER_READERS:
            raise DataError(f"{self.path}: 'data' uses .npy format version {version}, which is not supported")
        # The header is a Python literal read with ast.literal_eval: nothing in it can run code.
        shape, fortran_order, dtype = _NPY_HEADER_READERS[version](stream)
        if dtype != np.uint8:
            raise DataError(f"{self.path}: 'data' has dtype {dtype}, expected uint8")
        if len(shape) != 2 or shape[1] != IMAGE_BYTES or shape[0] < 0:
            raise DataError(
                f"{self.path}: 'data' has shape {shape}, expected (N, {IMAGE_BYTES}): "
                f"one 64x64x3 channel-planar image per row"
            )
        return shape[0], fortran_order

    def chunks(self, rows_per_chunk: int = ROWS_PER_CHUNK) -> Iterator[np.ndarray]:
        """Yield the rows in order, as uint8 arrays (k, 12288) of at most rows_per_chunk rows."""
        if self._fortran_order:
            # Column-major storage cannot be streamed row by row; such files are rare and small.
            # np.load refuses pickled (object) arrays by default; the dtype was checked anyway.
            with self._reading_errors(), np.load(self.path, allow_pickle=False) as arrays:
                data = arrays["data"]
            for start in range(0, self.num_rows, rows_per_chunk):
                yield np.ascontiguousarray(data[start : start + rows_per_chunk])
            return
        with self._reading_errors():
            archive = zipfile.ZipFile(self.path)
        with archive:
            with self._reading_errors():
                stream = archive.open("data.npy")
                self._read_header(stream)  # moves the stream to the first row
            with stream:
                for start in range(0, self.num_rows, rows_per_chunk):
                    count = min(rows_per_chunk, self.num_rows - start)
                    with self._reading_errors():
                        raw = stream.read(count * IMAGE_BYTES)
                    if len(raw) != count * IMAGE_BYTES:
                        row = start + len(raw) // IMAGE_BYTES
                        raise DataError(f"{self.path}: 'data' ends inside row {row} of {self.num_rows}; truncated file")
                    yield np.frombuffer(raw, dtype=np.uint8).reshape(count, IMAGE_BYTES)
                with self._reading_errors():
                    stream.read(1)  # reading to the end makes zipfile verify the member's CRC


def horizontal_flip_index(order: str, patch_size: int = 12) -> np.ndarray:
    """Index array `flip` (12288,) int64 with `image_bytes[flip]` = the bytes of the same image
    mirrored left-right, both in `order` ("raster", or "patch" with `patch_size`).

    Raster: the pixel columns reverse inside every row, each pixel's R, G, B staying in order.
    Patch scan: the blocks of a block row reverse, and so do the pixel columns inside each block,
    i.e. raster's flip conjugated by the patch-scan permutation.
    """
    if order not in IMAGE_ORDERS:
        raise ValueError(f"order must be one of {IMAGE_ORDERS}, got {order!r}")
    raster = np.arange(IMAGE_BYTES, dtype=np.int64).reshape(IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS)
    flip = raster[:, ::-1, :].reshape(-1)  # flipped_raster = raster_bytes[flip]
    if order == "raster":
        return np.ascontiguousarray(flip)
    scan = patch_scan_permutation(patch_size)  # scan_bytes = raster_bytes[scan]
    raster_to_scan = np.argsort(scan)  # raster_bytes = scan_bytes[raster_to_scan]
    # flipped_scan[k] = flipped_raster[scan[k]] = raster_bytes[flip[scan[k]]] = scan_bytes[raster_to_scan[...]]
    return raster_to_scan[flip[scan]]


class HorizontalFlips(RandomWindows):
    """Training images, each draw mirrored left-right with probability 1/2.

    Pixel bytes are mirrored by one index (`horizontal_flip_index`). MED residuals are not a
    permutation of the mirrored image's residuals (the left neighbour becomes the right one), so
    with a predictor a mirrored draw is decoded to pixels, mirrored and encoded again.

    Whether draw `DrawKey(seed, epoch, index)` is mirrored is a pure function of the key (a hash
    independent of the one that picks the image), so a resumed run and every rank draw exactly
    what one uninterrupted process would. Windows are whole images (seq_len = alignment = 12,288).
    """

    def __init__(self, windows: RandomWindows, order: str, patch_size: int, predictor: str = "none") -> None:
        if windows.token_format is not None or windows.seq_len != IMAGE_BYTES or windows.alignment != IMAGE_BYTES:
            raise ValueError("HorizontalFlips needs byte windows of exactly one image (seq_len = alignment = 12288)")
        super().__init__(windows.path, windows.num_bytes, windows.seq_len, windows.alignment, windows.num_windows)
        self.flip = torch.from_numpy(horizontal_flip_index(order, patch_size))  # (12288,) int64
        self.order, self.patch_size, self.predictor = order, patch_size, predictor

    @staticmethod
    def is_flipped(key: DrawKey) -> bool:
        seed, epoch, index = key
        return bool(window_hash(seed ^ FLIP_SALT, epoch, np.asarray([index]))[0] & np.uint64(1))

    def __getitem__(self, key: Union[int, DrawKey]) -> torch.Tensor:
        window = super().__getitem__(key)  # checks an integer key's range
        if isinstance(key, (int, np.integer)):
            key = DrawKey(0, 0, int(key))
        if not self.is_flipped(key):
            return window
        if self.predictor == "none":
            return window[self.flip]
        image = bytes_to_image(window.numpy(), self.order, self.patch_size, self.predictor)[:, ::-1]
        encoded = image_to_bytes(np.ascontiguousarray(image), self.order, self.patch_size, self.predictor)
        return torch.from_numpy(encoded).to(window.dtype)


class ImageNet64DataModule(ByteStreamDataModule):
    """64x64 RGB images as 12,288-byte records. See the module docstring for the accepted sources.

    Args:
        data_path: official downsampled-ImageNet folder, .npz file or folder of .npz files, or a
            folder of image files; None uses the embedded sample (190 ImageNet images).
        seq_len: must be 12288 (one image); kept as an argument so every datamodule takes it.
        order: "raster" (row-major RGB) or "patch" (MEGABYTE patch scan).
        patch_size: bytes per patch for the "patch" order, 3*p*p for p x p pixel blocks (12 = 2x2).
        predictor: "none" (pixel bytes) or "med" (each pixel's residual from the MED predictor
            of its left, upper and upper-left neighbours; `multibyte.codecs.image`): the same
            likelihood of the same pixels, in bytes a small model learns much faster.
        hflip: mirror each training image left-right with probability 1/2 (augmentation that
            respects `order` and `predictor`; validation and test images are never mirrored).
        batch_size, eval_batch_size, num_workers, cache_dir, train_windows_per_epoch, split_seed:
            see `ByteStreamDataModule`. The default train_windows_per_epoch is the number of
            training images.
    """

    modality = "image"

    def __init__(
        self,
        data_path: Optional[str] = None,
        seq_len: int = IMAGE_BYTES,
        order: str = "raster",
        patch_size: int = 12,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
        train_windows_per_epoch: Optional[int] = None,
        split_seed: int = 1234,
        hflip: bool = False,
        predictor: str = "none",
    ) -> None:
        if seq_len != IMAGE_BYTES:
            raise ValueError(f"seq_len must be {IMAGE_BYTES} (one 64x64x3 image) for images, got {seq_len}")
        if order not in IMAGE_ORDERS:
            raise ValueError(f"order must be one of {IMAGE_ORDERS}, got {order!r}")
        patch_side(patch_size)  # raises ValueError for a patch size that is not a square pixel block
        if predictor not in IMAGE_PREDICTORS:
            raise ValueError(f"predictor must be one of {IMAGE_PREDICTORS}, got {predictor!r}")
        super().__init__(
            data_path=data_path,
            seq_len=seq_len,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            cache_dir=cache_dir,
            train_windows_per_epoch=train_windows_per_epoch,
            split_seed=split_seed,
        )
        self.order = order
        self.patch_size = patch_size
        self.hflip = hflip
        self.predictor = predictor

    def setup(self, stage: Optional[str] = None) -> None:
        super().setup(stage)
        if self.hflip:
            self._train = HorizontalFlips(self._train, self.order, self.patch_size, self.predictor)

    def _spec_fields(self) -> dict[str, Any]:
        return {"image_order": self.order, "image_patch_size": self.patch_size, "image_predictor": self.predictor}

    @property
    def alignment(self) -> int:
        return IMAGE_BYTES  # a training window is exactly one whole image

    def _default_source(self) -> Path:
        return EMBEDDED_IMAGES

    def _layout(self, source: Path) -> tuple[str, list[Path]]:
        """("official" | "npz" | "images", files). Official files: train batches by number, then val_data."""
        if source.is_file():
            if source.suffix.lower() == ".npz":
                return "npz", [source]
            if source.suffix.lower() in IMAGE_FILE_SUFFIXES:
                return "images", [source]
            raise DataError(f"{source}: neither an .npz file nor an image file ({', '.join(IMAGE_FILE_SUFFIXES)})")
        if not source.is_dir():
            raise DataError(f"{source}: neither a regular file nor a folder")
        try:
            entries = list(source.iterdir())
        except OSError as error:
            raise DataError(f"{source}: cannot list the folder ({error.strerror})") from error
        batches = [path for path in entries if OFFICIAL_TRAIN_FILE.fullmatch(path.name)]
        if batches:
            batches.sort(key=lambda path: int(OFFICIAL_TRAIN_FILE.fullmatch(path.name).group(1)))
            test_file = source / OFFICIAL_TEST_FILE
            if not test_file.is_file():
                raise DataError(
                    f"{source}: has train_data_batch_*.npz but no {OFFICIAL_TEST_FILE} (the official validation "
                    f"set, used as the test split)"
                )
            return "official", batches + [test_file]
        npz_files = sorted(path for path in entries if path.is_file() and path.suffix.lower() == ".npz")
        if npz_files:
            return "npz", npz_files
        images = sorted(
            path for path in source.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_FILE_SUFFIXES
        )
        if images:
            return "images", images
        raise DataError(f"{source}: no .npz files and no image files ({', '.join(IMAGE_FILE_SUFFIXES)})")

    def _source_files(self, source: Path) -> list[Path]:
        return self._layout(source)[1]

    def _codec_params(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "patch_size": self.patch_size if self.order == "patch" else None,
            "predictor": self.predictor,
            "split_seed": self.split_seed,
            "official_validation_images": OFFICIAL_VALIDATION_IMAGES,
            "official_validation_percent": OFFICIAL_VALIDATION_PERCENT,
        }

    def _append_rows(self, writer: CacheWriter, planar_rows: np.ndarray, split_ids: np.ndarray) -> None:
        """Official-layout rows (k, 12288) -> one record per image in the chosen byte order."""
        images = planar_row_to_hwc(planar_rows)  # (k, 64, 64, 3)
        encoded = image_to_bytes(images, self.order, self.patch_size, self.predictor)  # (k, 12288)
        for record, split_id in zip(encoded, split_ids):
            writer.append_record(SPLITS[split_id], record)

    def _write_splits(self, source: Path, writer: CacheWriter) -> None:
        kind, files = self._layout(source)
        if kind == "official":
            self._write_official(source, files[:-1], files[-1], writer)
        elif kind == "npz":
            readers = [NpzImageRows(path) for path in files]
            assignment = shuffled_split_assignment(sum(r.num_rows for r in readers), self.split_seed, source, "images")
            first = 0
            for reader in readers:
                for rows in reader.chunks():
                    self._append_rows(writer, rows, assignment[first : first + len(rows)])
                    first += len(rows)
        else:
            assignment = shuffled_split_assignment(len(files), self.split_seed, source, "image files")
            for path, split_id in zip(files, assignment):
                try:
                    image = load_image_file(path)
                except ValueError as error:
                    raise DataError(str(error)) from error
                record = image_to_bytes(image, self.order, self.patch_size, self.predictor)
                writer.append_record(SPLITS[split_id], record)

    def _write_official(self, source: Path, train_files: list[Path], test_file: Path, writer: CacheWriter) -> None:
        readers = [NpzImageRows(path) for path in train_files]
        total = sum(reader.num_rows for reader in readers)
        held_out = min(OFFICIAL_VALIDATION_IMAGES, max(1, total * OFFICIAL_VALIDATION_PERCENT // 100))
        if total - held_out < 1:
            raise DataError(f"{source}: the train_data_batch files hold {total} images, too few to hold out validation")
        first = 0
        for reader in readers:
            for rows in reader.chunks():
                # 0 (train) before the held-out tail, 1 (validation) inside it.
                split_ids = (first + np.arange(len(rows)) >= total - held_out).astype(np.int8)
                self._append_rows(writer, rows, split_ids)
                first += len(rows)
        for rows in NpzImageRows(test_file).chunks():
            self._append_rows(writer, rows, np.full(len(rows), SPLITS.index("test")))
