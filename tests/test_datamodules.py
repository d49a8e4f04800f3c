"""Datamodules: cache building, splits, batch format, exact evaluation coverage and bad input."""

import os
import pickle
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile
import torch
from lightning import seed_everything

import datamodules.text
from datamodules import AudioDataModule, ByteStreamDataModule, ImageNet64DataModule, TextDataModule
from datamodules.base import EMBEDDED_DATA_DIR, SPLITS, DataError, RandomWindows
from datamodules.windows import TrainPosition
from multibyte.codecs import (
    IMAGE_BYTES,
    bytes_to_image,
    image_to_bytes,
    load_audio_file,
    load_image_file,
    planar_row_to_hwc,
    waveform_to_bytes,
)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------------
# Helpers: what every datamodule must satisfy
# ------------------------------------------------------------------------------------------------


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def split_bytes(dm: ByteStreamDataModule, split: str) -> bytes:
    return (dm.cache_folder / f"{split}.bin").read_bytes()


def split_records(dm: ByteStreamDataModule, split: str) -> list[bytes]:
    """A split cut into its records (images, clips) at the offsets stored next to it."""
    data = split_bytes(dm, split)
    starts = np.load(dm.cache_folder / f"{split}.offsets.npy").tolist()
    return [data[start:stop] for start, stop in zip(starts, starts[1:] + [len(data)])]


def prepared(dm: ByteStreamDataModule) -> ByteStreamDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def has_aligned_occurrence(haystack: bytes, needle: bytes, alignment: int) -> bool:
    start = haystack.find(needle)
    while start >= 0:
        if start % alignment == 0:
            return True
        start = haystack.find(needle, start + 1)
    return False


def check_train_batch(dm: ByteStreamDataModule) -> None:
    """A training batch is full: (batch_size, seq_len) uint8 windows, taken from the train split at aligned starts."""
    tokens, lengths = next(iter(dm.train_dataloader()))
    assert tokens.dtype == torch.uint8 and lengths.dtype == torch.int64
    assert tokens.shape == (dm.batch_size, dm.seq_len) and lengths.shape == (dm.batch_size,)
    assert torch.all(lengths == dm.seq_len)
    train = split_bytes(dm, "train")
    for row in tokens:
        assert has_aligned_occurrence(train, row.numpy().tobytes(), dm.alignment)


def check_eval_covers_split(dm: ByteStreamDataModule, split: str) -> None:
    """The evaluation loader scores every byte of the split exactly once, in order; padding is zeros."""
    loader = dm.val_dataloader() if split == "validation" else dm.test_dataloader()
    pieces = []
    for tokens, lengths in loader:
        assert tokens.dtype == torch.uint8 and lengths.dtype == torch.int64
        assert tokens.shape[1] == dm.seq_len and len(tokens) == len(lengths) <= dm.eval_batch_size
        for row, length in zip(tokens, lengths.tolist()):
            assert 1 <= length <= dm.seq_len and not row[length:].any()
            pieces.append(row[:length].numpy().tobytes())
    assert all(len(piece) == dm.seq_len for piece in pieces[:-1])  # only the last window may be short
    assert sum(len(piece) for piece in pieces) == dm.split_num_bytes(split)
    assert b"".join(pieces) == split_bytes(dm, split)


def check_full_cycle(dm: ByteStreamDataModule) -> None:
    prepared(dm)
    check_train_batch(dm)
    for split in ("validation", "test"):
        check_eval_covers_split(dm, split)


def expected_held_out(total: int) -> int:
    """Validation and test size of the 90/5/5 split: 5% rounded down, at least one."""
    return max(1, total // 20)


# ------------------------------------------------------------------------------------------------
# Embedded defaults
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [TextDataModule, ImageNet64DataModule, AudioDataModule])
def test_embedded_default_full_cycle(make: Callable[..., ByteStreamDataModule], cache_dir: Path) -> None:
    dm = make(cache_dir=str(cache_dir), batch_size=4, eval_batch_size=3)
    check_full_cycle(dm)
    assert dm.cache_folder.parent == cache_dir and dm.cache_folder.name.startswith(dm.modality + "-")


