"""What a person wants to see after training an image model: its test bits/dim beside PNG and WebP
lossless on the same images, a grid of samples, and completions of test images whose top half is
given (the bottom half generated), with a check that the completions continue their prompts.

`ImageReport` is a Lightning callback that does all of it when a test run ends (the shipped CPU
image preset enables it, so the README's first command ends with the table and the file paths):

    python -m multibyte fit --config image64.yaml --config cpu/image64.yaml

`write_image_report` is the same without Lightning: a model, the test split's bytes, its score.

The colour check. A model that uses the prompt carries the colours of the top half on into the
bottom half. For each completion it compares the mean RGB colour of generated rows with that of
the same rows of the true image, and of another test image (the next one, cyclically): the 8 rows
right below the prompt, and the whole generated half. A completion that continues its image lies
nearer its own; "copying the prompt" (the mean colour of as many given rows just above) is the
simple baseline. The distances are Euclidean, in 0..255 RGB units, averaged over the images.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from multibyte.callbacks import SampleCallback
from multibyte.codecs import IMAGE_BYTES, IMAGE_SIZE, patch_side
from multibyte.data_spec import data_spec_of
from multibyte.decoders import SampleFormat, image_grid, sample_to_files
from multibyte.reference_codecs import image_codecs

REPORT_FILE = "image_report.json"
COMPLETIONS_FILE = "completions.png"
BAND_ROWS = 8  # the colour check's first region: this many generated rows right below the prompt
VIEW_SCALE = 2  # completions.png is written at twice the pixel size: 64-pixel images are tiny on a screen


@dataclass
class ColourCheck:
    """How far the mean colours of generated rows lie from the truth, and from another image.

    Rows `first_row`..`last_row - 1` of each completion (all generated) against the same rows of
    its original and of another test image; distances between mean RGB colours (Euclidean, 0..255
    units), averaged over the completed images."""

    first_row: int
    last_row: int
    generated_to_true: float  # generated rows vs the same image's true rows
    generated_to_other: float  # generated rows vs another test image's rows
    true_to_other: float  # the two images' true rows: how far apart images are anyway
    prompt_to_true: float  # as many given rows just above, vs the true rows (copying the prompt's colour)
    closer_to_own_image: int  # completions nearer their own image's rows than the other image's
    images: int

    def describe(self) -> str:
        return (
            f"rows {self.first_row}-{self.last_row - 1}: generated {self.generated_to_true:.1f} from the truth, "
            f"{self.generated_to_other:.1f} from another image (true rows of two images: {self.true_to_other:.1f} "
            f"apart; the prompt's last {self.last_row - self.first_row} rows: {self.prompt_to_true:.1f}); "
            f"nearer its own image in {self.closer_to_own_image} of {self.images}"
        )


@dataclass
class ImageReportResult:
    """What `write_image_report` measured and wrote."""

    test_images: int
    bits_per_dim: dict[str, float]  # "model" and every image codec, on the same test bytes
    colours: list[ColourCheck]  # the rows just below the prompt, then the whole generated part
    prompt_rows: int  # pixel rows of each test image given as the prompt
    files: dict[str, str] = field(default_factory=dict)  # what -> path
    seconds: dict[str, float] = field(default_factory=dict)  # codecs, samples, completions

    def table(self) -> str:
        """The lines printed after a test run."""
        images = self.test_images
        lines = [f"test bits/dim on the {images} test image{'s' * (images != 1)} (lower is better):"]
        width = max(len(name) for name in self.bits_per_dim)
        model = self.bits_per_dim["model"]
        for name, bpd in self.bits_per_dim.items():
            versus = "" if name == "model" else f"   (model {100 * (model / bpd - 1):+.1f}%)"
            lines.append(f"  {name:<{width}}  {bpd:6.3f}{versus}")
        if self.colours:
            lines.append(f"completions (top {self.prompt_rows} of {IMAGE_SIZE} rows given), mean RGB colour distances:")
            lines += [f"  {check.describe()}" for check in self.colours]
        for what, path in self.files.items():
            note = f"  (top row: test images; bottom row: their top {self.prompt_rows} rows, continued by the model)"
            lines.append(f"{what + ':':<13} {path}{note if what == 'completions' else ''}")
        return "\n".join(lines)


def codec_bits_per_dim(data: bytes, fmt: SampleFormat) -> dict[str, float]:
    """Bits per byte of PNG and WebP lossless (one file per image, as `multibyte.reference_codecs`
    writes them) on the images of whole-image records `data` in `fmt`'s layout."""
    return {
        result.name: 8.0 * result.compressed_bytes / len(data)
        for result in image_codecs(data, fmt.image_order, fmt.image_patch_size, fmt.image_predictor)
        if not result.skipped
    }


