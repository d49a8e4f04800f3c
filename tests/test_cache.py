"""The data cache under faults and concurrency, with real processes.

- A preparation SIGKILLed half-way (while streaming records, or inside `commit()` just before
  the manifest) is never reused: the next `prepare_data` deletes its `.partial` temporaries and
  the split files it had moved into place, and builds the same cache a clean run builds.
- Two processes preparing the same cache at once end with one correct cache, converted once: the
  second waits on the folder's lock, then finds the cache complete.
- The lock itself excludes other processes, across the deletion and re-creation of its file.

The child processes run the real `prepare_data`; the only thing a child changes is to wait at a
chosen point (so that the kill or the overlap happens there), recorded in an events file.
"""

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datamodules import ImageNet64DataModule
from datamodules.base import MANIFEST_NAME, CacheLock
from multibyte.codecs import IMAGE_BYTES

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 40
STARTUP_SECONDS = 180  # a child imports torch and lightning: slow on a busy machine

CHILD = r'''
import json, os, sys, time
from pathlib import Path

import datamodules.base as base
from datamodules import ImageNet64DataModule

mode, source, cache, workdir = sys.argv[1:]
workdir = Path(workdir)


def log(event):
    with open(workdir / "events.jsonl", "a") as file:
        file.write(json.dumps({"pid": os.getpid(), "event": event, "time": time.time()}) + "\n")


def wait_to_be_killed():
    log("stalled")
    (workdir / "ready").touch()
    while True:
        time.sleep(1)


if mode == "kill-while-streaming":  # after 10 of the 40 images
    append_record = base.CacheWriter.append_record

    def append_then_stall(self, split, record):
        append_record(self, split, record)
        if sum(map(self.num_bytes, base.SPLITS)) >= 10 * 12288:
            wait_to_be_killed()

    base.CacheWriter.append_record = append_then_stall
elif mode == "kill-in-commit":  # the splits are in place, the manifest is about to be
    replace = os.replace

    def replace_unless_manifest(src, dst):
        if Path(dst).name == base.MANIFEST_NAME:
            wait_to_be_killed()
        replace(src, dst)

    os.replace = replace_unless_manifest
elif mode == "race":  # a slow conversion, and a common start signal
    convert = ImageNet64DataModule._write_splits

    def logged_slow_convert(self, source, writer):
        log("convert-start")
        time.sleep(2.0)
        convert(self, source, writer)
        log("convert-end")

    ImageNet64DataModule._write_splits = logged_slow_convert
    (workdir / f"armed-{os.getpid()}").touch()
    while not (workdir / "go").exists():
        time.sleep(0.005)

dm = ImageNet64DataModule(data_path=source, cache_dir=cache)
log("enter")
dm.prepare_data()
log("done")
print(json.dumps({name: dm.split_num_bytes(name) for name in base.SPLITS}))
'''


def write_source(folder: Path) -> Path:
    folder.mkdir()
    rows = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, IMAGE_BYTES), dtype=np.uint8)
    np.savez(folder / "images.npz", data=rows)
    return folder / "images.npz"


def start_child(workdir: Path, mode: str, source: Path, cache: Path) -> subprocess.Popen:
    script = workdir / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), mode, str(source), str(cache), str(workdir)],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(paths: list[Path], children: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while not all(path.exists() for path in paths):
        for child in children:
            if child.poll() is not None:
                pytest.fail(f"child exited early with {child.returncode}:\n{child.stderr.read()}")
        if time.monotonic() > deadline:
            for child in children:
                child.kill()
            pytest.fail(f"children did not reach {[path.name for path in paths]} in {STARTUP_SECONDS} s")
        time.sleep(0.05)


def events(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "events.jsonl").read_text().splitlines()]


def cache_contents(cache: Path) -> dict[str, str]:
    """Every file under `cache` (relative name -> sha256): the whole state a run leaves."""
    return {
        path.relative_to(cache).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(cache.rglob("*"))
        if path.is_file()
    }


def prepared_reference(source: Path, cache: Path) -> dict[str, str]:
    ImageNet64DataModule(data_path=str(source), cache_dir=str(cache)).prepare_data()
    return cache_contents(cache)


def prepare_within(dm: ImageNet64DataModule, seconds: float) -> None:
    """prepare_data, failing the test instead of waiting forever (say on a lock nobody releases)."""

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"prepare_data still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(seconds))
    try:
        dm.prepare_data()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill-while-streaming", "kill-in-commit"])
def test_a_killed_preparation_is_never_reused_and_is_cleaned_up(mode: str, tmp_path: Path) -> None:
    source = write_source(tmp_path / "source")
    cache = tmp_path / "cache"
    child = start_child(tmp_path, mode, source, cache)
    wait_for([tmp_path / "ready"], [child])
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL

    dm = ImageNet64DataModule(data_path=str(source), cache_dir=str(cache))
    folder = dm.cache_folder
    lock = folder.parent / f"{folder.name}.lock"
    left = sorted(path.name for path in folder.iterdir())
    assert MANIFEST_NAME not in left and lock.exists()  # the killed writer held the lock
    assert [name for name in left if name.endswith(".partial")], left
    if mode == "kill-in-commit":
        assert {"train.bin", "validation.bin", "test.bin", "train.offsets.npy"} <= set(left), left
        (folder / "train.bin").write_bytes(b"stale bytes that must not survive")
    else:
        assert not [name for name in left if not name.endswith(".partial")], left

    prepare_within(dm, 120)
    # The same files, byte for byte, as a clean run leaves (the folder name does not depend on
    # cache_dir): no temporaries, no stale splits, no lock file.
    assert cache_contents(cache) == prepared_reference(source, tmp_path / "ref")


@pytest.mark.slow
def test_two_processes_preparing_one_cache_at_once_make_one_correct_cache(tmp_path: Path) -> None:
    source = write_source(tmp_path / "source")
    cache = tmp_path / "cache"
    children = [start_child(tmp_path, "race", source, cache) for _ in range(2)]
    wait_for([tmp_path / f"armed-{child.pid}" for child in children], children)
    (tmp_path / "go").touch()
    outputs = [child.communicate(timeout=STARTUP_SECONDS) for child in children]
    for child, (stdout, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr

    log = events(tmp_path)
    enters = [event["time"] for event in log if event["event"] == "enter"]
    conversions = [event for event in log if event["event"] == "convert-start"]
    (conversion_end,) = [event["time"] for event in log if event["event"] == "convert-end"]
    assert len(enters) == 2 and max(enters) < conversion_end, "the two preparations did not overlap"
    assert len(conversions) == 1, "the cache was converted twice"
    # Both processes read the same complete cache, equal to one prepared alone.
    assert json.loads(outputs[0][0]) == json.loads(outputs[1][0])
    assert cache_contents(cache) == prepared_reference(source, tmp_path / "ref")  # nothing else left either


def increment_under_lock(folder: Path, times: int) -> None:
    """Read-modify-write a counter `times` times, each under the lock: lost updates mean two holders."""
    counter = folder / "counter"
    for _ in range(times):
        with CacheLock(folder):
            value = int(counter.read_text())
            time.sleep(0.0005)  # widen the window in which a second holder would interleave
            counter.write_text(str(value + 1))


def test_the_cache_lock_excludes_other_processes(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "text-0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "counter").write_text("0")
    context = multiprocessing.get_context("fork")  # the children only lock and touch files
    workers = [context.Process(target=increment_under_lock, args=(folder, 100)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert int((folder / "counter").read_text()) == 400
    assert not (folder.parent / f"{folder.name}.lock").exists()  # deleted by the last holder