def test_embedded_data_is_small_and_attributed() -> None:
    by_modality = {
        "text": [EMBEDDED_DATA_DIR / "gutenberg_books.txt"],
        "image": [EMBEDDED_DATA_DIR / "imagenet64_sample.npz"],
        "audio": sorted(EMBEDDED_DATA_DIR.glob("*.wav")),
    }
    for files in by_modality.values():
        assert files and sum(path.stat().st_size for path in files) <= 2_000_000
    notice = (EMBEDDED_DATA_DIR / "NOTICE").read_text()
    for phrase in ("Project Gutenberg", "ImageNet", "CC BY-SA 4.0", "Zohar Jackson"):
        assert phrase in notice


def test_embedded_text_splits_are_the_file_in_order(cache_dir: Path) -> None:
    dm = prepared(TextDataModule(cache_dir=str(cache_dir)))
    source = (EMBEDDED_DATA_DIR / "gutenberg_books.txt").read_bytes()
    held_out = expected_held_out(len(source))
    assert split_bytes(dm, "train") == source[: len(source) - 2 * held_out]
    assert split_bytes(dm, "validation") == source[len(source) - 2 * held_out : len(source) - held_out]
    assert split_bytes(dm, "test") == source[len(source) - held_out :]


def test_embedded_images_are_the_sample_rows_in_patch_order(cache_dir: Path) -> None:
    dm = prepared(ImageNet64DataModule(cache_dir=str(cache_dir), order="patch", patch_size=48))
    rows = np.load(EMBEDDED_DATA_DIR / "imagenet64_sample.npz")["data"]
    counts = {split: len(split_records(dm, split)) for split in SPLITS}
    held_out = expected_held_out(len(rows))
    assert counts == {"train": len(rows) - 2 * held_out, "validation": held_out, "test": held_out}
    # Decoding every record (patch order) gives back exactly the sample's images, each once.
    decoded = [planar_row_to_hwc(row).tobytes() for row in rows]
    cached = [bytes_to_image(record, "patch", 48).tobytes() for split in SPLITS for record in split_records(dm, split)]
    assert Counter(cached) == Counter(decoded)


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------


def test_text_folder_is_sorted_concatenation_split_90_5_5(shared_data: Path, cache_dir: Path) -> None:
    folder = shared_data / "text"
    dm = TextDataModule(data_path=str(folder), seq_len=4096, cache_dir=str(cache_dir), batch_size=2)
    check_full_cycle(dm)
    stream = b"".join(path.read_bytes() for path in sorted(folder.glob("*.txt")))
    held_out = expected_held_out(len(stream))
    assert dm.split_num_bytes("validation") == dm.split_num_bytes("test") == held_out
    assert split_bytes(dm, "train") + split_bytes(dm, "validation") + split_bytes(dm, "test") == stream
    # One epoch is about one pass over the train split by default.
    assert len(dm.train_dataloader().dataset) == (len(stream) - 2 * held_out) // 4096


