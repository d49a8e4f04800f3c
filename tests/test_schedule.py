"""The learning-rate schedule: warm-up then cosine decay, by steps or by the time budget
(`ByteLM(schedule_by_time=True)` with `trainer.max_time`), with worked examples."""

import math

import lightning as L
import pytest
from lightning.pytorch.callbacks import Timer

from multibyte.config import megabyte
from multibyte.training import ByteLM, warmup_cosine


def test_warmup_cosine_worked_example():
    # Warm-up of 2 steps, 12 steps in all, ending at 0.1: steps 0 and 1 ramp to 1; the decay
    # covers steps 2..12, so step 7 is half-way: 0.1 + 0.9 · (1 + cos(π/2)) / 2 = 0.55.
    values = [warmup_cosine(step, 2, 12, 0.1) for step in (0, 1, 2, 7, 12, 20)]
    assert values == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])


def test_time_fraction_moves_the_decay_when_it_is_further_along():
    # At step 2 (no step progress) a time budget half used puts the decay half-way; all used,
    # at the end. A time fraction behind the steps changes nothing; warm-up ignores it.
    assert warmup_cosine(2, 2, 12, 0.1, time_fraction=0.5) == pytest.approx(0.55)
    assert warmup_cosine(2, 2, 12, 0.1, time_fraction=1.0) == pytest.approx(0.1)
    assert warmup_cosine(7, 2, 12, 0.1, time_fraction=0.2) == pytest.approx(0.55)
    assert warmup_cosine(0, 2, 12, 0.1, time_fraction=0.9) == pytest.approx(0.5)
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert warmup_cosine(3, 2, 12, 0.1, time_fraction=0.25) == pytest.approx(quarter)


def module_on_trainer(schedule_by_time: bool, **trainer_args) -> ByteLM:
    module = ByteLM(megabyte(4, 32, 32, 1, 2, 16, 1, 2), schedule_by_time=schedule_by_time)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, **trainer_args)
    return module


def test_time_fraction_is_the_share_of_max_time_used(monkeypatch):
    module = module_on_trainer(True, max_time={"seconds": 100})
    (timer,) = [c for c in module.trainer.callbacks if isinstance(c, Timer)]
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": 30.0)
    monkeypatch.setattr(timer, "time_remaining", lambda stage="train": 70.0)
    assert module._time_fraction() == pytest.approx(0.3)
    # The scheduler the module configures reads it: 30% of the time at step 0 after warm-up.
    module.hparams.warmup_steps = 0
    _ = module.model  # built on first use outside fit
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert scheduler.lr_lambdas[0](0) == pytest.approx(warmup_cosine(0, 0, 100_000, module.hparams.min_lr_ratio, 0.3))


def test_no_time_fraction_without_the_option_or_a_time_limit(monkeypatch):
    assert module_on_trainer(False, max_time={"seconds": 100})._time_fraction() == 0.0
    assert module_on_trainer(True, max_steps=10)._time_fraction() == 0.0
    assert ByteLM(megabyte(4, 32, 32, 1, 2, 16, 1, 2), schedule_by_time=True)._time_fraction() == 0.0
