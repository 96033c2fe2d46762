#!/usr/bin/env bash
# The GPU results protocol (benchmarks/README.md): on a CUDA machine, in one go,
#   1. the test suite, with the Triton kernels compiled for real;
#   2. the full benchmark sweep (pytest benchmarks --full);
#   3. the ahead-of-time kernel report (sm_80 and sm_90);
#   4. fastgpt profile --compare for a forward pass, a train step and generation;
#   5. the markdown report and plots of the sweep.
# Every step runs even if an earlier one fails; the exit status is 1 if any failed.
# Writes OUTDIR/<gpu>-<date>.{json,md}, its PNG plots and the logs of each step.
# Downloads nothing: transformers' GPT-2 is built from a config with random weights.
#
#   benchmarks/run_gpu.sh benchmarks/results
set -uo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: benchmarks/run_gpu.sh OUTDIR   (e.g. benchmarks/results)" >&2
    exit 2
fi
outdir=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "run_gpu.sh: cannot create $1" >&2; exit 2; }
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Real kernels, default dispatch: neither the interpreter nor a forced backend.
unset TRITON_INTERPRET FASTGPT_BACKEND

gpu=$("$python" - <<'EOF'
import re, sys, torch
if not torch.cuda.is_available():
    sys.exit("run_gpu.sh: no CUDA device (torch.cuda.is_available() is False); this protocol is for a GPU machine")
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))
EOF
) || exit 2
stem="$outdir/$gpu-$(date -u +%Y-%m-%d)"
echo "run_gpu.sh: writing $stem.*" >&2

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

step "environment" "$stem-environment.txt" "$python" - <<'EOF'
import platform, torch, triton, transformers, fastgpt
print("device      ", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
print("torch       ", torch.__version__, "| CUDA", torch.version.cuda)
print("triton      ", triton.__version__)
print("transformers", transformers.__version__)
print("python      ", platform.python_version(), "| fastgpt", fastgpt.__version__)
EOF
nvidia-smi > "$stem-nvidia-smi.txt" 2>&1 || true

step "tests" "$stem-tests.txt" pytest tests -q -p no:cacheprovider
step "benchmarks" "$stem-benchmarks.txt" pytest benchmarks --full -p no:cacheprovider \
    --benchmark-json "$stem.json" --benchmark-group-by=group --benchmark-columns=min,median,iqr,rounds
step "kernel report" "$stem-kernels.txt" "$python" -m fastgpt.kernels.report --arch 80,90 --json "$stem-kernels.json"
for mode in forward train-step generate; do
    step "profile $mode" "$stem-profile-$mode.txt" fastgpt profile --compare --mode "$mode" --quiet \
        --json "$stem-profile-$mode.json"
done

if [[ -s "$stem.json" ]]; then
    step "report" "$stem-report.txt" "$python" benchmarks/report.py "$stem.json" "$outdir"
    # Append what the sweep's tables do not show: the other steps' verdicts and the profiles.
    {
        echo
        echo "## The rest of this run"
        echo
        echo "- tests: \`$(tail -n 1 "$stem-tests.txt")\`"
        echo "- kernel report: \`$(tail -n 1 "$stem-kernels.txt")\` (details: $(basename "$stem-kernels.txt"), $(basename "$stem-kernels.json"))"
        for failure in ${failed[@]+"${failed[@]}"}; do
            echo "- **failed**: $failure"
        done
        for mode in forward train-step generate; do
            echo
            echo "### fastgpt profile --compare --mode $mode"
            echo
            echo '```'
            cat "$stem-profile-$mode.txt"
            echo '```'
        done
    } >> "$stem.md"
else
    failed+=("report (no $stem.json: the benchmark step wrote nothing)")
fi

echo >&2
if [[ ${#failed[@]} -gt 0 ]]; then
    printf 'run_gpu.sh: FAILED: %s\n' "${failed[@]}" >&2
    echo "run_gpu.sh: results (with the failures recorded) are in $outdir; commit them all the same" >&2
    exit 1
fi
echo "run_gpu.sh: all steps passed; commit $outdir/$(basename "$stem")*" >&2
