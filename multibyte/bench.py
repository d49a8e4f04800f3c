"""Density-estimation benchmark: a model's bits per byte on a split, next to the codecs in use today.

Scoring. Every byte of the scored data is predicted exactly once, and its cost is
-log2 p(byte | context) under the model; the total divided by the byte count is bits per byte
(bits per dimension for images: one byte per colour channel). Which context a byte gets is the
inference mode, the four rows of MEGABYTE's Table 9 (Yu et al. 2023):

    basic            contiguous windows of L = seq_len bytes, [i·L, (i+1)·L): the test loop's windows
    sliding          windows of L that advance by S = L // 2; each window's first L - S bytes are
                     context only (the first window scores all of its bytes), so every byte after
                     the first window sees at least L - S bytes of context. Cost about 2x.
    strided          two passes of basic windows, the second offset by P/2 bytes; each keeps only
                     the first half of every patch (bytes early in a patch are predicted better:
                     the global model has just seen the previous patch). Cost 2x.
    sliding+strided  both: two passes of sliding windows (S must be a multiple of P). Cost about 4x.

Cost is reported as model positions computed per scored position (1.0 for basic windows), with
wall time and throughput. The plan of windows is plain data (`datamodules.windows.inference_plan`),
so "every byte exactly once" is checked directly on it (tests/test_windows.py) and again on the
scored count.

A subword model (data served as BPE ids) is scored the same way over its tokens: windows of
seq_len tokens, every token scored once, and bits per byte = the tokens' total bits over the
bytes they decode to (every byte of the split once), so it sits in the same table as the byte
models. The report adds its tokens per byte, and the codecs run on the split's bytes, which are
exactly what its tokens decode to.

Under torch.distributed (e.g. `bench --trainer.strategy ddp --trainer.devices 2`) each rank scores
its share of the plan's windows (`rank_share`: no window twice) and the bit and byte totals are
summed over the ranks; rank 0 alone runs the codecs and writes the report.

The report puts the model's rows beside `reference_codecs` on exactly the same bytes and is
written as Markdown, JSON and (with matplotlib, the `plot` extra) a bar chart PNG.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

# The plan of windows lives with the datamodules' windows; its names stay importable from here.
from datamodules.windows import (  # noqa: F401
    INFERENCE_MODES,
    Window,
    check_mode,
    groups,
    inference_plan,
    pass_windows,
    rank_share,
)
from multibyte.adaptation import AdaptConfig, Adapter, adapt_summary, distributed_rank
from multibyte.mixing import MIXINGS, MixingConfig, kind, mixed_log2_probabilities
from multibyte.mixing import check as check_mixing
from multibyte.mixing import describe as describe_mixing
from multibyte.atomic_files import write_atomically
from multibyte.chunked_loss import head_token_nll
from multibyte.compression import ADAPT_HEADER_SIZE, DEFAULT_ADAPT_WINDOWS, HEADER_SIZE
from multibyte.data_spec import data_spec_of
from multibyte.model import HierarchicalByteModel
from multibyte.progress import progress_bar
from multibyte.reference_codecs import CodecResult, reference_codecs
from multibyte.weight_formats import matrix_format

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelScore:
    mode: str
    bits: float  # total -log2 p over the scored symbols
    scored_bytes: int  # bytes the scored symbols stand for (= scored_symbols for a byte model)
    positions_computed: int  # symbols fed through the model, context included
    seconds: float
    scored_symbols: int = -1  # bytes or tokens scored; -1 means scored_bytes (a byte model)
    unmixed_bits: Optional[float] = None  # with n-gram mixing: the model's own bits, from the same pass

    def __post_init__(self) -> None:
        if self.scored_symbols < 0:
            object.__setattr__(self, "scored_symbols", self.scored_bytes)

    @property
    def bits_per_byte(self) -> float:
        return self.bits / max(1, self.scored_bytes)

    @property
    def cost(self) -> float:
        """Model positions computed per scored position (1.0 for basic windows)."""
        return self.positions_computed / max(1, self.scored_symbols)

    @property
    def tokens_per_byte(self) -> float:
        """Scored symbols per scored byte: 1.0 for a byte model, the tokenizer's rate for a subword one."""
        return self.scored_symbols / max(1, self.scored_bytes)

    @property
    def bytes_per_second(self) -> float:
        return self.scored_bytes / max(self.seconds, 1e-9)


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16-mixed" (and "bf16-true"), nothing for full precision."""
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _window_batch(
    windows: Sequence[Window], data: np.ndarray, seq_len: int, P: int, token_bytes: Optional[np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(tokens (B, L) right-padded, mask (B, L) of the scored positions, positions computed,
    bytes the scored symbols stand for) of a batch of windows."""
    tokens = torch.zeros(len(windows), seq_len, dtype=torch.long)
    mask = torch.zeros(len(windows), seq_len, dtype=torch.bool)
    computed, scored_bytes = 0, 0
    for row, window in enumerate(windows):
        length = window.stop - window.start
        symbols = np.asarray(data[window.start : window.stop], dtype=np.int64)
        scored_here = window.scored_mask(P)
        tokens[row, :length] = torch.from_numpy(symbols)
        mask[row, :length] = torch.from_numpy(scored_here)
        computed += length
        scored_bytes += int(scored_here.sum()) if token_bytes is None else int(token_bytes[symbols[scored_here]].sum())
    return tokens, mask, computed, scored_bytes


def _batch_bits(model: HierarchicalByteModel, tokens: torch.Tensor, mask: torch.Tensor, precision: str) -> float:
    """Total -log2 p of the masked positions of `tokens` (B, L) under `model`."""
    with precision_context(precision, tokens.device):
        # The head in chunks of positions with fp32 log-softmax (multibyte.chunked_loss), summed
        # in fp64: never the (B, L, V) fp32 logits, which at million-byte windows take gigabytes.
        nll, _ = model(tokens, loss_mask=mask)
    return float(nll) / LN2


def _symbol_log2_probabilities(model: HierarchicalByteModel, tokens: torch.Tensor, precision: str) -> np.ndarray:
    """(B, L) float64 log2 p of every symbol of `tokens` (B, L) under `model`: the head in chunks
    of positions with fp32 log-softmax, as `_batch_bits` (never the (B, L, V) fp32 logits)."""
    with precision_context(precision, tokens.device):
        nll = head_token_nll(model.hidden_states(tokens), model.head.weight, tokens)  # (B, L) nats
    return (-nll.double() / LN2).cpu().numpy()


@torch.inference_mode()
def score_bytes(
    model: HierarchicalByteModel,
    data: np.ndarray,
    seq_len: int,
    mode: str = "basic",
    batch_size: int = 8,
    precision: str = "32-true",
    token_bytes: Optional[np.ndarray] = None,
    adapt: Optional[AdaptConfig] = None,
    progress: Optional[bool] = False,
    mixing: Optional[MixingConfig] = None,
) -> ModelScore:
    """Bits of every symbol of `data` under `mode`: (N,) bytes (uint8, e.g. a memory-mapped split),
    or with `token_bytes` ((V,) bytes each id decodes to) N token ids, whose scored bytes are the
    sum of their lengths. Windows are `seq_len` symbols.

    With `adapt` (dynamic evaluation, `multibyte.adaptation`): batches of `batch_size` windows are
    scored in file order, each by the weights learned from every batch before it; the model given
    is left as it was. Modes whose windows run in file order only: basic and sliding.

    With `mixing` (`multibyte.mixing`): every byte's probability is the model's mixed with a second
    predictor's (a byte n-gram, a linear predictor of samples) fed the bytes before it, groups of
    `batch_size` windows (compress's lanes) as compress codes them; basic inference over bytes.
    Under torch.distributed the ranks share the model's per-byte probabilities and each computes
    the same mixture.

    Under torch.distributed every rank must call this with the same arguments: each scores its
    share of the windows (with `adapt`: its share of every batch, then all make the same update)
    and every rank returns the totals over all of them. `progress`: a bar on stderr (None: when
    stderr is a terminal), on rank 0 only.
    """
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if adapt is not None and "strided" in mode:
        raise ValueError(
            f"--adapt with {mode} inference: its second pass would score bytes the model has already "
            f"learned from; adapt with basic or sliding windows"
        )
    P = model.config.alignment
    plan = inference_plan(len(data), seq_len, P, mode)
    rank, world_size = distributed_rank()
    if mixing is not None:
        check_mixing(mixing, mode, token_bytes is not None, seq_len=seq_len)
    model_log2_p = np.zeros(len(data)) if mixing is not None else None  # (N,) the model's, in file order
    unmixed_bits = None
    device = model.head.weight.device
    adapter = Adapter(model, adapt) if adapt is not None else None
    scorer = adapter.model if adapter is not None else model
    if adapter is None:  # each rank its share of the windows, in batches
        batches = [[plan[i] for i in share] for share in groups(rank_share(len(plan), rank, world_size), batch_size)]
    else:  # every rank walks every batch in file order (each scores its share of it)
        batches = list(groups(plan, batch_size))
    was_training = model.training
    model.eval()
    began = time.perf_counter()
    total_bits, scored, scored_bytes, computed = 0.0, 0, 0, 0
    bar = progress_bar(len(plan), f"bench {mode}", "windows", progress if rank == 0 else False)
    try:
        for batch in batches:
            if adapter is None:
                mine = batch
            else:
                mine = [batch[i] for i in rank_share(len(batch), rank, world_size)]
            if mine:
                tokens, mask, positions, symbol_bytes = _window_batch(mine, data, seq_len, P, token_bytes)
                tokens, mask = tokens.to(device), mask.to(device)
                if model_log2_p is None:
                    total_bits += _batch_bits(scorer, tokens, mask, precision)
                else:
                    log2_p = _symbol_log2_probabilities(scorer, tokens, precision)  # (B, L)
                    for row, window in enumerate(mine):
                        model_log2_p[window.start : window.stop] = log2_p[row, : window.stop - window.start]
                scored += int(mask.sum())
                computed += positions
                scored_bytes += symbol_bytes
            if adapter is not None:
                tokens, mask, _, _ = _window_batch(batch, data, seq_len, P, token_bytes)
                adapter.update(tokens, mask)
            bar.update(len(batch) if adapter is not None else len(batch) * world_size)
    finally:
        bar.close()
        model.train(was_training)
    if model_log2_p is not None:
        if world_size > 1:  # each rank filled its windows' bytes (zeros elsewhere): the sum is the file's
            shared = torch.from_numpy(model_log2_p).to(device)
            dist.all_reduce(shared)
            model_log2_p = shared.cpu().numpy()
        windows = [(window.start, window.stop) for window in plan]
        unmixed_bits = -float(model_log2_p.sum())
        total_bits = -float(mixed_log2_probabilities(mixing, model_log2_p, data, windows, batch_size).sum())
        if rank > 0:  # every rank holds the file's total; the sum over the ranks below counts rank 0's
            total_bits = 0.0
    if token_bytes is None:
        scored_bytes = scored
    seconds = time.perf_counter() - began
    if world_size > 1:  # totals over the ranks' shares; the slowest rank's time is the run's
        totals = torch.tensor([total_bits, scored, scored_bytes, computed], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        elapsed = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        total_bits, scored, scored_bytes, computed = float(totals[0]), int(totals[1]), int(totals[2]), int(totals[3])
        seconds = float(elapsed[0])
    if scored != len(data):  # the plan tiles the data; anything else is a bug, never a result
        unit = "bytes" if token_bytes is None else "tokens"
        raise RuntimeError(f"{mode} inference scored {scored} {unit} of {len(data)}")
    return ModelScore(mode, total_bits, scored_bytes, computed, seconds, scored, unmixed_bits)


# ------------------------------------------------------------------------------------------------
# The benchmark on a datamodule split, and its report
# ------------------------------------------------------------------------------------------------

MODE_LABELS = {
    "basic": "model",
    "sliding": "model + sliding window",
    "strided": "model + strided",
    "sliding+strided": "model + sliding + strided",
}


def split_bytes(datamodule, split: str, max_bytes: Optional[int] = None) -> np.ndarray:
    """The bytes of `split` (memory-mapped), or its first `max_bytes` (whole images for images)."""
    datamodule.prepare_data()
    data = datamodule.byte_split(split)
    if max_bytes is None:
        return data
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
    spec = data_spec_of(datamodule)
    if spec.modality == "image" and max_bytes % spec.seq_len:
        raise ValueError(f"max_bytes={max_bytes} must be a whole number of images ({spec.seq_len} bytes each)")
    return data[:max_bytes]


@dataclass(frozen=True)
class ScoredData:
    """What `run_benchmark` scores: `symbols` go through the model (bytes, or token ids whose
    lengths are `token_bytes`), `raw` are the bytes they stand for (what the codecs compress)."""

    symbols: np.ndarray
    raw: np.ndarray
    token_bytes: Optional[np.ndarray] = None


def split_data(datamodule, split: str, max_bytes: Optional[int] = None) -> ScoredData:
    """The data of `split` as the model reads it. Bytes: `split_bytes`. Token ids (a subword
    datamodule): all of them, or with `max_bytes` the longest run of whole tokens from the start
    that decodes to at most max_bytes bytes; `raw` is exactly the bytes they decode to."""
    datamodule.prepare_data()
    dataset = datamodule.eval_dataset(split)
    if dataset.token_format is None:
        data = split_bytes(datamodule, split, max_bytes)
        return ScoredData(data, data)
    tokens, raw = dataset.symbols(), datamodule.byte_split(split)
    token_bytes = dataset.token_format.token_bytes
    if max_bytes is not None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        ends = np.cumsum(token_bytes[tokens])  # (N,) byte offset where each token ends
        count = int(np.searchsorted(ends, max_bytes, side="right"))  # tokens that end by max_bytes
        if count == 0:
            raise ValueError(f"max_bytes={max_bytes} holds no whole token (the first is {int(ends[0])} bytes)")
        tokens, raw = tokens[:count], raw[: int(ends[count - 1])]
    return ScoredData(tokens, raw, token_bytes)


def describe_patching(config) -> str:
    """E.g. "fixed 8", "space <= 16, then fixed 2", "none (one stage over bytes)"."""
    parts = [
        f"{stage.patcher} {stage.patch_size}" if stage.patcher == "fixed" else f"{stage.patcher} <= {stage.patch_size}"
        for stage in config.stages[:-1]
    ]
    return ", then ".join(parts) if parts else "none (one stage over bytes)"


def _mixable(mixing: MixingConfig, mode: str, token_bytes, encoding: Optional[str], seq_len: int) -> bool:
    """Whether `mixing` can run on this mode and data (for mixing by default, where possible)."""
    try:
        check_mixing(mixing, mode, token_bytes is not None, encoding, seq_len)
    except ValueError:
        return False
    return True


def codec_params(datamodule) -> dict[str, Any]:
    """What `reference_codecs` needs to know about how the datamodule laid out its bytes."""
    spec = data_spec_of(datamodule)
    if spec.modality == "image":
        return {"order": spec.image_order, "patch_size": spec.image_patch_size, "predictor": spec.image_predictor}
    if spec.modality == "audio":
        return {"sample_rate": spec.sample_rate, "encoding": spec.audio_encoding}
    return {}


def run_benchmark(
    model: HierarchicalByteModel,
    datamodule,
    split: str = "test",
    modes: Sequence[str] = ("basic",),
    batch_size: Optional[int] = None,
    max_bytes: Optional[int] = None,
    precision: str = "32-true",
    codecs: bool = True,
    checkpoint: Optional[str] = None,
    adapt: Optional[AdaptConfig] = None,
    progress: Optional[bool] = False,
    adapt_where_possible: bool = False,
    mixing: Optional[MixingConfig] = None,
    mixing_where_possible: bool = False,
) -> dict[str, Any]:
    """Score `model` on `split` of `datamodule` in every mode, and the codecs on the same bytes.
    With `adapt`, every mode runs with dynamic evaluation (see `score_bytes`), each from the
    given weights; a strided mode is refused, or with `adapt_where_possible` (adaptation by
    default, not asked for) scored without it. `batch_size` None: the datamodule's
    eval_batch_size, and DEFAULT_ADAPT_WINDOWS (compress's default lanes) for an adapted mode.
    With `mixing`, the model is mixed with a second predictor (basic mode over bytes, see
    `score_bytes`); with `mixing_where_possible` (mixing by default, not asked for) the runs it
    cannot mix are scored without it.

    Returns the report as a JSON-ready dict (see `write_report`). Under torch.distributed every
    rank calls this and gets the same report (the scores summed over the ranks' shares of the
    windows, the codec rows from rank 0); writing it is rank 0's job.
    """
    seq_len = datamodule.seq_len
    for mode in modes:  # fail before any work is done
        check_mode(mode, seq_len, model.config.alignment)
        if adapt is not None and "strided" in mode and not adapt_where_possible:
            raise ValueError(
                f"--adapt with --inference {mode}: its second pass would score bytes the model has already "
                f"learned from; adapt with basic or sliding"
            )
    rank, world_size = distributed_rank()
    if world_size > 1:  # one process converts the data (as Lightning's prepare_data), then all read it
        if rank == 0:
            datamodule.prepare_data()
        dist.barrier()
    data = split_data(datamodule, split, max_bytes)
    if len(data.raw) == 0:
        raise ValueError(f"split {split!r} of {datamodule.source} holds no bytes")
    rows: list[dict[str, Any]] = []
    encoding = codec_params(datamodule).get("encoding")
    if mixing is not None and not mixing_where_possible:  # asked for: refuse before any work is done
        for mode in modes:
            check_mixing(mixing, mode, data.token_bytes is not None, encoding, seq_len)
    mixed_any = False
    for mode in modes:
        adapting = adapt if "strided" not in mode else None
        mixes = mixing
        if mixing is not None and mixing_where_possible and not _mixable(mixing, mode, data.token_bytes, encoding, seq_len):
            mixes = None  # a default mixing goes without where it cannot run
        mixed_any |= mixes is not None
        batch = batch_size or (DEFAULT_ADAPT_WINDOWS if adapting is not None else datamodule.eval_batch_size)
        score = score_bytes(
            model, data.symbols, seq_len, mode, batch, precision, data.token_bytes, adapting, progress, mixes
        )
        if score.scored_bytes != len(data.raw):  # every byte once, counted through the tokens
            raise RuntimeError(f"{mode} inference scored {score.scored_bytes} bytes of {len(data.raw)}")
        row = {
            "method": MODE_LABELS[mode] + (" + adapt" if adapting is not None else "") + (f" + {kind(mixes).label}" if mixes else ""),
            "kind": "model",
            "mode": mode,
            "adapt": adapting is not None,
            "mixing": kind(mixes).label if mixes is not None else None,
            "bits_per_byte": score.bits_per_byte,
            "compressed_bytes": math.ceil(score.bits / 8),  # what arithmetic coding would need
            "scored_bytes": score.scored_bytes,
            "cost": score.cost,
            "seconds": score.seconds,
            "bytes_per_second": score.bytes_per_second,
        }
        if data.token_bytes is not None:
            row.update(scored_tokens=score.scored_symbols, tokens_per_byte=score.tokens_per_byte)
        if score.unmixed_bits is not None:  # the model alone, from the same pass, beside the mixture
            rows.append(
                {
                    **row,
                    "method": MODE_LABELS[mode] + (" + adapt" if adapting is not None else ""),
                    "mixing": None,
                    "bits_per_byte": score.unmixed_bits / score.scored_bytes,
                    "compressed_bytes": math.ceil(score.unmixed_bits / 8),
                }
            )
        rows.append(row)
    skipped: list[dict[str, str]] = []
    if codecs:
        codec_rows: list[dict[str, Any]] = []
        if rank == 0:  # the codecs run once; the other ranks receive their rows
            raw = np.asarray(data.raw).tobytes()
            for result in reference_codecs(raw, datamodule.modality, **codec_params(datamodule)):
                if result.skipped:
                    skipped.append({"method": result.name, "reason": result.note})
                else:
                    codec_rows.append(codec_row(result, len(raw)))
        if world_size > 1:
            shared = [codec_rows, skipped]
            dist.broadcast_object_list(shared, src=0)
            codec_rows, skipped = shared
        rows += codec_rows
    tokenizer = None
    if data.token_bytes is not None:
        subword = datamodule.subword_tokenizer()
        tokenizer = {
            "kind": "bpe",
            "vocab_size": subword.vocab_size,
            "fingerprint": subword.fingerprint(),
            "num_tokens": int(len(data.symbols)),
            "tokens_per_byte": len(data.symbols) / len(data.raw),
        }
    return {
        "modality": datamodule.modality,
        "unit": "bits/dim" if datamodule.modality == "image" else "bits/byte",
        "split": split,
        "num_bytes": int(len(data.raw)),
        "data_source": str(datamodule.source),
        "model": {
            "checkpoint": checkpoint,
            "parameters": model.num_parameters(),
            "patch_size": model.config.alignment,
            "patching": describe_patching(model.config),
            "seq_len": seq_len,
            "seq_unit": "bytes" if tokenizer is None else "tokens",
            "precision": precision,
            "weights": matrix_format(model),
            "device": str(model.head.weight.device),
            "tokenizer": tokenizer,
            "adapt": None if adapt is None else {**adapt.to_dict(), "batch_size": batch_size or DEFAULT_ADAPT_WINDOWS},
            "mixing": {"kind": kind(mixing).label, **mixing.to_dict()} if mixed_any else None,
        },
        "results": rows,
        "skipped": skipped,
    }


def codec_row(result: CodecResult, num_bytes: int) -> dict[str, Any]:
    return {
        "method": result.name,
        "kind": "codec",
        "bits_per_byte": 8 * result.compressed_bytes / num_bytes,
        "compressed_bytes": result.compressed_bytes,
        "seconds": result.seconds,
        "bytes_per_second": num_bytes / max(result.seconds, 1e-9),
        "note": result.note,
    }


def markdown_table(report: dict[str, Any]) -> str:
    unit = report["unit"]
    lines = [
        f"### {report['modality']}: {report['split']} split, {report['num_bytes']:,} bytes ({report['data_source']})",
        "",
        f"| method | {unit} | size (bytes) | cost (positions/scored) | throughput (bytes/s) | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in sorted(report["results"], key=lambda row: row["bits_per_byte"]):
        cost = f"{row['cost']:.2f}x" if row["kind"] == "model" else ""
        note = row.get("note", "") if row["kind"] == "codec" else f"{row['seconds']:.1f} s"
        lines.append(
            f"| {row['method']} | {row['bits_per_byte']:.4f} | {row['compressed_bytes']:,} | {cost} "
            f"| {row['bytes_per_second']:,.0f} | {note} |"
        )
    for item in report["skipped"]:
        lines.append(f"| {item['method']} | | | | | skipped: {item['reason']} |")
    model = report["model"]
    tokenizer = model.get("tokenizer")
    shape = (
        f"patching: {model.get('patching', model['patch_size'])}, windows of {model['seq_len']:,} bytes"
        if not tokenizer
        else f"BPE tokenizer of {tokenizer['vocab_size']:,} ids ({tokenizer['tokens_per_byte']:.3f} tokens per byte: "
        f"{tokenizer['num_tokens']:,} tokens), windows of {model['seq_len']:,} tokens"
    )
    lines += [
        "",
        f"Model: {model['parameters']:,} parameters, {shape}, {model['precision']} on {model['device']}"
        + (f", matrices rounded to {model['weights']}" if model.get("weights", "float32") != "float32" else "")
        + (f", checkpoint `{model['checkpoint']}`." if model["checkpoint"] else ", untrained (no checkpoint)."),
    ]
    if model.get("adapt"):
        options = dict(model["adapt"])
        every = options.pop("batch_size")
        lines.append(
            f"Adapted while scoring (dynamic evaluation): {adapt_summary(AdaptConfig(**options))}, "
            f"updating after every {every} windows scored."
        )
    if model.get("mixing"):
        options = dict(model["mixing"])
        label = options.pop("kind")
        (mixing,) = [mixing for mixing in MIXINGS if mixing.label == label]
        lines.append(f"Mixed with {describe_mixing(mixing.config(**options))} (multibyte/mixing.py).")
    lines += [
        "Model sizes are what arithmetic coding under its probabilities needs (`multibyte compress` "
        f"attains them within a few bytes plus a {HEADER_SIZE}-byte header, {ADAPT_HEADER_SIZE} with --adapt, "
        + ", ".join(f"{mixing.block.size} more with {mixing.flag}" for mixing in MIXINGS) + ").",
    ]
    return "\n".join(lines) + "\n"


def bar_chart(report: dict[str, Any], path: Path) -> bool:
    """Write a bar chart of every method's bits per byte to `path`; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = sorted(report["results"], key=lambda row: row["bits_per_byte"])
    figure, axes = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    colours = ["tab:blue" if row["kind"] == "model" else "tab:gray" for row in rows]
    axes.barh([row["method"] for row in rows], [row["bits_per_byte"] for row in rows], color=colours)
    for y, row in enumerate(rows):
        axes.text(row["bits_per_byte"], y, f" {row['bits_per_byte']:.3f}", va="center", fontsize=8)
    axes.set_xlim(0, 1.12 * max(row["bits_per_byte"] for row in rows))  # room for the labels
    axes.invert_yaxis()
    axes.set_xlabel(f"{report['unit']} (lower is better)")
    axes.set_title(f"{report['modality']}, {report['split']} split, {report['num_bytes']:,} bytes")
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    write_atomically(path, image.getvalue())
    return True


def write_report(
    report: dict[str, Any], output_dir: Union[str, Path], stem: Optional[str] = None
) -> dict[str, Optional[Path]]:
    """`<stem>.md`, `<stem>.json` and (with matplotlib) `<stem>.png` in `output_dir`, each written
    through a temporary file. Returns the paths ("png" is None without matplotlib)."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or f"bench-{report['modality']}-{report['split']}"
    paths: dict[str, Optional[Path]] = {"md": folder / f"{stem}.md", "json": folder / f"{stem}.json"}
    write_atomically(paths["md"], markdown_table(report).encode("utf-8"))
    write_atomically(paths["json"], (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    png = folder / f"{stem}.png"
    paths["png"] = png if bar_chart(report, png) else None
    return paths
