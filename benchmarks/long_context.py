"""Training cost against sequence length, 8K to 1M bytes (issue #14).

    python benchmarks/long_context.py            # 8K, 16K, 64K, 256K, 1M bytes (minutes to an hour)
    python benchmarks/long_context.py --quick    # 8K and 64K, megabyte3 and mblm (the same step, < 60 s)

Per model and length: the wall time and peak resident memory (RSS) of ONE training step (forward,
summed next-byte loss, backward; batch 1) after one untimed 1K step, each length in a fresh
subprocess so the peak RSS is that length's own. The step runs under bf16 autocast where the CPU
multiplies bf16 in hardware (AVX512-BF16 or AMX) and in fp32 elsewhere, where bf16 is emulated
and slower than fp32 (`--precision` chooses). Torch uses `--threads` intra-op threads (default:
torch's own count). Models at equal parameter counts (within ~10%):
    megabyte3  the 3-stage MEGABYTE preset `megabyte3-long-cpu` (configs/cpu/text_long.yaml: units
               of 256 and 16 bytes, learned slot positions inside, activation checkpointing)
    mambabyte  one Mamba stage over bytes (d 256, 19 layers, activation checkpointing)
    vanilla    one attention stage over bytes (d 256, 11 layers, activation checkpointing, rotary
               positions: a learned table of 1M rows would triple its size)
    mblm       the PyPI `mblm` peer (IBM's MBLM, benchmark extra), the same three stages' widths,
               depths, heads and patch sizes with its transformer blocks, default settings
A length is skipped, and says why, when the trend of the model's last two measured lengths (the
larger of a power law and a straight line through them) predicts a peak RSS over `--memory_gib`
(default: 16 GiB or 80% of the memory available at the start, whichever is less) or a step longer
than what is left of the model's `--budget_seconds` (the sum of its measured steps may not exceed
it): no run is pushed into an out-of-memory kill. The 16K point gives that trend before 64K.
`--quick` measures 8K and 64K of the two hierarchical models with a 20 s budget each: the same
steps as the full run's, so its points agree with the full run's up to noise. The
growth exponents are least-squares slopes of log(seconds) and log(peak RSS) against log(length)
over the measured lengths from 64K to 1M (null with fewer than two). mblm is looked up in the
environment, or in the folder named by $MBLM_SITE.

The last line printed is one JSON object; it includes the load average (other processes on the
machine slow every figure; relative growth within one run is what the exponents compare).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from multibyte import cpu_features  # noqa: E402
from multibyte.config import ModelConfig, StageConfig  # noqa: E402
from multibyte.model import HierarchicalByteModel  # noqa: E402

FULL_LENGTHS = [1 << 13, 1 << 14, 1 << 16, 1 << 18, 1 << 20]
QUICK_LENGTHS = [1 << 13, 1 << 16]  # 64K needs a few GiB on every model: no trend needed to guard it
MODELS = ("megabyte3", "mambabyte", "vanilla", "mblm")
QUICK_MODELS = ("megabyte3", "mblm")  # one stage over every byte: an 8K step alone outlasts --quick on a CPU
WARMUP_LENGTH = 1 << 10  # the untimed first step: thread pool, allocator, kernels
MBLM_SITE_ENV = "MBLM_SITE"  # an extra sys.path entry where mblm is installed, when not in the environment


def our_config(name: str) -> ModelConfig:
    if name == "megabyte3":
        return ModelConfig.from_name("megabyte3-long-cpu")
    if name == "mambabyte":
        return ModelConfig(stages=[StageConfig("mamba", 256, 19, 1, checkpoint=True)], max_seq_len=1 << 20, position_embedding=False)
    if name == "vanilla":
        return ModelConfig(
            stages=[StageConfig("attention", 256, 11, 4, position="rotary", checkpoint=True)],
            max_seq_len=1 << 20,
            position_embedding=False,
        )
    raise ValueError(f"unknown model {name!r} (one of: {', '.join(MODELS)})")


def mblm_model(length: int):
    """MBLM with megabyte3's stages: widths 512/256/128, 2 layers each, 64-wide heads, units of
    256 then 16 bytes; its stage lengths are (length / 256, 16, 16)."""
    from mblm import MBLM, MBLMModelConfig, TransformerBlock

    blocks = [
        TransformerBlock(attn_head_dims=64, attn_num_heads=heads, attn_use_rot_embs=True, ff_multiplier=4)
        for heads in (8, 4, 2)
    ]
    config = MBLMModelConfig(
        num_tokens=257,  # byte 0 stays a learnable byte; 256 pads
        pad_token_id=256,
        hidden_dims=[512, 256, 128],
        num_layers=[2, 2, 2],
        seq_lens=[max(1, length // 256), 16, 16],
        train_checkpoint_chunks=None,
        block=blocks,
    )
    return MBLM(config)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def child(name: str, length: int, threads: int, bf16: bool) -> dict:
    """One timed training step of `name` at `length` bytes, in this (fresh) process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if name == "mblm":
        if os.environ.get(MBLM_SITE_ENV):
            sys.path.insert(0, os.environ[MBLM_SITE_ENV])
        from mblm import MBLMReturnType

        def make(n):
            return mblm_model(n).train()

        def loss_of(model, tokens):
            return model(tokens, return_type=MBLMReturnType.LOSS)

        model = make(length)
        warm = make(WARMUP_LENGTH) if length != WARMUP_LENGTH else model
    else:
        model = HierarchicalByteModel(our_config(name)).train()
        warm = model
        takes_mask = "loss_mask" in inspect.signature(model.forward).parameters

        def loss_of(model, tokens):
            if takes_mask:  # the head in chunks (multibyte.chunked_loss): no full fp32 logits
                nll, count = model(tokens, loss_mask=torch.ones_like(tokens, dtype=torch.bool))
            else:
                from multibyte.training import masked_byte_nll  # imports Lightning: only when needed

                nll, count = masked_byte_nll(model(tokens), tokens, torch.tensor([tokens.shape[1]]))
            return nll / count

    params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step(m, n: int) -> float:
        tokens = torch.randint(0, 256, (1, n))
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(m, tokens)
        loss.backward()
        seconds = time.perf_counter() - began
        m.zero_grad(set_to_none=True)
        return seconds

    step(warm, WARMUP_LENGTH)  # thread pool, allocator, kernels
    if warm is not model:
        del warm
    seconds = step(model, length)
    return {"seconds": round(seconds, 3), "peak_rss_gib": round(peak_rss_gib(), 3), "params": params}


