"""Optional native CPU kernels, each the twin of a PyTorch reference that stays the definition.

A kernel is one C file here, compiled on first use with the system C compiler (`$CC`, else `cc`)
for this CPU (`-O3 -march=native`) into a cache folder (`$MULTIBYTE_KERNEL_CACHE`, default
`~/.cache/multibyte/kernels`), keyed by a hash of the source, the flags, the compiler and the
CPU, and loaded with ctypes: no Python headers, no build of the package. Where there is no
compiler, the build fails, or `MULTIBYTE_NATIVE=0`, `load` returns None (warning once) and the
callers run their PyTorch reference. Tests hold every kernel to its reference
(tests/test_native_kernels.py).

    attention_step.c   one decoding position of an attention stack (`multibyte.model.Stack`),
                       bound by `multibyte.kernels.attention.NativeAttentionStep`
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-std=c11", "-shared", "-fPIC"]
SOURCES = Path(__file__).resolve().parent

_loaded: dict[str, Optional[ctypes.CDLL]] = {}
_lock = threading.Lock()


def enabled() -> bool:
    """False when the environment turns native kernels off (`MULTIBYTE_NATIVE=0`)."""
    return os.environ.get("MULTIBYTE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


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


def library_path(name: str) -> Optional[Path]:
    """Where `name`'s library for this CPU, compiler and source lives (None: no compiler)."""
    compiler = _compiler()
    if compiler is None:
        return None
    source = (SOURCES / f"{name}.c").read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), _cpu_identity().encode()]))
    return cache_folder() / f"{name}-{key.hexdigest()[:16]}.so"


def _build(name: str, target: Path) -> None:
    """Compile SOURCES/name.c into `target`, atomically (concurrent processes may build too)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        command = [_compiler(), *FLAGS, "-o", temporary, str(SOURCES / f"{name}.c"), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def load(name: str) -> Optional[ctypes.CDLL]:
    """The compiled kernel library `name` (built on first use), or None when native kernels are
    off or cannot be built here (one warning says why)."""
    if not enabled():
        return None
    with _lock:
        if name in _loaded:
            return _loaded[name]
        library = None
        try:
            path = library_path(name)
            if path is None:
                raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')}) on the PATH")
            if not path.exists():
                _build(name, path)
            library = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            warnings.warn(f"native kernel {name!r} unavailable, using the PyTorch reference: {error}", RuntimeWarning, stacklevel=2)
        _loaded[name] = library
        return library