def test_non_utf8_single_file_is_copied_verbatim(tmp_path: Path, cache_dir: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes() + b"\xff\xfe\xc3("
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    path = tmp_path / "binary.dat"
    path.write_bytes(data)
    dm = TextDataModule(data_path=str(path), seq_len=64, cache_dir=str(cache_dir), batch_size=2)
    check_full_cycle(dm)
    held_out = expected_held_out(len(data))  # 1004 bytes -> 50
    assert [dm.split_num_bytes(split) for split in SPLITS] == [len(data) - 2 * held_out, held_out, held_out]
    assert split_bytes(dm, "train") + split_bytes(dm, "validation") + split_bytes(dm, "test") == data


@pytest.mark.parametrize("size", [999, 1000, 1500])
def test_large_single_file_gets_the_fixed_size_standard_split(
    size: int, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scaled-down enwik8 rule: files of >= 1000 bytes keep the last 2 x 50 bytes for validation/test.
    monkeypatch.setattr(datamodules.text, "STANDARD_SPLIT_MIN_BYTES", 1000)
    monkeypatch.setattr(datamodules.text, "STANDARD_EVAL_SPLIT_BYTES", 50)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "enwik.txt").write_bytes(data)
    dm = prepared(TextDataModule(data_path=str(tmp_path / "enwik.txt"), seq_len=32, cache_dir=str(cache_dir)))
    held_out = 50 if size >= 1000 else expected_held_out(size)  # below the threshold: 5% = 49
    assert [dm.split_num_bytes(split) for split in SPLITS] == [size - 2 * held_out, held_out, held_out]
    assert split_bytes(dm, "validation") == data[size - 2 * held_out : size - held_out]
    assert split_bytes(dm, "test") == data[size - held_out :]


def test_pg19_layout_uses_each_subfolder_as_its_split(tmp_path: Path, cache_dir: Path) -> None:
    rng = np.random.default_rng(1)
    expected = {}
    for split, count in zip(SPLITS, (3, 2, 2)):
        folder = tmp_path / "pg19" / split
        folder.mkdir(parents=True)
        contents = [rng.integers(0, 256, int(rng.integers(100, 400)), dtype=np.uint8).tobytes() for _ in range(count)]
        for index, content in reversed(list(enumerate(contents))):  # written out of order on purpose
            (folder / f"{index:03d}.txt").write_bytes(content)
        (folder / "README.md").write_text("not a .txt file, ignored")
        expected[split] = b"".join(contents)
    dm = TextDataModule(data_path=str(tmp_path / "pg19"), seq_len=128, cache_dir=str(cache_dir), batch_size=2)
    check_full_cycle(dm)
    for split in SPLITS:
        assert split_bytes(dm, split) == expected[split]


def test_named_files_are_held_out_whole_and_the_rest_trains(tmp_path: Path, cache_dir: Path) -> None:
    books = {name: f"<{name}> ".encode() * (10 + i) for i, name in enumerate(["a.txt", "b.txt", "c.txt", "d.txt", "e.txt"])}
    for name, content in books.items():
        (tmp_path / name).write_bytes(content)
    dm = TextDataModule(
        data_path=str(tmp_path), seq_len=16, batch_size=2, cache_dir=str(cache_dir),
        validation_files=["d.txt"], test_files=["e.txt", "b.txt"],  # the order given is kept
    )
    check_full_cycle(dm)
    assert split_bytes(dm, "train") == books["a.txt"] + books["c.txt"]
    assert split_bytes(dm, "validation") == books["d.txt"]
    assert split_bytes(dm, "test") == books["e.txt"] + books["b.txt"]
    # Another choice of held-out books is another cache.
    other = TextDataModule(data_path=str(tmp_path), cache_dir=str(cache_dir), validation_files=["a.txt"], test_files=["e.txt"])
    assert other.cache_folder != dm.cache_folder


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"validation_files": ["a.txt"]}, "give both"),
        ({"validation_files": [], "test_files": ["a.txt"]}, "validation_files: empty list"),
        ({"validation_files": ["a.txt"], "test_files": ["a.txt"]}, "both name ['a.txt']"),
    ],
)
def test_held_out_file_options_are_checked(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TextDataModule(data_path=str(tmp_path), **kwargs)


def test_held_out_files_must_exist_and_leave_something_to_train(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"alpha " * 20)
    (tmp_path / "b.txt").write_bytes(b"beta " * 20)
    missing = TextDataModule(data_path=str(tmp_path), cache_dir=str(cache_dir), validation_files=["a.txt"], test_files=["z.txt"])
    with pytest.raises(DataError, match=re.escape("test_files names ['z.txt'], not .txt files of this folder")):
        missing.prepare_data()
    everything = TextDataModule(data_path=str(tmp_path), cache_dir=str(cache_dir), validation_files=["a.txt"], test_files=["b.txt"])
    with pytest.raises(DataError, match="nothing is left to train on"):
        everything.prepare_data()
    single = TextDataModule(data_path=str(tmp_path / "a.txt"), cache_dir=str(cache_dir), validation_files=["a.txt"], test_files=["b.txt"])
    with pytest.raises(DataError, match="need data_path to be a folder"):
        single.prepare_data()


def test_prepare_is_idempotent(cache_dir: Path) -> None:
    dm = TextDataModule(cache_dir=str(cache_dir))
    dm.prepare_data()
    before = {path: path.stat().st_mtime_ns for path in files_under(cache_dir)}
    assert sorted(path.name for path in before) == ["manifest.json", "test.bin", "train.bin", "validation.bin"]
    dm.prepare_data()
    TextDataModule(cache_dir=str(cache_dir)).prepare_data()
    assert {path: path.stat().st_mtime_ns for path in files_under(cache_dir)} == before


def test_setup_before_prepare_data_prepares_the_cache(tmp_path: Path, cache_dir: Path) -> None:
    # Lightning calls prepare_data first; code that calls setup alone gets the cache built then.
    (tmp_path / "a.txt").write_bytes(bytes(range(32, 127)) * 50)
    dm = TextDataModule(data_path=str(tmp_path / "a.txt"), seq_len=16, cache_dir=str(cache_dir), batch_size=2)
    dm.setup("fit")
    assert (dm.cache_folder / "manifest.json").is_file()
    check_train_batch(dm)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_cache_file_is_one_error_naming_it(damage: str, tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "a.txt").write_bytes(bytes(range(32, 127)) * 50)
    dm = TextDataModule(data_path=str(tmp_path / "a.txt"), seq_len=16, cache_dir=str(cache_dir))
    dm.prepare_data()
    train = dm.cache_folder / "train.bin"
    expected = train.stat().st_size
    if damage == "delete":
        train.unlink()
        message = rf"{re.escape(str(train))}: missing, though the cache's manifest.json lists it with {expected} bytes"
    else:
        train.write_bytes(train.read_bytes()[:10])
        message = rf"{re.escape(str(train))}: holds 10 bytes but the cache's manifest.json says {expected}"
    with pytest.raises(DataError, match=message + rf"; delete {re.escape(str(dm.cache_folder))} to rebuild the cache"):
        TextDataModule(data_path=str(tmp_path / "a.txt"), seq_len=16, cache_dir=str(cache_dir)).setup("fit")


def test_cache_folder_follows_source_and_codec_parameters(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"some text " * 20)
    first = TextDataModule(data_path=str(path), cache_dir=str(cache_dir)).cache_folder
    assert TextDataModule(data_path=str(path), cache_dir=str(cache_dir)).cache_folder == first
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert TextDataModule(data_path=str(path), cache_dir=str(cache_dir)).cache_folder != first
    raster = ImageNet64DataModule(cache_dir=str(cache_dir), order="raster").cache_folder
    assert ImageNet64DataModule(cache_dir=str(cache_dir), order="patch").cache_folder != raster
    assert ImageNet64DataModule(cache_dir=str(cache_dir), order="patch", patch_size=48).cache_folder not in (
        raster,
        ImageNet64DataModule(cache_dir=str(cache_dir), order="patch").cache_folder,
    )


def test_missing_and_unusable_text_sources(tmp_path: Path, cache_dir: Path) -> None:
    cases = {
        "missing": tmp_path / "does_not_exist",
        "empty": tmp_path / "empty",
        "no_txt": tmp_path / "no_txt",
        "pg19_without_test": tmp_path / "partial_pg19",
        "two_bytes": tmp_path / "tiny.txt",
    }
    cases["empty"].mkdir()
    cases["no_txt"].mkdir()
    (cases["no_txt"] / "notes.md").write_text("markdown is not .txt")
    for split in ("train", "validation"):
        (cases["pg19_without_test"] / split).mkdir(parents=True)
        (cases["pg19_without_test"] / split / "book.txt").write_text("text")
    cases["two_bytes"].write_bytes(b"hi")
    for name, path in cases.items():
        with pytest.raises(DataError, match=str(path.name)):
            TextDataModule(data_path=str(path), seq_len=4, cache_dir=str(cache_dir)).prepare_data()
        assert files_under(cache_dir) == [], name


def test_seq_len_longer_than_the_train_split_is_reported(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "short.txt").write_bytes(b"x" * 100)
    dm = TextDataModule(data_path=str(tmp_path / "short.txt"), seq_len=512, cache_dir=str(cache_dir))
    dm.prepare_data()
    with pytest.raises(DataError, match="fewer than seq_len=512"):
        dm.setup("fit")


def test_training_windows_are_reproducible_under_seed_everything(cache_dir: Path) -> None:
    dm = prepared(TextDataModule(seq_len=256, cache_dir=str(cache_dir), batch_size=4, train_windows_per_epoch=8))
    assert len(dm.train_dataloader()) == 2

    def first_epoch(seed: int) -> list[torch.Tensor]:
        seed_everything(seed, workers=True, verbose=False)
        return [tokens for tokens, _ in dm.train_dataloader()]

    epoch = first_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(epoch, first_epoch(1)))
    assert not torch.equal(epoch[0], first_epoch(2)[0])


