"""Text <-> bytes. Text is the one modality whose bytes need no layout: they are the UTF-8 encoding.

This module also holds `as_byte_array`, the conversion every codec applies to its byte input, so
that generated tokens can be decoded whether they arrive as `bytes`, a numpy array or a tensor.
"""

from typing import Union

import numpy as np
import torch

ByteLike = Union[bytes, bytearray, memoryview, np.ndarray, torch.Tensor]


def as_byte_array(data: ByteLike) -> np.ndarray:
    """Return `data` as a flat uint8 numpy array (no copy when it already is one).

    Accepts bytes-like objects, numpy arrays and tensors. Integer arrays of another dtype (say the
    int64 tokens a sampler returns) are accepted when every value is a byte value, 0..255.
    """
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    array = np.asarray(data)
    if array.dtype == np.uint8:
        return array.reshape(-1)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"expected bytes or an integer array of byte values, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"byte values must lie in 0..255, got {array.min()}..{array.max()}")
    return array.astype(np.uint8).reshape(-1)


def encode_text(text: str) -> bytes:
    """The UTF-8 bytes of `text`."""
    return text.encode("utf-8")


def decode_text(data: ByteLike) -> str:
    """Decode UTF-8 bytes; invalid sequences (common in sampled bytes) become U+FFFD instead of failing."""
    return as_byte_array(data).tobytes().decode("utf-8", errors="replace")
