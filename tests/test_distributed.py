"""Many processes, through Lightning's strategies: 2 real CPU processes (gloo) run `python -m multibyte`.

- `fit --trainer.strategy ddp --trainer.devices 2`: the ranks train on different windows, which
  together are exactly the windows one process with twice the batch draws; the sample callback
  takes part on every rank and the run finishes (a deadlock fails the test at its timeout).
- `validate`, `test` and `bench` under DDP give the bits per byte of one process on the same
  checkpoint: every byte scored exactly once, no window padded in twice.
- FSDP2 (`ModelParallelStrategy`) shards the model at construction and trains, validates and samples.
- A run SIGKILLed mid-epoch and resumed with `fit --ckpt_path` ends with weights bit-identical to
  an uninterrupted run's.

The callbacks below are test instruments the subprocesses load by name (tests/ is on their path).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning import Callback

from architectures import tiny

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
ARCHITECTURE = json.dumps(tiny("attention", "attention", patch_size=4, max_seq_len=64).to_dict())
DDP = ("--trainer.strategy", "ddp", "--trainer.devices", "2")
FSDP = (
    *("--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy", "--trainer.devices", "2"),
    *("--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1"),
)


# ------------------------------------------------------------------------------------------------
# Instruments loaded by the subprocesses
# ------------------------------------------------------------------------------------------------


class RecordTrainBatches(Callback):
    """Writes <folder>/rank<r>.json: every training batch this rank saw, as hex strings of its rows,
    and how many of the model's parameter elements this rank holds."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.batches: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        tokens, _ = batch
        self.batches.append([bytes(row.tolist()).hex() for row in tokens])

    def on_train_end(self, trainer, pl_module) -> None:
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in pl_module.model.parameters())
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"batches": self.batches, "local_parameters": local}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class ProcessGroupAtExit(Callback):
    """Writes <folder>/rank<r>.json at the process's exit (atexit, after `main` returned, before the
    interpreter finalizes): whether the default process group was still initialized then."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def setup(self, trainer, pl_module, stage: str) -> None:
        import atexit

        rank, path = trainer.global_rank, self.folder

        def record() -> None:
            path.mkdir(parents=True, exist_ok=True)
            initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
            (path / f"rank{rank}.json").write_text(json.dumps({"initialized": initialized}))

        atexit.register(record)


class StallAfter(Callback):
    """From the batch after `step` on (its checkpoint is written by then), touch `marker` and
    sleep: the test kills the process there."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(3600)


