"""Optional native CPU kernels, each the twin of a PyTorch reference that stays the definition.

A kernel is one C file here (with the shared headers), compiled on first use with the system C
compiler (`$CC`, else `cc`) for this CPU (`-O3 -march=native`) into a cache folder
(`$MULTIBYTE_KERNEL_CACHE`, default `~/.cache/multibyte/kernels`), keyed by a hash of the sources,
the flags (`$MULTIBYTE_KERNEL_FLAGS` adds some, e.g. `-mno-avx512f` builds what a CPU with AVX2
only runs), the compiler and the CPU, and loaded with ctypes: no Python headers, no build of the package. Where there is no
compiler, the build fails, or `MULTIBYTE_NATIVE=0`, `load` returns None (warning once) and the
callers run their PyTorch reference. Tests hold every kernel to its reference
(tests/test_native_kernels.py).

    attention_step.c   one decoding position of an attention stack (`multibyte.model.Stack`),
                       bound by `multibyte.kernels.attention.NativeAttentionStep`
    mamba_step.c       the same for a Mamba stack (MambaByte), `multibyte.kernels.mamba.NativeMambaStep`
    decode_run.c       whole decoding steps of a model with fixed units (or SpaceByte's word units,
                       one row) and runs of them with the draws (built with both stack steps),
                       `multibyte.kernels.decode_run.NativeDecode`
    parallel.c         a helper thread for the large matrix-vector products (in every library;
                       `native_threads`, `set_native_threads`, `$MULTIBYTE_NATIVE_THREADS`)
    vector_ops.h       what all use: RMSNorm, the row-blocked matrix-vector products, exp
    attention_step.h,  the stacks' structures and entry points, shared with decode_run
    mamba_step.h

`bind_stack_step` picks the one for a stack; `multibyte.model.StackStates.native` holds it.

Each library also comes in variants that read the model's matrices (the weights of its linear
layers) in a compact format: bf16 (`-DMULTIBYTE_BF16_WEIGHTS`, `load(name, "bfloat16")`) and
int8 with a scale per row (`-DMULTIBYTE_INT8_WEIGHTS`, `load(name, "int8")`), used for models
whose matrices all lie on that grid (`multibyte.weight_formats`: e.g. `sample --dtype bfloat16`
on a CPU, `sample --quantize int8`): the same fp32 arithmetic over a half or a quarter of the
bytes, which is what a batch-1 step of a large stack waits for. The bindings then hold copies of
the matrices in that format (`matrix_for_kernel`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from multibyte.weight_formats import check_format, int8_rows

# -ffp-contract=fast: in ISO C mode (-std=c11) GCC would not fuse a * b + c into one FMA.
# -fno-trapping-math: the kernels never read the floating-point exception flags; with them kept
# (the default), GCC may not turn a comparison inside a loop (exp's clamp, softplus) into a
# select without AVX-512's masks, and left every loop over exp (softmax, SiLU, the Mamba state
# update) scalar on AVX2 CPUs. Values are unchanged: no reassociation, no other rounding.
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast", "-fno-trapping-math", "-std=c11", "-pthread", "-shared", "-fPIC"]
SOURCES = Path(__file__).resolve().parent

# The C files of each library (default: the library's name + .c).
LIBRARY_SOURCES = {
    "attention_step": ("attention_step.c", "parallel.c"),
    "mamba_step": ("mamba_step.c", "parallel.c"),
    "decode_run": ("decode_run.c", "attention_step.c", "mamba_step.c", "parallel.c"),
}

# What each weight-format variant of a library adds to FLAGS, and to its file name.
WEIGHT_FORMAT_FLAGS = {"float32": [], "bfloat16": ["-DMULTIBYTE_BF16_WEIGHTS"], "int8": ["-DMULTIBYTE_INT8_WEIGHTS"]}
_WEIGHT_FORMAT_SUFFIX = {"float32": "", "bfloat16": "-bf16w", "int8": "-int8w"}

_loaded: dict[tuple[str, str, tuple[str, ...]], Optional[ctypes.CDLL]] = {}  # (name, format, extra flags)
_lock = threading.Lock()


def enabled() -> bool:
    """False when the environment turns native kernels off (`MULTIBYTE_NATIVE=0`)."""
    return os.environ.get("MULTIBYTE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


_threads: Optional[int] = None  # set_native_threads's choice; None: native_threads's default


def native_threads() -> int:
    """Threads the kernels' large matrix-vector products use (parallel.c): what
    `set_native_threads` chose, else `$MULTIBYTE_NATIVE_THREADS` (1 or 2), else 2 where the
    process may run on two cores or more. A batch-1 step of a large stack is bound by how fast
    its weights come from memory, which two cores draw much faster than one
    (benchmarks/sample_speed.py, `native_threads`)."""
    if _threads is not None:
        return _threads
    value = os.environ.get("MULTIBYTE_NATIVE_THREADS", "").strip()
    if value:
        if value not in ("1", "2"):
            raise ValueError(f"MULTIBYTE_NATIVE_THREADS must be 1 or 2, got {value!r}")
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 if cores >= 2 else 1


def set_native_threads(threads: Optional[int]) -> None:
    """Use `threads` (1 or 2; None: back to `native_threads`'s default) for the large products
    from now on, in the libraries already loaded and in those loaded later."""
    global _threads
    if threads not in (None, 1, 2):
        raise ValueError(f"native threads must be 1 or 2 (or None for the default), got {threads!r}")
    _threads = threads
    for library in _loaded.values():
        if library is not None:
            library.multibyte_set_threads(native_threads())


def cache_folder() -> Path:
    return Path(os.environ.get("MULTIBYTE_KERNEL_CACHE") or Path.home() / ".cache" / "multibyte" / "kernels")


def _cpu_identity() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags (Linux), else the
    machine name. A library built for one CPU is never loaded on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted))  # the first core's lines (the cores are alike)


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC", "cc"))


def _sources(name: str) -> list[Path]:
    return [SOURCES / file for file in LIBRARY_SOURCES.get(name, (f"{name}.c",))]


def extra_flags() -> tuple[str, ...]:
    """Compiler flags `$MULTIBYTE_KERNEL_FLAGS` adds after FLAGS (shell words; a library built
    with them is a file of its own)."""
    value = os.environ.get("MULTIBYTE_KERNEL_FLAGS", "")
    try:
        return tuple(shlex.split(value))
    except ValueError as error:
        raise ValueError(f"MULTIBYTE_KERNEL_FLAGS is not a list of shell words ({error}): {value!r}") from None


def _flags(weight_format: str) -> list[str]:
    return FLAGS + WEIGHT_FORMAT_FLAGS[check_format(weight_format)] + list(extra_flags())


def library_path(name: str, weight_format: str = "float32") -> Optional[Path]:
    """Where `name`'s library (its variant reading the matrices in `weight_format`) for this
    CPU, compiler and sources (its C files and the shared headers) lives (None: no compiler)."""
    compiler = _compiler()
    if compiler is None:
        return None
    sources = [path.read_bytes() for path in _sources(name)] + [header.read_bytes() for header in sorted(SOURCES.glob("*.h"))]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(_flags(weight_format)).encode(), compiler.encode(), _cpu_identity().encode()]))
    return cache_folder() / f"{name}{_WEIGHT_FORMAT_SUFFIX[weight_format]}-{key.hexdigest()[:16]}.so"


def _build(name: str, target: Path, weight_format: str = "float32") -> None:
    """Compile `name`'s C files into `target`, atomically (concurrent processes may build too)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        command = [_compiler(), *_flags(weight_format), "-o", temporary, *map(str, _sources(name)), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def load(name: str, weight_format: str = "float32") -> Optional[ctypes.CDLL]:
    """The compiled kernel library `name` (built on first use; its variant reading the model's
    matrices in `weight_format`), or None when native kernels are off or cannot be built here
    (one warning says why)."""
    if not enabled():
        return None
    key = (name, weight_format, extra_flags())
    with _lock:
        if key in _loaded:
            return _loaded[key]
        library = None
        try:
            path = library_path(name, weight_format)
            if path is None:
                raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')}) on the PATH")
            if not path.exists():
                _build(name, path, weight_format)
            library = ctypes.CDLL(str(path))
            library.multibyte_set_threads.argtypes, library.multibyte_set_threads.restype = [ctypes.c_int], ctypes.c_int
            library.multibyte_set_threads(native_threads())
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            warnings.warn(f"native kernel {name!r} unavailable, using the PyTorch reference: {error}", RuntimeWarning, stacklevel=2)
        _loaded[key] = library
        return library


# Most rows a stack step is bound for. The kernels compute each matrix product as one dot product
# per output and row (the weights read once per call); with more rows PyTorch's GEMM catches up
# (benchmarks/sample_speed.py, `native_by_batch`: the shipped image preset and a 7.9M MEGABYTE at
# batch 1 to 64), and beyond it (sampling.CPU_BF16_MIN_BATCH) sampling decodes in bf16 PyTorch
# (bf16 arithmetic, which the kernels, fp32 throughout, do not do).
NATIVE_MAX_BATCH = 32


def usable(t: Optional[torch.Tensor]) -> bool:
    """A tensor a kernel may read or write in place: contiguous fp32 on the CPU."""
    return t is not None and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def matrix_for_kernel(weight: torch.Tensor, weight_format: str) -> torch.Tensor:
    """What a kernel's matrix pointer points at: the fp32 weight itself (float32), a contiguous
    bf16 copy (bfloat16), or for int8 one uint8 buffer holding the rows' fp32 scales (out,)
    followed by the int8 values (out, in) (vector_ops.h's packed matrix). The caller keeps it
    alive and checked that the weight lies on the format's grid
    (`multibyte.weight_formats.matrix_format`), so the kernel computes what PyTorch computes
    from the fp32 weight, up to rounding."""
    if check_format(weight_format) == "bfloat16":
        return weight.detach().to(torch.bfloat16).contiguous()
    if weight_format == "int8":
        q, scale = int8_rows(weight)
        return torch.cat([scale.contiguous().view(torch.uint8), q.contiguous().view(torch.uint8).flatten()])
    return weight


def load_stack_step(kind: str, stack_struct: type, weight_format: str = "float32") -> Optional[ctypes.CDLL]:
    """`load(f"{kind}_step", weight_format)` with its two entry points typed, the contract of every stack step
    kernel: `int multibyte_{kind}_step(const Stack *, int64_t rows, const float *x, float *y,
    float *work)` (0: done; nonzero: declined, nothing written) and `int64_t
    multibyte_{kind}_workspace(const Stack *, int64_t rows)` (floats of `work`)."""
    library = load(f"{kind}_step", weight_format)
    if library is not None and not hasattr(library, "_multibyte_typed"):
        stack = ctypes.POINTER(stack_struct)
        step, workspace = getattr(library, f"multibyte_{kind}_step"), getattr(library, f"multibyte_{kind}_workspace")
        step.argtypes, step.restype = [stack, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
        workspace.argtypes, workspace.restype = [stack, ctypes.c_int64], ctypes.c_int64
        library._multibyte_typed = True
    return library


class NativeStackStep:
    """A stack's one-position decoding step as one native call (a kernel loaded by
    `load_stack_step`), bound to one stack and one set of per-block states: the pointers in
    `stack_struct` are read once, at binding, so a parameter object replaced afterwards is not
    seen (values changed in place, as an optimizer step does, are; not in a compact
    `weight_format`, whose matrices are copies taken at binding).

    Call with x (B, 1, D) fp32: returns the stack's (B, 1, D) output and advances the states, or
    None (nothing changed) when it cannot take this call; the caller then runs the reference."""

    def __init__(self, library: ctypes.CDLL, kind: str, stack_struct: ctypes.Structure, keep: list, batch_size: int, weight_format: str = "float32") -> None:
        self.weight_format = weight_format  # the format of the matrices the struct points at
        self._kernel = getattr(library, f"multibyte_{kind}_step")
        self.struct = stack_struct
        self._stack_ref = ctypes.byref(stack_struct)
        self._keep = keep + [stack_struct]  # what the kernel's pointers point into
        self.batch_size = batch_size
        self._work = torch.empty(int(getattr(library, f"multibyte_{kind}_workspace")(self._stack_ref, batch_size)))
        self._work_ptr = self._work.data_ptr()

    def __call__(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[0] != self.batch_size or x.shape[1] != 1:
            return None
        x = x.contiguous()
        y = torch.empty_like(x)
        if self._kernel(self._stack_ref, self.batch_size, x.data_ptr(), y.data_ptr(), self._work_ptr):
            return None
        self._advanced()
        return y

    def _advanced(self) -> None:
        """Host bookkeeping after a step the kernel took (none by default)."""


def bind_stack_step(stack: torch.nn.Module, states: list, weight_format: str = "float32") -> Optional[NativeStackStep]:
    """The native one-position step of `stack` (a `multibyte.model.Stack`) on its decoding
    `states`, or None where no kernel can run it (see each kernel's `bind`); the kernels read
    its matrices in `weight_format` (the caller checked `multibyte.weight_formats.matrix_format`)."""
    from multibyte.kernels.attention import NativeAttentionStep
    from multibyte.kernels.mamba import NativeMambaStep

    for kernel in (NativeAttentionStep, NativeMambaStep):
        step = kernel.bind(stack, states, weight_format)
        if step is not None:
            return step
    return None
