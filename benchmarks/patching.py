"""Patching at equal training FLOPs: fixed (MEGABYTE), space (SpaceByte) and entropy (BLT) patches
and a subword (BPE) model of the same core, scored in bits per byte on English, noised English and
Chinese text none of them trained on.

    python benchmarks/patching.py                     # each model trains a few minutes (2 cores)
    python benchmarks/patching.py --en-zh-training    # + byte and BPE models trained on English + Chinese
    python benchmarks/patching.py --quick             # the same code on tiny settings (< 60 s)

Data: the README's whole-book split of ../shared/data/text: four books to train on
(devils_dictionary, jack_sheppard, news_from_nowhere, pride_and_prejudice, concatenated in that
order as the text datamodule does), katrine.txt held out; and ../shared/data/text_zh/tang_poems.txt
(UTF-8 Chinese), split by position: the test part starts at the first blank line (a poem boundary)
after 90% of its bytes, the part before is the Chinese training text. Without the data the script
says so and prints a JSON line with "skipped".

Test sets, each scored by every entry:

    english             katrine.txt
    english-noised      katrine.txt with 5% of its words (runs of ASCII letters) changed once, seeded:
                        one letter's case flipped, or two adjacent different letters swapped (even
                        odds); scored on the noised bytes (the same length as the original)
    chinese             the tail of tang_poems.txt

Entries, all the same widths (outermost stage G x L_G over patches, byte stage L x L_L), all
trained on the English books only (so every byte model meets Chinese zero-shot):

    fixed               MEGABYTE, patches of exactly P = 8 bytes
    space               SpaceByte's rule (multibyte/patchers/space.py), at most 16 bytes, concat pooling
    space-attention     the same with attention pooling (BLT-like learned query over the patch's bytes)
    entropy-global      BLT: a patch starts where H(x_t) > θ, at most 16 bytes
    entropy-monotonic   BLT: a patch starts where H(x_t) - H(x_{t-1}) > θ, at most 16 bytes
    bpe                 one attention stage over the tokens of a byte-level BPE (multibyte/bpe.py,
                        cl100k pre-tokenisation) of 4,096 ids trained on the English books: what a
                        user's off-the-shelf English tokenizer gives
    bpe-tok-en+zh       the same, its tokenizer trained on the English books + the Chinese training
                        text (the model still trains on English only): a tokenizer that saw Chinese

With --en-zh-training, a second group trains on the English books + the Chinese training text
(concatenated; windows drawn uniformly, so about a third of them Chinese) at the same budget:
`fixed/en+zh`, `space/en+zh` (the pooling that won on English), `entropy-<mode>/en+zh` (the mode
that won on English, over its own entropy model trained on the same text) and `bpe/en+zh` (the
English + Chinese tokenizer).

A BPE model is the same `HierarchicalByteModel` with one attention stage over tokens
(`vocab_size` = the tokenizer's), width `bpe_width`; its depth is the one whose training FLOPs per
byte (per token, divided by the bytes per token of its training text) come closest to the fixed
model's, and its window holds about as many bytes as the byte models' (seq_len / bytes per token
tokens), so both see the same context in bytes on English.

The entropy entries use whichever pooling gave the space entries the lower held-out English bits
per byte (both are reported). Their entropy model is a one-stage attention byte model of this
suite, trained first on the same books with its own FLOP budget; θ is then calibrated with
`EntropyPatcher.calibrate` (refined for the length cap) on training windows so that entropy patches
average exactly as many bytes as space patches on those windows: the two dynamic patchers are
compared at equal patch length.

Training: plain PyTorch loops, bf16 autocast on CPU, AdamW (weight decay on matrices only) with
`multibyte.training.warmup_cosine`, gradient clipping at 1, random windows of the model's
`max_seq_len` symbols (seq_len bytes, or a BPE model's window of tokens), the same seeded sequence
of window starts for every entry. Every step is charged `model.training_flops(window, units)` per
row, with units the number of outermost units of that row's layout (boundaries computed once per
batch, in fp32, and passed to the forward pass); an entropy model's forward pass at every byte is
part of that count. A model stops at the first step whose cumulative FLOPs reach the budget; its
cosine schedule is sized from the FLOPs of a few probe batches. Rows of one batch are padded to the
longest row's units: that padding is computed but not charged (`padding_overhead` reports it).

The entropy model's own training FLOPs are reported separately. `--entropy-model-cost charged`
(the default) counts them against the entropy entries' budget: their main model trains for
budget - entropy-model FLOPs, so every entry costs the same in total. `amortized` gives the entropy
entries the full budget, as when one entropy model serves many models (BLT trains it once).

Scoring: every symbol of a test set once, in contiguous windows of the model's `max_seq_len` from
an empty context (bench's basic mode), fp32. Bits per byte are the summed NLL in bits over the
number of bytes the scored symbols decode to (for a BPE model, the bytes of its tokens: every byte
of the test set once), so byte and subword models share one table. Also reported per test set:
bytes per outermost unit (patch length; bytes per token for BPE), symbols per byte (tokens per
byte of the tokenizer) and generation bytes/s (`multibyte.sampling.generate`, batch 1, one
intra-op thread, fp32, temperature 1, prompted with the set's first bytes; for BPE, the bytes its
new tokens decode to). Per entry: training FLOPs per byte, training bytes/s (the whole step: window,
boundaries, forward, backward, AdamW) and average patch length on training windows.

Peer: if `transformers` is importable (benchmark-only, `pip install -e '.[bench]'`), Hugging
Face's `BltForCausalLM`, randomly initialised from a `BltConfig` of the same widths and depths
(encoder 1 layer at the byte width, decoder and global model as ours, its entropy patcher as our
entropy model, SwiGLU feed-forward of equal size, 4,096 hash buckets per n-gram size), with its
threshold set so its random patcher cuts patches of the same average length, is timed: forward +
backward + AdamW bytes/s at our batch and window, and `generate` bytes/s at batch 1. Only speed:
it is not trained.

The load average is printed with the figures (the machine may be shared); the last line printed is
one JSON object with every figure. `who_wins` holds, per training text and test set, the entries
ranked by bits per byte, the best one's margin over the next, and each BPE row's gap to the best
byte model (positive: the byte model needs fewer bits). The margin of the best dynamic patcher over
fixed patches on English is kept as before. The script reports; it does not decide anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from multibyte.bpe import train_bpe  # noqa: E402
from multibyte.config import ModelConfig, StageConfig  # noqa: E402
from multibyte.model import HierarchicalByteModel  # noqa: E402
from multibyte.sampling import generate  # noqa: E402
from multibyte.training import warmup_cosine  # noqa: E402

LN2 = math.log(2.0)
TRAIN_BOOKS = ("devils_dictionary.txt", "jack_sheppard.txt", "news_from_nowhere.txt", "pride_and_prejudice.txt")
TEST_BOOK = "katrine.txt"
DEFAULT_TEXT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
DEFAULT_ZH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "text_zh" / "tang_poems.txt"


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything that sizes one run; `QUICK` and `FULL` below."""

    seq_len: int
    """Window length in bytes, for training, scoring and the byte models' max_seq_len (a BPE
    model's window is about as many bytes of English in tokens)."""
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
    """Score only this prefix of each test set (None: all of it)."""
    eval_batch_size: int = 16
    prompt_bytes: int = 32
    """Generation prompt: the first bytes of the test set (cut back to a whole UTF-8 character)."""
    generate_bytes: int = 480
    peer_steps: int = 4
    """Timed optimizer steps of the peer (after one untimed)."""
    peer_hash_buckets: int = 4096
    bpe_vocab_size: int = 4096
    """Ids of each BPE tokenizer (special token and 256 byte tokens included)."""
    bpe_width: int = 256
    """d_model of a BPE model's one attention stage; its depth is chosen to match FLOPs per byte."""
    bpe_heads: int = 4
    bpe_max_layers: int = 8
    """Deepest BPE model considered when matching the fixed model's training FLOPs per byte."""
    noise_rate: float = 0.05
    """Fraction of the held-out words changed once in the noised English test set."""
    zh_test_fraction: float = 0.1
    """The Chinese test set is the tail of tang_poems.txt from the first poem boundary after
    1 - this fraction of its bytes."""
    train_bytes: Optional[int] = None
    """Train (models and tokenizers) on only the first train_bytes / n bytes of each of the n
    training documents (None: all of them)."""
    seed: int = 0


