"""Sampling speed: our cached sampler vs full recompute vs MEGABYTE-pytorch's generate(), one run.

    python benchmarks/sample_speed.py            # whole 64x64 images, 12,288 bytes (a few minutes)
    python benchmarks/sample_speed.py --quick    # the first 1,200 bytes of an image (< 60 s)

Every model has the dimensions of the shipped CPU image preset (cpu/image64.yaml): MEGABYTE with
P = 12, a 384-wide 4-layer global model and a 128-wide 2-layer local model, random weights
(speed does not depend on them). Measured, in bytes per second (rows x bytes / wall time):

- ours: `multibyte.sampling.generate` (KV caches, prefill, one global step per patch), batch 1 and 16;
- recompute: the same model run on the whole sequence for every byte (what a sampler without a
  cache does); MEGABYTE-pytorch: its own `generate()` (which also recomputes everything per byte),
  with the same widths, depths, heads of the local width's size, patch size and length. Both are
  quadratic, so each is timed for ONE step at several sequence lengths, the per-step time is
  interpolated linearly between them and summed over all byte positions: keys say
  `..._interpolated_from_step_times`, and `step_time_lengths` lists where they were measured;
- MEGABYTE vs the vanilla byte transformer of (about) the same non-embedding parameter count,
  both with our cached sampler, timed per byte at several positions and interpolated the same
  way (the paper's claim: MEGABYTE is faster);
- MambaByte's time per byte at positions 1K, 4K and 12K (a recurrent step: should be flat);
- what the CPU defaults were chosen by: 1 vs 2 decode threads, fp32 vs bf16 weights at batch
  1, 8 and 16, eager vs torch.compile (full run only).

All baselines run with `--threads` intra-op threads (default 1, as our decoding loop): on the
shared 2-core machine this was written on, 2 threads made every measured path slower.

The machine's load average is recorded: other processes on the same cores slow every figure.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # MEGABYTE-pytorch's generate() draws a progress bar

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from multibyte.codecs import IMAGE_BYTES  # noqa: E402
from multibyte.config import ModelConfig, StageConfig, megabyte  # noqa: E402
from multibyte.model import HierarchicalByteModel  # noqa: E402
from multibyte.sampling import (  # noqa: E402
    allocate_decode_state,
    decode_step,
    decoding_threads,
    generate,
    prefill,
    sample_next_byte,
)

P = 12


def build_models() -> dict[str, HierarchicalByteModel]:
    configs = {
        "megabyte": megabyte(P, IMAGE_BYTES, 384, 4, 4, 128, 2, 4),
        # MEGABYTE's global model run at every byte: the same 4 x 384 transformer, no local model.
        "vanilla": ModelConfig(stages=[StageConfig("attention", 384, 4, 4)], max_seq_len=IMAGE_BYTES),
        "mambabyte": ModelConfig(
            stages=[StageConfig("mamba", 384, 8, d_state=16, d_conv=4, expand=2)],
            max_seq_len=IMAGE_BYTES + 1024,
            position_embedding=False,
        ),
    }
    models = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        models[name] = HierarchicalByteModel(config).eval()
    return models


# ------------------------------------------------------------------------------------------------
# Cached sampling
# ------------------------------------------------------------------------------------------------


def cached_bytes_per_second(model, batch: int, num_bytes: int, **options) -> float:
    """`generate` from an empty prompt for `num_bytes` bytes per row, after a short warm-up."""
    empty = torch.zeros(batch, 0, dtype=torch.long)
    generate(model, empty, 2 * P, seed=1, **options)
    start = time.perf_counter()
    generate(model, empty, num_bytes, seed=0, **options)
    return batch * num_bytes / (time.perf_counter() - start)


def decode_loop_bytes_per_second(model, batch: int, num_bytes: int, threads: int) -> float:
    """The loop inside `generate`, written out with the public pieces, at a chosen thread count."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(), decoding_threads(torch.device("cpu"), threads):
        for timed in (False, True):
            n = num_bytes if timed else 2 * P
            state = allocate_decode_state(model, batch, n)
            start = time.perf_counter()
            logits = prefill(model, state, torch.zeros(batch, 0, dtype=torch.long))
            for _ in range(n - 1):
                logits = decode_step(model, state, sample_next_byte(logits, generator=generator))
            sample_next_byte(logits, generator=generator)
    return batch * num_bytes / (time.perf_counter() - start)