def prompt_rows_for(fmt: SampleFormat, rows: int = IMAGE_SIZE // 2) -> int:
    """The most pixel rows <= `rows` that are a whole number of rows of blocks in `fmt`'s byte
    order (every row in raster order): both orders emit the image top to bottom, so the top r rows
    are its first r·64·3 bytes."""
    if fmt.image_order == "raster":
        return rows
    side = patch_side(fmt.image_patch_size)
    return rows - rows % side


def mean_colour(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3) float64 mean RGB."""
    return images.reshape(len(images), -1, 3).astype(np.float64).mean(axis=1)


def colour_check(originals: np.ndarray, completions: np.ndarray, first_row: int, last_row: int) -> ColourCheck:
    """Compare rows first_row..last_row-1 of completions (N, 64, 64, 3) with the same rows of their
    originals, and of image (i + 1) mod N for image i. Needs N >= 2 and first_row >= the rows compared."""
    height = last_row - first_row
    if len(originals) < 2 or originals.shape != completions.shape:
        raise ValueError(f"colour_check needs two or more matching images, got {originals.shape} and {completions.shape}")
    if not 0 < height <= first_row or last_row > originals.shape[1]:
        raise ValueError(f"colour_check: rows {first_row}..{last_row} need as many prompt rows above them")
    generated = mean_colour(completions[:, first_row:last_row])
    true = mean_colour(originals[:, first_row:last_row])
    other = np.roll(true, -1, axis=0)
    prompt = mean_colour(originals[:, first_row - height : first_row])
    to_true = np.linalg.norm(generated - true, axis=1)
    to_other = np.linalg.norm(generated - other, axis=1)
    return ColourCheck(
        first_row=first_row,
        last_row=last_row,
        generated_to_true=round(float(to_true.mean()), 2),
        generated_to_other=round(float(to_other.mean()), 2),
        true_to_other=round(float(np.linalg.norm(true - other, axis=1).mean()), 2),
        prompt_to_true=round(float(np.linalg.norm(prompt - true, axis=1).mean()), 2),
        closer_to_own_image=int((to_true < to_other).sum()),
        images=len(originals),
    )


def _write_png(image: np.ndarray, path: Path) -> None:
    image = image.repeat(VIEW_SCALE, axis=0).repeat(VIEW_SCALE, axis=1)
    with open(path, "xb") as file:
        Image.fromarray(image, mode="RGB").save(file, format="PNG")


def complete_images(
    model: torch.nn.Module,
    records: np.ndarray,
    fmt: SampleFormat,
    prompt_rows: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
) -> np.ndarray:
    """Give the model the top `prompt_rows` pixel rows of each record ((N, 12288) bytes in `fmt`'s
    order) and let it write the rest; returns the completed images (N, 64, 64, 3) uint8."""
    from multibyte.sampling import generate

    prompt_length = prompt_rows * IMAGE_SIZE * 3
    completed = []
    for first in range(0, len(records), batch_size):
        prompts = torch.as_tensor(records[first : first + batch_size, :prompt_length].astype(np.int64))
        out = generate(model, prompts, IMAGE_BYTES - prompt_length, temperature=temperature, seed=seed + first)
        completed += [fmt.image(row.astype(np.uint8)) for row in out.cpu().numpy()]
    return np.stack(completed)


def write_image_report(
    model: torch.nn.Module,
    fmt: SampleFormat,
    test_bytes: np.ndarray,
    model_bits_per_dim: float,
    folder: Path,
    *,
    num_samples: int = 8,
    num_completions: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
) -> ImageReportResult:
    """Score PNG and WebP lossless on `test_bytes` (whole images in `fmt`'s order) beside the
    model's `model_bits_per_dim`, sample `num_samples` images, complete the top halves of the first
    `num_completions` test images, and write it all into `folder` (which must not exist yet):
    samples/ (one PNG per sample, a grid, settings), completions.png (top row the originals,
    bottom row the completions) and image_report.json."""
    if fmt.modality != "image":
        raise ValueError(f"the image report needs image data, got {fmt.modality}")
    data = np.asarray(test_bytes, dtype=np.uint8)
    if data.size == 0 or data.size % IMAGE_BYTES:
        raise ValueError(f"test bytes must be whole 64x64x3 images ({IMAGE_BYTES} bytes each), got {data.size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    records = data.reshape(-1, IMAGE_BYTES)
    seconds: dict[str, float] = {}

    began = time.perf_counter()
    scores = {"model": float(model_bits_per_dim), **codec_bits_per_dim(data.tobytes(), fmt)}
    seconds["codecs"] = time.perf_counter() - began
    files: dict[str, str] = {}

    if num_samples > 0:
        began = time.perf_counter()
        run = sample_to_files(
            model, fmt, folder / "samples", num_samples=num_samples, batch_size=num_samples,
            max_new_bytes=IMAGE_BYTES, prompt=np.zeros(0, dtype=np.uint8), temperature=temperature,
            seed=seed, progress=False,
        )  # fmt: skip
        seconds["samples"] = time.perf_counter() - began
        grid = next(path for path in run.paths if path.name.endswith("_grid.png"))
        files["sample grid"] = str(grid)

    colours: list[ColourCheck] = []
    prompt_rows = prompt_rows_for(fmt)
    count = min(num_completions, len(records))
    if count > 0 and prompt_rows > 0:
        began = time.perf_counter()
        originals = np.stack([fmt.image(record) for record in records[:count]])
        completions = complete_images(model, records[:count], fmt, prompt_rows, temperature, seed)
        seconds["completions"] = time.perf_counter() - began
        if count >= 2:
            band = min(BAND_ROWS, prompt_rows, IMAGE_SIZE - prompt_rows)
            colours.append(colour_check(originals, completions, prompt_rows, prompt_rows + band))
            rest = min(IMAGE_SIZE, 2 * prompt_rows)  # as many rows as were given, at most
            colours.append(colour_check(originals, completions, prompt_rows, rest))
        path = folder / COMPLETIONS_FILE
        _write_png(image_grid(list(originals) + list(completions), columns=count), path)
        files["completions"] = str(path)

    result = ImageReportResult(
        test_images=len(records),
        bits_per_dim={name: round(value, 4) for name, value in scores.items()},
        colours=colours,
        prompt_rows=prompt_rows,
        files=files,
        seconds={name: round(value, 1) for name, value in seconds.items()},
    )
    report = {
        **asdict(result),
        "temperature": temperature,
        "seed": seed,
        "image_order": fmt.image_order,
        "image_predictor": fmt.image_predictor,
    }
    report_path = folder / REPORT_FILE
    with open(report_path, "x", encoding="utf-8") as file:
        json.dump(report, file, indent=2)
    result.files["report"] = str(report_path)
    return result


def _free_folder(base: Path) -> Path:
    """`base`, or `base_1`, `base_2`, ... : the first that does not exist (a repeated test run
    writes a new report rather than refusing or overwriting)."""
    candidate, n = base, 0
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}_{n}")
    return candidate


class ImageReport(Callback):
    """When a test run on image data ends, print the model's test bits/dim beside PNG and WebP
    lossless on the same images, and write samples and completions (`write_image_report`) into
    `<log_dir>/image_report/`, printing where. Does nothing for text or audio data.

    Args:
        num_samples: unconditional samples in the grid (0: none).
        num_completions: test images whose top half the model completes (0: none).
        temperature: sampling temperature of both.
        seed: the draws' seed (the same seed gives the same images from the same weights).
    """

    def __init__(self, num_samples: int = 8, num_completions: int = 8, temperature: float = 1.0, seed: int = 0) -> None:
        if num_samples < 0 or num_completions < 0:
            raise ValueError(f"num_samples and num_completions must be >= 0, got {num_samples} and {num_completions}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.num_samples = num_samples
        self.num_completions = num_completions
        self.temperature = temperature
        self.seed = seed
        self.result: Optional[ImageReportResult] = None

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or data_spec_of(datamodule).modality != "image":
            return
        folder = _free_folder(Path(trainer.log_dir or trainer.default_root_dir) / "image_report")
        model = SampleCallback._whole_model(trainer, pl_module)  # every rank joins when the model is sharded
        if not trainer.is_global_zero:
            return
        bpd = trainer.callback_metrics.get("test/bpb")
        if bpd is None:
            rank_zero_warn("ImageReport: the test run logged no test/bpb; no report written")
            return
        self.result = write_image_report(
            model,
            SampleFormat.from_datamodule(datamodule),
            np.asarray(datamodule.byte_split("test")),
            float(bpd),
            folder,
            num_samples=self.num_samples,
            num_completions=self.num_completions,
            temperature=self.temperature,
            seed=self.seed,
        )
        print(self.result.table(), flush=True)
