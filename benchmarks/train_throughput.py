"""Training throughput: our MEGABYTE vs MEGABYTE-pytorch, same shapes, same run, same machine.

    python benchmarks/train_throughput.py            # sequence length 8,192 (a few minutes)
    python benchmarks/train_throughput.py --quick    # shorter sequences and fewer steps (< 60 s)

Both sides train (forward, cross-entropy, backward, AdamW step) on random bytes at the same global
and local widths, depths, heads, patch size, sequence length and batch. MEGABYTE-pytorch
(`pip install MEGABYTE-pytorch`, a benchmark-only dependency) gets `num_tokens=257, pad_id=256` so
byte 0 is learnable, and `dim_head = local width / heads`, so its local attention matches ours and
its global attention is narrower than ours (fewer FLOPs on its side: the comparison is
conservative). It runs in fp32 as its training script does; ours at fp32 and bf16-mixed.

The CPU's matmul peak is measured in the same run for each precision, and our model FLOPs
utilisation is 6 x (parameters touched per byte) x bytes/s plus attention, over the peak of the
precision used. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from multibyte.config import ModelConfig, megabyte  # noqa: E402
from multibyte.model import HierarchicalByteModel  # noqa: E402
from multibyte.training import masked_byte_nll  # noqa: E402


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (thread pool, packing buffers)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def time_training(step, batch: torch.Tensor, warmup: int, steps: int) -> float:
    """Bytes per second of `step(batch)` (one full optimizer step), after `warmup` untimed steps."""
    for _ in range(warmup):
        step(batch)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return batch.numel() * steps / (time.perf_counter() - start)


def ours_step_fn(config: ModelConfig, bf16: bool):
    model = HierarchicalByteModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    lengths = None

    def step(tokens: torch.Tensor) -> None:
        nonlocal lengths
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens)
        nll, count = masked_byte_nll(logits, tokens, lengths)
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def peer_step_fn(config: ModelConfig, seq_len: int):
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
    ).train()
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
    parser.add_argument("--quick", action="store_true", help="shorter sequences and fewer steps (< 60 s)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()

    seq_len = args.seq_len or (2048 if args.quick else 8192)
    batch = args.batch or (2 if args.quick else 4)
    steps = args.steps or (2 if args.quick else 4)
    warmup = 1
    config = megabyte(8, seq_len, 512, 6, 4, 256, 4, 4)
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (batch, seq_len), dtype=torch.uint8)

    results: dict[str, float | int | str] = {
        "seq_len": seq_len,
        "batch": batch,
        "patch_size": config.stages[0].patch_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    results["peak_gflops_fp32"] = round(matmul_peak_gflops(torch.float32), 1)
    results["peak_gflops_bf16"] = round(matmul_peak_gflops(torch.bfloat16), 1)

    model, step = ours_step_fn(config, bf16=False)
    results["ours_params"] = model.num_parameters()
    results["ours_bytes_per_s_fp32"] = round(time_training(step, tokens, warmup, steps), 1)
    flops_per_byte = training_flops_per_byte(model, seq_len)
    del model, step
    model, step = ours_step_fn(config, bf16=True)
    results["ours_bytes_per_s_bf16"] = round(time_training(step, tokens, warmup, steps), 1)
    del model, step

    try:
        peer, peer_step = peer_step_fn(config, seq_len)
    except ImportError:
        results["peer"] = "MEGABYTE-pytorch not installed: pip install MEGABYTE-pytorch"
    else:
        results["peer_params"] = sum(p.numel() for p in peer.parameters())
        results["megabyte_pytorch_bytes_per_s_fp32"] = round(time_training(peer_step, tokens, warmup, steps), 1)
        del peer, peer_step
        peer_rate = results["megabyte_pytorch_bytes_per_s_fp32"]
        best = max(results["ours_bytes_per_s_fp32"], results["ours_bytes_per_s_bf16"])
        results["ratio"] = round(best / peer_rate, 3)
        results["ratio_same_precision"] = round(results["ours_bytes_per_s_fp32"] / peer_rate, 3)

    results["flops_per_byte"] = round(flops_per_byte)
    best_bf16 = results["ours_bytes_per_s_bf16"] >= results["ours_bytes_per_s_fp32"]
    best_rate = results["ours_bytes_per_s_bf16"] if best_bf16 else results["ours_bytes_per_s_fp32"]
    peak = results["peak_gflops_bf16"] if best_bf16 else results["peak_gflops_fp32"]
    results["mfu_precision"] = "bf16-mixed" if best_bf16 else "fp32"
    results["mfu"] = round(flops_per_byte * best_rate / (peak * 1e9), 3)
    results["mfu_fp32"] = round(flops_per_byte * results["ours_bytes_per_s_fp32"] / (results["peak_gflops_fp32"] * 1e9), 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