def compiled_figures(model, batch: int, num_bytes: int) -> dict[str, float]:
    """torch.compile'd step: first run (compiles), second run, and its logits against eager's."""
    empty = torch.zeros(batch, 0, dtype=torch.long)
    start = time.perf_counter()
    generate(model, empty, num_bytes, seed=0, compile=True)
    first = time.perf_counter() - start
    start = time.perf_counter()
    generate(model, empty, num_bytes, seed=0, compile=True)
    second = time.perf_counter() - start
    # Same bytes through both steps: how far apart are the logits?
    data = torch.randint(0, 256, (batch, 4 * P), generator=torch.Generator().manual_seed(1))
    differences = []
    with torch.inference_mode(), decoding_threads(torch.device("cpu")):
        states = [allocate_decode_state(model, batch, num_bytes, compile=c) for c in (False, True)]
        logits = [prefill(model, state, data[:, :0]) for state in states]
        for t in range(data.shape[1]):
            differences.append((logits[0] - logits[1]).abs().max().item())
            logits = [decode_step(model, state, data[:, t]) for state in states]
    return {
        "first_run_seconds_with_compilation": round(first, 2),
        "bytes_per_s": round(batch * num_bytes / second, 1),
        "max_abs_logit_diff_vs_eager": float(f"{max(differences):.3g}"),
    }


def cached_seconds_per_byte_at(model, batch: int, position: int, steps: int) -> float:
    """Prefill `position` bytes in one pass, then time `steps` single-byte steps (with draws) from
    there: the cached sampler's time per byte at that position."""
    with torch.inference_mode():
        state = allocate_decode_state(model, batch, position + steps)
        logits = prefill(model, state, torch.randint(0, 256, (batch, position)))
        with decoding_threads(torch.device("cpu")):
            byte = sample_next_byte(logits)
            start = time.perf_counter()
            for _ in range(steps):
                byte = sample_next_byte(decode_step(model, state, byte))
            return (time.perf_counter() - start) / steps


# ------------------------------------------------------------------------------------------------
# Quadratic baselines: one step timed at several lengths, interpolated, summed
# ------------------------------------------------------------------------------------------------


def recompute_step_seconds(model, batch: int, length: int, repeats: int) -> float:
    """One step of sampling without a cache: the whole forward over `length` bytes, then a draw."""
    sequence = torch.randint(0, 256, (batch, length))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            byte = sample_next_byte(model(sequence)[:, -1])
            torch.cat([sequence, byte[:, None]], dim=1)
            best = min(best, time.perf_counter() - start)
    return best


