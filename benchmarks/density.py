"""Density estimation against real codecs, end to end.

    python benchmarks/density.py --quick                            # fresh tiny models, < 1 minute
    python benchmarks/density.py --quick --checkpoint text=runs/text_recipe/.../last.ckpt
    python benchmarks/density.py --checkpoint text=CKPT --checkpoint audio=CKPT ...   # full mode

Trains nothing.

Full mode scores the given trained checkpoints on held-out data: for each modality, the TEST split
of its recipe (`configs/cpu/{text,image64,audio}_recipe.yaml`, or `--recipe MODALITY=YAML`):
whole books of genres the text recipe never trained on, images and speakers of their own. Each
model is scored without and with dynamic evaluation (`multibyte.adaptation`: the model learns
from each batch of windows after scoring it), next to every reference codec on the same bytes,
and a table per modality is printed (the README's table comes from it). Needs ../shared/data.

Quick mode (`--quick`) takes a sample of the embedded data (`datamodules/embedded/`, always
present) for text, one 64x64 image and audio, then:

1. scores it with a model (a given checkpoint for that modality, else a freshly initialised tiny
   MEGABYTE) in every inference mode of `multibyte.bench` (basic, sliding, strided, both);
2. runs the reference codecs of `multibyte.reference_codecs` on exactly the same bytes;
3. compresses the bytes with `multibyte.compression` (arithmetic coding under the model), decodes
   them again, and checks the round trip and that the size is within 1% (+ header) of the
   basic-mode prediction for the same bytes. Coding runs one model step per byte, so --quick
   codes only the first 2,048 bytes of each sample (--compress_bytes changes that).

An untrained model is near 8 bits per byte, so the codecs win here: the point is that every
figure of the comparison is produced by the real code paths. The last line printed is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules.base import EMBEDDED_DATA_DIR  # noqa: E402
from multibyte.adaptation import AdaptConfig  # noqa: E402
from multibyte.bench import INFERENCE_MODES, run_benchmark, score_bytes  # noqa: E402
from multibyte.codecs import (  # noqa: E402
    IMAGE_BYTES,
    image_to_bytes,
    load_audio_file,
    planar_row_to_hwc,
    waveform_to_bytes,
)
from multibyte.compression import HEADER_SIZE, compress_bytes, decompress_bytes  # noqa: E402
from multibyte.config import megabyte  # noqa: E402
from multibyte.model import HierarchicalByteModel  # noqa: E402
from multibyte.lpc_mixing import LpcConfig  # noqa: E402
from multibyte.mixing import MixingConfig  # noqa: E402
from multibyte.ngram_mixing import NgramConfig  # noqa: E402
from multibyte.reference_codecs import reference_codecs  # noqa: E402
from multibyte.training import load_model  # noqa: E402

AUDIO_RATE = 8000  # the embedded spoken digits are 8 kHz


def samples(quick: bool) -> dict[str, tuple[bytes, dict]]:
    """modality -> (bytes, codec parameters). Quick: 8 KB of text, one image, one clip."""
    text = (EMBEDDED_DATA_DIR / "gutenberg_books.txt").read_bytes()
    text = text[100_000 : 100_000 + (8_192 if quick else 65_536)]
    with np.load(EMBEDDED_DATA_DIR / "imagenet64_sample.npz") as arrays:
        rows = arrays["data"][: 1 if quick else 4]
    image = image_to_bytes(planar_row_to_hwc(rows), "raster").tobytes()
    clips = sorted(EMBEDDED_DATA_DIR.glob("*.wav"))[: 1 if quick else 8]
    audio = b"".join(waveform_to_bytes(load_audio_file(path, AUDIO_RATE), "pcm16").tobytes() for path in clips)
    return {
        "text": (text, {}),
        "image": (image, {"order": "raster", "patch_size": 12}),
        "audio": (audio, {"sample_rate": AUDIO_RATE, "encoding": "pcm16"}),
    }


def tiny_model(modality: str) -> tuple[HierarchicalByteModel, int]:
    """A freshly initialised tiny MEGABYTE and its window length for `modality`."""
    torch.manual_seed(0)
    patch, seq_len = {"text": (8, 1024), "image": (12, IMAGE_BYTES), "audio": (32, 4096)}[modality]
    config = megabyte(patch, seq_len, 8 * patch, 1, 2, 32, 1, 2)
    return HierarchicalByteModel(config).eval(), seq_len


def measure(
    modality: str, data: bytes, params: dict, checkpoint: str | None, lanes: int, compress_limit: int | None
) -> dict:
    if checkpoint:
        model = load_model(checkpoint).model.eval()
        seq_len = model.config.max_seq_len  # the shipped presets train on windows this long
    else:
        model, seq_len = tiny_model(modality)
    array = np.frombuffer(data, dtype=np.uint8)
    result: dict = {
        "num_bytes": len(data),
        "checkpoint": checkpoint,
        "parameters": model.num_parameters(),
        "seq_len": seq_len,
    }

    scores = {mode: score_bytes(model, array, seq_len, mode) for mode in INFERENCE_MODES}
    result["model_bits_per_byte"] = {mode: round(score.bits_per_byte, 4) for mode, score in scores.items()}
    result["model_cost"] = {mode: round(score.cost, 3) for mode, score in scores.items()}
    result["model_bytes_per_second"] = {mode: round(score.bytes_per_second) for mode, score in scores.items()}

    codecs = reference_codecs(data, modality, **params)
    result["codec_bits_per_byte"] = {
        c.name: round(8 * c.compressed_bytes / len(data), 4) for c in codecs if not c.skipped
    }
    result["codecs_skipped"] = {c.name: c.note for c in codecs if c.skipped}

    coded = data[:compress_limit]
    blob, stats = compress_bytes(model, coded, seq_len, lanes=lanes)
    began = time.perf_counter()
    restored, _ = decompress_bytes(model, blob)
    predicted_bytes = score_bytes(model, array[: len(coded)], seq_len, "basic").bits / 8
    result["compression"] = {
        "input_bytes": len(coded),
        "compressed_bytes": len(blob),
        "header_bytes": HEADER_SIZE,
        "predicted_payload_bytes": round(predicted_bytes, 1),
        "payload_vs_prediction": round((len(blob) - HEADER_SIZE) / predicted_bytes - 1, 5),
        "within_1_percent": abs(len(blob) - HEADER_SIZE - predicted_bytes) <= 0.01 * predicted_bytes,
        "round_trip": restored == coded,
        "compress_bytes_per_second": round(stats.bytes_per_second),
        "decompress_bytes_per_second": round(len(coded) / (time.perf_counter() - began)),
    }
    return result


REPO = Path(__file__).resolve().parents[1]
RECIPES = {  # modality -> (base config, recipe layered on it), under configs/
    "text": ("text.yaml", "cpu/text_recipe.yaml"),
    "image": ("image64.yaml", "cpu/image64_recipe.yaml"),
    "audio": ("audio.yaml", "cpu/audio_recipe.yaml"),
}


def recipe_datamodule(modality: str, recipe: Optional[str]):
    """The datamodule of `modality`'s recipe: `data` of the base config with the recipe's on top
    (or of the given YAML on top); a relative data_path is taken from the repository root, as the
    recipes' commands run there."""
    import importlib

    import yaml

    base, layered = RECIPES[modality]
    paths = [REPO / "configs" / base, Path(recipe) if recipe else REPO / "configs" / layered]
    class_path, init_args = None, {}
    for path in paths:
        try:
            data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        except (OSError, yaml.YAMLError) as error:
            raise SystemExit(f"--recipe {modality}: {path}: cannot read the YAML ({error})")
        class_path = data.get("class_path", class_path)
        init_args.update(data.get("init_args") or {})
    if init_args.get("data_path") and not Path(init_args["data_path"]).is_absolute():
        init_args["data_path"] = str((REPO / init_args["data_path"]).resolve())
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**init_args)


