"""`MultibyteTrainer`: Lightning's Trainer plus the subcommands that only byte models have.

LightningCLI turns every public method listed in `EXTRA_SUBCOMMANDS` into a subcommand whose flags
are the method's parameters (so `python -m multibyte sample --help` documents them). Each method
stays thin: it loads what it needs and hands over to the module that does the work.

A subword model (the BPE baseline) goes through the same subcommands: the tokenizer comes with its
checkpoint (or export directory), data encoded by another tokenizer is refused, `sample` encodes
the prompt and decodes what it generates, `bench` reports bits per byte, and `compress` codes the
token ids.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

from lightning import LightningDataModule, LightningModule, Trainer
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from multibyte.adaptation import AdaptConfig, adapt_summary
from multibyte.lpc_mixing import LpcConfig
from multibyte.mixing import MixingConfig
from multibyte.mixing import check as check_mixing
from multibyte.mixing import describe as describe_mixing
from multibyte.ngram_mixing import NgramConfig
from multibyte.checkpoints import (
    SafeCheckpointIO,
    check_same_tokenizer,
    checkpoint_hparams,
    checkpoint_tokenizer,
    export_checkpoint,
    is_export_dir,
    load_checkpoint,
    load_module_weights,
    plain,
    safe_globals,
)
from multibyte.decoders import check_writable
from multibyte.data_spec import data_spec_of
from multibyte.model import HierarchicalByteModel
from multibyte.weight_formats import matrix_format, round_matrices

# Subcommand name -> the method arguments LightningCLI fills in itself (not exposed as flags).
EXTRA_SUBCOMMANDS: dict[str, set[str]] = {
    "sample": {"model", "datamodule"},
    "bench": {"model", "datamodule"},
    "compress": {"model", "datamodule"},
    "decompress": {"model", "datamodule"},
    "export": {"model", "datamodule"},
}

InferenceMode = Literal["basic", "sliding", "strided", "sliding+strided"]

# Whether `bench` and `compress` adapt (dynamic evaluation) when --adapt is not given, by the
# modality of --data: on where it was measured better on validation data (README "Dynamic
# evaluation": text and audio); opt-in (--adapt true) where it has not been measured (images).
ADAPT_BY_DEFAULT = {"text": True, "audio": True, "image": False}


def _switch(value: Optional[bool], modality: Optional[str], defaults: dict[str, bool]) -> bool:
    """A switch as given, or None: the modality's default (off when the modality is unknown)."""
    if value is not None:
        return value
    return defaults.get(modality, False) if modality else False


def adapt_wanted(adapt: Optional[bool], modality: Optional[str]) -> bool:
    """--adapt as given, or None: the modality's default (ADAPT_BY_DEFAULT)."""
    return _switch(adapt, modality, ADAPT_BY_DEFAULT)


# Which second predictor `bench` and `compress` mix the model with when neither --ngram nor --lpc
# is true: the one measured better on validation data (README "Mixing with a byte n-gram" and
# "Mixing with a linear predictor"): a byte n-gram for text, a linear predictor of samples for
# audio, none for images.
MIXING_BY_DEFAULT = {"text": "ngram", "audio": "lpc"}


def mixing_wanted(
    ngram: Optional[bool],
    ngram_options: NgramConfig,
    lpc: Optional[bool],
    lpc_options: LpcConfig,
    modality: Optional[str],
) -> tuple[Optional[MixingConfig], bool]:
    """The mixing --ngram / --lpc ask for, or the modality's default (MIXING_BY_DEFAULT) unless its
    switch is false; and whether it was asked for (then refused where it cannot run, while a
    default one is skipped there)."""
    if ngram and lpc:
        raise ValueError("--ngram true and --lpc true: the model is mixed with one second predictor; choose one")
    if ngram or lpc:
        return (ngram_options if ngram else lpc_options), True
    default = MIXING_BY_DEFAULT.get(modality or "")
    if default == "ngram" and ngram is None:
        return ngram_options, False
    if default == "lpc" and lpc is None:
        return lpc_options, False
    return None, False


def _writable(paths: list[Path], overwrite: bool) -> None:
    """`check_writable`, with the flag that allows replacing named in the error."""
    for path in paths:
        try:
            check_writable([path], overwrite)
        except FileExistsError:
            raise FileExistsError(f"{path}: already exists (--overwrite true replaces it)") from None


def _set_up_and_call(strategy: Any, function: Any, *args: Any, **kwargs: Any) -> Any:
    strategy.setup_environment()  # this process's device and its torch.distributed process group
    return function(*args, **kwargs)