# The text recipe's optimiser settings (configs/cpu/text_recipe.yaml) and the CPU text preset's
# widths: global 256 x 4, local 128 x 2. The FULL budget is about 480 steps of 8 x 1,024 bytes for
# the fixed model (~5 MFLOPs per byte); space patches, shorter than 8 bytes on average, give the
# global stage more positions per byte. A BPE model's depth is chosen at run time (`bpe_config`),
# once the tokenizer's bytes per token are known; its 4,096-way head is a large part of its cost.
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
    budget_flops=8.0e9,
    entropy_budget_flops=2.0e9,
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
    eval_bytes=4096,
    eval_batch_size=16,
    prompt_bytes=16,
    generate_bytes=32,
    peer_steps=2,
    peer_hash_buckets=512,
    bpe_vocab_size=512,
    bpe_width=32,
    bpe_heads=2,
    train_bytes=1 << 18,
)


# ------------------------------------------------------------------------------------------------
# Data: the corpora, the three test sets, and symbol streams (bytes, or a tokenizer's ids)
# ------------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """What a subword entry brings (multibyte.bpe.BPETokenizer): bytes -> token ids -> the same bytes."""

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
    """`data` as bytes, or as `tokenizer`'s ids; num_bytes counts the bytes the ids decode to,
    which must be `data` itself (a tokenizer that loses bytes would score fewer of them)."""
    if tokenizer is None:
        return Stream(torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), len(data))
    ids = tokenizer.encode(data)
    decoded = tokenizer.decode(ids)
    if decoded != data:
        raise ValueError(f"the tokenizer does not round-trip a text of {len(data)} bytes (decodes to {len(decoded)})")
    return Stream(torch.tensor(ids, dtype=torch.long), len(decoded))


