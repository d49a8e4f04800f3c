"""`MultibyteTrainer`: Lightning's Trainer plus the subcommands that only byte models have.

LightningCLI turns every public method listed in `EXTRA_SUBCOMMANDS` into a subcommand whose flags
are the method's parameters (so `python -m multibyte sample --help` documents them). Each method
stays thin: it loads what it needs and hands over to the module that does the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from lightning import LightningDataModule, LightningModule, Trainer

from multibyte.model import HierarchicalByteModel

# Subcommand name -> the method arguments LightningCLI fills in itself (not exposed as flags).
EXTRA_SUBCOMMANDS: dict[str, set[str]] = {
    "sample": {"model", "datamodule"},
    "bench": {"model", "datamodule"},
    "compress": {"model", "datamodule"},
    "decompress": {"model", "datamodule"},
}

InferenceMode = Literal["basic", "sliding", "strided", "sliding+strided"]


class MultibyteTrainer(Trainer):
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
        dtype: Optional[Literal["float32", "bfloat16"]] = None,
        overwrite: bool = False,
    ) -> list[str]:
        """Generate from a checkpoint: 64x64 PNGs (and a grid), WAVs or UTF-8 text, by modality.

        The architecture comes from the config (and the checkpoint's hyperparameters), the weights
        from --ckpt_path, the output format (modality, image order, audio rate and encoding) from
        --data. Each prompt is continued num_samples times; the files keep prompt + continuation.

        Args:
            ckpt_path: the Lightning checkpoint whose weights to sample from.
            output_dir: folder for the files; None means <trainer.default_root_dir>/samples.
                Existing files are never replaced unless --overwrite true.
            num_samples: how many samples to write.
            batch_size: samples generated side by side (batch i uses seed + i).
            max_new_bytes: bytes to generate per sample; None fills the model's context (for
                images: the rest of the 64x64 image).
            temperature: softmax temperature; 0 is greedy.
            top_k: sample only among the k likeliest bytes.
            top_p: sample only among the likeliest bytes whose probabilities add up to top_p.
            seed: the same seed (and batch size) gives the same bytes.
            stop_byte: end a sample after this byte value (e.g. 10 for a newline).
            prompt: text to continue (its UTF-8 bytes).
            prompt_file: a file to continue: text's raw bytes, an image whose top prompt_rows
                rows are completed, or a WAV/FLAC file continued from its end.
            prompt_rows: pixel rows of the prompt image to keep (images only).
            prompt_seconds: keep only the first seconds of the prompt audio (audio only).
            compile: torch.compile the one-byte step (meant for GPUs, with CUDA graphs); on a
                CPU it measured no reliably faster than eager (benchmarks/sample_speed.py).
            dtype: weights and caches while sampling; None picks the fastest measured: on a CPU
                float32 below batch 16 and bfloat16 from there (with native bf16), on a GPU
                bfloat16 when the trainer's precision is bf16. Changes the sampled bytes.
            overwrite: replace existing files in output_dir.
        """
        import torch

        from multibyte.codecs import IMAGE_BYTES
        from multibyte.decoders import SampleFormat, prompt_bytes, sample_to_files
        from multibyte.sampling import fastest_decode_dtype

        if datamodule is None:
            raise SystemExit("multibyte sample: choose the output format with --data (e.g. --config image64.yaml)")
        try:
            fmt = SampleFormat.from_datamodule(datamodule)
            prompt_data = prompt_bytes(fmt, prompt, prompt_file, prompt_rows, prompt_seconds)
        except ValueError as error:
            raise SystemExit(f"multibyte sample: {error}") from error
        byte_model = self._load_weights(model, ckpt_path).model
        device = self.strategy.root_device
        if dtype is None:
            weights_dtype = fastest_decode_dtype(device, min(batch_size, num_samples), str(self.precision).startswith("bf16"))
        else:
            weights_dtype = getattr(torch, dtype)
        byte_model = byte_model.to(device=device, dtype=weights_dtype).eval()

        context = byte_model.config.max_seq_len
        T = len(prompt_data)
        if max_new_bytes is None:
            max_new_bytes = (IMAGE_BYTES if fmt.modality == "image" else context) - T
        where = f"prompt file {prompt_file}" if prompt_file else "the prompt"
        if max_new_bytes < 1:
            raise SystemExit(f"multibyte sample: {where} already holds {T} bytes: nothing left to generate")
        if byte_model.position_embedding is not None and T + max_new_bytes > context:
            raise SystemExit(
                f"multibyte sample: {where} holds {T} bytes; with max_new_bytes={max_new_bytes} that exceeds "
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
                overwrite=overwrite,
                progress=self.progress_bar_callback is not None,
                info={
                    "checkpoint": str(ckpt_path),
                    "prompt": prompt,
                    "prompt_file": prompt_file,
                    "dtype": str(weights_dtype).removeprefix("torch."),
                    "device": str(device),
                },
            )
        except (FileExistsError, ValueError) as error:
            raise SystemExit(f"multibyte sample: {error}") from error
        print(
            f"wrote {len(run.paths)} files to {output} ({run.new_bytes:,} bytes in {run.seconds:.1f} s, "
            f"{run.bytes_per_second:,.0f} bytes/s)"
        )
        return [str(path) for path in run.paths]

    def _load_weights(self, model: LightningModule, ckpt_path: str) -> LightningModule:
        """Load a Lightning checkpoint's weights into the configured `model`; one clear error
        naming the file when it is missing, unreadable or made for another architecture."""
        import torch

        from multibyte.config import ModelConfig, StackConfig

        path = Path(ckpt_path)
        if not path.is_file():
            raise SystemExit(f"multibyte: checkpoint {path}: no such file")
        try:
            # The checkpoint's hyperparameters hold the config dataclasses; allow exactly those.
            with torch.serialization.safe_globals([ModelConfig, StackConfig]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: torch raises many kinds
            raise SystemExit(f"multibyte: checkpoint {path}: cannot be read ({error})") from error
        weights = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if weights is None:
            raise SystemExit(f"multibyte: checkpoint {path}: no state_dict in it (not a Lightning checkpoint)")
        # A model trained with compile=True saved its weights under "model._orig_mod.".
        weights = {name.replace("._orig_mod.", "."): value for name, value in weights.items()}
        try:
            model.load_state_dict(weights)
        except RuntimeError as error:
            raise SystemExit(
                f"multibyte: checkpoint {path} does not fit the configured architecture:\n{error}"
            ) from error
        return model

    # ---------------------------------------------------------------- bench / compress / decompress
    def _byte_model(self, model: LightningModule, ckpt_path: Optional[str]) -> HierarchicalByteModel:
        """The configured model (LightningCLI builds it with the checkpoint's architecture) with
        the checkpoint's weights, on this trainer's device, in eval mode; without a checkpoint,
        as initialised."""
        if ckpt_path is not None:
            self._load_weights(model, ckpt_path)
        return model.model.to(self.strategy.root_device).eval()

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
    ) -> dict[str, Any]:
        """Density benchmark: bits per byte (bits/dim) on a split beside the reference codecs.

        Scores every byte of the split once and runs gzip -9, bzip2 -9, xz -9e, zstd -19 and the
        modality's codec (PNG and WebP lossless, FLAC) on the same bytes; writes Markdown, JSON
        and (with matplotlib) a PNG chart.

        Args:
            ckpt_path: checkpoint to score; None scores the configured model untrained.
            split: which split of the datamodule (--data) to score; every byte is scored once.
            inference: MEGABYTE inference modes to run: basic (contiguous windows), sliding
                (half-window context), strided (two passes offset by P/2), sliding+strided.
                None means [basic].
            batch_size: windows per forward pass; None uses the datamodule's eval_batch_size.
            max_bytes: score only the first max_bytes bytes of the split (whole images for images).
            codecs: also run the reference codecs on the same bytes.
            output_dir: where bench-<modality>-<split>.{md,json,png} go; None means
                <trainer.default_root_dir>/bench.
        """
        from multibyte.bench import markdown_table, run_benchmark, write_report

        if datamodule is None:
            raise SystemExit("multibyte bench: choose the data to score with --data (e.g. --config text.yaml)")
        byte_model = self._byte_model(model, ckpt_path)
        try:
            report = run_benchmark(
                byte_model,
                datamodule,
                split=split,
                modes=inference or ["basic"],
                batch_size=batch_size,
                max_bytes=max_bytes,
                precision=str(self.precision),
                codecs=codecs,
                checkpoint=ckpt_path,
            )
        except ValueError as error:  # bad data (DataError), an impossible mode or window size
            raise SystemExit(f"multibyte bench: {error}") from error
        paths = write_report(report, output_dir or Path(self.default_root_dir) / "bench")
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
        lanes: int = 32,
        precision: Literal["32-true", "bf16-mixed"] = "32-true",
        datamodule: Optional[LightningDataModule] = None,
    ) -> None:
        """Compress a file: arithmetic coding under the checkpoint's next-byte probabilities.

        Args:
            input_file: the file to compress.
            output_file: where the compressed file goes; None means <input_file>.mbac.
            ckpt_path: the model checkpoint (decompression needs the very same one).
            seq_len: window length in bytes, each window coded from an empty context as bench
                scores it; None means the datamodule's seq_len when --data is given, else the
                model's max_seq_len.
            lanes: windows decoded side by side as one batch (speed only; stored in the file).
            precision: arithmetic of the model while coding, stored in the file so decompression
                repeats it. float32 is as fast as bf16 for one-byte steps on a CPU and the
                safer choice for bit-identical probabilities.
        """
        from multibyte.compression import CompressionError, compress_file

        if ckpt_path is None:
            raise SystemExit("multibyte compress: --ckpt_path is required (decompression needs the same model)")
        byte_model = self._byte_model(model, ckpt_path)
        window = seq_len or getattr(datamodule, "seq_len", None) or byte_model.config.max_seq_len
        output_file = output_file or f"{input_file}.mbac"
        if Path(output_file).resolve() == Path(input_file).resolve():
            raise SystemExit(f"multibyte compress: {output_file}: output would overwrite the input")
        try:
            stats = compress_file(byte_model, input_file, output_file, window, lanes, precision)
        except (CompressionError, ValueError) as error:
            raise SystemExit(f"multibyte compress: {error}") from error
        print(
            f"{input_file}: {stats.original_bytes:,} -> {stats.compressed_bytes:,} bytes "
            f"({stats.bits_per_byte:.4f} bits/byte; model {stats.model_bits / max(1, stats.original_bytes):.4f}) "
            f"in {stats.seconds:.1f} s, written to {output_file}"
        )

    def decompress(
        self,
        model: LightningModule,
        input_file: str,
        output_file: Optional[str] = None,
        ckpt_path: Optional[str] = None,
        datamodule: Optional[LightningDataModule] = None,
    ) -> None:
        """Restore a file written by `compress`, with the same checkpoint.

        A different model, a truncated file or a flipped bit stops with an error instead of
        writing wrong bytes.

        Args:
            input_file: the compressed file.
            output_file: where the restored bytes go; None strips .mbac from input_file (or
                appends .out).
            ckpt_path: the checkpoint the file was compressed with.
        """
        from multibyte.compression import CompressionError, decompress_file

        if ckpt_path is None:
            raise SystemExit("multibyte decompress: --ckpt_path is required (the checkpoint used to compress)")
        byte_model = self._byte_model(model, ckpt_path)
        if output_file is None:
            output_file = input_file[: -len(".mbac")] if input_file.endswith(".mbac") else f"{input_file}.out"
        if Path(output_file).resolve() == Path(input_file).resolve():
            raise SystemExit(f"multibyte decompress: {output_file}: output would overwrite the input")
        try:
            stats = decompress_file(byte_model, input_file, output_file)
        except CompressionError as error:
            raise SystemExit(f"multibyte decompress: {error}") from error
        print(f"{input_file}: restored {stats.original_bytes:,} bytes in {stats.seconds:.1f} s, written to {output_file}")