class MultibyteTrainer(Trainer):
    def __init__(self, *args: Any, use_distributed_sampler: bool = False, **kwargs: Any) -> None:
        """Lightning's Trainer with the byte suite's defaults.

        Args:
            use_distributed_sampler: keep False: the byte datamodules share windows out between
                processes themselves (datamodules/windows.py), without the padding by which
                DistributedSampler would score some evaluation windows twice.
        """
        super().__init__(*args, use_distributed_sampler=use_distributed_sampler, **kwargs)

    # ---------------------------------------------------------------- fit / validate / test / predict
    # Lightning's own entry points, with every checkpoint read made safe: the strategy's reader
    # becomes `SafeCheckpointIO` (weights_only, the config dataclasses allowed, one clear error
    # naming the file, atomic writes), and any other reader a strategy uses still runs with
    # weights_only=True and the same allowed classes. An `export` directory is accepted wherever
    # a checkpoint is.

    @contextlib.contextmanager
    def _safe_checkpoint_reads(self, weights_only: Optional[bool]) -> Iterator[None]:
        if weights_only is False:
            raise ValueError(
                "--weights_only false is not supported: checkpoints are read with weights_only=True "
                "(tensors and the multibyte config classes), never as arbitrary pickles"
            )
        if type(self.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
            self.strategy.checkpoint_io = SafeCheckpointIO()
        with safe_globals():
            yield

    def fit(
        self,
        model: LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: Optional[LightningDataModule] = None,
        ckpt_path: Optional[Union[str, Path]] = None,
        weights_only: Optional[bool] = None,
    ) -> None:
        """Train the model; with --ckpt_path, resume a run.

        Args:
            ckpt_path: resume from this Lightning checkpoint (weights, optimizer, schedule, step
                counter, callbacks) or "last" / "hpc"; settings that contradict the checkpoint's
                architecture or optimisation are refused. An `export` directory instead starts a
                new run from its weights (fresh optimizer, schedule and step counter).
            weights_only: checkpoints are always read with weights_only=True; false is refused.
        """
        if ckpt_path is not None and is_export_dir(ckpt_path):
            self._start_from_weights(model, ckpt_path)
            ckpt_path = None
        with self._safe_checkpoint_reads(weights_only):
            return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only=True)

    def validate(
        self,
        model: Optional[LightningModule] = None,
        dataloaders: Any = None,
        ckpt_path: Optional[Union[str, Path]] = None,
        verbose: bool = True,
        datamodule: Optional[LightningDataModule] = None,
        weights_only: Optional[bool] = None,
    ) -> list[dict[str, float]]:
        """Score the validation split.

        Args:
            ckpt_path: a Lightning checkpoint or `export` directory, or "best" / "last".
            verbose: print the results.
            weights_only: checkpoints are always read with weights_only=True; false is refused.
        """
        with self._safe_checkpoint_reads(weights_only):
            return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only=True)

    def test(
        self,
        model: Optional[LightningModule] = None,
        dataloaders: Any = None,
        ckpt_path: Optional[Union[str, Path]] = None,
        verbose: bool = True,
        datamodule: Optional[LightningDataModule] = None,
        weights_only: Optional[bool] = None,
    ) -> list[dict[str, float]]:
        """Score the test split.

        Args:
            ckpt_path: a Lightning checkpoint or `export` directory, or "best" / "last".
            verbose: print the results.
            weights_only: checkpoints are always read with weights_only=True; false is refused.
        """
        with self._safe_checkpoint_reads(weights_only):
            return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only=True)

    def predict(
        self,
        model: Optional[LightningModule] = None,
        dataloaders: Any = None,
        datamodule: Optional[LightningDataModule] = None,
        return_predictions: Optional[bool] = None,
        ckpt_path: Optional[Union[str, Path]] = None,
        weights_only: Optional[bool] = None,
    ) -> Any:
        """Run the model's predict_step over the predict dataloader.

        Args:
            return_predictions: collect and return the predictions.
            ckpt_path: a Lightning checkpoint or `export` directory, or "best" / "last".
            weights_only: checkpoints are always read with weights_only=True; false is refused.
        """
        with self._safe_checkpoint_reads(weights_only):
            return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only=True)

    def _start_from_weights(self, model: LightningModule, folder: Union[str, Path]) -> None:
        """Load an export directory's weights into `model` for a new run, after checking that the
        configured architecture is the one they were trained for."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        from multibyte.training import describe_conflicts, hparam_conflicts

        if isinstance(self.strategy, ModelParallelStrategy):
            # The weights go in before fit, into a model built whole; FSDP2 shards it only when
            # it builds the model itself (ByteLM.configure_model, under the strategy's mesh).
            raise ValueError(
                f"fit --ckpt_path {folder}: starting from an export directory is not supported with "
                f"ModelParallelStrategy; use ddp or fsdp, or a Lightning checkpoint"
            )
        checkpoint = load_checkpoint(folder)
        conflicts = hparam_conflicts(plain(dict(model.hparams)), checkpoint_hparams(checkpoint), resuming=False)
        if conflicts:
            raise ValueError(describe_conflicts(folder, conflicts, resuming=False))
        load_module_weights(model, folder, checkpoint)
        tokenizer = checkpoint_tokenizer(checkpoint, folder)
        if tokenizer is not None:  # the data's is compared with it when fit sets the model up
            model.tokenizer = tokenizer

    # ---------------------------------------------------------------- sample
    def sample(
        self,
        model: LightningModule,
        ckpt_path: str,
        datamodule: Optional[LightningDataModule] = None,
        output_dir: Optional[str] = None,
        num_samples: int = 4,
        batch_size: int = 4,
        max_new_bytes: Optional[int] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: int = 0,
        stop_byte: Optional[int] = None,
        prompt: Optional[str] = None,
        prompt_file: Optional[str] = None,
        prompt_rows: int = 32,
        prompt_seconds: Optional[float] = None,
        compile: bool = False,
        native: bool = True,
        dtype: Optional[Literal["float32", "bfloat16"]] = None,
        quantize: Optional[Literal["int8"]] = None,
        overwrite: bool = False,
    ) -> list[str]:
        """Generate from a checkpoint: 64x64 PNGs (and a grid), WAVs or UTF-8 text, by modality.

        The architecture comes from the config (and the checkpoint's hyperparameters), the weights
        from --ckpt_path, the output format (modality, image order, audio rate and encoding) from
        --data. Each prompt is continued num_samples times; the files keep prompt + continuation.
        A subword model (BPE) encodes the prompt with its checkpoint's tokenizer, generates tokens
        and writes the bytes they decode to.

        Args:
            ckpt_path: the Lightning checkpoint whose weights to sample from.
            output_dir: folder for the files; None means <trainer.default_root_dir>/samples.
                Existing files are never replaced unless --overwrite true.
            num_samples: how many samples to write.
            batch_size: samples generated side by side (batch i uses seed + i).
            max_new_bytes: bytes to generate per sample; for a subword model, new TOKENS (each
                decodes to one or more bytes). None fills the model's context (for images: the
                rest of the 64x64 image).
            temperature: softmax temperature; 0 is greedy.
            top_k: sample only among the k likeliest bytes (tokens).
            top_p: sample only among the likeliest bytes (tokens) whose probabilities add up to top_p.
            seed: the same seed (and batch size) gives the same bytes.
            stop_byte: end a sample after this byte value (e.g. 10 for a newline); byte models only.
            prompt: text to continue (its UTF-8 bytes; a subword model reads their tokens).
            prompt_file: a file to continue: text's raw bytes (a subword model reads their
                tokens), an image whose top prompt_rows rows are completed, or a WAV/FLAC file
                continued from its end.
            prompt_rows: pixel rows of the prompt image to keep (images only).
            prompt_seconds: keep only the first seconds of the prompt audio (audio only).
            compile: torch.compile each step together with its draw, a few bytes per call
                (CUDA graphs on a GPU). On a CPU compiling costs tens of seconds up front and
                its steps are slower than the native kernels' (benchmarks/sample_speed.py,
                `batch1_compiled`): for GPUs, or CPUs where the kernels cannot be built.
            native: on a CPU, run the model's steps as native C kernels (multibyte/kernels, built
                on first use) where they can: fp32 weights, at most 32 rows; whole runs of
                steps and draws are one call. Several times faster at batch 1
                (benchmarks/sample_speed.py); equal to PyTorch up to rounding.
                false: every op in PyTorch.
            dtype: weights and caches while sampling; None picks the fastest measured: bfloat16
                weights for a model trained in bf16 (the trainer's precision), else float32; on a
                CPU from batch 33 bfloat16 where the CPU has native bf16 arithmetic. On a CPU
                up to batch 32, bfloat16 means bf16 weights with fp32 arithmetic and caches (the
                native kernels read the weights in half the bytes). Changes the sampled bytes.
            quantize: int8 rounds every matrix of the model to int8 with one scale per output
                row (weight-only; multibyte/weight_formats.py), kept in fp32 with fp32
                arithmetic: on a CPU the native kernels read a quarter of fp32's bytes, the
                fastest batch-1 decoding of a large stack (benchmarks/sample_speed.py). Changes
                the sampled bytes; `bench --quantize int8` measures what it costs in bits.
            overwrite: replace existing files in output_dir.
        """
        import torch

        from multibyte.codecs import IMAGE_BYTES
        from multibyte.decoders import SampleFormat, prompt_bytes, sample_to_files
        from multibyte.sampling import fastest_decode_dtype, model_for_decoding

        if datamodule is None:
            raise ValueError("sample: choose the output format with --data (e.g. --config image64.yaml)")
        check_sampling_flags(num_samples, batch_size, max_new_bytes, temperature, top_k, top_p, stop_byte)
        fmt = SampleFormat.from_datamodule(datamodule)
        prompt_data = prompt_bytes(fmt, prompt, prompt_file, prompt_rows, prompt_seconds)
        self._load_weights(model, ckpt_path)
        tokenizer = self._tokenizer(model, datamodule, ckpt_path, prepare=False)
        unit = "bytes"
        if tokenizer is not None:  # a subword model: the prompt, the context and the new symbols are tokens
            if stop_byte is not None:
                raise ValueError("--stop_byte: a subword model generates tokens, not bytes; leave --stop_byte out")
            prompt_data = tokenizer.encode_array(prompt_data.tobytes(), allowed_special="all")
            unit = "tokens"
        device = self.strategy.root_device
        rows = min(batch_size, num_samples)
        if quantize is not None and dtype not in (None, "float32"):
            raise ValueError(f"--quantize {quantize} decodes with fp32 arithmetic: leave --dtype out (or set float32), got --dtype {dtype}")
        if quantize is not None:
            weights_dtype = torch.float32
        elif dtype is None:
            weights_dtype = fastest_decode_dtype(device, rows, str(self.precision).startswith("bf16"))
        else:
            weights_dtype = getattr(torch, dtype)
        byte_model = model_for_decoding(model.model, device, weights_dtype, rows, quantize)

        context = byte_model.config.max_seq_len
        T = len(prompt_data)
        if max_new_bytes is None:
            max_new_bytes = (IMAGE_BYTES if fmt.modality == "image" else context) - T
        where = f"prompt file {prompt_file}" if prompt_file else "the prompt"
        if max_new_bytes < 1:
            raise ValueError(f"sample: {where} already holds {T} {unit}: nothing left to generate")
        if byte_model.length_limited and T + max_new_bytes > context:
            raise ValueError(
                f"sample: {where} holds {T} {unit}; with max_new_bytes={max_new_bytes} that exceeds "
                f"the model's max_seq_len={context} (use a shorter prompt, e.g. --prompt_rows or --prompt_seconds)"
            )
        output = Path(output_dir) if output_dir else Path(self.default_root_dir) / "samples"
        try:
            run = sample_to_files(
                byte_model,
                fmt,
                output,
                num_samples=num_samples,
                batch_size=batch_size,
                max_new_bytes=max_new_bytes,
                prompt=prompt_data,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                stop_byte=stop_byte,
                compile=compile,
                native=native,
                overwrite=overwrite,
                progress=self.progress_bar_callback is not None,
                info={
                    "checkpoint": str(ckpt_path),
                    "prompt": prompt,
                    "prompt_file": prompt_file,
                    "dtype": str(weights_dtype).removeprefix("torch."),
                    "arithmetic": str(byte_model.head.weight.dtype).removeprefix("torch."),
                    # the grid the matrices' values lie on (bf16 or int8 values held in fp32)
                    "matrices": matrix_format(byte_model) if byte_model.head.weight.dtype == torch.float32 else str(weights_dtype).removeprefix("torch."),
                    "device": str(device),
                },
                tokenizer=tokenizer,
            )
        except FileExistsError as error:
            raise FileExistsError(f"{error} (--overwrite true replaces it)") from None
        tokens = "" if tokenizer is None else f" from {run.info['new_tokens']:,} tokens"
        print(
            f"wrote {len(run.paths)} files to {output} ({run.new_bytes:,} bytes{tokens} in {run.seconds:.1f} s, "
            f"{run.bytes_per_second:,.0f} bytes/s)"
        )
        return [str(path) for path in run.paths]

    def _load_weights(self, model: LightningModule, ckpt_path: Union[str, Path]) -> LightningModule:
        """Load a checkpoint's (or export directory's) weights, and a subword model's tokenizer,
        into the configured `model`, read safely; one clear error naming the file when it is
        missing, unreadable, unsafe or made for another architecture."""
        checkpoint = load_checkpoint(ckpt_path)
        load_module_weights(model, ckpt_path, checkpoint)
        model.tokenizer = checkpoint_tokenizer(checkpoint, ckpt_path)
        return model

    def _tokenizer(
        self, model: LightningModule, datamodule: Optional[LightningDataModule], ckpt_path: Optional[str], prepare: bool
    ) -> Any:
        """The `BPETokenizer` a subword model reads text with (None for a byte model): its
        checkpoint's, else the data's. Data encoded by another tokenizer than the checkpoint's is
        refused. `prepare`: the data's tokenizer is needed (bench: it trains it if the cache lacks
        it); otherwise only one the cache already holds is compared."""
        data_tokenizer = None
        if datamodule is not None and hasattr(datamodule, "subword_tokenizer"):
            data_tokenizer = datamodule.subword_tokenizer() if prepare else datamodule.prepared_subword_tokenizer()
        model_tokenizer = getattr(model, "tokenizer", None)
        check_same_tokenizer(model_tokenizer, data_tokenizer, f"checkpoint {ckpt_path}" if ckpt_path else "the model")
        tokenizer = model_tokenizer or data_tokenizer
        vocab_size = model.model.config.vocab_size
        if tokenizer is None and vocab_size != 256:
            where = f"checkpoint {ckpt_path} carries none" if ckpt_path else "there is no checkpoint"
            raise ValueError(
                f"the model reads {vocab_size} symbols (a subword model) but no tokenizer goes with it: {where}, "
                f"and --data serves no BPE tokens (datamodules.TextDataModule with tokenizer: bpe)"
            )
        return tokenizer

    # ---------------------------------------------------------------- bench / compress / decompress
    def _byte_model(self, model: LightningModule, ckpt_path: Optional[str]) -> HierarchicalByteModel:
        """The configured model (LightningCLI builds it with the checkpoint's architecture) with
        the checkpoint's weights, on this trainer's device, in eval mode; without a checkpoint,
        as initialised."""
        if ckpt_path is not None:
            self._load_weights(model, ckpt_path)
        return model.model.to(self.strategy.root_device).eval()

    def _in_every_process(self, function, *args: Any, **kwargs: Any) -> Any:
        """`function(*args, **kwargs)` in every process of the strategy, with torch.distributed
        set up: Lightning's launcher starts the other processes as `fit` does (none for one device,
        or when torchrun/SLURM started them). Returns rank 0's result in the calling process."""
        run = partial(_set_up_and_call, self.strategy, function, *args, **kwargs)  # picklable, for ddp_spawn
        launcher = self.strategy.launcher
        return run() if launcher is None else launcher.launch(run)

    def bench(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        ckpt_path: Optional[str] = None,
        split: Literal["train", "validation", "test"] = "test",
        inference: Optional[list[InferenceMode]] = None,
        batch_size: Optional[int] = None,
        max_bytes: Optional[int] = None,
        codecs: bool = True,
        output_dir: Optional[str] = None,
        overwrite: bool = False,
        adapt: Optional[bool] = None,
        adapt_options: AdaptConfig = AdaptConfig(),
        progress: Optional[bool] = None,
        ngram: Optional[bool] = None,
        ngram_options: NgramConfig = NgramConfig(),
        lpc: Optional[bool] = None,
        lpc_options: LpcConfig = LpcConfig(),
        quantize: Optional[Literal["int8"]] = None,
    ) -> dict[str, Any]:
        """Density benchmark: bits per byte (bits/dim) on a split beside the reference codecs.

        Scores every byte of the split once and runs gzip -9, bzip2 -9, xz -9e, zstd -19 and the
        modality's codec (PNG and WebP lossless, FLAC) on the same bytes; writes Markdown, JSON
        and (with matplotlib) a PNG chart. A subword model scores every token of the split once:
        its bits over the bytes they decode to, with its tokens per byte in the report.

        Args:
            ckpt_path: checkpoint to score; None scores the configured model untrained.
            split: which split of the datamodule (--data) to score; every byte is scored once.
            inference: MEGABYTE inference modes to run: basic (contiguous windows), sliding
                (half-window context), strided (two passes offset by P/2), sliding+strided.
                None means [basic].
            batch_size: windows per forward pass; None uses the datamodule's eval_batch_size, and
                8 with --adapt (compress's default --lanes with it, so bench predicts compress).
            max_bytes: score only the first max_bytes bytes of the split (whole images for images;
                for a subword model the whole tokens that fit in them).
            codecs: also run the reference codecs on the same bytes.
            output_dir: where bench-<modality>-<split>.{md,json,png} go; None means
                <trainer.default_root_dir>/bench.
            overwrite: replace report files that already exist.
            adapt: dynamic evaluation: after scoring each batch of windows the model learns from
                it (multibyte/adaptation.py); basic and sliding inference only (--adapt true
                with a strided mode is refused). None means the modality's default
                (ADAPT_BY_DEFAULT: on for text and audio), where strided modes run without
                it; --adapt false (or --no-adapt) turns it off.
            adapt_options: how it learns (optimizer, learning_rate, parameters, steps,
                windows_per_step, precision, max_grad_norm, beta1, beta2), e.g.
                --adapt_options.learning_rate 1e-4. An update follows every --batch_size windows
                (8 by default: the group its defaults were tuned with; fewer adapt sooner).
            progress: a progress bar on stderr; None shows it when stderr is a terminal.
            ngram: mix the model with an adaptive byte n-gram of the bytes scored so far
                (multibyte/ngram_mixing.py; what PPM and cmix count): remembers the file beyond
                the model's window; the report shows the model alone beside the mixture. Basic
                inference over bytes (--ngram true otherwise is refused); under DDP the ranks
                share the model's probabilities. None means the modality's default
                (MIXING_BY_DEFAULT: on for text), where possible; --ngram false (or --no-ngram)
                turns it off.
            ngram_options: its order, learning_rate and initial_weight, e.g.
                --ngram_options.order 5.
            lpc: mix the model with a backward-adaptive linear predictor of 16-bit samples
                (multibyte/lpc_mixing.py; what FLAC predicts with), one mixture weight per byte
                of the sample. Audio in pcm16 with basic inference and an even seq_len (--lpc true
                otherwise is refused). None means the modality's default (MIXING_BY_DEFAULT: on
                for audio), where possible; --lpc false (or --no-lpc) turns it off.
            lpc_options: its order, history, refit, scale_window, min_scale, ridge,
                learning_rate and initial_weight, e.g. --lpc_options.order 32.
            quantize: int8 scores the model with every matrix rounded as `sample --quantize
                int8` rounds it: what weight-only int8 costs in bits (the report's
                model.weights says which grid the matrices are on).
        """
        from multibyte.bench import markdown_table, run_benchmark, write_report

        if datamodule is None:
            raise ValueError("bench: choose the data to score with --data (e.g. --config text.yaml)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"--max_bytes must be at least 1, got {max_bytes}")
        folder = Path(output_dir) if output_dir else Path(self.default_root_dir) / "bench"
        stem = f"bench-{data_spec_of(datamodule).modality}-{split}"
        _writable([folder / f"{stem}.{suffix}" for suffix in ("md", "json", "png")], overwrite)
        adapting = adapt_wanted(adapt, data_spec_of(datamodule).modality)
        mixing, asked = mixing_wanted(ngram, ngram_options, lpc, lpc_options, data_spec_of(datamodule).modality)
        byte_model = self._byte_model(model, ckpt_path)
        if quantize is not None:
            round_matrices(byte_model, quantize)
        self._tokenizer(model, datamodule, ckpt_path, prepare=True)  # refuses data of another tokenizer
        # Under a multi-process strategy (ddp, torchrun, SLURM) every rank scores its share of
        # the windows; rank 0 runs the codecs and writes the report.
        report = self._in_every_process(
            run_benchmark,
            byte_model,
            datamodule,
            split=split,
            modes=inference or ["basic"],
            batch_size=batch_size,
            max_bytes=max_bytes,
            precision=str(self.precision),
            codecs=codecs,
            checkpoint=None if ckpt_path is None else str(ckpt_path),
            adapt=adapt_options if adapting else None,
            progress=progress,
            adapt_where_possible=adapt is None,  # by default: strided modes run without it
            mixing=mixing,
            mixing_where_possible=not asked,  # by default: sliding, strided and subword run without it
        )
        if not self.is_global_zero:
            return report
        paths = write_report(report, folder, stem)
        print(markdown_table(report))
        written = [str(path) for path in paths.values() if path is not None]
        print("wrote " + ", ".join(written) + ("" if paths["png"] else " (no chart: pip install 'multibyte[plot]')"))
        return report

    def compress(
        self,
        model: LightningModule,
        input_file: str,
        output_file: Optional[str] = None,
        ckpt_path: Optional[str] = None,
        seq_len: Optional[int] = None,
        lanes: Optional[int] = None,
        precision: Literal["32-true", "bf16-mixed"] = "32-true",
        overwrite: bool = False,
        datamodule: Optional[LightningDataModule] = None,
        adapt: Optional[bool] = None,
        adapt_options: AdaptConfig = AdaptConfig(),
        progress: Optional[bool] = None,
        ngram: Optional[bool] = None,
        ngram_options: NgramConfig = NgramConfig(),
        lpc: Optional[bool] = None,
        lpc_options: LpcConfig = LpcConfig(),
    ) -> None:
        """Compress a file: arithmetic coding under the checkpoint's next-byte probabilities (a
        subword model: next-token probabilities over the file's token ids, from its tokenizer).

        Args:
            input_file: the file to compress.
            output_file: where the compressed file goes; None means <input_file>.mbac.
            ckpt_path: the model checkpoint or export directory (decompression needs the very
                same weights).
            seq_len: window length in bytes (tokens for a subword model), each window coded from
                an empty context as bench scores it; None means the datamodule's seq_len when
                --data is given, else the model's max_seq_len.
            lanes: windows decoded side by side as one batch (stored in the file); with --adapt
                also the windows coded between two updates. None: 8 with --adapt (as bench's
                default batch with it, so bench predicts the size), else 32 (speed only).
            precision: arithmetic of the model while coding, stored in the file so decompression
                repeats it. float32 is as fast as bf16 for one-byte steps on a CPU and the
                safer choice for bit-identical probabilities.
            overwrite: replace output_file if it exists.
            adapt: dynamic evaluation: the model learns from every group of --lanes windows once
                coded, and the decoder repeats each update (options, device type, thread count and
                PyTorch version are stored in the file and must match when decompressing). None
                means the modality of --data's default (ADAPT_BY_DEFAULT: on for text and audio; off
                without --data); --adapt false (or --no-adapt) turns it off.
            adapt_options: how it learns, as for bench (e.g. --adapt_options.learning_rate 1e-4).
            progress: a progress bar on stderr; None shows it when stderr is a terminal.
            ngram: mix the model with an adaptive byte n-gram, as bench --ngram true (the options
                are stored in the file; a byte model only). None means the modality of --data's
                default (MIXING_BY_DEFAULT: on for text byte models; off without --data).
            ngram_options: its order, learning_rate and initial_weight, as for bench.
            lpc: mix the model with a linear predictor of 16-bit samples, as bench --lpc true (the
                input must be pcm16 bytes, e.g. the audio datamodule's stream; options stored in the
                file). None means the modality of --data's default (MIXING_BY_DEFAULT: on for
                pcm16 audio; off without --data).
            lpc_options: its options, as for bench.
        """
        from multibyte.compression import compress_file

        if ckpt_path is None:
            raise ValueError("compress: --ckpt_path is required (decompression needs the same model)")
        if lanes is not None and not 1 <= lanes <= 0xFFFF:
            raise ValueError(f"--lanes must lie in 1..65535, got {lanes}")
        if seq_len is not None and seq_len < 1:
            raise ValueError(f"--seq_len must be at least 1, got {seq_len}")
        output_file = output_file or f"{input_file}.mbac"
        if Path(output_file).resolve() == Path(input_file).resolve():
            raise ValueError(f"compress: {output_file}: output would overwrite the input")
        _writable([Path(output_file)], overwrite)
        byte_model = self._byte_model(model, ckpt_path)
        tokenizer = self._tokenizer(model, datamodule, ckpt_path, prepare=False)
        window = seq_len or (data_spec_of(datamodule).seq_len if datamodule is not None else byte_model.config.max_seq_len)
        modality = data_spec_of(datamodule).modality if datamodule is not None else None
        options = adapt_options if adapt_wanted(adapt, modality) else None
        mixing, asked = mixing_wanted(ngram, ngram_options, lpc, lpc_options, modality)
        if mixing is not None and not asked:  # a default mixing runs only where it can
            encoding = getattr(data_spec_of(datamodule), "audio_encoding", None) if datamodule is not None else None
            try:
                check_mixing(mixing, "basic", tokenizer is not None, encoding, window)
            except ValueError:
                mixing = None
        stats = compress_file(
            byte_model, input_file, output_file, window, lanes, precision, tokenizer, options, progress, mixing
        )
        tokens = "" if tokenizer is None else f", {stats.num_symbols:,} tokens"
        print(
            f"{input_file}: {stats.original_bytes:,} -> {stats.compressed_bytes:,} bytes "
            f"({stats.bits_per_byte:.4f} bits/byte; model {stats.model_bits / max(1, stats.original_bytes):.4f}{tokens}) "
            f"in {stats.seconds:.1f} s, written to {output_file}"
            + (
                f" (adapted while coding: {adapt_summary(options)})" if stats.adapted
                else " (not adapted: the input fits in one group of windows, so no update would ever be used)"
                if options is not None
                else ""
            )
            + (f" (mixed with {describe_mixing(mixing)})" if mixing is not None else "")
        )

    def decompress(
        self,
        model: LightningModule,
        input_file: str,
        output_file: Optional[str] = None,
        ckpt_path: Optional[str] = None,
        overwrite: bool = False,
        datamodule: Optional[LightningDataModule] = None,
        progress: Optional[bool] = None,
    ) -> None:
        """Restore a file written by `compress`, with the same checkpoint.

        A different model or tokenizer, a truncated file or a flipped bit stops with an error
        instead of writing wrong bytes.

        Args:
            input_file: the compressed file.
            output_file: where the restored bytes go; None strips .mbac from input_file (or
                appends .out).
            ckpt_path: the checkpoint (or export directory) the file was compressed with.
            overwrite: replace output_file if it exists (e.g. the original next to X.mbac).
            progress: a progress bar on stderr; None shows it when stderr is a terminal. (A file
                compressed with --adapt is decoded with its own stored adapt options.)
        """
        from multibyte.compression import decompress_file

        if ckpt_path is None:
            raise ValueError("decompress: --ckpt_path is required (the checkpoint used to compress)")
        if output_file is None:
            output_file = input_file[: -len(".mbac")] if input_file.endswith(".mbac") else f"{input_file}.out"
        if Path(output_file).resolve() == Path(input_file).resolve():
            raise ValueError(f"decompress: {output_file}: output would overwrite the input")
        _writable([Path(output_file)], overwrite)
        byte_model = self._byte_model(model, ckpt_path)
        tokenizer = self._tokenizer(model, datamodule, ckpt_path, prepare=False)
        stats = decompress_file(byte_model, input_file, output_file, tokenizer, progress)
        print(f"{input_file}: restored {stats.original_bytes:,} bytes in {stats.seconds:.1f} s, written to {output_file}")

    # ---------------------------------------------------------------- export
    def export(
        self,
        model: LightningModule,
        ckpt_path: str,
        output_dir: str,
        overwrite: bool = False,
        datamodule: Optional[LightningDataModule] = None,
    ) -> list[str]:
        """Write a checkpoint's weights as output_dir/model.safetensors and its model settings as
        output_dir/config.yaml (and a subword model's tokenizer as output_dir/tokenizer.json), for
        sharing: safetensors holds tensors only, so loading it can run no code. Every command that
        takes --ckpt_path takes the directory, and config.yaml works as --config.

        Args:
            ckpt_path: the Lightning checkpoint to export.
            output_dir: the folder to write (created if needed).
            overwrite: replace model.safetensors / config.yaml / tokenizer.json if they exist.
        """
        paths = export_checkpoint(ckpt_path, output_dir, overwrite)
        print("wrote " + ", ".join(str(path) for path in paths))
        return [str(path) for path in paths]


def check_sampling_flags(
    num_samples: int,
    batch_size: int,
    max_new_bytes: Optional[int],
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    stop_byte: Optional[int],
) -> None:
    """One ValueError naming the flag for a sampling setting that cannot work."""
    if num_samples < 1:
        raise ValueError(f"--num_samples must be at least 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    if max_new_bytes is not None and max_new_bytes < 1:
        raise ValueError(f"--max_new_bytes must be at least 1, got {max_new_bytes}")
    if not temperature >= 0:  # also NaN
        raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top_p must lie in (0, 1], got {top_p}")
    if stop_byte is not None and not 0 <= stop_byte <= 255:
        raise ValueError(f"--stop_byte must be a byte value 0..255, got {stop_byte}")
