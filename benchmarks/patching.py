"""Patching at equal training FLOPs: fixed (MEGABYTE), space (SpaceByte) and entropy (BLT) patches,
scored in bits per byte on a book none of them trained on.

    python benchmarks/patching.py            # each model trains a few minutes (< ~30 min in all, 2 cores)
    python benchmarks/patching.py --quick    # the same code on tiny settings (< 60 s)

Data: the README's whole-book split of ../shared/data/text: four books to train on
(devils_dictionary, jack_sheppard, news_from_nowhere, pride_and_prejudice, concatenated in that
order as the text datamodule does), katrine.txt held out. Without the data the script says so and
prints a JSON line with "skipped".

Entries, all the same widths (outermost stage G x L_G over patches, byte stage L x L_L):

    fixed               MEGABYTE, patches of exactly P = 8 bytes
    space               SpaceByte's rule (multibyte/patchers/space.py), at most 16 bytes, concat pooling
    space-attention     the same with attention pooling (BLT-like learned query over the patch's bytes)
    entropy-global      BLT: a patch starts where H(x_t) > θ, at most 16 bytes
    entropy-monotonic   BLT: a patch starts where H(x_t) - H(x_{t-1}) > θ, at most 16 bytes

The entropy entries use whichever pooling gave the space entries the lower held-out bits per byte
(both are reported). Their entropy model is a one-stage attention byte model of this suite, trained
first on the same books with its own FLOP budget; θ is then calibrated with
`EntropyPatcher.calibrate` (refined for the length cap) on training windows so that entropy patches
average exactly as many bytes as space patches on those windows: the two dynamic patchers are
compared at equal patch length.

Training: plain PyTorch loops, bf16 autocast on CPU, AdamW (weight decay on matrices only) with
`multibyte.training.warmup_cosine`, gradient clipping at 1, random windows of `seq_len` bytes, the
same seeded sequence of windows for every entry. Every step is charged
`model.training_flops(seq_len, units)` per row, with units the number of outermost units of that
row's layout (boundaries computed once per batch, in fp32, and passed to the forward pass); an
entropy model's forward pass at every byte is part of that count. A model stops at the first step
whose cumulative FLOPs reach the budget; its cosine schedule is sized from the FLOPs of a few
probe batches. Rows of one batch are padded to the longest row's units: that padding is computed
but not charged (`padding_overhead` reports it).

The entropy model's own training FLOPs are reported separately. `--entropy-model-cost charged`
(the default) counts them against the entropy entries' budget: their main model trains for
budget - entropy-model FLOPs, so every entry costs the same in total. `amortized` gives the entropy
entries the full budget, as when one entropy model serves many models (BLT trains it once).

Scoring: every byte of the held-out book once, in contiguous windows of `seq_len` from an empty
context (bench's basic mode), fp32. Also reported: average patch length (bytes per outermost unit,
held-out and training windows), training FLOPs per byte, training bytes/s (the whole step: window,
boundaries, forward, backward, AdamW) and generation bytes/s (`multibyte.sampling.generate`, batch
1, one intra-op thread, fp32, temperature 1).

Peer: if `transformers` is importable (benchmark-only, `pip install -e '.[bench]'`), Hugging
Face's `BltForCausalLM`, randomly initialised from a `BltConfig` of the same widths and depths
(encoder 1 layer at the byte width, decoder and global model as ours, its entropy patcher as our
entropy model, SwiGLU feed-forward of equal size, 4,096 hash buckets per n-gram size), with its
threshold set so its random patcher cuts patches of the same average length, is timed: forward +
backward + AdamW bytes/s at our batch and window, and `generate` bytes/s at batch 1. Only speed:
it is not trained.

The load average is printed with the figures (the machine may be shared); the last line printed is
one JSON object with every figure. The script reports the margin of the best dynamic patcher over
fixed patches (positive: it beats fixed), or the gap; it does not decide anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from multibyte.config import ModelConfig, StageConfig  # noqa: E402
from multibyte.model import HierarchicalByteModel  # noqa: E402
from multibyte.sampling import generate  # noqa: E402
from multibyte.training import warmup_cosine  # noqa: E402

LN2 = math.log(2.0)
TRAIN_BOOKS = ("devils_dictionary.txt", "jack_sheppard.txt", "news_from_nowhere.txt", "pride_and_prejudice.txt")
TEST_BOOK = "katrine.txt"
DEFAULT_TEXT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything that sizes one run; `QUICK` and `FULL` below."""

    seq_len: int
    """Window length in bytes, for training, scoring and the models' max_seq_len."""
    batch_size: int
    """Training windows per step."""
    budget_flops: float
    """Training FLOPs per entry (model.training_flops, summed over rows and steps)."""
    entropy_budget_flops: float
    """Training FLOPs of the entropy model."""
    global_width: int
    global_layers: int
    global_heads: int
    local_width: int
    local_layers: int
    local_heads: int
    entropy_width: int
    entropy_layers: int
    entropy_heads: int
    fixed_patch: int = 8
    """MEGABYTE's P."""
    max_patch: int = 16
    """Longest space / entropy patch (SpaceByte's and BLT's cap)."""
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    probe_batches: int = 8
    """Batches whose FLOPs size the cosine schedule (drawn from their own generator)."""
    calibration_windows: int = 32
    """Training windows on which patch lengths are measured and θ is calibrated."""
    eval_bytes: Optional[int] = None
    """Score only this prefix of the held-out book (None: all of it)."""
    eval_batch_size: int = 16
    prompt_bytes: int = 32
    """Generation prompt: the first bytes of the held-out book."""
    generate_bytes: int = 480
    peer_steps: int = 4
    """Timed optimizer steps of the peer (after one untimed)."""
    peer_hash_buckets: int = 4096
    seed: int = 0


