#!/usr/bin/env bash
# GPU check for a lent H100 / H200, under 5 minutes in all. Run from anywhere inside the repo:
#
#   OUT=/path/to/out bash benchmarks/gpu_check.sh      # default OUT=./gpu_check_out
#
# Parts, each under `timeout` and a global deadline, each tee'd to $OUT/<part>.txt:
#   env        nvidia-smi, python / torch / CUDA versions, which of the repo's packages are missing
#   tests_cuda tests/test_cuda.py: FourM forward/backward, training steps, tokenizers, AionModel on CUDA vs CPU
#   tests      tests/test_pretrain.py tests/test_model.py tests/test_inference.py (test_pretrain's runs pick
#              CUDA when it is there; it needs the mock universe, so it is left out when astropy & co. are missing)
#   pretrain   benchmarks/gpu_pretrain.py, base preset: tokens/s and MFU, peak memory, the real loop
#   inference  benchmarks/run_all.py --synthetic --parts inference --device cuda: embed / predict objects/s of a
#              random-init base model on random tokens (the model alone; no mock data needed)
# $OUT/summary.txt lists each part's exit code and seconds (0 = passed; 124 = timed out).
#
# Environment: PYTHON (default python3), PARTS (default "env tests_cuda tests pretrain inference"),
# DEADLINE_S (default 290), WHEELS=DIR to pip-install wheels from DIR first (no index; e.g. astropy for the
# mock universe), SMOKE=1 to exercise this script on a CPU-only machine (tiny sizes; GPU parts run on the CPU).
# Without CUDA (and without SMOKE=1) only `env` runs and the script exits with 2.
set -u
set -o pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
PY=${PYTHON:-$(command -v python3 || command -v python)}
PARTS=${PARTS:-"env tests_cuda tests pretrain inference"}
SMOKE=${SMOKE:-0}
T0=$(date +%s)
DEADLINE=$((T0 + ${DEADLINE_S:-290}))
FAILED=0

wants() { [[ " $PARTS " == *" $1 "* ]]; }

note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# run_part NAME LIMIT_S CMD...: run under timeout (cut to what is left before the deadline), tee to $OUT/NAME.txt
run_part() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    if ((left < 15)); then
        note "$name: NOT RUN (global deadline reached)"
        FAILED=1
        return
    fi
    ((limit > left)) && limit=$left
    local start
    start=$(date +%s)
    echo "== $name (timeout ${limit} s): $*" | tee "$OUT/$name.txt"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    local secs=$(($(date +%s) - start))
    ((rc != 0)) && FAILED=1
    local what="ok"
    ((rc == 124 || rc == 137)) && what="TIMED OUT"
    ((rc != 0 && rc != 124 && rc != 137)) && what="FAILED"
    note "$name: $what (exit $rc, ${secs} s; log $OUT/$name.txt)"
}

if [[ -n "${WHEELS:-}" && -d "${WHEELS:-}" ]]; then
    echo "installing wheels from $WHEELS into /tmp/aion_site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/aion_site \
        "$WHEELS"/*.whl; then
        export PYTHONPATH="/tmp/aion_site:$PYTHONPATH"
    else
        note "wheels from $WHEELS: install failed (continuing without them)"
    fi
fi

# ---------------------------------------------------------------------------- (a) environment
ENV_PY='
import importlib.util, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}; CUDA {torch.version.cuda}; "
      f"cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("device: no CUDA device visible to torch")
# module names of pyproject.toml dependencies (+ test / optional ones)
mods = ["torch", "einops", "accelerate", "safetensors", "numpy", "scipy", "astropy", "astropy_healpix", "datasets",
        "pyarrow", "h5py", "yaml", "tqdm", "matplotlib", "kcorrect", "speclite", "sklearn", "pytest", "deepspeed"]
missing = []
for m in mods:
    try:
        found = importlib.util.find_spec(m) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        missing.append(m)
print("missing python packages:", " ".join(missing) if missing else "none")
mock = [m for m in ("astropy", "astropy_healpix", "h5py", "scipy", "kcorrect", "speclite") if m in missing]
print("mock universe / cross-match:", f"UNAVAILABLE (missing {mock})" if mock else "available")
'
env_part() {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')); OUT=$OUT; PY=$PY"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        nvidia-smi | head -15
    else
        echo "nvidia-smi: not found"
    fi
    echo "cpus: $(nproc)"
    "$PY" -c "$ENV_PY"
}
if wants env; then
    export -f env_part
    export REPO OUT PY ENV_PY
    run_part env 30 bash -c env_part
fi

HAVE_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
MOCK_OK=$("$PY" -c '
import importlib.util
ok = True
for m in ("astropy", "astropy_healpix", "h5py", "scipy", "kcorrect", "speclite"):
    try:
        ok = ok and importlib.util.find_spec(m) is not None
    except (ImportError, ValueError):
        ok = False
print(int(ok))' 2>/dev/null || echo 0)

if [[ "$HAVE_CUDA" != 1 && "$SMOKE" != 1 ]]; then
    note "no CUDA device: GPU parts skipped (SMOKE=1 runs them on the CPU as a test of this script)"
    note "total $(($(date +%s) - T0)) s"
    exit 2
fi
DEVICE=cuda
[[ "$HAVE_CUDA" != 1 ]] && DEVICE=cpu

# ---------------------------------------------------------------------------- (b) tests
if wants tests_cuda; then
    run_part tests_cuda 45 "$PY" -m pytest -q -x -p no:cacheprovider -rs tests/test_cuda.py
fi
if wants tests; then
    FILES="tests/test_pretrain.py tests/test_model.py tests/test_inference.py"
    if [[ "$MOCK_OK" != 1 ]]; then
        note "tests: tests/test_pretrain.py left out: its fixture builds a mock universe (astropy & co. missing)"
        FILES="tests/test_model.py tests/test_inference.py"
    fi
    [[ "$SMOKE" == 1 && "$HAVE_CUDA" != 1 ]] && FILES="tests/test_model.py"
    # shellcheck disable=SC2086  # FILES is a list of paths
    run_part tests 150 "$PY" -m pytest -q -x -p no:cacheprovider -rs $FILES
fi

# ---------------------------------------------------------------------------- (c) base-preset training MFU
if wants pretrain; then
    if [[ "$DEVICE" == cuda ]]; then
        run_part pretrain 120 "$PY" benchmarks/gpu_pretrain.py --batches 256 --steps 10 --warmup 2 \
            --loop-steps 20 --workers 8
    else
        run_part pretrain 120 "$PY" benchmarks/gpu_pretrain.py --device cpu --preset tiny --batches 4 --steps 2 \
            --loop-steps 4 --loop-objects 256 --workers 1
    fi
fi

# ---------------------------------------------------------------------------- (d) inference throughput
if wants inference; then
    if [[ "$DEVICE" == cuda ]]; then
        run_part inference 90 "$PY" benchmarks/run_all.py --synthetic --parts inference --device cuda \
            --inference-preset base --synthetic-objects 2048 --batch-size 256 --threads 8 --out "$OUT/inference.md"
    else
        run_part inference 90 "$PY" benchmarks/run_all.py --synthetic --parts inference --device cpu \
            --inference-preset tiny --synthetic-objects 64 --out "$OUT/inference.md"
    fi
fi

note "total $(($(date +%s) - T0)) s; device $DEVICE$([[ "$SMOKE" == 1 ]] && echo ' (SMOKE)')"
exit $FAILED
