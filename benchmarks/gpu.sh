#!/usr/bin/env bash
# DNRT on one GPU, every measurement of issue 13 in one go (at most 8 minutes):
#
#     bash benchmarks/gpu.sh [--dry-run] [OUT_DIR]          (OUT_DIR defaults to benchmarks/gpu-out)
#
# Writes OUT_DIR/full.log (every command and all it printed) and OUT_DIR/summary.md (machine, versions, which steps
# passed, failed or timed out, and each step's figures). Steps: CUDA tests, benchmarks/ops.py, benchmarks/train_step.py
# (ViT-Tiny 32×32 batch 256 bf16 AMP: GELU, RAA, RAA + ARR, the authors' way; eager, compiled, compiled as CUDA
# graphs; ResNet-18 CIFAR stem GELU vs DNRT) and `dnrt profile` of ViT-Tiny/16 at 224 (batch 1 and 128, eager and
# compiled). Each step has its own timeout, and none starts past the total budget (GPU_SH_BUDGET seconds, 465).
#
# Needs no network: the repository is put on PYTHONPATH (no install). Python packages the GPU machine lacks can
# come as wheels in .whl/ at the repository root (ignored by git), installed with --no-index --no-deps into a
# temporary folder on PYTHONPATH; prepare them on a machine with network, e.g. for timm:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl timm==1.0.31
# PYTHON names the interpreter (default python3).
#
# --dry-run: the same steps on the CPU with tiny sizes (each script's --dry-run; compilation through dynamo with the
# 'eager' backend, or disabled for `dnrt profile`): checks that everything imports and each step starts.
set -uo pipefail

usage() { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; }
DRY=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "error: one OUT_DIR only, got $OUT and $arg" >&2; exit 2; }; OUT="$arg" ;;
    esac
done
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/gpu-out}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-python3}"
BUDGET="${GPU_SH_BUDGET:-465}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

SITE=""
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE="$WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "error: could not install the wheels of .whl/" >&2; exit 1; }
fi
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/build/torch_extensions}"
DNRT=("$PY" -c 'import sys; from dnrt.tool.cli import main; sys.exit(main(sys.argv[1:]))')

ARGS="$*"
START=$SECONDS
STARTED="$(date -u '+%Y-%m-%d %H:%M UTC')"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git status --porcelain 2>/dev/null | grep -q . && COMMIT="$COMMIT (+ uncommitted changes)"
NAMES=() STATES=() TIMES=() COMMANDS=() LOGS=()
: > "$WORK/full.log"

write_summary() {  # summary.md from what has run so far, written atomically
    local i tmp="$OUT/.summary.md.tmp"
    {
        echo "# DNRT GPU benchmarks$([ $DRY = 1 ] && echo ' (dry run on the CPU: timings meaningless)')"
        echo
        echo "Command: \`bash benchmarks/gpu.sh $ARGS\`, commit $COMMIT, started $STARTED," \
             "$((SECONDS - START)) s so far."
        echo
        [ -s "$WORK/env.txt" ] && { sed 's/^/    /' "$WORK/env.txt"; echo; }
        echo "| step | status | seconds | command |"
        echo "|---|---|---|---|"
        for i in "${!NAMES[@]}"; do
            echo "| ${NAMES[$i]} | ${STATES[$i]} | ${TIMES[$i]} | \`${COMMANDS[$i]}\` |"
        done
        for i in "${!NAMES[@]}"; do
            [ -s "${LOGS[$i]}" ] || continue
            echo
            echo "## ${NAMES[$i]}: ${STATES[$i]}"
            echo
            echo '```'
            if [ "${NAMES[$i]}" = test_cuda ]; then tail -n 25 "${LOGS[$i]}"
            else grep -v -e 'Warning' -e 'warn(' -e '^W[0-9]\{4\} ' "${LOGS[$i]}" | tail -n 60; fi
            echo '```'
        done
    } > "$tmp" && mv "$tmp" "$OUT/summary.md"
    cp "$WORK/full.log" "$OUT/.full.log.tmp" && mv "$OUT/.full.log.tmp" "$OUT/full.log"
}

