"""Training throughput and peak memory: our MambaByte vs mambapy, same shapes, same run, same machine.

    python benchmarks/mamba_scan.py            # L = 1,024 (batch 8) and 8,192 (batch 1), a few minutes
    python benchmarks/mamba_scan.py --quick    # L = 2,048 at batch 1, fewer steps (< 60 s)

Both sides train a byte language model (embedding, a stack of pre-norm Mamba blocks, final RMSNorm,
linear head over 256 bytes; forward, cross-entropy, backward, AdamW step) on random bytes at the same
d_model, layers, d_state, expand, d_conv, dt_rank, sequence length and batch:

  - ours: `HierarchicalByteModel` with patch size 1 and a Mamba global stack (MambaByte), whose
    selective scan is the chunked pure-PyTorch scan of `multibyte.mixers.mamba`; run in fp32 and
    under bf16 autocast (projections in bf16, the scan in fp32);
  - mambapy (`pip install mambapy`, a benchmark-only dependency): `mambapy.mamba.Mamba` with its
    parallel (Blelloch) scan, `pscan=True`, in fp32 as it is written for; wrapped in the same
    embedding, final norm and head.

Both sides run with the same number of intra-op threads, 1 by default: on a machine shared with
other jobs, every multi-threaded op ends at an OpenMP barrier that waits for a descheduled thread
(milliseconds per op), which swamps the measurement; pass --threads 2 (or 0 for torch's default)
on an idle machine.

Each configuration runs in a fresh subprocess, so peak memories do not mix: `peak_mb` is that
process's maximum resident set size (getrusage), `peak_over_idle_mb` the part of it above the
resident size just before the first training step (model, optimizer state and batch already
allocated; what training itself adds). Rates are bytes per second of the median timed step, after
one untimed warm-up step. The machine may be shared: the median, not the mean, keeps one descheduled
step from deciding the result.

The last line printed is one JSON object with every figure; "ratio" is our best rate over
mambapy's (the smallest over the sequence lengths), "ratio_fp32" the same at equal precision.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SIDES = ("ours-fp32", "ours-bf16", "mambapy")


# ------------------------------------------------------------------------------------------------
# The two models, built with the same shape.
# ------------------------------------------------------------------------------------------------


def build_ours(d_model: int, n_layers: int, d_state: int, expand: int, d_conv: int, seq_len: int) -> nn.Module:
    from multibyte.config import ModelConfig, StageConfig
    from multibyte.model import HierarchicalByteModel

    config = ModelConfig(
        stages=[StageConfig("mamba", d_model, n_layers, d_state=d_state, expand=expand, d_conv=d_conv)],
        max_seq_len=seq_len,
        position_embedding=False,
    )
    return HierarchicalByteModel(config)  # forward(tokens) -> logits of tokens, shifted inside


class MambapyByteLM(nn.Module):
    """mambapy's Mamba stack inside the embedding / final norm / head that our model has."""

    def __init__(self, d_model: int, n_layers: int, d_state: int, expand: int, d_conv: int) -> None:
        super().__init__()
        from mambapy.mamba import Mamba, MambaConfig  # benchmark-only; never imported by multibyte

        config = MambaConfig(
            d_model=d_model, n_layers=n_layers, d_state=d_state, expand_factor=expand, d_conv=d_conv, pscan=True
        )
        self.embedding = nn.Embedding(256, d_model)
        self.mamba = Mamba(config)
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, 256, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Predict byte t from bytes < t: shift right by one, byte 0 standing in for "before the start".
        inputs = F.pad(tokens[:, :-1], (1, 0))
        return self.head(self.norm(self.mamba(self.embedding(inputs))))


# ------------------------------------------------------------------------------------------------
# One configuration, in its own process.
# ------------------------------------------------------------------------------------------------