def test_training_windows_ignore_the_global_generators(cache_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # the run's seed keys the draws
    dm = prepared(TextDataModule(seq_len=64, cache_dir=str(cache_dir), batch_size=4, train_windows_per_epoch=12))
    loader = dm.train_dataloader()
    first = [tokens for tokens, _ in loader]
    torch.manual_seed(0)
    np.random.seed(0)
    torch.rand(1000)  # whatever else consumes or reseeds the generators
    assert all(torch.equal(a, b) for a, b in zip(first, [tokens for tokens, _ in loader]))
    loader.sampler.set_epoch(1)  # Lightning's call before the next epoch: other windows
    assert not any(torch.equal(a, b) for a, b in zip(first, [tokens for tokens, _ in loader]))


def test_a_checkpointed_position_continues_the_epoch_where_it_stopped(cache_dir: Path, monkeypatch) -> None:
    def passes(dm: TextDataModule, count: int) -> list[list[torch.Tensor]]:
        """The training loader's first `count` passes, as Lightning runs them (set_epoch first)."""
        loader = dm.train_dataloader()
        out = []
        for epoch in range(count):
            loader.sampler.set_epoch(epoch)
            out.append([tokens for tokens, _ in loader])
        return out

    def datamodule() -> TextDataModule:
        return prepared(TextDataModule(seq_len=64, cache_dir=str(cache_dir), batch_size=4, train_windows_per_epoch=16))

    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    epoch_0, epoch_1 = passes(datamodule(), 2)
    # A checkpoint taken after 3 of epoch 0's 4 batches, restored in a run seeded otherwise.
    monkeypatch.setenv("PL_GLOBAL_SEED", "99")
    resumed = datamodule()
    position = TrainPosition(seed=3, epoch=0, batches_done=3, batch_size=4, world_size=1)
    resumed.load_state_dict({"train_position": position.state_dict()})
    rest, next_epoch = passes(resumed, 2)
    assert len(rest) == 1 and torch.equal(rest[0], epoch_0[3])
    assert len(next_epoch) == 4 and all(torch.equal(a, b) for a, b in zip(next_epoch, epoch_1))


def test_random_windows_start_on_sample_boundaries(tmp_path: Path) -> None:
    # 16-bit samples 0, 1, 2, ...: a window is aligned iff its samples read back as consecutive numbers.
    path = tmp_path / "ramp.bin"
    np.arange(5000, dtype="<u2").tofile(path)
    windows = RandomWindows(path, num_bytes=10000, seq_len=64, alignment=2, num_windows=200)
    torch.manual_seed(0)
    starts = set()
    for index in range(len(windows)):
        samples = np.frombuffer(windows[index].numpy().tobytes(), dtype="<u2")
        np.testing.assert_array_equal(np.diff(samples), 1)
        starts.add(int(samples[0]))
    assert len(starts) > 150  # spread over the stream, not a few fixed offsets
    assert max(starts) <= 5000 - 32  # every window fits


def test_datasets_pickle_and_load_in_worker_processes(cache_dir: Path) -> None:
    dm = prepared(TextDataModule(seq_len=1024, cache_dir=str(cache_dir), batch_size=4, num_workers=2))
    evaluation = dm.eval_dataset("validation")
    first = evaluation[0]  # opens the memmap in this process
    assert torch.equal(pickle.loads(pickle.dumps(evaluation))[0], first)
    loader = dm.val_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    check_eval_covers_split(dm, "validation")
    check_train_batch(dm)


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def test_image_npz_file_split_by_shuffle(shared_data: Path, cache_dir: Path, tmp_path: Path) -> None:
    source = shared_data / "images" / "imagenet64_sample.npz"
    rows = np.load(source)["data"]
    dm = ImageNet64DataModule(data_path=str(source), cache_dir=str(cache_dir), batch_size=2, eval_batch_size=16)
    check_full_cycle(dm)
    held_out = expected_held_out(len(rows))
    records = {split: split_records(dm, split) for split in SPLITS}
    assert [len(records[split]) for split in SPLITS] == [len(rows) - 2 * held_out, held_out, held_out]
    raster_rows = [image_to_bytes(planar_row_to_hwc(row)).tobytes() for row in rows]
    assert Counter(sum(records.values(), [])) == Counter(raster_rows)
    # Each split keeps the source order of its images.
    for split in SPLITS:
        positions = [raster_rows.index(record) for record in records[split]]
        assert positions == sorted(positions)
    # Same seed, same splits; another seed, other test images.
    again = prepared(ImageNet64DataModule(data_path=str(source), cache_dir=str(tmp_path / "again")))
    assert all(split_bytes(again, split) == split_bytes(dm, split) for split in SPLITS)
    other = prepared(ImageNet64DataModule(data_path=str(source), cache_dir=str(tmp_path / "other"), split_seed=99))
    assert set(split_records(other, "test")) != set(records["test"])


def test_image_official_layout(shared_data: Path, tmp_path: Path, cache_dir: Path) -> None:
    rows = np.load(shared_data / "images" / "imagenet64_sample.npz")["data"]
    folder = tmp_path / "Imagenet64"
    folder.mkdir()
    # Batches 1, 2 and 10 (10 must come last, not after 1), 400 train images; val_data is the test split.
    for number, (start, stop) in {1: (0, 200), 2: (200, 300), 10: (300, 400)}.items():
        labels = np.ones(stop - start, dtype=np.int64)
        np.savez_compressed(folder / f"train_data_batch_{number}.npz", data=rows[start:stop], labels=labels)
    np.savez_compressed(folder / "val_data.npz", data=rows[400:], labels=np.ones(100))
    dm = ImageNet64DataModule(
        data_path=str(folder), order="patch", patch_size=12, cache_dir=str(cache_dir), batch_size=2
    )
    check_full_cycle(dm)
    held_out = 400 * 2 // 100  # 2% of the train images, as that is fewer than 10,000
    encoded = [image_to_bytes(planar_row_to_hwc(row), "patch", 12).tobytes() for row in rows]
    assert split_records(dm, "train") == encoded[: 400 - held_out]
    assert split_records(dm, "validation") == encoded[400 - held_out : 400]
    assert split_records(dm, "test") == encoded[400:]


def test_image_folder_is_box_resized_and_split(shared_data: Path, cache_dir: Path) -> None:
    folder = shared_data / "images" / "jpeg"
    files = sorted(folder.iterdir())
    dm = ImageNet64DataModule(data_path=str(folder), cache_dir=str(cache_dir), batch_size=2)
    check_full_cycle(dm)
    held_out = expected_held_out(len(files))
    records = {split: split_records(dm, split) for split in SPLITS}
    assert [len(records[split]) for split in SPLITS] == [len(files) - 2 * held_out, held_out, held_out]
    expected = [image_to_bytes(load_image_file(path)).tobytes() for path in files]
    assert Counter(sum(records.values(), [])) == Counter(expected)


def test_column_major_npz_reads_like_row_major(tmp_path: Path) -> None:
    rows = np.random.default_rng(4).integers(0, 256, (30, IMAGE_BYTES), dtype=np.uint8)
    caches = {}
    for layout, data in [("c", rows), ("fortran", np.asfortranarray(rows))]:
        np.savez(tmp_path / f"{layout}.npz", data=data)
        dm = ImageNet64DataModule(data_path=str(tmp_path / f"{layout}.npz"), cache_dir=str(tmp_path / layout))
        caches[layout] = [split_bytes(prepared(dm), split) for split in SPLITS]
    assert caches["fortran"] == caches["c"]


def write_truncated_npz(path: Path, rows: np.ndarray) -> None:
    np.savez_compressed(path, data=rows)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def write_npz_with_corrupt_data(path: Path, rows: np.ndarray) -> None:
    # Zip directory intact, compressed rows damaged in the middle: found while streaming the rows.
    np.savez(path, data=rows)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 100] = bytes(100)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "problem,write,message",
    [
        ("truncated", write_truncated_npz, "corrupt or truncated"),
        ("corrupt rows", write_npz_with_corrupt_data, "corrupt or truncated"),
        ("wrong key", lambda path, rows: np.savez(path, images=rows), "no 'data' array"),
        ("row length", lambda path, rows: np.savez(path, data=rows[:, :3072]), r"shape \(10, 3072\)"),
        ("dtype", lambda path, rows: np.savez(path, data=rows.astype(np.float32)), "dtype float32"),
        ("not a zip", lambda path, rows: path.write_bytes(b"PK but not really"), "corrupt or truncated"),
    ],
)
def test_bad_npz_is_reported_and_leaves_no_files(
    problem: str, write: Callable, message: str, tmp_path: Path, cache_dir: Path
) -> None:
    rows = np.random.default_rng(0).integers(0, 256, (10, IMAGE_BYTES), dtype=np.uint8)
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "a_good.npz", data=rows)  # converted first, so the failure happens mid-way
    write(folder / "b_bad.npz", rows)
    with pytest.raises(DataError, match=f"b_bad.npz.*{message}"):
        ImageNet64DataModule(data_path=str(folder), cache_dir=str(cache_dir)).prepare_data()
    assert files_under(cache_dir) == []


