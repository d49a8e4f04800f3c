"""`MultibyteTrainer`: Lightning's Trainer plus the subcommands that only byte models have.

LightningCLI turns every public method listed in `EXTRA_SUBCOMMANDS` into a subcommand whose flags
are the method's parameters (so `python -m multibyte sample --help` documents them). Each method
stays thin: it loads what it needs and hands over to the module that does the work.
"""

from __future__ import annotations

from lightning import Trainer

# Subcommand name -> the method arguments LightningCLI fills in itself (not exposed as flags).
EXTRA_SUBCOMMANDS: dict[str, set[str]] = {}


class MultibyteTrainer(Trainer):
    pass
