"""Lossless conversions between each modality and the raw bytes the models read and write."""

from multibyte.codecs.audio import (
    AUDIO_ENCODINGS,
    bytes_per_sample,
    bytes_to_wav,
    bytes_to_waveform,
    load_audio_file,
    waveform_to_bytes,
)
from multibyte.codecs.image import (
    IMAGE_BYTES,
    IMAGE_ORDERS,
    IMAGE_PREDICTORS,
    IMAGE_SIZE,
    bytes_to_image,
    bytes_to_png,
    image_to_bytes,
    load_image_file,
    patch_scan_permutation,
    patch_side,
    planar_row_to_hwc,
)
from multibyte.codecs.text import as_byte_array, decode_text, encode_text

__all__ = [
    "AUDIO_ENCODINGS",
    "IMAGE_BYTES",
    "IMAGE_ORDERS",
    "IMAGE_PREDICTORS",
    "IMAGE_SIZE",
    "as_byte_array",
    "bytes_per_sample",
    "bytes_to_image",
    "bytes_to_png",
    "bytes_to_wav",
    "bytes_to_waveform",
    "decode_text",
    "encode_text",
    "image_to_bytes",
    "load_audio_file",
    "load_image_file",
    "patch_scan_permutation",
    "patch_side",
    "planar_row_to_hwc",
    "waveform_to_bytes",
]