def test_undecodable_image_in_folder(shared_data: Path, tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((shared_data / "images" / "jpeg").iterdir())[:4]:
        shutil.copy(path, folder / path.name)
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    with pytest.raises(DataError, match="zz_broken.png"):
        ImageNet64DataModule(data_path=str(folder), cache_dir=str(cache_dir)).prepare_data()
    assert files_under(cache_dir) == []


def test_image_sources_without_images(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "official").mkdir()
    np.savez(tmp_path / "official" / "train_data_batch_1.npz", data=np.zeros((5, IMAGE_BYTES), np.uint8))
    for path, message in [
        (tmp_path / "empty", "no .npz files and no image files"),
        (tmp_path / "missing", "no such file or folder"),
        (tmp_path / "official", "no val_data.npz"),
    ]:
        with pytest.raises(DataError, match=message):
            ImageNet64DataModule(data_path=str(path), cache_dir=str(cache_dir)).prepare_data()
    assert files_under(cache_dir) == []


def test_image_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="seq_len must be 12288"):
        ImageNet64DataModule(seq_len=8192)
    with pytest.raises(ValueError, match="patch_size=13"):
        ImageNet64DataModule(order="patch", patch_size=13)
    with pytest.raises(ValueError, match="'zigzag'"):
        ImageNet64DataModule(order="zigzag")