def run_child(name: str, length: int, threads: int, precision: str, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", name, str(length), "--threads", str(threads), "--precision", precision]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"step still running after {timeout:.0f} s (killed)"}
    if done.returncode != 0:
        lines = (done.stderr.strip() or "no output").splitlines()
        return {"failed": f"exit status {done.returncode}: {lines[-1][:300]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def trend(points: list[tuple[int, float]], length: int) -> float | None:
    """The last two (length, value) points extrapolated to `length`: the larger of a power law
    (log-log line) and a straight line (a fixed part plus a part proportional to the length,
    which a power law fitted where the fixed part still dominates underestimates)."""
    if len(points) < 2:
        return None
    (l0, v0), (l1, v1) = points[-2:]
    power = v1 * (length / l1) ** (math.log(v1 / v0) / math.log(l1 / l0))
    line = v1 + (v1 - v0) * (length - l1) / (l1 - l0)
    return max(power, line)


def exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(value) against log(length)."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(v) for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 3)


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 16.0


def mblm_available() -> bool:
    probe = "import os, sys; p = os.environ.get('%s'); p and sys.path.insert(0, p); import mblm" % MBLM_SITE_ENV
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8K and 64K bytes, megabyte3 and mblm (< 60 s)")
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated subset of {','.join(MODELS)} (default: all; --quick: {','.join(QUICK_MODELS)})",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per step")
    parser.add_argument("--memory_gib", type=float, default=None, help="skip a length whose predicted peak RSS exceeds this")
    parser.add_argument(
        "--budget_seconds", type=float, default=None, help="step seconds per model (default 20 quick, 900 full)"
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="bf16 autocast or fp32 (auto: bf16 when the CPU has bf16 arithmetic, AVX512-BF16 or AMX)",
    )
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.threads, bf16=args.precision == "bf16")))
        return
    if args.models is None:
        args.models = ",".join(QUICK_MODELS if args.quick else MODELS)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    lengths = QUICK_LENGTHS if args.quick else FULL_LENGTHS
    memory_limit = args.memory_gib if args.memory_gib is not None else round(min(16.0, 0.8 * available_gib()), 1)
    budget = args.budget_seconds if args.budget_seconds is not None else (20.0 if args.quick else 900.0)
    if args.precision == "auto":
        args.precision = "bf16" if cpu_features.has_native_bf16() else "fp32"
    load_start = os.getloadavg()
    began = time.perf_counter()
    results = {}
    for name in models:
        if name == "mblm" and not mblm_available():
            results[name] = {"skipped": "mblm is not installed (pip install 'multibyte[bench]')"}
            continue
        sizes, times, memory = {}, [], []
        stopped = None  # why the remaining lengths are not run (a shorter one did not finish)
        for length in lengths:
            if stopped:
                sizes[str(length)] = {"skipped": stopped}
                continue
            left = budget - sum(t for _, t in times)  # step seconds only: process start-up is not counted
            predicted_rss, predicted_time = trend(memory, length), trend(times, length)
            if predicted_rss is not None and predicted_rss > memory_limit:
                sizes[str(length)] = {"skipped": f"does not fit: predicted peak RSS {predicted_rss:.1f} GiB > {memory_limit} GiB"}
                continue
            if left <= 0 or (predicted_time is not None and predicted_time > left):
                why = f"predicted {predicted_time:.0f} s" if predicted_time is not None else "no time left"
                sizes[str(length)] = {"skipped": f"over the time budget ({why}, {max(0.0, left):.0f} s left)"}
                continue
            result = run_child(name, length, args.threads, args.precision, timeout=max(left, 30.0) + 60.0)
            sizes[str(length)] = result
            if "seconds" in result:
                times.append((length, result["seconds"]))
                memory.append((length, result["peak_rss_gib"]))
            else:
                stopped = f"a shorter length did not finish ({length} bytes)"
        params = next((s["params"] for s in sizes.values() if "params" in s), None)
        for s in sizes.values():
            s.pop("params", None)
        long_times = [(n, t) for n, t in times if n >= 1 << 16]
        long_memory = [(n, m) for n, m in memory if n >= 1 << 16]
        results[name] = {
            "params": params,
            "lengths": sizes,
            "time_exponent_64k_1m": exponent(long_times),
            "memory_exponent_64k_1m": exponent(long_memory),
        }
    report = {
        "benchmark": "long_context",
        "quick": args.quick,
        "step": "forward + summed next-byte loss + backward, batch 1",
        "precision": "bf16 autocast" if args.precision == "bf16" else "fp32",
        "threads": args.threads,
        "memory_limit_gib": memory_limit,
        "budget_seconds_per_model": budget,
        "elapsed_seconds": round(time.perf_counter() - began, 1),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "models": results,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