def measure_held_out(
    modality: str,
    checkpoint: str,
    recipe: Optional[str],
    adapt: AdaptConfig,
    adapt_batch: int,
    max_bytes: Optional[int],
    mixing: Optional[MixingConfig] = None,
) -> dict:
    """bench's report for the recipe's test split, without and with adaptation (and with `mixing`,
    the adapted model mixed with a second predictor, from the same pass), codecs beside."""
    datamodule = recipe_datamodule(modality, recipe)
    datamodule.prepare_data()
    model = load_model(checkpoint).model.eval()
    plain = run_benchmark(model, datamodule, "test", ("basic",), max_bytes=max_bytes, checkpoint=checkpoint)
    adapted = run_benchmark(
        model, datamodule, "test", ("basic",), batch_size=adapt_batch, max_bytes=max_bytes, codecs=False, adapt=adapt,
        checkpoint=checkpoint, mixing=mixing,
    )
    rows = plain["results"] + adapted["results"]
    return {
        "held_out": {
            "source": plain["data_source"],
            "split": "test",
            "num_bytes": plain["num_bytes"],
            "records": datamodule.manifest["splits"]["test"].get("num_records"),
        },
        "unit": plain["unit"],
        "checkpoint": checkpoint,
        "parameters": plain["model"]["parameters"],
        "adapt": adapted["model"]["adapt"],
        "mixing": adapted["model"]["mixing"],
        "bits": {row["method"]: round(row["bits_per_byte"], 4) for row in rows},
        "model_seconds": {row["method"]: round(row["seconds"], 1) for row in rows if row["kind"] == "model"},
        "codecs_skipped": plain["skipped"],
    }


