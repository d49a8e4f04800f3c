#!/usr/bin/env bash
# The GPU check: one run, under 8 minutes on one NVIDIA GPU (sized for an H200).
#
#   bash benchmarks/gpu_check.sh             # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run   # the script's own logic on any machine: tiny CPU
#                                            # shapes, CUDA tests collected (and skipped)
#
# 1. finds or makes a Python environment with a CUDA build of torch: $MULTIBYTE_PYTHON if set,
#    else the CI environment .ci/run makes (same key), else `python3` (e.g. an activated venv)
#    when it imports multibyte and pytest and its torch sees a GPU, else creates that CI
#    environment (`pip install -e '.[test]'`, needs the network; never in a dry run);
#    MEGABYTE-pytorch (the peer in both benchmarks) and the `[cuda]` extra (mamba-ssm's fused
#    kernels) are installed when possible, their absence is reported, not fatal;
# 2. runs every CUDA-marked test (`pytest -m cuda`: tests/test_cuda.py);
# 3. runs benchmarks/train_throughput.py --device cuda (full shapes: L 8192, B 4);
# 4. runs benchmarks/sample_speed.py on the GPU when it takes --device, else measures batch-1
#    sampling of the same image model (eager and CUDA-graph decoding) inline;
# 5. prints ONE JSON line summarising everything. Full logs go to $OUT/gpu_check (or
#    a new folder under $TMPDIR (or /tmp) when OUT is unset).
# Exit status: 0 when every part ran and every test passed, 1 when something failed, 2 when no
# GPU is usable (outside --dry-run).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (known: --dry-run, --help)" >&2; exit 2 ;;
  esac
done

LOGS="${OUT:+$OUT/gpu_check}"
LOGS="${LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$LOGS"
START=$(date +%s)
STATUS="$LOGS/status.tsv"  # part <tab> outcome <tab> detail, one line per part
: > "$STATUS"
note() { printf '%s\t%s\t%s\n' "$1" "$2" "${3:-}" >> "$STATUS"; echo "gpu_check: $1: $2 ${3:-}" >&2; }

summary() {  # the one JSON line, from the status file and the parts' own outputs
  "${PY:-python3}" - "$LOGS" "$DRY_RUN" "$(( $(date +%s) - START ))" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
logs, dry_run, wall = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
out = {"check": "gpu_check", "dry_run": dry_run, "wall_s": wall, "logs": str(logs)}
try:
    out.update(json.loads((logs / "device.json").read_text()))
except (OSError, ValueError):
    out["gpu"] = None
parts = {}
for line in (logs / "status.tsv").read_text().splitlines():
    part, outcome, detail = (line.split("\t") + ["", ""])[:3]
    parts[part] = outcome if not detail else f"{outcome}: {detail}"
out["parts"] = parts
junit = logs / "cuda_tests.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    out["cuda_tests"] = counts
for name in ("train_throughput", "sample_speed"):
    path = logs / f"{name}.log"
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l.startswith("{")]
        try:
            out[name] = json.loads(lines[-1]) if lines else None
        except ValueError:
            out[name] = None
print(json.dumps(out))
PY
}

if [ "$DRY_RUN" = 0 ] && ! nvidia-smi -L >"$LOGS/nvidia-smi.log" 2>&1; then
  note gpu none "nvidia-smi lists no GPU (see nvidia-smi.log); nothing installed or run"
  PY=""; summary
  exit 2
fi

# ------------------------------------------------------------------ 1. the environment
has_cuda_torch() {  # $1: a python; true when it imports torch and (outside dry runs) sees a GPU
  "$1" - "$DRY_RUN" <<'PY' >/dev/null 2>&1
import sys
import torch
sys.exit(0 if sys.argv[1] == "1" or torch.cuda.is_available() else 1)
PY
}

PIP_FAST="--quiet --retries 1 --timeout 15"  # an offline machine fails in seconds, not minutes
key=$(sha256sum pyproject.toml | cut -c1-16)
venv="${MULTIBYTE_ENV_ROOT:-$HOME/.cache/multibyte-ci}/venv-$key"
PY=""
if [ -n "${MULTIBYTE_PYTHON:-}" ]; then
  PY="$MULTIBYTE_PYTHON"; note environment given "$PY"
elif [ -f "$venv/.complete" ] && has_cuda_torch "$venv/bin/python"; then
  PY="$venv/bin/python"; note environment reused "$venv"
elif command -v python3 >/dev/null && has_cuda_torch python3 && python3 -c "import multibyte.training, pytest" 2>/dev/null; then
  PY=$(command -v python3); note environment system "$PY"
elif [ "$DRY_RUN" = 1 ]; then
  note environment failed "dry run: no usable Python (activate the project's environment); nothing installed"
else
  echo "gpu_check: creating $venv (pip install -e '.[test]')" >&2
  rm -rf "$venv" && mkdir -p "$(dirname "$venv")" && python3 -m venv "$venv" \
    && timeout 300 "$venv/bin/python" -m pip install --quiet --upgrade pip >"$LOGS/install.log" 2>&1 \
    && timeout 300 "$venv/bin/python" -m pip install --quiet -e '.[test]' >>"$LOGS/install.log" 2>&1 \
    && touch "$venv/.complete" && PY="$venv/bin/python" && note environment created "$venv"
  [ -n "$PY" ] || note environment failed "see install.log"
fi