@dataclass
class Books:
    documents: list[bytes]
    """The training books, in TRAIN_BOOKS order."""
    test: bytes
    folder: Path

    @property
    def train(self) -> bytes:
        return b"".join(self.documents)


def load_books(folder: Path) -> Books:
    """The whole-book split; FileNotFoundError naming what is missing."""
    missing = [name for name in TRAIN_BOOKS + (TEST_BOOK,) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}")
    return Books([(folder / name).read_bytes() for name in TRAIN_BOOKS], (folder / TEST_BOOK).read_bytes(), folder)


def split_by_position(data: bytes, test_fraction: float, source: str = "the text") -> tuple[bytes, bytes]:
    """(train, test) of a text of blank-line separated records (poems): test runs from the first
    blank line at or after (1 - test_fraction) of the bytes to the end, train is everything before.
    Every byte lands in exactly one part and no record is cut. ValueError naming `source` when there
    is no blank line to cut at."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction must lie in (0, 1), got {test_fraction}")
    at = data.find(b"\n\n", int(len(data) * (1 - test_fraction)))
    if at < 0:
        raise ValueError(f"{source}: no blank line after {1 - test_fraction:.0%} of its bytes to split it at")
    cut = at + 2
    return data[:cut], data[cut:]


@dataclass
class Corpora:
    """The benchmark's data: the English books and tang_poems.txt split by position."""

    books: Books
    zh_train: bytes
    zh_test: bytes
    zh_file: Path


def load_corpora(text_folder: Path, zh_file: Path, zh_test_fraction: float = 0.1) -> Corpora:
    """FileNotFoundError naming what is missing; ValueError naming a Chinese file that is not
    UTF-8 or cannot be split."""
    books = load_books(text_folder)
    if not zh_file.is_file():
        raise FileNotFoundError(f"{zh_file}: missing")
    data = zh_file.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{zh_file}: not UTF-8 ({error})") from None
    zh_train, zh_test = split_by_position(data, zh_test_fraction, str(zh_file))
    return Corpora(books, zh_train, zh_test, zh_file)


@dataclass
class Corpus:
    """One training text: `documents` (books, the Chinese training part) train the tokenizers,
    their concatenation is the stream the models draw windows from."""

    name: str
    """`en` or `en+zh`; an entry's `corpus`."""
    documents: list[bytes]

    @property
    def text(self) -> bytes:
        return b"".join(self.documents)