# ------------------------------------------------------------------------------------------------
# Audio
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def audio_folder(shared_data: Path, tmp_path: Path) -> Path:
    """16 FSDD clips in speaker subfolders, plus a 44.1 kHz stereo WAV and a FLAC of our own."""
    folder = tmp_path / "audio"
    for path in sorted((shared_data / "audio" / "fsdd").glob("*_0.wav"))[:16]:
        speaker = path.stem.split("_")[1]
        (folder / speaker).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / speaker / path.name)
    rng = np.random.default_rng(2)
    soundfile.write(folder / "stereo_44k.wav", rng.uniform(-0.5, 0.5, (4410, 2)), 44100, subtype="PCM_16")
    soundfile.write(folder / "mono_16k.flac", rng.uniform(-0.5, 0.5, 1600), 16000, subtype="PCM_16")
    return folder


@pytest.mark.parametrize("encoding", ["pcm16", "mulaw8"])
def test_audio_folder_clips_become_records(audio_folder: Path, cache_dir: Path, encoding: str) -> None:
    dm = AudioDataModule(data_path=str(audio_folder), seq_len=1024, encoding=encoding, cache_dir=str(cache_dir))
    check_full_cycle(dm)
    files = sorted(path for path in audio_folder.rglob("*") if path.is_file())
    held_out = expected_held_out(len(files))
    records = {split: split_records(dm, split) for split in SPLITS}
    assert [len(records[split]) for split in SPLITS] == [len(files) - 2 * held_out, held_out, held_out]
    expected = [waveform_to_bytes(load_audio_file(path, 16000), encoding).tobytes() for path in files]
    assert Counter(sum(records.values(), [])) == Counter(expected)
    assert dm.alignment == (2 if encoding == "pcm16" else 1)


