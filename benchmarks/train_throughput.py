"""Training throughput: our MEGABYTE vs MEGABYTE-pytorch, same shapes, same run, same machine.

    python benchmarks/train_throughput.py                 # L 8,192, B 4: 1 warm-up + 4 timed steps per model
    python benchmarks/train_throughput.py --quick         # the same shapes, 1 warm-up + 1 timed step, ours at its best precision only
    python benchmarks/train_throughput.py --device cuda   # on a GPU (autocast bf16 there, TF32 off)
    python benchmarks/train_throughput.py --compile       # also ours in bf16 under torch.compile
    python benchmarks/train_throughput.py --bf16          # bf16 even on a CPU without bf16 arithmetic

Both sides train (forward, cross-entropy, backward, AdamW step) on random bytes at the same global
and local widths, depths, heads, patch size, sequence length and batch. MEGABYTE-pytorch
(`pip install MEGABYTE-pytorch`, a benchmark-only dependency) gets `num_tokens=257, pad_id=256` so
byte 0 is learnable, and `dim_head = local width / heads`, so its local attention matches ours and
its global attention is narrower than ours (fewer FLOPs on its side: the comparison is
conservative). It runs in fp32 as its training script does; ours at fp32 and bf16-mixed.

The device's matmul peak is measured in the same run for each precision, and our model FLOPs
utilisation is 6 x (parameters touched per byte) x bytes/s plus attention, over the peak of the
precision used. `--quick` measures the same regime as the full run (same shapes, the same
warm-up, fewer timed steps), so the two agree up to noise; to stay near a minute it trains ours at
its best precision only (bf16 where the CPU has bf16 arithmetic, else fp32), so the ratio at equal
precision comes from the full run there. Ours trains as `ByteLM` does: the loss
through `model(tokens, loss_mask=...)` (head and cross-entropy in chunks of positions) and, on
CPU, `reuse_freed_memory()` (activation-sized blocks reused, not re-faulted, every step). The
machine's load average is recorded before and after: other processes slow every figure. With
`--compile`, ours also trains in bf16 under `torch.compile` (as `ByteLM(compile=True)` does;
Inductor fuses the elementwise work around the matmuls); its compilation happens in the warm-up
step and is reported apart. On a CPU without bf16 arithmetic (no AVX512-BF16 or AMX) bf16 is
emulated, several times slower than fp32 (a 2048^2 bf16 matmul alone takes about a minute), so
there the bf16 runs are skipped unless `--bf16`, and fp32 is the best setting. The last line
printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from multibyte import cpu_features  # noqa: E402
from multibyte.config import ModelConfig, megabyte  # noqa: E402
from multibyte.model import HierarchicalByteModel  # noqa: E402
from multibyte.chunked_loss import real_positions  # noqa: E402
from multibyte.host_memory import reuse_freed_memory  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, seconds: float = 3.0, windows: int = 6) -> float:
    """The best rate of an n x n matmul over `windows` equal windows of `seconds` in all: a peak,
    so a window slowed by something else on the machine does not lower it (and inflate MFU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up (thread pool, packing buffers, kernel selection)
    synchronize(device)
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            a @ b
            count += 1
            if device.type == "cuda" and count % 10 == 0:
                synchronize(device)
        synchronize(device)
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def time_training(step, batch: torch.Tensor, warmup: int, steps: int) -> float:
    """Bytes per second of `step(batch)` (one full optimizer step), after `warmup` untimed steps."""
    for _ in range(warmup):
        step(batch)
    synchronize(batch.device)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    synchronize(batch.device)
    return batch.numel() * steps / (time.perf_counter() - start)


def ours_step_fn(config: ModelConfig, bf16: bool, device: torch.device, compile: bool = False):
    model = HierarchicalByteModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    forward = torch.compile(model) if compile else model
    lengths = None

    def step(tokens: torch.Tensor) -> None:
        nonlocal lengths
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            nll, count = forward(tokens, loss_mask=real_positions(tokens, lengths))  # as ByteLM trains
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def peer_step_fn(config: ModelConfig, seq_len: int, device: torch.device):
    from MEGABYTE_pytorch import MEGABYTE

    g, l = config.stages
    P = config.stages[0].patch_size
    model = MEGABYTE(
        num_tokens=257,
        pad_id=256,
        dim=(g.d_model, l.d_model),
        depth=(g.n_layers, l.n_layers),
        max_seq_len=(seq_len // P, P),
        heads=l.n_heads,
        dim_head=l.d_model // l.n_heads,
        ff_mult=int(l.mlp_ratio),
    ).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step(tokens: torch.Tensor) -> None:
        loss = model(tokens.long(), return_loss=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def training_flops_per_byte(model: HierarchicalByteModel, seq_len: int) -> float:
    """The model's own count (`HierarchicalByteModel.training_flops`), per byte."""
    return model.training_flops(seq_len) / seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the same shapes, one timed step per model, ours at its best precision only")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 4; --quick: 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--compile", action="store_true", help="also time ours in bf16 under torch.compile")
    parser.add_argument("--bf16", action="store_true", help="run bf16 on a CPU without bf16 arithmetic too")
    args = parser.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch build sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: only cpu and cuda are supported")
    for flag, value in (("--seq-len", args.seq_len), ("--batch", args.batch), ("--steps", 1 if args.steps is None else args.steps)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.seq_len % 8:
        parser.error(f"--seq-len must be a multiple of the patch size 8, got {args.seq_len}")

    began = time.perf_counter()
    seq_len, batch = args.seq_len, args.batch
    steps = args.steps if args.steps is not None else (1 if args.quick else 4)
    warmup = 1
    if device.type == "cpu":
        reuse_freed_memory()
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # "fp32" means fp32 on both sides
        torch.backends.cudnn.allow_tf32 = False
    config = megabyte(8, seq_len, 512, 6, 4, 256, 4, 4)
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (batch, seq_len), dtype=torch.uint8).to(device)

    results: dict[str, float | int | str | bool] = {
        "seq_len": seq_len,
        "batch": batch,
        "patch_size": config.stages[0].patch_size,
        "quick": args.quick,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_before": round(os.getloadavg()[0], 2),
    }
    results["bf16_native"] = device.type == "cuda" or cpu_features.has_native_bf16()
    run_bf16 = results["bf16_native"] or args.bf16
    # --quick: shorter peak windows (each still holds whole matmuls and is timed to its end)
    peak_window = {"seconds": 1.2, "windows": 4} if args.quick else {}
    run_fp32 = not (args.quick and results["bf16_native"])
    if run_fp32:
        results["peak_gflops_fp32"] = round(matmul_peak_gflops(torch.float32, device, **peak_window), 1)
    else:
        results["ours_fp32"] = "skipped by --quick (bf16 is the best precision here); the full run measures it"
    if run_bf16:
        results["peak_gflops_bf16"] = round(matmul_peak_gflops(torch.bfloat16, device, **peak_window), 1)
    else:
        results["bf16"] = "skipped: this CPU has no bf16 arithmetic (AVX512-BF16 or AMX); --bf16 runs it anyway"

    flops_per_byte = 0.0
    for name, bf16, run in (("fp32", False, run_fp32), ("bf16", True, run_bf16)):
        if run:
            model, step = ours_step_fn(config, bf16, device)
            results["ours_params"] = model.num_parameters()
            flops_per_byte = training_flops_per_byte(model, seq_len)
            results[f"ours_bytes_per_s_{name}"] = round(time_training(step, tokens, warmup, steps), 1)
            del model, step
    if args.compile and run_bf16:
        model, step = ours_step_fn(config, True, device, compile=True)
        start = time.perf_counter()
        step(tokens)  # compiles forward and backward
        synchronize(device)
        results["compile_s"] = round(time.perf_counter() - start, 1)
        results["ours_bytes_per_s_bf16_compiled"] = round(time_training(step, tokens, warmup, steps), 1)
        del model, step

    try:
        peer, peer_step = peer_step_fn(config, seq_len, device)
    except ImportError:
        results["peer"] = "MEGABYTE-pytorch not installed: pip install MEGABYTE-pytorch"
    else:
        results["peer_params"] = sum(p.numel() for p in peer.parameters())
        results["megabyte_pytorch_bytes_per_s_fp32"] = round(time_training(peer_step, tokens, warmup, steps), 1)
        del peer, peer_step
        peer_rate = results["megabyte_pytorch_bytes_per_s_fp32"]
        best = max(results.get(key, 0) for key in ("ours_bytes_per_s_fp32", "ours_bytes_per_s_bf16", "ours_bytes_per_s_bf16_compiled"))
        results["ratio"] = round(best / peer_rate, 3)
        if run_fp32:
            results["ratio_same_precision"] = round(results["ours_bytes_per_s_fp32"] / peer_rate, 3)

    results["flops_per_byte"] = round(flops_per_byte)
    settings = {"fp32": results["ours_bytes_per_s_fp32"]} if run_fp32 else {}
    if "ours_bytes_per_s_bf16" in results:
        settings["bf16-mixed"] = results["ours_bytes_per_s_bf16"]
    if "ours_bytes_per_s_bf16_compiled" in results:
        settings["bf16-mixed, compiled"] = results["ours_bytes_per_s_bf16_compiled"]
    best_setting = max(settings, key=settings.get)
    peak = results["peak_gflops_fp32"] if best_setting == "fp32" else results["peak_gflops_bf16"]
    results["mfu_precision"] = best_setting
    results["mfu"] = round(flops_per_byte * settings[best_setting] / (peak * 1e9), 3)
    if "ours_bytes_per_s_bf16" in results:
        results["mfu_bf16_eager"] = round(flops_per_byte * results["ours_bytes_per_s_bf16"] / (results["peak_gflops_bf16"] * 1e9), 3)
    if run_fp32:
        results["mfu_fp32"] = round(flops_per_byte * results["ours_bytes_per_s_fp32"] / (results["peak_gflops_fp32"] * 1e9), 3)
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    results["wall_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
