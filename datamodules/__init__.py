"""Lightning datamodules that turn text, 64x64 images and audio into batches of raw bytes."""

from datamodules.audio import AudioDataModule
from datamodules.base import ByteStreamDataModule, DataError
from datamodules.image import ImageNet64DataModule
from datamodules.text import TextDataModule

__all__ = ["AudioDataModule", "ByteStreamDataModule", "DataError", "ImageNet64DataModule", "TextDataModule"]
