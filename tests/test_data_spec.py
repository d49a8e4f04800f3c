"""The typed data contract: every datamodule states its DataSpec, consumers read only that, and a
model that does not fit the data is one clear error."""

import pytest

from datamodules import AudioDataModule, ImageNet64DataModule, TextDataModule
from multibyte.config import ModelConfig, StageConfig, megabyte
from multibyte.data_spec import DataSpec, check_model_fits_data, data_spec_of
from multibyte.decoders import SampleFormat
from multibyte.training import ByteLM


def test_every_datamodule_states_its_spec():
    assert TextDataModule(seq_len=64).spec == DataSpec("text", 64)
    image = ImageNet64DataModule(order="patch", patch_size=48).spec
    assert (image.modality, image.seq_len, image.image_order, image.image_patch_size) == ("image", 12288, "patch", 48)
    assert image.unit == "bits/dim"
    audio = AudioDataModule(seq_len=256, sample_rate=8000, encoding="mulaw8").spec
    assert (audio.sample_rate, audio.audio_encoding, audio.unit) == (8000, "mulaw8", "bits/byte")
    fmt = SampleFormat.from_datamodule(AudioDataModule(sample_rate=8000, encoding="mulaw8"))
    assert (fmt.sample_rate, fmt.encoding) == (8000, "mulaw8")


def test_a_foreign_datamodule_is_one_clear_error():
    class Elsewhere:
        seq_len = 64

    with pytest.raises(ValueError, match="Elsewhere is not a multibyte datamodule"):
        data_spec_of(Elsewhere())


@pytest.mark.parametrize(
    "spec, message",
    [
        (DataSpec("text", 100), r"seq_len=100 is not a multiple of the model's patch_size=8"),
        (DataSpec("text", 2048), r"seq_len=2048 exceeds the model's max_seq_len=1024"),
        (DataSpec("text", 64, vocab_size=4096), r"written in 4096 symbols but the model's vocab_size is 256"),
    ],
)
def test_a_model_that_does_not_fit_the_data_is_refused_at_construction(spec, message):
    architecture = megabyte(8, 1024, 64, 1, 2, 32, 1, 2)
    with pytest.raises(ValueError, match=message):
        check_model_fits_data(architecture, spec)
    with pytest.raises(ValueError, match=message):
        ByteLM(architecture, data_spec=spec)


def test_dynamic_patches_take_any_window_length():
    space = ModelConfig(
        stages=[StageConfig("attention", 64, 1, 2, patcher="space", patch_size=16), StageConfig("attention", 32, 1, 2)],
        max_seq_len=1024,
    )
    check_model_fits_data(space, DataSpec("text", 1001))  # no error: no fixed patch to align to


def outermost(position: str, position_embedding: bool = False) -> ModelConfig:
    return ModelConfig(
        stages=[
            StageConfig("attention", 64, 1, 2, patcher="fixed", patch_size=8, position=position),
            StageConfig("attention", 32, 1, 2),
        ],
        max_seq_len=1024,
        position_embedding=position_embedding,
    )


@pytest.mark.parametrize(
    "architecture, limited",
    [
        (outermost("none", position_embedding=True), True),  # the byte position table
        (outermost("learned"), True),  # the outermost stage's unit table, sized by max_seq_len
        (outermost("rotary"), False),
        (outermost("none"), False),
        (ModelConfig(stages=[StageConfig("mamba", 32, 1, 1)], max_seq_len=1024, position_embedding=False), False),
    ],
)
def test_only_learned_tables_sized_by_max_seq_len_limit_the_data_length(architecture, limited):
    # The config's rule is the one the built model's tables follow.
    from multibyte.model import HierarchicalByteModel

    model = HierarchicalByteModel(architecture)
    assert architecture.length_limited == limited
    assert (model.position_embedding is not None or model.stages[0].unit_position is not None) == limited
    long = DataSpec("text", 2048)
    if limited:
        with pytest.raises(ValueError, match=r"seq_len=2048 exceeds the model's max_seq_len=1024"):
            check_model_fits_data(architecture, long)
    else:
        check_model_fits_data(architecture, long)  # no table to run off the end of