def test_audio_speakers_are_held_out_by_pattern(audio_folder: Path, cache_dir: Path) -> None:
    dm = AudioDataModule(
        data_path=str(audio_folder), seq_len=1024, sample_rate=8000, cache_dir=str(cache_dir),
        validation_files=["nicolas/*"], test_files=["theo/*", "*.flac"],
    )
    check_full_cycle(dm)
    files = sorted(path for path in audio_folder.rglob("*") if path.is_file())
    def clips(keep) -> list[bytes]:
        return [waveform_to_bytes(load_audio_file(p, 8000), "pcm16").tobytes() for p in files if keep(p.relative_to(audio_folder).as_posix())]
    assert split_records(dm, "validation") == clips(lambda name: name.startswith("nicolas/"))
    assert split_records(dm, "test") == clips(lambda name: name.startswith("theo/") or name.endswith(".flac"))
    assert split_records(dm, "train") == clips(lambda name: not name.startswith(("nicolas/", "theo/")) and not name.endswith(".flac"))


def test_audio_held_out_patterns_are_checked(audio_folder: Path, cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="give both"):
        AudioDataModule(data_path=str(audio_folder), test_files=["theo/*"])
    unmatched = AudioDataModule(data_path=str(audio_folder), cache_dir=str(cache_dir), validation_files=["nobody/*"], test_files=["theo/*"])
    with pytest.raises(DataError, match=re.escape("validation_files pattern(s) ['nobody/*'] match no audio file")):
        unmatched.prepare_data()
    both = AudioDataModule(data_path=str(audio_folder), cache_dir=str(cache_dir), validation_files=["theo/*"], test_files=["*theo*"])
    with pytest.raises(DataError, match="matched by both"):
        both.prepare_data()
    everything = AudioDataModule(data_path=str(audio_folder), cache_dir=str(cache_dir), validation_files=["*.wav"], test_files=["*.flac"])
    with pytest.raises(DataError, match="nothing is left to train on"):
        everything.prepare_data()