step() {  # step NAME TIMEOUT COMMAND...: run it under its own timeout, within what is left of the budget
    local name="$1" limit="$2" left rc began log="$WORK/${#NAMES[@]}-$1.log"
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    [ "$limit" -le $((left - 5)) ] || limit=$((left - 5))
    NAMES+=("$name") COMMANDS+=("$*") LOGS+=("$log")
    if [ "$limit" -lt 15 ]; then
        STATES+=("skipped (budget of $BUDGET s spent)") TIMES+=(0)
        write_summary; return
    fi
    printf '\n### %s (timeout %s s)\n$ %s\n' "$name" "$limit" "$*" >> "$WORK/full.log"
    began=$SECONDS
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    cat "$log" >> "$WORK/full.log"
    TIMES+=($((SECONDS - began)))
    case $rc in
        0) STATES+=(passed) ;;
        124|137) STATES+=("timed out after $limit s") ;;
        *) STATES+=("failed (exit $rc)") ;;
    esac
    echo "gpu.sh: $name: ${STATES[-1]} (${TIMES[-1]} s)" >&2
    write_summary
}

"$PY" - "$DRY" > "$WORK/env.txt" 2>&1 <<'EOF'
import importlib, platform, sys
dry = sys.argv[1] == "1"
print(f"python {platform.python_version()} ({sys.executable}) on {platform.node()}, {platform.machine()}")
missing = []
for name in ("torch", "torchvision", "timm", "numpy", "pytest", "triton", "dnrt"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except ImportError as e:
        print(f"{name}: MISSING ({e})")
        missing += [] if name == "triton" and dry else [name]
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; CUDA {torch.version.cuda}")
elif not dry:
    missing.append("a CUDA device (torch.cuda.is_available() is False)")
if missing:
    sys.exit(f"missing: {', '.join(missing)}; carry wheels in .whl/ (see benchmarks/gpu.sh)")
EOF
ENV_RC=$?
if [ $ENV_RC != 0 ]; then
    NAMES+=(environment) STATES+=("failed (exit $ENV_RC)") TIMES+=(0) COMMANDS+=("import check") LOGS+=("$WORK/env.txt")
    cat "$WORK/env.txt" >> "$WORK/full.log"
    write_summary
    cat "$WORK/env.txt" >&2
    exit 1
fi

if [ $DRY = 1 ]; then
    # the scripts' --dry-run compile with dynamo's 'eager' backend; `dnrt profile` runs with compilation disabled
    DEV=(--device cpu) TS=(--dry-run) OPS=(--dry-run) PROFILE=(env TORCH_COMPILE_DISABLE=1) SIZES=(--img-size 32
        --min-time 0.01) B128=2
else
    DEV=(--device cuda) TS=(--rounds 5 --min-time 0.3) OPS=() PROFILE=(env) SIZES=(--min-time 0.5) B128=128
fi
step test_cuda 120 "$PY" -m pytest -q -ra tests/test_cuda.py
step ops 90 "$PY" benchmarks/ops.py "${DEV[@]}" "${OPS[@]}"
step vit_eager_compiled 170 "$PY" benchmarks/train_step.py "${DEV[@]}" "${TS[@]}" --batch-size 256 --compile
step profile_batch1 70 "${PROFILE[@]}" "${DNRT[@]}" profile -m vit_tiny_patch16_224 "${DEV[@]}" "${SIZES[@]}" \
    --batch-size 1 --compile
step vit_cudagraphs 110 "$PY" benchmarks/train_step.py "${DEV[@]}" "${TS[@]}" --batch-size 256 \
    --compile-mode reduce-overhead --no-eager
step resnet18_cifar 100 "$PY" benchmarks/train_step.py "${DEV[@]}" "${TS[@]}" --model resnet18_cifar \
    --batch-size 256 --kinds gelu raa_arr --compile
step profile_batch128 70 "${PROFILE[@]}" "${DNRT[@]}" profile -m vit_tiny_patch16_224 "${DEV[@]}" "${SIZES[@]}" \
    --batch-size "$B128" --compile
write_summary
echo "gpu.sh: $((SECONDS - START)) s; $OUT/summary.md, $OUT/full.log" >&2
for state in "${STATES[@]}"; do [ "$state" = passed ] || exit 1; done