# ------------------------------------------------------------------------------------------------
# Running the command line
# ------------------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def start(*args: str, cwd: Path) -> subprocess.Popen:
    """`python -m multibyte ARGS` in a process group of its own (Lightning's launcher starts rank 1
    as its child), so that the whole group can be killed."""
    return subprocess.Popen(
        [sys.executable, "-m", "multibyte", *args],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def multibyte(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the command to its end; one that outlives `timeout` (a deadlock) is killed, with every
    rank, and fails the test."""
    process = start(*args, cwd=cwd)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"multibyte {args[0]} still running after {timeout} s (deadlocked?):\n{stderr[-4000:]}")
    assert process.returncode == 0, f"multibyte {args[0]} failed:\n{stderr[-4000:]}"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def book(root: Path) -> Path:
    """The first 42,000 bytes of the embedded books: the 90/5/5 split leaves 2,100 bytes each to
    validation and test, 33 windows of 64 (the last one 52 bytes), an odd number, so that
    DistributedSampler would pad one window in twice, and few enough for that to show."""
    from datamodules.text import EMBEDDED_TEXT

    path = root / "book.txt"
    if not path.exists():
        path.write_bytes(EMBEDDED_TEXT.read_bytes()[:42_000])
    return path


def common(root: Path, batch_size: int = 4) -> tuple[str, ...]:
    """Tiny MEGABYTE on a piece of the embedded books, 64-byte windows, full precision, quiet."""
    return (
        *("--seed_everything", "0", "--model.architecture", ARCHITECTURE),
        *("--model.learning_rate", "3e-3", "--model.warmup_steps", "2"),
        *("--data", "datamodules.TextDataModule", "--data.data_path", str(book(root)), "--data.seq_len", "64"),
        *("--data.batch_size", str(batch_size), "--data.eval_batch_size", "4", "--data.cache_dir", str(root / "cache")),
        *("--trainer.accelerator", "cpu", "--trainer.precision", "32-true"),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
    )


def logged(folder: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) of every row of the CSV logger's metrics.csv under `folder` that logged `name`."""
    (path,) = folder.rglob("metrics.csv")
    lines = path.read_text().splitlines()
    columns = lines[0].split(",")
    rows = [dict(zip(columns, line.split(","))) for line in lines[1:]]
    return [(int(row["step"]), float(row[name])) for row in rows if row.get(name)]


def csv_logger(folder: Path) -> tuple[str, ...]:
    return ("--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(folder))


# ------------------------------------------------------------------------------------------------
# DDP: training, the sample callback, validation and test
# ------------------------------------------------------------------------------------------------

# 24 windows per epoch: each of the 2 ranks trains on 12, 3 batches of 4; 6 steps are 2 epochs.
# Validation after each epoch scores all 33 windows of the validation split (see `book`).
WINDOWS_PER_EPOCH, STEPS = 24, 6


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    multibyte(
        "fit",
        *common(root),
        *DDP,
        *("--data.train_windows_per_epoch", str(WINDOWS_PER_EPOCH), "--trainer.max_steps", str(STEPS)),
        *("--trainer.default_root_dir", str(root / "run"), *csv_logger(root / "run")),
        *("--trainer.callbacks+=multibyte.callbacks.SampleCallback", "--trainer.callbacks.num_samples", "2"),
        "--trainer.callbacks.max_new_bytes=8",
        "--trainer.callbacks+=test_distributed.RecordTrainBatches",
        *("--trainer.callbacks.folder", str(root / "record")),
        "--trainer.callbacks+=test_distributed.ProcessGroupAtExit",
        *("--trainer.callbacks.folder", str(root / "at_exit")),
        cwd=root,
    )
    return root


def test_every_rank_leaves_its_process_group_before_the_interpreter_ends(ddp_fit: Path):
    # (a Gloo group left to finalization can abort the process after a successful run)
    for rank in (0, 1):
        assert json.loads((ddp_fit / "at_exit" / f"rank{rank}.json").read_text()) == {"initialized": False}


def test_fit_with_the_sample_callback_finishes_under_ddp(ddp_fit: Path):
    samples = sorted((ddp_fit / "run").rglob("samples/validation_*"))
    assert [folder.name for folder in samples] == ["validation_0001_step_3", "validation_0002_step_6"]
    for folder in samples:  # rank 0 alone wrote: two samples and their info, nothing twice
        written = sorted(path.name for path in folder.iterdir())
        assert written == ["sample_000.txt", "sample_001.txt", "sample_info.json"]
    assert len(logged(ddp_fit / "run", "test/bpb")) == 1  # the test after fit ran, on both ranks


def test_ranks_draw_different_windows_that_together_are_one_process_batches(ddp_fit: Path, monkeypatch):
    from datamodules import TextDataModule

    ranks = [json.loads((ddp_fit / "record" / f"rank{r}.json").read_text())["batches"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == STEPS
    for step, (rank0, rank1) in enumerate(zip(*ranks)):
        assert not set(rank0) & set(rank1), f"step {step}: both ranks trained on the same window"
    # One process drawing the same epochs with the global batch (2 ranks x 4 windows).
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # what --seed_everything 0 set in the run
    single = TextDataModule(
        data_path=str(book(ddp_fit)),
        seq_len=64,
        batch_size=8,
        train_windows_per_epoch=WINDOWS_PER_EPOCH,
        cache_dir=str(ddp_fit / "cache"),
    )
    loader = single.train_dataloader()
    expected = []
    for epoch in range(STEPS // len(loader)):
        loader.sampler.set_epoch(epoch)
        expected += [[bytes(row.tolist()).hex() for row in tokens] for tokens, _ in loader]
    for step, (rank0, rank1, together) in enumerate(zip(*ranks, expected)):
        assert sorted(rank0 + rank1) == sorted(together), f"step {step}: not the single-process global batch"
    assert ranks[0][0] != ranks[0][3]  # epoch 1 draws other windows than epoch 0


def test_validate_and_test_under_ddp_equal_one_process(ddp_fit: Path):
    (checkpoint,) = (ddp_fit / "run").rglob("best-*.ckpt")
    scores = {}
    for name, strategy in (("ddp", DDP), ("single", ("--trainer.devices", "1"))):
        for command in ("validate", "test"):
            folder = ddp_fit / f"{command}-{name}"
            if (name, command) == ("ddp", "test"):  # the fit already tested this checkpoint under DDP
                scores[name, command] = logged(ddp_fit / "run", "test/bpb")[0][1]
                continue
            arguments = (*common(ddp_fit), *strategy, *csv_logger(folder), "--ckpt_path", str(checkpoint))
            multibyte(command, *arguments, cwd=ddp_fit)
            ((_, scores[name, command]),) = logged(folder, f"{'val' if command == 'validate' else 'test'}/bpb")
    for command in ("validate", "test"):
        assert scores["ddp", command] == pytest.approx(scores["single", command], rel=1e-6, abs=0)
    # and the DDP fit's own validation of these weights, the score that made the checkpoint "best"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)  # a file this test's run wrote
    (during_fit,) = [state["best_model_score"] for state in saved["callbacks"].values() if "best_model_score" in state]
    assert float(during_fit) == pytest.approx(scores["single", "validate"], rel=1e-6, abs=0)


def test_bench_under_ddp_equals_one_process(ddp_fit: Path):
    (checkpoint,) = (ddp_fit / "run").rglob("best-*.ckpt")
    reports, outputs = {}, {}
    for name, strategy in (("ddp", DDP), ("single", ("--trainer.devices", "1"))):
        result = multibyte(
            "bench",
            *common(ddp_fit),
            *strategy,
            *("--trainer.logger", "false", "--ckpt_path", str(checkpoint), "--adapt", "false"),
            *("--inference", "[basic, sliding+strided]", "--output_dir", str(ddp_fit / f"bench-{name}")),
            cwd=ddp_fit,
        )
        reports[name] = json.loads((ddp_fit / f"bench-{name}" / "bench-text-test.json").read_text())
        outputs[name] = result.stdout
    assert outputs["ddp"].count("| model |") == 1  # rank 0 alone printed (and wrote) the report
    rows = {name: {row["method"]: row for row in report["results"]} for name, report in reports.items()}
    assert rows["ddp"].keys() == rows["single"].keys() and "xz -9e" in rows["ddp"]
    for method, row in rows["single"].items():
        other = rows["ddp"][method]
        assert other["bits_per_byte"] == pytest.approx(row["bits_per_byte"], rel=1e-6, abs=0), method
        if row["kind"] == "model":
            assert other["scored_bytes"] == row["scored_bytes"] == 2100  # the whole test split
            assert other["cost"] == row["cost"]


def test_bench_adapt_under_ddp_equals_one_process(ddp_fit: Path):
    """Dynamic evaluation under DDP: each rank scores its share of every batch, the ranks' gradients
    are summed and every rank makes the same update, so the bits are one process's (up to the
    order of floating-point sums, which the adaptation carries forward)."""
    (checkpoint,) = (ddp_fit / "run").rglob("best-*.ckpt")
    reports = {}
    for name, strategy in (("ddp", DDP), ("single", ("--trainer.devices", "1"))):
        multibyte(
            "bench",
            *common(ddp_fit),
            *strategy,
            *("--trainer.logger", "false", "--ckpt_path", str(checkpoint), "--codecs", "false"),
            *("--adapt", "true", "--adapt_options.learning_rate", "3e-3", "--adapt_options.windows_per_step", "2"),
            *("--inference", "[basic, sliding]", "--output_dir", str(ddp_fit / f"bench-adapt-{name}")),
            cwd=ddp_fit,
        )
        reports[name] = json.loads((ddp_fit / f"bench-adapt-{name}" / "bench-text-test.json").read_text())
    rows = {name: {row["method"]: row for row in report["results"]} for name, report in reports.items()}
    # text mixes with the byte n-gram by default (basic only); under DDP the ranks share the
    # model's per-byte probabilities and compute the same mixture
    assert set(rows["ddp"]) == set(rows["single"]) == {
        "model + adapt", "model + adapt + n-gram", "model + sliding window + adapt"
    }
    for method, row in rows["single"].items():
        assert rows["ddp"][method]["bits_per_byte"] == pytest.approx(row["bits_per_byte"], rel=1e-4, abs=0), method
        assert rows["ddp"][method]["scored_bytes"] == row["scored_bytes"] == 2100


# ------------------------------------------------------------------------------------------------
# FSDP2: sharded at construction
# ------------------------------------------------------------------------------------------------


def test_fsdp_shards_the_model_trains_validates_and_samples(tmp_path: Path):
    multibyte(
        "fit",
        *common(tmp_path),
        *FSDP,
        *("--data.train_windows_per_epoch", "16", "--trainer.max_steps", "4"),
        *("--trainer.default_root_dir", str(tmp_path / "run"), *csv_logger(tmp_path / "run")),
        *("--test_after_fit", "false"),
        *("--trainer.callbacks+=multibyte.callbacks.SampleCallback", "--trainer.callbacks.num_samples", "2"),
        "--trainer.callbacks.max_new_bytes=8",
        "--trainer.callbacks+=test_distributed.RecordTrainBatches",
        *("--trainer.callbacks.folder", str(tmp_path / "record")),
        cwd=tmp_path,
    )
    from multibyte.model import HierarchicalByteModel

    held = [json.loads((tmp_path / "record" / f"rank{r}.json").read_text())["local_parameters"] for r in (0, 1)]
    model = HierarchicalByteModel(tiny("attention", "attention", patch_size=4, max_seq_len=64))
    parameters = sum(p.numel() for p in model.parameters())
    assert sum(held) == parameters and max(held) < 0.6 * parameters  # each rank holds about half
    # 16 windows: 8 per rank, 2 steps an epoch; validation (and sampling) after steps 2 and 4.
    scores = [value for _, value in logged(tmp_path / "run", "val/bpb")]
    assert len(scores) == 2 and all(0 < value < 9 for value in scores)
    samples = sorted((tmp_path / "run").rglob("samples/validation_*"))
    assert [folder.name for folder in samples] == ["validation_0001_step_2", "validation_0002_step_4"]
    assert all(len(list(folder.glob("sample_*.txt"))) == 2 for folder in samples)


# ------------------------------------------------------------------------------------------------
# Resume after SIGKILL
# ------------------------------------------------------------------------------------------------


def test_a_run_killed_mid_epoch_and_resumed_reaches_the_uninterrupted_weights(tmp_path: Path):
    # 16 windows of 2 per step: 8 steps an epoch. Checkpoints every 5 steps; the run is killed
    # after step 10 (epoch 1, 2 batches in), resumed, and goes on through epoch 2 to step 20.
    args = (
        *common(tmp_path, batch_size=2),
        *("--data.train_windows_per_epoch", "16", "--trainer.max_steps", "20", "--trainer.limit_val_batches", "0"),
        *("--trainer.logger", "false", "--test_after_fit", "false"),
        *("--checkpoint.monitor", "null", "--checkpoint.save_top_k", "-1", "--checkpoint.every_n_train_steps", "5"),
        *("--checkpoint.filename", "step{step}"),
    )
    multibyte("fit", *args, "--trainer.default_root_dir", str(tmp_path / "whole"), cwd=tmp_path)

    marker = tmp_path / "stalled"
    killed = start(
        "fit", *args, "--trainer.default_root_dir", str(tmp_path / "killed"),
        *("--trainer.callbacks+=test_distributed.StallAfter", "--trainer.callbacks.step", "10"),
        *("--trainer.callbacks.marker", str(marker)),
        cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    _, stderr = killed.communicate()
    assert marker.exists(), f"the run never reached step 10:\n{stderr[-3000:]}"
    assert killed.returncode == -signal.SIGKILL
    (checkpoint,) = (tmp_path / "killed").rglob("step10.ckpt")
    assert not list((tmp_path / "killed").rglob("step15.ckpt"))

    resumed = multibyte(
        "fit", *args, "--trainer.default_root_dir", str(tmp_path / "killed"), "--ckpt_path", str(checkpoint),
        cwd=tmp_path,
    )  # fmt: skip
    assert "not resumable" not in resumed.stderr  # Lightning's warning about replayed data does not apply

    def final_weights(run: str) -> dict[str, torch.Tensor]:
        (path,) = (tmp_path / run).rglob("step20.ckpt")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # written by this test's runs
        assert checkpoint["global_step"] == 20
        return checkpoint["state_dict"]

    whole, killed_and_resumed = final_weights("whole"), final_weights("killed")
    assert whole.keys() == killed_and_resumed.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, killed_and_resumed[name]), f"{name} differs after resuming"


# ------------------------------------------------------------------------------------------------
# The shipped multi-node config
# ------------------------------------------------------------------------------------------------


def test_multinode_config_layers_ddp_over_a_model_config(tmp_path: Path):
    printed = multibyte("fit", "--config", "text.yaml", "--config", "multinode.yaml", "--print_config", cwd=tmp_path)
    trainer = printed.stdout.split("\ntrainer:\n", 1)[1]
    for setting in ("strategy: ddp", "num_nodes: 2", "devices: 8", "use_distributed_sampler: false"):
        assert f"  {setting}\n" in trainer
    assert "patch_size: 8" in printed.stdout  # text.yaml's model, untouched
    from multibyte.cli import shipped_config_dir

    comments = (shipped_config_dir() / "multinode.yaml").read_text()
    assert "torchrun --nnodes" in comments and "srun python -m multibyte fit" in comments
