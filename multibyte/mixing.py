"""The second predictors a byte model can be mixed with, in one table: what bench, compress and the
compressed container need of each. A new one is a module with a frozen config dataclass,
`mixed_log2_probabilities` (whole file) and a byte-by-byte mixer, registered in MIXINGS here.

- n-gram (`multibyte.ngram_mixing`): an adaptive byte n-gram, for text.
- LPC (`multibyte.lpc_mixing`): a backward-adaptive linear predictor of 16-bit samples, for audio.

Both are defined over contiguous windows of bytes tiled in groups (bench's batch, compress's lanes)
and count only what a decoder holds, so bench's mixed bits are a code length compress achieves.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from multibyte import lpc_mixing, ngram_mixing
from multibyte.lpc_mixing import LpcConfig, LpcMixer, lpc_summary
from multibyte.ngram_mixing import NgramConfig, NgramMixer, ngram_summary

MixingConfig = Union[NgramConfig, LpcConfig]


@dataclass(frozen=True)
class Mixing:
    """One kind of second predictor."""

    code: int  # its value of the container's mixing byte (0 is none)
    flag: str  # its CLI switch, e.g. "--ngram"
    label: str  # what bench's rows append to the method, e.g. "n-gram"
    noun: str  # what reports say it is mixed with, e.g. "a byte n-gram"
    config: type
    block: struct.Struct  # its options in the container, in the config's field order
    summary: Callable[[Any], str]
    whole_file: Callable[..., np.ndarray]  # (model_log2_p, data, windows, group_size, config) -> (N,) log2 p
    mixer: Callable[[Any], Any]  # config -> a byte-by-byte mixer (start_group / distribution / observe / end_group)
    check_stream: Optional[Callable[[Optional[str], Optional[int]], None]] = None  # (audio encoding, seq_len) -> raises


MIXINGS = (
    Mixing(1, "--ngram", "n-gram", "a byte n-gram", NgramConfig, struct.Struct("<Bdd"), ngram_summary,
           ngram_mixing.mixed_log2_probabilities, NgramMixer),
    Mixing(2, "--lpc", "LPC", "a linear predictor", LpcConfig, struct.Struct("<IIIIdddd"), lpc_summary,
           lpc_mixing.mixed_log2_probabilities, LpcMixer, lpc_mixing.check_stream),
)


def kind(config: MixingConfig) -> Mixing:
    for mixing in MIXINGS:
        if type(config) is mixing.config:
            return mixing
    raise TypeError(f"not a mixing config: {config!r}")


def by_code(code: int) -> Optional[Mixing]:
    """The kind with container code `code` (None for an unknown code)."""
    return next((mixing for mixing in MIXINGS if mixing.code == code), None)


def mixed_log2_probabilities(
    config: MixingConfig,
    model_log2_p: np.ndarray,
    data: np.ndarray,
    windows: Sequence[tuple[int, int]],
    group_size: int,
) -> np.ndarray:
    """(N,) float64 log2 p of every byte of `data` under the model mixed by `config`."""
    return kind(config).whole_file(model_log2_p, data, windows, group_size, config)


def byte_mixer(config: MixingConfig):
    """The byte-by-byte mixer compress and decompress code with."""
    return kind(config).mixer(config)


def describe(config: Optional[MixingConfig]) -> str:
    """E.g. "a byte n-gram: order 6, ..." (for reports); "off" for None."""
    if config is None:
        return "off"
    return f"{kind(config).noun}: {kind(config).summary(config)}"


def pack_block(config: MixingConfig) -> bytes:
    return kind(config).block.pack(*(getattr(config, field.name) for field in fields(config)))


def unpack_block(mixing: Mixing, blob: bytes) -> MixingConfig:
    """The config stored in `blob` (exactly `mixing.block.size` bytes); ValueError when invalid."""
    return mixing.config(*mixing.block.unpack(blob))


def check(
    config: MixingConfig, mode: str, subword: bool, audio_encoding: Optional[str] = None, seq_len: Optional[int] = None
) -> None:
    """Refuse a mixing where it is not defined: sliding or strided windows, token ids, and what the
    kind itself refuses (LPC: a stream that is not 16-bit little-endian PCM, when known, or
    windows that split samples)."""
    mixing = kind(config)
    if mode != "basic":
        raise ValueError(f"{mixing.flag} with {mode} inference: mixing runs over contiguous windows; use basic")
    if subword:
        raise ValueError(f"{mixing.flag} mixes byte probabilities: a subword model's token ids cannot be mixed")
    if mixing.check_stream is not None:
        mixing.check_stream(audio_encoding, seq_len)
