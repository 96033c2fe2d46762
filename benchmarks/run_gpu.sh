#!/usr/bin/env bash
# The long GPU session (benchmarks/README.md): on a CUDA machine with an hour or
# more, after the 8-minute check, in one go:
#   1. benchmarks/gpu_check.py OUTDIR/<stem>-check   (installs this checkout offline first)
#   2. the whole test suite, kernels compiled for real;
#   3. the full benchmark sweep, one suite at a time;
#   4. the ahead-of-time kernel report (sm_80 and sm_90);
#   5. fastgpt profile --compare for a forward pass, a train step and generation;
#   6. the markdown report and plots of each suite.
# Every step runs even if an earlier one fails, and each writes its files as it
# finishes (logs stream as they go), so a run stopped at any moment keeps every
# finished step. The exit status is 1 if any step failed. Downloads nothing.
#
#   benchmarks/run_gpu.sh benchmarks/results
set -uo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: benchmarks/run_gpu.sh OUTDIR   (e.g. benchmarks/results)" >&2
    exit 2
fi
outdir=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "run_gpu.sh: cannot create $1" >&2; exit 2; }
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# Real kernels, default dispatch: neither the interpreter nor a forced backend.
unset TRITON_INTERPRET FASTGPT_BACKEND

gpu=$("$python" - <<'EOF'
import re, sys, torch
if not torch.cuda.is_available():
    sys.exit("run_gpu.sh: no CUDA device (torch.cuda.is_available() is False); this protocol is for a GPU machine")
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))
EOF
) || exit 2
stem="$outdir/$(date -u +%Y-%m-%d)-$gpu"
echo "run_gpu.sh: writing $stem-*" >&2

failed=()
step() {  # step NAME LOG COMMAND...: run, tee to LOG, remember a failure
    local name=$1 log=$2
    shift 2
    echo "=== $name: $*" >&2
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    if [[ $rc -ne 0 ]]; then
        failed+=("$name (exit $rc, see $(basename "$log"))")
    fi
    return 0
}

# The 8-minute verdict first; it also makes this checkout importable offline.
step "gpu check" "$stem-check.log" "$python" benchmarks/gpu_check.py "$stem-check"
step "tests" "$stem-tests.txt" "$python" -P -m pytest tests -q -p no:cacheprovider -n 8 \
    --junitxml "$stem-tests.xml"
for suite in op_attention op_decode_attention op_layer_norm op_gelu model_forward model_training model_generation \
    model_kv_cache; do
    step "benchmark $suite" "$stem-bench-$suite.txt" "$python" -P -m pytest "benchmarks/test_$suite.py" --full \
        -p no:cacheprovider --benchmark-json "$stem-bench-$suite.json" --benchmark-group-by=group \
        --benchmark-columns=min,median,iqr,rounds
    if [[ -s "$stem-bench-$suite.json" ]]; then
        step "report $suite" "$stem-report-$suite.txt" "$python" benchmarks/report.py "$stem-bench-$suite.json" "$outdir"
    fi
done
step "kernel report" "$stem-kernels.txt" "$python" -m fastgpt.kernels.report --arch 80,90 --json "$stem-kernels.json"
for mode in forward train-step generate; do
    step "profile $mode" "$stem-profile-$mode.txt" fastgpt profile --compare --mode "$mode" --quiet \
        --json "$stem-profile-$mode.json"
done

echo >&2
if [[ ${#failed[@]} -gt 0 ]]; then
    printf 'run_gpu.sh: FAILED: %s\n' "${failed[@]}" | tee "$stem-failures.txt" >&2
    echo "run_gpu.sh: results (with the failures recorded) are in $outdir; commit them all the same" >&2
    exit 1
fi
echo "run_gpu.sh: all steps passed; commit $stem-*" >&2