def print_table(modality: str, figures: dict) -> None:
    bits = figures["bits"]
    best_codec = min((value, name) for name, value in bits.items() if name not in figures["model_seconds"])
    print(f"\n{modality}: {figures['held_out']['source']} test split, {figures['held_out']['num_bytes']:,} bytes ({figures['unit']})", file=sys.stderr)
    for name, value in sorted(bits.items(), key=lambda item: item[1]):
        kind = "model" if name in figures["model_seconds"] else "codec"
        print(f"  {value:7.4f}  {kind:5}  {name}", file=sys.stderr)
    model_best = min(value for name, value in bits.items() if name in figures["model_seconds"])
    print(f"  best model vs best codec ({best_codec[1]}): {model_best - best_codec[0]:+.4f}", file=sys.stderr)


def main_full(args, checkpoints: dict[str, str], parser) -> None:
    recipes: dict[str, str] = {}
    for item in args.recipe:
        modality, _, path = item.partition("=")
        if modality not in RECIPES or not Path(path).is_file():
            parser.error(f"--recipe expects MODALITY=YAML with an existing file, got {item!r}")
        recipes[modality] = path
    if not checkpoints:
        parser.error("full mode scores trained checkpoints: give --checkpoint text=PATH (image=, audio=), or use --quick")
    adapt = AdaptConfig(learning_rate=args.adapt_lr) if args.adapt_lr else AdaptConfig()
    began = time.perf_counter()
    figures: dict = {"quick": False, "torch": torch.__version__, "threads": torch.get_num_threads()}
    for modality, checkpoint in checkpoints.items():
        mixing = None
        if modality in args.ngram:
            mixing = NgramConfig(order=args.ngram_order)
        elif modality in args.lpc:
            mixing = LpcConfig()
        figures[modality] = measure_held_out(
            modality, checkpoint, recipes.get(modality), adapt, args.adapt_batch, args.max_bytes, mixing
        )
        print_table(modality, figures[modality])
    figures["seconds"] = round(time.perf_counter() - began, 1)
    figures["load_average"] = [round(value, 2) for value in os.getloadavg()]
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small sample per modality (< 1 minute)")
    parser.add_argument("--recipe", action="append", default=[], metavar="MODALITY=YAML",
                        help="full mode: take the held-out data from this recipe instead of configs/cpu/<modality>_recipe.yaml")
    parser.add_argument("--adapt_lr", type=float, default=None, help="full mode: learning rate of dynamic evaluation")
    parser.add_argument("--adapt_batch", type=int, default=8, help="full mode: windows scored between two updates (fewer adapt sooner)")
    parser.add_argument("--max_bytes", type=int, default=None, help="full mode: score only this prefix of each test split")
    parser.add_argument("--ngram", nargs="*", default=["text"], metavar="MODALITY",
                        help="full mode: modalities whose adapted model is also mixed with a byte n-gram (default: text)")
    parser.add_argument("--ngram_order", type=int, default=NgramConfig().order,
                        help="full mode: the n-gram's longest context in bytes")
    parser.add_argument("--lpc", nargs="*", default=["audio"], metavar="MODALITY",
                        help="full mode: modalities whose adapted model is also mixed with a linear predictor of samples (default: audio)")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="MODALITY=PATH",
        help="score this checkpoint for text, image or audio instead of a fresh tiny model (repeatable)",
    )
    parser.add_argument("--lanes", type=int, default=32, help="windows compressed side by side")
    parser.add_argument(
        "--compress_bytes", type=int, default=None, help="code only this many bytes of each sample (--quick: 2048)"
    )
    args = parser.parse_args()
    checkpoints: dict[str, str] = {}
    for item in args.checkpoint:
        modality, _, path = item.partition("=")
        if modality not in ("text", "image", "audio") or not path:
            parser.error(f"--checkpoint expects text=PATH, image=PATH or audio=PATH, got {item!r}")
        if not Path(path).is_file():
            parser.error(f"--checkpoint {item}: {path}: no such file")
        checkpoints[modality] = path
    if not args.quick:
        main_full(args, checkpoints, parser)
        return

    began = time.perf_counter()
    figures: dict = {"quick": args.quick, "torch": torch.__version__, "threads": torch.get_num_threads()}
    for modality, (data, params) in samples(args.quick).items():
        compress_limit = args.compress_bytes or (2048 if args.quick else None)
        figures[modality] = measure(modality, data, params, checkpoints.get(modality), args.lanes, compress_limit)
        summary = figures[modality]
        print(
            f"{modality}: {len(data):,} bytes, model {summary['model_bits_per_byte']['basic']:.3f} bits/byte, "
            f"best codec {min(summary['codec_bits_per_byte'].items(), key=lambda item: item[1])}, "
            f"first {summary['compression']['input_bytes']:,} bytes compressed to "
            f"{summary['compression']['compressed_bytes']:,}, "
            f"round trip {'ok' if summary['compression']['round_trip'] else 'FAILED'}",
            file=sys.stderr,
        )
    figures["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