def resident_mb() -> float:
    """Current resident set size of this process in MiB (Linux), or the peak where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_resident_mb()


def peak_resident_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def run_worker(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    shape = (args.d_model, args.n_layers, args.d_state, args.expand, args.d_conv)
    if args.worker == "mambapy":
        model = MambapyByteLM(*shape)
    else:
        model = build_ours(*shape, seq_len=args.seq_len)
    model.train()
    bf16 = args.worker == "ours-bf16"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (args.batch, args.seq_len))

    def train_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, 256), tokens.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    idle_mb = resident_mb()
    train_step()  # warm-up: allocator, thread pool, optimizer state
    step_seconds: list[float] = []
    started = time.perf_counter()
    while len(step_seconds) < args.min_steps or (
        time.perf_counter() - started < args.min_seconds and len(step_seconds) < args.max_steps
    ):
        t0 = time.perf_counter()
        train_step()
        step_seconds.append(time.perf_counter() - t0)
    median = statistics.median(step_seconds)
    return {
        "side": args.worker,
        "params": sum(p.numel() for p in model.parameters()),
        "bytes_per_s": round(args.batch * args.seq_len / median, 1),
        "step_seconds": [round(s, 3) for s in step_seconds],
        "peak_mb": round(peak_resident_mb(), 1),
        "peak_over_idle_mb": round(peak_resident_mb() - idle_mb, 1),
    }


def spawn_worker(side: str, seq_len: int, batch: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--worker", side,
        "--seq-len", str(seq_len), "--batch", str(batch),
        "--d-model", str(args.d_model), "--n-layers", str(args.n_layers), "--d-state", str(args.d_state),
        "--expand", str(args.expand), "--d-conv", str(args.d_conv),
        "--min-steps", str(args.min_steps if side != "mambapy" else args.peer_min_steps),
        "--min-seconds", str(args.min_seconds), "--max-steps", str(args.max_steps),
    ]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{side} at L={seq_len} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {side:10s} L={seq_len:5d} B={batch}: {result['bytes_per_s']:9.1f} bytes/s, "
          f"peak {result['peak_mb']:7.1f} MiB ({result['peak_over_idle_mb']:7.1f} over idle), "
          f"steps {result['step_seconds']}", flush=True)  # fmt: skip
    return result


def compare(seq_len: int, batch: int, args: argparse.Namespace) -> dict:
    runs = {side: spawn_worker(side, seq_len, batch, args) for side in SIDES}
    ours_fp32, ours_bf16, peer = runs["ours-fp32"], runs["ours-bf16"], runs["mambapy"]
    best = ours_bf16 if ours_bf16["bytes_per_s"] > ours_fp32["bytes_per_s"] else ours_fp32
    return {
        "seq_len": seq_len,
        "batch": batch,
        "ours_bytes_per_s": best["bytes_per_s"],
        "ours_precision": "bf16-mixed" if best is ours_bf16 else "fp32",
        "ours_peak_mb": best["peak_mb"],
        "ours_peak_over_idle_mb": best["peak_over_idle_mb"],
        "ours_fp32_bytes_per_s": ours_fp32["bytes_per_s"],
        "ours_fp32_peak_mb": ours_fp32["peak_mb"],
        "ours_fp32_peak_over_idle_mb": ours_fp32["peak_over_idle_mb"],
        "mambapy_bytes_per_s": peer["bytes_per_s"],
        "mambapy_peak_mb": peer["peak_mb"],
        "mambapy_peak_over_idle_mb": peer["peak_over_idle_mb"],
        "ratio": round(best["bytes_per_s"] / peer["bytes_per_s"], 2),
        "ratio_fp32": round(ours_fp32["bytes_per_s"] / peer["bytes_per_s"], 2),
        "ours_params": ours_fp32["params"],
        "mambapy_params": peer["params"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short sequences, fewer steps (< 60 s)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--bytes-per-step", type=int, default=None, help="batch = this // seq_len")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--expand", type=int, default=2)
    parser.add_argument("--d-conv", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads of every worker, both sides (0: torch's default)"
    )
    parser.add_argument("--min-steps", type=int, default=None, help="timed steps, at least (ours)")
    parser.add_argument("--peer-min-steps", type=int, default=None, help="timed steps, at least (mambapy)")
    parser.add_argument("--min-seconds", type=float, default=None, help="keep timing ours until this long")
    parser.add_argument("--max-steps", type=int, default=20)
    # Internal: run one configuration in this process.
    parser.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker is not None:
        print(json.dumps(run_worker(args)))
        return

    seq_lens = args.seq_lens or ([2048] if args.quick else [1024, 8192])
    bytes_per_step = args.bytes_per_step or (2048 if args.quick else 8192)
    args.min_steps = args.min_steps or (2 if args.quick else 3)
    args.peer_min_steps = args.peer_min_steps or (1 if args.quick else 2)
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (2.0 if args.quick else 10.0)
    threads = args.threads or torch.get_num_threads()
    print(
        f"MambaByte training, ours vs mambapy: d_model={args.d_model} n_layers={args.n_layers} "
        f"d_state={args.d_state} expand={args.expand} d_conv={args.d_conv} "
        f"dt_rank={math.ceil(args.d_model / 16)} threads={threads}",
        flush=True,
    )

    started = time.perf_counter()
    results = [compare(L, max(1, bytes_per_step // L), args) for L in seq_lens]
    summary = {
        "benchmark": "mamba_scan",
        "quick": args.quick,
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "d_state": args.d_state,
        "expand": args.expand,
        "d_conv": args.d_conv,
        "threads": threads,
        "torch": torch.__version__,
        "results": results,
        "ratio": min(r["ratio"] for r in results),
        "ratio_fp32": min(r["ratio_fp32"] for r in results),
        "peak_not_above_mambapy": all(r["ours_peak_mb"] <= r["mambapy_peak_mb"] for r in results),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