# The text recipe's optimiser settings (configs/cpu/text_recipe.yaml) and the CPU text preset's
# widths: global 256 x 4, local 128 x 2. The FULL budget is about 480 steps of 8 x 1,024 bytes for
# the fixed model (~5 MFLOPs per byte); space patches of ~5.8 bytes cost about twice that per byte
# (their byte stage runs over all 16 slots of every patch: the grid is padded to the longest patch).
FULL = Settings(
    seq_len=1024,
    batch_size=8,
    budget_flops=2.0e13,
    entropy_budget_flops=2.0e12,
    global_width=256,
    global_layers=4,
    global_heads=4,
    local_width=128,
    local_layers=2,
    local_heads=4,
    entropy_width=64,
    entropy_layers=2,
    entropy_heads=4,
)

QUICK = Settings(
    seq_len=128,
    batch_size=8,
    budget_flops=3.0e10,
    entropy_budget_flops=5.0e9,
    global_width=64,
    global_layers=2,
    global_heads=2,
    local_width=32,
    local_layers=1,
    local_heads=2,
    entropy_width=32,
    entropy_layers=1,
    entropy_heads=2,
    warmup_steps=5,
    probe_batches=4,
    calibration_windows=16,
    eval_bytes=8192,
    eval_batch_size=16,
    prompt_bytes=16,
    generate_bytes=64,
    peer_steps=2,
    peer_hash_buckets=512,
)


# ------------------------------------------------------------------------------------------------
# Data: symbol streams (bytes here; issue 11's BPE entry encodes the same books into tokens)
# ------------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """What a subword entry brings (issue 11): bytes -> token ids -> the same bytes."""

    def encode(self, data: bytes) -> list[int]: ...

    def decode(self, ids: list[int]) -> bytes: ...