def peer_step_seconds(batch: int, length: int, repeats: int) -> float:
    """One step of MEGABYTE-pytorch's generate(): a model whose max_seq_len ends at `length`
    (a multiple of P), primed with `length - 1` bytes, so generate() draws exactly one byte."""
    from MEGABYTE_pytorch import MEGABYTE

    torch.manual_seed(0)
    peer = MEGABYTE(
        num_tokens=257,
        pad_id=256,
        dim=(GLOBAL.d_model, LOCAL.d_model),
        depth=(GLOBAL.n_layers, LOCAL.n_layers),
        max_seq_len=(length // P, P),
        heads=LOCAL.n_heads,
        dim_head=LOCAL.d_model // LOCAL.n_heads,
        ff_mult=int(LOCAL.mlp_ratio),
    ).eval()
    prime = torch.randint(0, 256, (batch, length - 1))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            peer.generate(prime=prime)
            best = min(best, time.perf_counter() - start)
    return best


def interpolated_total_seconds(seconds_at: dict[int, float], num_bytes: int) -> float:
    """Sum over positions t = 0..num_bytes-1 of the time to produce byte t, interpolated linearly
    between the positions where it was measured."""
    positions = sorted(seconds_at)
    return float(np.interp(np.arange(num_bytes), positions, [seconds_at[t] for t in positions]).sum())


def peer_params() -> int:
    from MEGABYTE_pytorch import MEGABYTE

    with torch.device("meta"):
        peer = MEGABYTE(
            num_tokens=257, pad_id=256, dim=(GLOBAL.d_model, LOCAL.d_model), depth=(GLOBAL.n_layers, LOCAL.n_layers),
            max_seq_len=(IMAGE_BYTES // P, P), heads=LOCAL.n_heads, dim_head=LOCAL.d_model // LOCAL.n_heads,
        )
    return sum(p.numel() for p in peer.parameters())


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first 1,200 bytes of an image (< 60 s)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="intra-op threads for the recompute baselines (ours decodes with CPU_DECODE_THREADS = 1)",
    )
    args = parser.parse_args()
    quick = args.quick
    torch.set_num_threads(args.threads)

    num_bytes = 1200 if quick else IMAGE_BYTES
    batches = (1, 16)
    # Where one step of the quadratic baselines is timed (multiples of P, ending at num_bytes).
    lengths = [P, num_bytes // 2, num_bytes] if quick else [P, 3072, 6144, 9216, IMAGE_BYTES]
    repeats = 1  # the long steps take seconds each: timing noise is small next to them
    models = build_models()
    megabyte, vanilla, mambabyte = models["megabyte"], models["vanilla"], models["mambabyte"]

    results: dict = {
        "quick": quick,
        "image_bytes": num_bytes,
        "full_image": num_bytes == IMAGE_BYTES,
        "patch_size": P,
        "dims": "global 384x4 (4 heads), local 128x2 (4 heads), as cpu/image64.yaml",
        "precision": "fp32 for every method (bf16 only in cpu_defaults)",
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_cores": os.cpu_count(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "params": {name: model.num_parameters() for name, model in models.items()},
        "params_excluding_embeddings": {name: model.num_parameters(exclude_embeddings=True) for name, model in models.items()},
    }
    try:
        results["params"]["megabyte_pytorch"] = peer_params()
    except ImportError:
        results["peer"] = "MEGABYTE-pytorch not installed: pip install MEGABYTE-pytorch"
    results["step_time_lengths"] = lengths

    # Where the cached samplers' time per byte is measured, over `steps` bytes (whole patches).
    steps = 2 * P
    positions = [0, num_bytes // 2, num_bytes - steps] if quick else [0, 3072, 6144, 9216, IMAGE_BYTES - steps]
    results["cached_step_positions"] = positions
    for batch in batches:
        key = f"batch{batch}"
        figures: dict = {}
        # Ours, measured directly: generate() over the whole image (or the quick prefix).
        ours = cached_bytes_per_second(megabyte, batch, num_bytes)
        figures["ours_generate_bytes_per_s"] = round(ours, 1)
        figures["ours_generate_seconds"] = round(batch * num_bytes / ours, 2)
        # The quadratic baselines: a step at length L reads L - 1 bytes to produce byte L - 1.
        recompute = {n - 1: recompute_step_seconds(megabyte, batch, n, repeats) for n in lengths}
        recompute_total = interpolated_total_seconds(recompute, num_bytes)
        figures["recompute_bytes_per_s_interpolated_from_step_times"] = round(batch * num_bytes / recompute_total, 2)
        figures["speedup_vs_recompute"] = round(ours * recompute_total / (batch * num_bytes), 1)
        if "peer" not in results:
            peer = {n - 1: peer_step_seconds(batch, n, repeats) for n in lengths}
            peer_total = interpolated_total_seconds(peer, num_bytes)
            figures["megabyte_pytorch_step_seconds_at_lengths"] = {n: round(peer[n - 1], 4) for n in lengths}
            figures["megabyte_pytorch_generate_seconds_interpolated_from_step_times"] = round(peer_total, 1)
            figures["megabyte_pytorch_generate_bytes_per_s_interpolated_from_step_times"] = round(batch * num_bytes / peer_total, 2)
            figures["speedup_vs_megabyte_pytorch"] = round(ours * peer_total / (batch * num_bytes), 1)
        # MEGABYTE vs the vanilla transformer, both cached, both by the same method: time per byte
        # at several positions, interpolated, summed (a vanilla KV cache at 12K positions and batch
        # 16 is 2.4 GB read per byte, too slow to run through in full here).
        for name, model in (("megabyte", megabyte), ("vanilla", vanilla)):
            per_byte = {t: cached_seconds_per_byte_at(model, batch, t, steps) for t in positions}
            total = interpolated_total_seconds(per_byte, num_bytes)
            figures[f"{name}_cached_us_per_step_at_positions"] = {t: round(1e6 * v, 1) for t, v in per_byte.items()}
            figures[f"{name}_cached_bytes_per_s_interpolated"] = round(batch * num_bytes / total, 1)
        figures["megabyte_over_vanilla"] = round(
            figures["megabyte_cached_bytes_per_s_interpolated"] / figures["vanilla_cached_bytes_per_s_interpolated"], 2
        )
        results[key] = figures
        print(json.dumps({key: figures}), flush=True)

    mamba_steps = 30 if quick else 200
    results["mambabyte_us_per_byte_at_position"] = {
        t: round(1e6 * cached_seconds_per_byte_at(mambabyte, 1, t, mamba_steps), 1) for t in (1024, 4096, 12288)
    }

    if not quick:
        # How the CPU defaults were chosen (sampling.CPU_DECODE_THREADS, CPU_BF16_MIN_BATCH, compile
        # off by default): best of 2 runs of 600 bytes each.
        choice_bytes = 600
        defaults: dict = {"measured_bytes": choice_bytes}
        bf16 = copy.deepcopy(megabyte).to(torch.bfloat16)
        for batch in (1, 8, 16):
            for name, model in (("fp32", megabyte), ("bf16", bf16)):
                rate = max(cached_bytes_per_second(model, batch, choice_bytes) for _ in range(2))
                defaults[f"batch{batch}_{name}_bytes_per_s"] = round(rate, 1)
        for batch in batches:
            for threads in (1, 2):
                rate = max(decode_loop_bytes_per_second(megabyte, batch, choice_bytes, threads) for _ in range(2))
                defaults[f"batch{batch}_threads{threads}_bytes_per_s"] = round(rate, 1)
            defaults[f"batch{batch}_compiled"] = compiled_figures(megabyte, batch, choice_bytes)
        results["cpu_defaults"] = defaults
    results["load_average_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