def training_corpora(corpora: Corpora, s: Settings) -> dict[str, Corpus]:
    """`en`: the English books; `en+zh`: the books, then the Chinese training part."""

    def cap(documents: list[bytes]) -> list[bytes]:
        if s.train_bytes is None:
            return documents
        return [document[: s.train_bytes // len(documents)] for document in documents]

    english = corpora.books.documents
    return {"en": Corpus("en", cap(english)), "en+zh": Corpus("en+zh", cap(english + [corpora.zh_train]))}


WORD = re.compile(rb"[A-Za-z]+")  # a word of the noised test set: a run of ASCII letters


def noise_words(data: bytes, rate: float, seed: int) -> bytes:
    """`data` with round(rate x words) of its words (runs of ASCII letters) changed once each,
    chosen and changed by a generator seeded with `seed`: one letter's case flipped, or two
    adjacent different letters swapped (even odds; a word with no such pair, as "a" or "ll", gets a
    case flip). Only ASCII letters move, so the length, every word's span and every other byte
    (Latin-1 or UTF-8 letters included) stay as they were."""
    if not 0 <= rate <= 1:
        raise ValueError(f"noise rate must lie in [0, 1], got {rate}")
    words = [match.span() for match in WORD.finditer(data)]
    rng = random.Random(seed)
    out = bytearray(data)
    for i in sorted(rng.sample(range(len(words)), round(rate * len(words)))):
        begin, end = words[i]
        swap = rng.random() < 0.5
        pairs = [j for j in range(begin, end - 1) if out[j] != out[j + 1]]
        if swap and pairs:
            j = rng.choice(pairs)
            out[j], out[j + 1] = out[j + 1], out[j]
        else:
            out[rng.randrange(begin, end)] ^= 0x20  # ASCII letters differ from their other case in bit 5
    return bytes(out)


def utf8_prefix(data: bytes, n: Optional[int]) -> bytes:
    """The first n bytes of `data` (all of it for None), cut back so no UTF-8 character is split."""
    if n is None or n >= len(data):
        return data
    while n > 0 and 0x80 <= data[n] < 0xC0:  # data[n] continues the character before it
        n -= 1
    return data[:n]


@dataclass
class EvalSet:
    """One test set: its name, the bytes every entry scores, and where they come from."""

    name: str
    data: bytes
    note: str


def eval_sets(s: Settings, corpora: Corpora) -> list[EvalSet]:
    english = corpora.books.test[: s.eval_bytes]
    return [
        EvalSet("english", english, f"{TEST_BOOK}, held out"),
        EvalSet(
            "english-noised",
            noise_words(english, s.noise_rate, s.seed + 3),
            f"{TEST_BOOK} with {s.noise_rate:.0%} of its words changed once (case flip or adjacent swap), "
            f"seed {s.seed + 3}",
        ),
        EvalSet(
            "chinese",
            utf8_prefix(corpora.zh_test, s.eval_bytes),
            f"{corpora.zh_file.name}, the last {s.zh_test_fraction:.0%} from a poem boundary",
        ),
    ]


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
    """A BPE entry's tokenizer (config.vocab_size is its vocabulary): the entry trains and scores
    on `to_stream(text, tokenizer)` and divides by bytes. None: bytes."""
    vocabulary: str = "bytes"
    """The name of the symbol streams it reads: `bytes`, or its tokenizer's (`bpe-en`, `bpe-en+zh`)."""
    corpus: str = "en"
    """The training text (`Corpus.name`): `en`, or `en+zh`."""


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


def build(config: ModelConfig, seed: int) -> HierarchicalByteModel:
    torch.manual_seed(seed)
    return HierarchicalByteModel(config)


def flops_per_byte(config: ModelConfig, bytes_per_symbol: float = 1.0) -> float:
    """Training FLOPs per byte of a model with fixed units over full windows of its max_seq_len
    symbols, each standing for `bytes_per_symbol` bytes (built on the meta device: shapes only)."""
    with torch.device("meta"):
        model = HierarchicalByteModel(config)
    T = config.max_seq_len
    return model.training_flops(T) / (T * bytes_per_symbol)


def bpe_config(s: Settings, vocab_size: int, bytes_per_token: float, target_flops_per_byte: float) -> ModelConfig:
    """A subword model of the same core: one attention stage of `bpe_width` over tokens, in
    windows of about seq_len bytes (seq_len / bytes_per_token tokens), its depth the one of
    1..bpe_max_layers whose training FLOPs per byte come closest, in ratio, to the target."""
    window = max(2, round(s.seq_len / bytes_per_token))

    def config(layers: int) -> ModelConfig:
        stage = StageConfig("attention", s.bpe_width, layers, s.bpe_heads)
        return ModelConfig(stages=[stage], vocab_size=vocab_size, max_seq_len=window)

    def mismatch(layers: int) -> float:
        return abs(math.log(flops_per_byte(config(layers), bytes_per_token) / target_flops_per_byte))

    return config(min(range(1, s.bpe_max_layers + 1), key=mismatch))


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
    """Train until the charged FLOPs reach `budget` (the step that crosses it is the last), on
    windows of the model's max_seq_len symbols."""
    T, B = model.config.max_seq_len, s.batch_size
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


class Streams:
    """Every text under every vocabulary, encoded once: `streams[vocabulary, text]`, where a
    vocabulary is `bytes` or a tokenizer's name and a text is `train:<corpus>` or a test set."""

    def __init__(self, tokenizers: dict[str, Tokenizer], texts: dict[str, bytes]) -> None:
        self.tokenizers: dict[str, Optional[Tokenizer]] = {"bytes": None, **tokenizers}
        self.texts = texts
        self._streams: dict[tuple[str, str], Stream] = {}

    def __getitem__(self, key: tuple[str, str]) -> Stream:
        if key not in self._streams:
            vocabulary, text = key
            self._streams[key] = to_stream(self.texts[text], self.tokenizers[vocabulary])
        return self._streams[key]


def evaluate(entry: Entry, model: HierarchicalByteModel, stream: Stream, data: bytes, s: Settings) -> dict:
    """One entry on one test set (`data`, and `stream`: the same bytes in the entry's vocabulary)."""
    window = model.config.max_seq_len
    held_out = score(model, stream, window, s.eval_batch_size)
    prompt = to_stream(utf8_prefix(data, s.prompt_bytes), entry.tokenizer).symbols
    # A BPE model generates about generate_bytes of this text's bytes, within its window.
    new = s.generate_bytes if entry.tokenizer is None else max(
        1, min(window - len(prompt), math.ceil(s.generate_bytes / stream.bytes_per_symbol))
    )
    return {
        "bits_per_byte": round(held_out.bits_per_byte, 4),
        "avg_patch_length": round(held_out.num_bytes / held_out.units, 3),  # bytes per token for BPE
        "symbols_per_byte": round(len(stream.symbols) / stream.num_bytes, 4),
        "bytes_scored": held_out.num_bytes,
        "generate_bytes_per_s": round(generation_speed(model, prompt, new, s.seed, entry.tokenizer), 1),
    }


def who_wins(results: dict[str, dict], set_names: Sequence[str]) -> dict:
    """Per training text (`en`, `en+zh`) and test set: the entries trained on that text ranked by
    bits per byte, the best one's margin over the next, and each BPE entry's bits per byte minus
    the best byte model's (positive: the byte model needs fewer bits)."""
    summary: dict[str, dict] = {}
    for corpus in dict.fromkeys(r["trained_on"] for r in results.values()):
        group = {name: r for name, r in results.items() if r["trained_on"] == corpus}
        summary[corpus] = {}
        for set_name in set_names:
            bpb = {name: r["tests"][set_name]["bits_per_byte"] for name, r in group.items()}
            ranking = sorted(bpb, key=bpb.get)
            table: dict = {"ranking": [[name, bpb[name]] for name in ranking], "best": ranking[0]}
            if len(ranking) > 1:
                table["next"] = ranking[1]
                table["margin_over_next"] = round(bpb[ranking[1]] - bpb[ranking[0]], 4)
            byte_rows = [name for name in ranking if group[name]["vocabulary"] == "bytes"]
            subword_rows = [name for name in ranking if group[name]["vocabulary"] != "bytes"]
            if byte_rows and subword_rows:
                table["best_byte"] = byte_rows[0]
                table["bpe_minus_best_byte"] = {name: round(bpb[name] - bpb[byte_rows[0]], 4) for name in subword_rows}
            summary[corpus][set_name] = table
    return summary


def run(s: Settings, corpora: Corpora, entropy_cost: str = "charged", peer: bool = True, en_zh_training: bool = False,
        extra_entries: Sequence[Entry] = (), log: Callable[[str], None] = print) -> dict:
    """Every entry trained to the budget and scored on every test set; one dict of figures (the
    JSON line). `extra_entries` train after the others, each on its `corpus`."""
    begin = time.perf_counter()
    corpus = training_corpora(corpora, s)
    sets = eval_sets(s, corpora)
    texts = {f"train:{name}": c.text for name, c in corpus.items()} | {e.name: e.data for e in sets}
    english_words = len(WORD.findall(sets[0].data))
    out: dict = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_start": loadavg(),
        "data": {
            "folder": str(corpora.books.folder),
            "train_books": list(TRAIN_BOOKS),
            "train_bytes": {name: len(c.text) for name, c in corpus.items() if name == "en" or en_zh_training},
            "zh_file": str(corpora.zh_file),
            "zh_split_bytes": {"train": len(corpora.zh_train), "test": len(corpora.zh_test)},
            "test_sets": {e.name: {"note": e.note, "bytes": len(e.data)} for e in sets},
            "noised_words": {"words": english_words, "changed": round(s.noise_rate * english_words)},
        },
        "settings": dataclasses.asdict(s),
        "budget_flops": s.budget_flops,
        "entropy_model_cost": entropy_cost,
        "byte_models_on_chinese": "zero-shot: trained on the English books only"
        + (" (the /en+zh entries trained on English + Chinese)" if en_zh_training else ""),
    }
    log(f"load average {out['loadavg_start']}, {out['threads']} threads, budget {s.budget_flops:.3g} FLOPs per entry")

    # The two tokenizers, and how many tokens a byte of each text costs under each.
    tokenizers: dict[str, Tokenizer] = {}
    out["tokenizers"] = {}
    for name in ("en", "en+zh"):
        start = time.perf_counter()
        tokenizer = train_bpe(corpus[name].documents, s.bpe_vocab_size)
        tokenizers[f"bpe-{name}"] = tokenizer
        out["tokenizers"][f"bpe-{name}"] = {"trained_on": name, "vocab_size": tokenizer.vocab_size,
                                            "train_seconds": round(time.perf_counter() - start, 1)}
    streams = Streams(tokenizers, texts)
    for vocabulary, figures in out["tokenizers"].items():
        figures["tokens_per_byte"] = {
            text: round(len(streams[vocabulary, text].symbols) / streams[vocabulary, text].num_bytes, 4)
            for text in [f"train:{figures['trained_on']}"] + [e.name for e in sets]
        }
        log(f"{vocabulary}: {figures['vocab_size']} ids, trained on {figures['trained_on']} in "
            f"{figures['train_seconds']} s, tokens per byte {figures['tokens_per_byte']}")

    results: dict[str, dict] = {}
    # A BPE model's depth is matched to the fixed model's training FLOPs per byte.
    fixed_flops = flops_per_byte(fixed_and_space_entries(s)[0].config)

    def train_and_score(entry: Entry, model: HierarchicalByteModel, budget: float) -> dict:
        log(f"{entry.name}: {entry.note}, trained on {entry.corpus}, {model.num_parameters():,} parameters, "
            f"budget {budget:.3g} FLOPs")
        result = train_to_budget(model, streams[entry.vocabulary, f"train:{entry.corpus}"], s, budget, log)
        tests = {e.name: evaluate(entry, model, streams[entry.vocabulary, e.name], e.data, s) for e in sets}
        results[entry.name] = r = {
            "note": entry.note,
            "trained_on": entry.corpus,
            "vocabulary": entry.vocabulary,
            "window": model.config.max_seq_len,
            "params": model.num_parameters(),
            **result.summary(),
            "tests": tests,
            "loadavg": loadavg(),
        }
        log(f"  {r['train_steps']} steps, {r['train_flops_per_byte'] / 1e6:.2f} MFLOPs/byte, "
            f"{r['train_bytes_per_s']:.0f} train bytes/s, load {r['loadavg']}")
        for name, t in tests.items():
            log(f"  {name}: {t['bits_per_byte']:.4f} bits/byte, {t['avg_patch_length']:.2f} bytes per unit, "
                f"{t['generate_bytes_per_s']:.0f} generated bytes/s")
        return r

    def calibration_windows(corpus_name: str) -> torch.Tensor:
        stream = streams["bytes", f"train:{corpus_name}"]
        return sample_windows(stream, s.calibration_windows, s.seq_len, torch.Generator().manual_seed(s.seed + 2))

    def entropy_group(corpus_name: str, modes: Sequence[str], pooling: str, suffix: str, target_length: float) -> None:
        """BLT's entropy model trained on `corpus_name`, then its entries at `target_length`."""
        key = "entropy_model" + suffix
        entropy_config = entropy_model_config(s)
        log(f"{key}: {s.entropy_width} x {s.entropy_layers} attention over bytes, trained on {corpus_name}, "
            f"budget {s.entropy_budget_flops:.3g} FLOPs")
        entropy_model = build(entropy_config, s.seed)
        entropy_result = train_to_budget(entropy_model, streams["bytes", f"train:{corpus_name}"], s,
                                         s.entropy_budget_flops, log)
        out[key] = {
            "config": f"attention {s.entropy_width} x {s.entropy_layers}, {s.entropy_heads} heads",
            "trained_on": corpus_name,
            "params": entropy_model.num_parameters(),
            "bits_per_byte": {e.name: round(score(entropy_model, streams["bytes", e.name], s.seq_len,
                                                  s.eval_batch_size).bits_per_byte, 4) for e in sets},
            **{k: v for k, v in entropy_result.summary().items() if "patch" not in k and k != "padding_overhead"},
        }
        log(f"  {out[key]}")
        budget = s.budget_flops - (entropy_result.flops if entropy_cost == "charged" else 0.0)
        windows = calibration_windows(corpus_name)
        for entry in entropy_entries(s, entropy_config, pooling):
            mode = entry.config.stages[0].entropy_mode
            if mode not in modes:
                continue
            entry = dataclasses.replace(entry, name=entry.name + suffix, corpus=corpus_name)
            model = build(entry.config, s.seed)
            model.patchers[0].model.load_state_dict(entropy_model.state_dict())
            theta, measured = calibrate_entropy(model, windows, target_length)
            train_and_score(entry, model, budget).update(
                entropy_threshold_bits=round(theta, 4), calibration_patch_length=round(measured, 3)
            )

    def bpe_entry(name: str, vocabulary: str, corpus_name: str) -> Entry:
        tokenizer = tokenizers[vocabulary]
        bytes_per_token = streams[vocabulary, f"train:{corpus_name}"].bytes_per_symbol
        config = bpe_config(s, tokenizer.vocab_size, bytes_per_token, fixed_flops)
        stage = config.stages[0]
        return Entry(
            name, config,
            f"BPE ({vocabulary} tokenizer, {tokenizer.vocab_size} ids), attention {stage.d_model} x {stage.n_layers} "
            f"over windows of {config.max_seq_len} tokens, "
            f"{flops_per_byte(config, bytes_per_token) / fixed_flops:.2f}x the fixed model's training FLOPs per byte",
            tokenizer=tokenizer, vocabulary=vocabulary, corpus=corpus_name,
        )

    # --- trained on English: the byte models, then the BPE models.
    entries = fixed_and_space_entries(s)
    calibration = calibration_windows("en")
    space_length = mean_patch_length(build(entries[1].config, s.seed), calibration)
    out["space_patch_length_calibration"] = round(space_length, 3)

    if peer:
        log("peer: Hugging Face BltForCausalLM (speed only)")
        out["peer_blt"] = blt_peer(s, calibration, space_length)
        log(f"  {out['peer_blt']}")

    for entry in entries:
        train_and_score(entry, build(entry.config, s.seed), s.budget_flops)
    english = {name: r["tests"]["english"]["bits_per_byte"] for name, r in results.items()}
    pooling = "attention" if english["space-attention"] < english["space"] else "concat"
    out["space_pooling_winner"] = pooling

    # BLT's entropy model, then the entropy entries at the space patches' length.
    entropy_group("en", ("global", "monotonic"), pooling, "", space_length)
    for entry in (bpe_entry("bpe", "bpe-en", "en"), bpe_entry("bpe-tok-en+zh", "bpe-en+zh", "en")):
        train_and_score(entry, build(entry.config, s.seed), s.budget_flops)

    if en_zh_training:
        # --- trained on English + Chinese: fixed, the winning space pooling, the winning entropy
        # mode (over its own entropy model), BPE with the English + Chinese tokenizer.
        english = {name: r["tests"]["english"]["bits_per_byte"] for name, r in results.items()}
        mode = "global" if english["entropy-global"] <= english["entropy-monotonic"] else "monotonic"
        space_name = "space" if pooling == "concat" else "space-attention"
        for entry in fixed_and_space_entries(s):
            if entry.name in ("fixed", space_name):
                entry = dataclasses.replace(entry, name=f"{entry.name}/en+zh", corpus="en+zh")
                train_and_score(entry, build(entry.config, s.seed), s.budget_flops)
        both_length = mean_patch_length(build(entries[1].config, s.seed), calibration_windows("en+zh"))
        out["space_patch_length_calibration/en+zh"] = round(both_length, 3)
        entropy_group("en+zh", (mode,), pooling, "/en+zh", both_length)
        entry = bpe_entry("bpe/en+zh", "bpe-en+zh", "en+zh")
        train_and_score(entry, build(entry.config, s.seed), s.budget_flops)

    for entry in extra_entries:
        train_and_score(entry, build(entry.config, s.seed), s.budget_flops)

    out["entries"] = results
    out["who_wins"] = who_wins(results, [e.name for e in sets])
    # The patching question, on English: the dynamic patchers against fixed patches.
    english = {name: r["tests"]["english"]["bits_per_byte"] for name, r in results.items()}
    fixed = english["fixed"]
    patched = {name: english[name] for name, r in results.items()
               if name != "fixed" and r["vocabulary"] == "bytes" and r["trained_on"] == "en"}
    best = min(patched, key=patched.get)
    out["vs_fixed_bits_per_byte"] = {name: round(fixed - bpb, 4) for name, bpb in patched.items()}
    out["best_patched"] = best
    out["best_margin_over_fixed"] = round(fixed - patched[best], 4)  # > 0: beats fixed patches; < 0: the gap
    out["loadavg_end"] = loadavg()
    out["seconds"] = round(time.perf_counter() - begin, 1)
    margin = out["best_margin_over_fixed"]
    log(f"best dynamic patcher on English: {best}, {abs(margin):.4f} bits/byte {'under' if margin > 0 else 'over'} "
        f"fixed ({fixed:.4f})")
    for corpus_name, tables in out["who_wins"].items():
        for set_name, table in tables.items():
            gaps = ", ".join(f"{name} {gap:+.4f}" for name, gap in table.get("bpe_minus_best_byte", {}).items())
            log(f"trained on {corpus_name}, {set_name}: lowest {table['best']} "
                f"({table['ranking'][0][1]:.4f} bits/byte, {table.get('margin_over_next', 0.0):.4f} under "
                f"{table.get('next')}); BPE minus best byte model ({table.get('best_byte')}): {gaps}")
    log(f"load average {out['loadavg_end']}, {out['seconds']} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a small budget, a held-out prefix (< 60 s)")
    parser.add_argument("--data", type=Path, default=DEFAULT_TEXT_DIR, help="folder of the five books (../shared/data/text)")
    parser.add_argument("--zh-data", type=Path, default=DEFAULT_ZH_FILE,
                        help="the Chinese text: UTF-8, blank lines between poems (../shared/data/text_zh/tang_poems.txt)")
    parser.add_argument("--en-zh-training", action="store_true",
                        help="also train fixed, space, entropy and BPE models on English + Chinese training text")
    parser.add_argument("--budget-flops", type=float, default=None, help="training FLOPs per entry")
    parser.add_argument("--entropy-budget-flops", type=float, default=None, help="training FLOPs of the entropy model")
    parser.add_argument("--entropy-model-cost", choices=("charged", "amortized"), default="charged",
                        help="charged: the entropy model's training FLOPs come out of the entropy entries' budget")
    parser.add_argument("--eval-bytes", type=int, default=None, help="score only this prefix of each test set")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for training and scoring (default: torch's; 1 with --quick)")
    parser.add_argument("--no-peer", action="store_true", help="skip Hugging Face's BltForCausalLM")
    args = parser.parse_args()

    s = QUICK if args.quick else FULL
    overrides = {"budget_flops": args.budget_flops, "entropy_budget_flops": args.entropy_budget_flops,
                 "eval_bytes": args.eval_bytes}
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    for name in ("budget_flops", "entropy_budget_flops", "eval_bytes"):
        if getattr(s, name) is not None and getattr(s, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(s, name)}")
    if args.entropy_model_cost == "charged" and s.entropy_budget_flops >= s.budget_flops:
        parser.error("--entropy-budget-flops must stay below --budget-flops when the entropy model's cost is charged")
    # The quick models are tiny: per-op overhead dominates, and a second intra-op thread only adds
    # barrier waits (stalling whenever another process holds the other core).
    threads = 1 if args.quick and args.threads is None else args.threads
    if threads is not None:
        if threads < 1:
            parser.error(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        corpora = load_corpora(args.data, args.zh_data, s.zh_test_fraction)
    except FileNotFoundError as error:
        print(f"skipped: the benchmark's data is not available ({error})")
        print(json.dumps({"quick": args.quick, "skipped": str(error)}))
        return
    except ValueError as error:
        parser.error(f"--zh-data: {error}")
    out = run(s, corpora, args.entropy_model_cost, peer=not args.no_peer, en_zh_training=args.en_zh_training)
    print(json.dumps({"quick": args.quick, **out}))


if __name__ == "__main__":
    main()