@dataclass
class Stream:
    """A text as the model sees it: `symbols` (N,) int64 (bytes, or a tokenizer's ids) that decode
    to `num_bytes` bytes. Bits per byte always divide by bytes, so byte and subword models share
    one table."""

    symbols: torch.Tensor
    num_bytes: int

    @property
    def bytes_per_symbol(self) -> float:
        return self.num_bytes / max(1, len(self.symbols))


def to_stream(data: bytes, tokenizer: Optional[Tokenizer] = None) -> Stream:
    if tokenizer is None:
        return Stream(torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), len(data))
    return Stream(torch.tensor(tokenizer.encode(data), dtype=torch.long), len(data))


@dataclass
class Books:
    train: bytes
    test: bytes
    folder: Path


def load_books(folder: Path) -> Books:
    """The whole-book split; FileNotFoundError naming what is missing."""
    missing = [name for name in TRAIN_BOOKS + (TEST_BOOK,) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}")
    train = b"".join((folder / name).read_bytes() for name in TRAIN_BOOKS)
    return Books(train, (folder / TEST_BOOK).read_bytes(), folder)


def sample_windows(stream: Stream, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(B, T) random windows of the training stream, int64."""
    starts = torch.randint(0, len(stream.symbols) - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([stream.symbols[s : s + seq_len] for s in starts.tolist()])


# ------------------------------------------------------------------------------------------------
# Entries
# ------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One model in the comparison."""

    name: str
    config: ModelConfig
    note: str
    tokenizer: Optional[Tokenizer] = None
    """Issue 11's `bpe` entry sets this (and config.vocab_size to its vocabulary); every function
    below trains and scores on `to_stream(text, tokenizer)` and divides by bytes. None: bytes."""


def two_stages(s: Settings, patcher: str, patch_size: int, pooling: str = "concat", **patcher_fields) -> ModelConfig:
    return ModelConfig(
        stages=[
            StageConfig(
                "attention", s.global_width, s.global_layers, s.global_heads,
                patcher=patcher, patch_size=patch_size, pooling=pooling, **patcher_fields,
            ),
            StageConfig("attention", s.local_width, s.local_layers, s.local_heads),
        ],
        max_seq_len=s.seq_len,
    )


def entropy_model_config(s: Settings) -> ModelConfig:
    """BLT's small entropy model: one attention stage over bytes."""
    return ModelConfig(
        stages=[StageConfig("attention", s.entropy_width, s.entropy_layers, s.entropy_heads)], max_seq_len=s.seq_len
    )


def fixed_and_space_entries(s: Settings) -> list[Entry]:
    return [
        Entry("fixed", two_stages(s, "fixed", s.fixed_patch), f"MEGABYTE, P = {s.fixed_patch}"),
        Entry("space", two_stages(s, "space", s.max_patch), f"SpaceByte rule, at most {s.max_patch} bytes, concat pooling"),
        Entry(
            "space-attention",
            two_stages(s, "space", s.max_patch, pooling="attention"),
            f"SpaceByte rule, at most {s.max_patch} bytes, attention pooling",
        ),
    ]


def entropy_entries(s: Settings, entropy_config: ModelConfig, pooling: str) -> list[Entry]:
    return [
        Entry(
            f"entropy-{mode}",
            two_stages(
                s, "entropy", s.max_patch, pooling=pooling,
                entropy_architecture=entropy_config.to_dict(), entropy_mode=mode,
            ),
            f"BLT {mode} entropy rule, at most {s.max_patch} bytes, {pooling} pooling",
        )
        for mode in ("global", "monotonic")
    ]


# Issue 11's hook: `run(..., extra_entries=[Entry("bpe", <a one-stage attention ModelConfig with
# vocab_size = the tokenizer's>, note, tokenizer=<its tokenizer>)])` trains it at the same budget on
# the tokenized books and scores it in bits per byte beside the byte models.


def build(config: ModelConfig, seed: int) -> HierarchicalByteModel:
    torch.manual_seed(seed)
    return HierarchicalByteModel(config)


# ------------------------------------------------------------------------------------------------
# FLOPs and boundaries of one batch
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def boundaries(model: HierarchicalByteModel, tokens: torch.Tensor) -> tuple[Optional[list[torch.Tensor]], torch.Tensor]:
    """Unit starts to hand to the forward pass (None for fixed patches: the model reshapes) and
    (B,) outermost units per row. Computed in fp32, outside any autocast, so that training and
    scoring place an entropy patch boundary identically."""
    B, T = tokens.shape
    if model.config.is_fixed:
        return None, torch.full((B,), -(-T // model.config.unit_slots(0)), dtype=torch.long)
    starts = model.unit_starts(tokens)
    return starts, starts[0].sum(dim=1)


def batch_flops(model: HierarchicalByteModel, T: int, units: torch.Tensor) -> tuple[float, float]:
    """(charged, computed) training FLOPs of a batch: each row's own units, and every row padded
    to the longest row's (what the padded grid really costs)."""
    counts = units.tolist()
    charged = sum(model.training_flops(T, k) for k in counts)
    return charged, len(counts) * model.training_flops(T, max(counts))


def symbol_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-symbol NLL in nats, fp32; logits[:, t] predicts tokens[:, t]. Any vocabulary."""
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="sum")


# ------------------------------------------------------------------------------------------------
# Training to a FLOP budget
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    planned_steps: int
    flops: float  # charged (each row's own units)
    computed_flops: float  # with batch padding
    bytes: float
    units: int
    seconds: float
    final_bits_per_byte: float  # mean training loss of the last 10 steps, bits per byte

    def summary(self) -> dict:
        return {
            "train_steps": self.steps,
            "train_flops": self.flops,
            "train_bytes": round(self.bytes),
            "train_flops_per_byte": round(self.flops / self.bytes),
            "padding_overhead": round(self.computed_flops / self.flops, 4),
            "train_avg_patch_length": round(self.bytes / self.units, 3),
            "train_bytes_per_s": round(self.bytes / self.seconds, 1),
            "train_seconds": round(self.seconds, 1),
            "final_train_bits_per_byte": round(self.final_bits_per_byte, 4),
        }


def make_optimizer(model: HierarchicalByteModel, s: Settings) -> torch.optim.AdamW:
    """AdamW as ByteLM configures it: decay on trainable matrices only."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.learning_rate, betas=s.betas, foreach=True)


def train_to_budget(
    model: HierarchicalByteModel,
    stream: Stream,
    s: Settings,
    budget: float,
    log: Callable[[str], None] = lambda line: None,
) -> TrainResult:
    """Train until the charged FLOPs reach `budget` (the step that crosses it is the last)."""
    T, B = s.seq_len, s.batch_size
    probe = torch.Generator().manual_seed(s.seed + 1)
    per_step = []
    for _ in range(s.probe_batches):
        _, units = boundaries(model, sample_windows(stream, B, T, probe))
        per_step.append(batch_flops(model, T, units)[0])
    planned = max(1, math.ceil(budget / (sum(per_step) / len(per_step))))
    warmup = min(s.warmup_steps, max(1, planned // 10))

    optimizer = make_optimizer(model, s)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, planned, s.min_lr_ratio)
    )
    generator = torch.Generator().manual_seed(s.seed)
    model.train()
    flops = computed = 0.0
    steps = units_seen = 0
    recent: list[float] = []
    start = time.perf_counter()
    while flops < budget:
        tokens = sample_windows(stream, B, T, generator)
        starts, units = boundaries(model, tokens)
        charged, padded = batch_flops(model, T, units)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens, starts)
        loss = symbol_nll(logits, tokens) / tokens.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        flops += charged
        computed += padded
        units_seen += int(units.sum())
        steps += 1
        recent = (recent + [float(loss.detach()) / LN2 / stream.bytes_per_symbol])[-10:]
        if steps % 100 == 0:
            log(f"    step {steps}/{planned}: {recent[-1]:.3f} bits/byte, {flops / budget:.0%} of the budget")
    seconds = time.perf_counter() - start
    model.eval()
    num_bytes = steps * B * T * stream.bytes_per_symbol
    return TrainResult(steps, planned, flops, computed, num_bytes, units_seen, seconds, sum(recent) / len(recent))


# ------------------------------------------------------------------------------------------------
# Scoring, patch lengths, generation
# ------------------------------------------------------------------------------------------------


@dataclass
class Score:
    bits_per_byte: float
    num_bytes: int
    units: int
    seconds: float


@torch.no_grad()
def score(model: HierarchicalByteModel, stream: Stream, seq_len: int, batch_size: int) -> Score:
    """Every symbol once, in contiguous windows of `seq_len` from an empty context, fp32."""
    model.eval()
    symbols = stream.symbols
    n = len(symbols)
    full = n // seq_len
    batches = [symbols[: full * seq_len].view(full, seq_len)[i : i + batch_size] for i in range(0, full, batch_size)]
    if n % seq_len:
        batches.append(symbols[full * seq_len :][None])
    nll, units = 0.0, 0
    start = time.perf_counter()
    for tokens in batches:
        starts, row_units = boundaries(model, tokens)
        nll += float(symbol_nll(model(tokens, starts), tokens))
        units += int(row_units.sum())
    seconds = time.perf_counter() - start
    return Score(nll / LN2 / stream.num_bytes, stream.num_bytes, units, seconds)


@torch.no_grad()
def mean_patch_length(model: HierarchicalByteModel, windows: torch.Tensor) -> float:
    """Bytes per outermost unit over (B, T) windows."""
    _, units = boundaries(model, windows)
    return windows.numel() / float(units.sum())


def match_patch_length(set_length: Callable[[float], float], target: float, tolerance: float = 0.005) -> tuple[float, int]:
    """Aim a patcher at `target` bytes per patch: `set_length(aim)` sets its threshold for an aim
    (ignoring the length cap, which only adds boundaries) and returns the length measured with the
    cap; the aim is rescaled by target / measured until the measurement lands within `tolerance`.
    Returns (measured, tries)."""
    aim, measured = target, float("nan")
    for tries in range(1, 9):
        measured = set_length(aim)
        if abs(measured / target - 1) <= tolerance:
            break
        aim *= target / measured
    return measured, tries


def calibrate_entropy(model: HierarchicalByteModel, windows: torch.Tensor, target: float) -> tuple[float, float]:
    """θ of `model`'s entropy patcher for `target` bytes per patch on `windows`. (θ, measured)."""
    patcher = model.patchers[0]

    def set_length(aim: float) -> float:
        patcher.target_patch_length = aim
        patcher.calibrate(windows)
        return mean_patch_length(model, windows)

    measured, _ = match_patch_length(set_length, target)
    return float(patcher.threshold), measured


def generation_speed(
    model: HierarchicalByteModel, prompt: torch.Tensor, new_symbols: int, seed: int, tokenizer: Optional[Tokenizer] = None
) -> float:
    """Bytes/s of `generate` at batch 1 (after a short untimed warm-up); with a tokenizer, the
    bytes its new tokens decode to."""
    model.eval()
    generate(model, prompt, min(8, new_symbols), seed=seed)
    start = time.perf_counter()
    out = generate(model, prompt, new_symbols, seed=seed)
    seconds = time.perf_counter() - start
    new = out[0, prompt.shape[-1] :]
    return (len(new) if tokenizer is None else len(tokenizer.decode(new.tolist()))) / seconds


# ------------------------------------------------------------------------------------------------
# The peer: Hugging Face's BltForCausalLM, timed only
# ------------------------------------------------------------------------------------------------

HF_BYTE_OFFSET = 4  # BLT's byte ids start after 4 special tokens


def blt_peer(s: Settings, windows: torch.Tensor, target_length: float) -> dict:
    """Training and generation speed of `BltForCausalLM` at our sizes (see the module docstring)."""
    try:
        import transformers
        from transformers import BltConfig, BltForCausalLM
    except ImportError as error:
        return {"skipped": f"transformers with BltForCausalLM not importable ({error}); pip install -e '.[bench]'"}
    transformers.logging.set_verbosity_error()
    T = s.seq_len
    # SwiGLU of width 8d/3 has the parameters of our 4d GELU feed-forward; BltConfig's sub-configs
    # default to the 1B model's widths otherwise.
    def swiglu(d: int) -> int:
        return 8 * d // 3

    local = dict(hidden_size=s.local_width, num_attention_heads=s.local_heads, max_position_embeddings=T,
                 hidden_size_global=s.global_width, intermediate_size=swiglu(s.local_width))
    config = BltConfig(
        vocab_size=256 + HF_BYTE_OFFSET,
        max_position_embeddings=T,
        patch_in_forward=True,
        patching_mode="entropy",
        max_patch_length=s.max_patch,
        cross_attn_k=max(1, s.global_width // s.local_width),
        encoder_hash_byte_group_vocab=s.peer_hash_buckets,
        patcher_config=dict(hidden_size=s.entropy_width, num_hidden_layers=s.entropy_layers,
                            num_attention_heads=s.entropy_heads, max_position_embeddings=T, sliding_window=None,
                            intermediate_size=swiglu(s.entropy_width)),
        encoder_config=dict(num_hidden_layers=1, **local),
        decoder_config=dict(num_hidden_layers=s.local_layers, **local),
        global_config=dict(hidden_size=s.global_width, num_hidden_layers=s.global_layers,
                           num_attention_heads=s.global_heads, max_position_embeddings=T,
                           intermediate_size=swiglu(s.global_width)),
    )
    torch.manual_seed(s.seed)
    model = BltForCausalLM(config)
    ids = windows.long() + HF_BYTE_OFFSET

    # Its patcher is random, so aim its threshold (nats) at our patch length by quantile.
    with torch.no_grad():
        entropies = model.model.patcher(ids)[0][:, 1:].flatten().double()

    def set_length(aim: float) -> float:
        config.patching_threshold = float(torch.quantile(entropies, 1.0 - min(1.0, 1.0 / aim)))
        with torch.no_grad():
            lengths = model.model.patcher(ids, patch_size=config.patch_size, threshold=config.patching_threshold,
                                          max_patch_length=config.max_patch_length)[1]
        return ids.numel() / float((lengths > 0).sum())

    measured, _ = match_patch_length(set_length, target_length)

    batch = ids[: s.batch_size]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    model.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(s.peer_steps):
        step()
    train_rate = batch.numel() * s.peer_steps / (time.perf_counter() - start)

    model.eval()
    prompt = ids[:1, : s.prompt_bytes]
    options = dict(max_new_tokens=s.generate_bytes, do_sample=True, top_k=0, pad_token_id=0)
    cache_note = "on"
    try:
        model.generate(prompt, **dict(options, max_new_tokens=8))
    except AttributeError as error:  # transformers 5.x builds BLT's cache from a config without layer counts
        cache_note = f"off: generate with its cache failed ({error})"
        options["use_cache"] = False
        model.generate(prompt, **dict(options, max_new_tokens=8))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as our generate does on a CPU
    try:
        start = time.perf_counter()
        out = model.generate(prompt, **options)
        generate_rate = (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {
        "transformers": transformers.__version__,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "hash_embedding_params": model.model.encoder_hash_tok_embedding.weight.numel(),  # included in params
        "patcher_params": sum(p.numel() for p in model.model.patcher.parameters()),  # frozen, not in params
        "avg_patch_length": round(measured, 3),
        "train_bytes_per_s": round(train_rate, 1),
        "generate_bytes_per_s": round(generate_rate, 1),
        "generate_cache": cache_note,
    }


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def evaluate_entry(entry: Entry, model: HierarchicalByteModel, result: TrainResult, test: Stream, s: Settings) -> dict:
    held_out = score(model, test, s.seq_len, s.eval_batch_size)
    prompt = test.symbols[: s.prompt_bytes]
    return {
        "note": entry.note,
        "bits_per_byte": round(held_out.bits_per_byte, 4),
        "avg_patch_length": round(held_out.num_bytes / held_out.units, 3),
        **result.summary(),
        "generate_bytes_per_s": round(generation_speed(model, prompt, s.generate_bytes, s.seed, entry.tokenizer), 1),
        "params": model.num_parameters(),
        "loadavg": loadavg(),
    }


def run(s: Settings, books: Books, entropy_cost: str = "charged", peer: bool = True,
        extra_entries: Sequence[Entry] = (), log: Callable[[str], None] = print) -> dict:
    """Every entry trained to the budget and scored; one dict of figures (the JSON line)."""
    begin = time.perf_counter()
    test_bytes = books.test[: s.eval_bytes]
    train, test = to_stream(books.train), to_stream(test_bytes)
    calibration = sample_windows(train, s.calibration_windows, s.seq_len, torch.Generator().manual_seed(s.seed + 2))
    out: dict = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_start": loadavg(),
        "data": {"folder": str(books.folder), "train_books": list(TRAIN_BOOKS), "train_bytes": train.num_bytes,
                 "test_book": TEST_BOOK, "test_bytes_scored": test.num_bytes},
        "settings": dataclasses.asdict(s),
        "budget_flops": s.budget_flops,
        "entropy_model_cost": entropy_cost,
    }
    log(f"load average {out['loadavg_start']}, {out['threads']} threads, budget {s.budget_flops:.3g} FLOPs per entry")

    entries = fixed_and_space_entries(s)
    space_length = mean_patch_length(build(entries[1].config, s.seed), calibration)
    out["space_patch_length_calibration"] = round(space_length, 3)

    if peer:
        log("peer: Hugging Face BltForCausalLM (speed only)")
        out["peer_blt"] = blt_peer(s, calibration, space_length)
        log(f"  {out['peer_blt']}")

    results: dict[str, dict] = {}

    def train_and_score(entry: Entry, model: HierarchicalByteModel, budget: float) -> None:
        log(f"{entry.name}: {entry.note}, {model.num_parameters():,} parameters, budget {budget:.3g} FLOPs")
        entry_train, entry_test = (
            (train, test) if entry.tokenizer is None
            else (to_stream(books.train, entry.tokenizer), to_stream(test_bytes, entry.tokenizer))
        )
        result = train_to_budget(model, entry_train, s, budget, log)
        results[entry.name] = evaluate_entry(entry, model, result, entry_test, s)
        r = results[entry.name]
        log(f"  {r['bits_per_byte']:.4f} bits/byte held out, patches of {r['avg_patch_length']:.2f} bytes, "
            f"{r['train_steps']} steps, {r['train_flops_per_byte'] / 1e6:.2f} MFLOPs/byte, "
            f"{r['train_bytes_per_s']:.0f} train bytes/s, {r['generate_bytes_per_s']:.0f} generated bytes/s, "
            f"load {r['loadavg']}")

    for entry in entries:
        train_and_score(entry, build(entry.config, s.seed), s.budget_flops)
    pooling = "attention" if results["space-attention"]["bits_per_byte"] < results["space"]["bits_per_byte"] else "concat"
    out["space_pooling_winner"] = pooling

    # BLT's entropy model, then the entropy entries at the space patches' length.
    entropy_config = entropy_model_config(s)
    log(f"entropy model: {s.entropy_width} x {s.entropy_layers} attention over bytes, budget {s.entropy_budget_flops:.3g} FLOPs")
    entropy_model = build(entropy_config, s.seed)
    entropy_result = train_to_budget(entropy_model, train, s, s.entropy_budget_flops, log)
    entropy_score = score(entropy_model, test, s.seq_len, s.eval_batch_size)
    out["entropy_model"] = {
        "config": f"attention {s.entropy_width} x {s.entropy_layers}, {s.entropy_heads} heads",
        "params": entropy_model.num_parameters(),
        "bits_per_byte": round(entropy_score.bits_per_byte, 4),
        **{k: v for k, v in entropy_result.summary().items() if "patch" not in k and k != "padding_overhead"},
    }
    log(f"  {out['entropy_model']}")
    budget = s.budget_flops - (entropy_result.flops if entropy_cost == "charged" else 0.0)
    for entry in entropy_entries(s, entropy_config, pooling):
        model = build(entry.config, s.seed)
        model.patchers[0].model.load_state_dict(entropy_model.state_dict())
        theta, measured = calibrate_entropy(model, calibration, space_length)
        train_and_score(entry, model, budget)
        results[entry.name].update(entropy_threshold_bits=round(theta, 4), calibration_patch_length=round(measured, 3))
    for entry in extra_entries:
        train_and_score(entry, build(entry.config, s.seed), s.budget_flops)

    out["entries"] = results
    fixed = results["fixed"]["bits_per_byte"]
    patched = {name: r["bits_per_byte"] for name, r in results.items() if name != "fixed"}
    best = min(patched, key=patched.get)
    out["vs_fixed_bits_per_byte"] = {name: round(fixed - bpb, 4) for name, bpb in patched.items()}
    out["best_patched"] = best
    out["best_margin_over_fixed"] = round(fixed - patched[best], 4)  # > 0: beats fixed patches; < 0: the gap
    out["loadavg_end"] = loadavg()
    out["seconds"] = round(time.perf_counter() - begin, 1)
    margin = out["best_margin_over_fixed"]
    log(f"best dynamic patcher: {best}, {abs(margin):.4f} bits/byte {'under' if margin > 0 else 'over'} fixed "
        f"({fixed:.4f}); load average {out['loadavg_end']}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a small budget, a held-out prefix (< 60 s)")
    parser.add_argument("--data", type=Path, default=DEFAULT_TEXT_DIR, help="folder of the five books (../shared/data/text)")
    parser.add_argument("--budget-flops", type=float, default=None, help="training FLOPs per entry")
    parser.add_argument("--entropy-budget-flops", type=float, default=None, help="training FLOPs of the entropy model")
    parser.add_argument("--entropy-model-cost", choices=("charged", "amortized"), default="charged",
                        help="charged: the entropy model's training FLOPs come out of the entropy entries' budget")
    parser.add_argument("--eval-bytes", type=int, default=None, help="score only this prefix of the held-out book")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for training and scoring")
    parser.add_argument("--no-peer", action="store_true", help="skip Hugging Face's BltForCausalLM")
    args = parser.parse_args()

    s = QUICK if args.quick else FULL
    overrides = {"budget_flops": args.budget_flops, "entropy_budget_flops": args.entropy_budget_flops,
                 "eval_bytes": args.eval_bytes}
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    for name in ("budget_flops", "entropy_budget_flops"):
        if getattr(s, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(s, name)}")
    if args.entropy_model_cost == "charged" and s.entropy_budget_flops >= s.budget_flops:
        parser.error("--entropy-budget-flops must stay below --budget-flops when the entropy model's cost is charged")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        books = load_books(args.data)
    except FileNotFoundError as error:
        print(f"skipped: the whole-book split is not available ({error})")
        print(json.dumps({"quick": args.quick, "skipped": str(error)}))
        return
    out = run(s, books, args.entropy_model_cost, peer=not args.no_peer)
    print(json.dumps({"quick": args.quick, **out}))


if __name__ == "__main__":
    main()