if [ -n "$PY" ]; then
  "$PY" -c "import MEGABYTE_pytorch" 2>/dev/null \
    || timeout 60 "$PY" -m pip install $PIP_FAST MEGABYTE-pytorch >>"$LOGS/install.log" 2>&1 \
    || note megabyte_pytorch missing "pip install MEGABYTE-pytorch failed (offline?): peer figures absent"
  if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import mamba_ssm, causal_conv1d" 2>/dev/null; then
    # Prebuilt wheels only: compiling the kernels would take longer than the whole check.
    timeout 60 "$PY" -m pip install $PIP_FAST --only-binary=:all: 'mamba-ssm>=2' 'causal-conv1d>=1.2' >>"$LOGS/install.log" 2>&1 \
      || note mamba_ssm missing "no prebuilt wheel: the fused-kernel test skips"
  fi
fi

GPU_OK=0
if [ -n "$PY" ]; then
  "$PY" - >"$LOGS/device.json" 2>>"$LOGS/device.log" <<'PY' && GPU_OK=1
import json, torch
ok = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if ok else None}))
raise SystemExit(0 if ok else 1)
PY
fi
if [ "$GPU_OK" = 0 ]; then
  if [ "$DRY_RUN" = 0 ]; then
    note gpu none "no usable CUDA device (torch.cuda.is_available() is false or no environment)"
  else
    note gpu none "dry run: CPU shapes"
  fi
fi


if [ -z "$PY" ] || { [ "$GPU_OK" = 0 ] && [ "$DRY_RUN" = 0 ]; }; then
  summary
  exit 2
fi
DEVICE=cuda
[ "$GPU_OK" = 1 ] || DEVICE=cpu
FAILED=0

# ------------------------------------------------------------------ 2. CUDA tests
if timeout 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$LOGS/cuda_tests.xml" tests/ >"$LOGS/cuda_tests.log" 2>&1; then
  note cuda_tests ok
else
  rc=$?; FAILED=1; note cuda_tests failed "exit $rc, see cuda_tests.log"
fi

# ------------------------------------------------------------------ 3. training throughput
if [ "$DRY_RUN" = 1 ]; then TRAIN_ARGS=(--seq-len 256 --batch 1 --steps 1); else TRAIN_ARGS=(); fi
if timeout 200 "$PY" benchmarks/train_throughput.py --device "$DEVICE" "${TRAIN_ARGS[@]}" >"$LOGS/train_throughput.log" 2>&1; then
  note train_throughput ok
else
  rc=$?; FAILED=1; note train_throughput failed "exit $rc, see train_throughput.log"
fi

# ------------------------------------------------------------------ 4. sampling speed
if "$PY" benchmarks/sample_speed.py --help 2>/dev/null | grep -q -- "--device"; then
  SAMPLE=(benchmarks/sample_speed.py --device "$DEVICE")
  [ "$DRY_RUN" = 1 ] && SAMPLE+=(--quick)
  note sample_speed_source script "sample_speed.py --device $DEVICE"
else
  SAMPLE=(-)
  note sample_speed_source inline "sample_speed.py takes no --device: batch-1 sampling measured inline"
fi
if [ "${SAMPLE[0]}" = "-" ]; then
  timeout 200 "$PY" - "$DEVICE" "$DRY_RUN" >"$LOGS/sample_speed.log" 2>&1 <<'PY'
# Batch-1 sampling of the shipped CPU image preset's shape (MEGABYTE, P = 12, 384x4 global,
# 128x2 local; random weights): the first 4,096 bytes of an image, eager and compiled (CUDA
# graphs on a GPU). A dry run checks the plumbing only: 240 bytes, eager.
import json, sys, time
import torch
from multibyte.config import ModelConfig
from multibyte.model import HierarchicalByteModel
from multibyte.sampling import allocate_decode_state, decode_step, prefill, sample_next_byte

device, dry_run = torch.device(sys.argv[1]), sys.argv[2] == "1"
length = 240 if dry_run else 4096
torch.manual_seed(0)
model = HierarchicalByteModel(ModelConfig.from_name("megabyte-image64-cpu")).to(device).eval()
out = {"device": str(device), "bytes": length, "batch": 1}

def run(compile: bool, n: int) -> float:
    """Bytes per second of sampling n bytes from an empty prompt."""
    state = allocate_decode_state(model, 1, n, compile=compile)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        logits = prefill(model, state, torch.zeros(1, 0, dtype=torch.long, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n - 1):
            byte = sample_next_byte(logits, generator=generator)
            logits = decode_step(model, state, byte)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (n - 1) / (time.perf_counter() - start)

for name, compile in (("eager", False),) + ((("compiled", True),) if not dry_run else ()):
    try:
        run(compile, 48)  # warm-up; compiles every step kind (inside a patch, at its boundary)
        out[f"batch1_bytes_per_s_{name}"] = round(run(compile, length), 1)
    except Exception as error:  # reported in the JSON: one failing mode must not hide the other
        out[f"{name}_error"] = f"{type(error).__name__}: {error}"[:300]
print(json.dumps(out))
raise SystemExit(1 if any(k.endswith("_error") for k in out) else 0)
PY
else
  timeout 200 "$PY" "${SAMPLE[@]}" >"$LOGS/sample_speed.log" 2>&1
fi
rc=$?
if [ "$rc" = 0 ]; then note sample_speed ok; else FAILED=1; note sample_speed failed "exit $rc, see sample_speed.log"; fi

summary | tee "$LOGS/summary.json"
exit "$FAILED"