def test_audio_splits_are_deterministic(audio_folder: Path, tmp_path: Path) -> None:
    first = prepared(AudioDataModule(data_path=str(audio_folder), seq_len=512, cache_dir=str(tmp_path / "a")))
    second = prepared(AudioDataModule(data_path=str(audio_folder), seq_len=512, cache_dir=str(tmp_path / "b")))
    assert all(split_bytes(first, split) == split_bytes(second, split) for split in SPLITS)


def test_corrupt_wav_is_reported_and_leaves_no_files(audio_folder: Path, cache_dir: Path) -> None:
    (audio_folder / "zz_corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(64))
    with pytest.raises(DataError, match="zz_corrupt.wav"):
        AudioDataModule(data_path=str(audio_folder), cache_dir=str(cache_dir)).prepare_data()
    assert files_under(cache_dir) == []


def test_too_few_or_no_audio_files(shared_data: Path, tmp_path: Path, cache_dir: Path) -> None:
    two = tmp_path / "two"
    two.mkdir()
    for path in sorted((shared_data / "audio" / "fsdd").glob("*.wav"))[:2]:
        shutil.copy(path, two / path.name)
    (tmp_path / "empty").mkdir()
    for path, message in [
        (two, "2 audio files cannot be split"),
        (two / "0_george_0.wav", "1 audio files cannot be split"),
        (tmp_path / "empty", "no .wav or .flac files"),
        (tmp_path / "missing", "no such file or folder"),
    ]:
        with pytest.raises(DataError, match=message):
            AudioDataModule(data_path=str(path), cache_dir=str(cache_dir)).prepare_data()
    assert files_under(cache_dir) == []


def test_audio_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="multiple of 2"):
        AudioDataModule(seq_len=1001)
    with pytest.raises(ValueError, match="'flac'"):
        AudioDataModule(encoding="flac")
    assert AudioDataModule(seq_len=1001, encoding="mulaw8").alignment == 1


def test_hyperparameters_include_modality_arguments() -> None:
    hparams = dict(AudioDataModule(sample_rate=8000, encoding="mulaw8", cache_dir="unused").hparams)
    assert hparams["sample_rate"] == 8000 and hparams["encoding"] == "mulaw8" and hparams["seq_len"] == 8192
    assert dict(ImageNet64DataModule(order="patch").hparams)["order"] == "patch"
