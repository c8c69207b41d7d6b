#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in at most 8 minutes, run the GPU-only tests (`python -m pytest -m gpu`: FSDP1,
# ModelParallel/FSDP2, 16-mixed, a CPU teacher beside a CUDA student, DeepSpeed 1-3), the overhead benchmark and a
# realistic model (benchmarks/gpu_model.py: GPT-2 in bf16, plugin vs hand-written step time, teacher memory), and
# write one report, benchmarks/results/gpu_check.md, with every step's log in benchmarks/results/gpu_check/.
#
#   benchmarks/gpu_check.sh                   # on the GPU machine (from any folder)
#   benchmarks/gpu_check.sh --cpu-dry-run     # anywhere: the same steps at smoke size on CPU, report under /tmp
#   benchmarks/gpu_check.sh --output DIR      # write the report and logs to DIR instead
#
# Python: the active interpreter ($PYTHON, default python3) when it already imports torch (with CUDA, unless
# --cpu-dry-run), lightning, pytest and transformers; the project itself is then added with `pip install --no-deps
# -e .` if needed (works offline). Otherwise it makes .venv-gpu and runs `pip install -e '.[test]'` from the
# project's files (needs PyPI; on Linux PyPI's torch wheels are CUDA builds). DeepSpeed is tried with `pip install
# deepspeed` when missing; its three tests skip when it is not installed. A step that fails or runs out of time is
# reported as such and the next step still runs. Exit code: 0 when every step passed, 1 otherwise.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
OUTPUT=""
BUDGET=480 # seconds, all steps together
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu-dry-run) DRY_RUN=1 ;;
        --output) OUTPUT="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$OUTPUT" ]]; then
    if [[ $DRY_RUN == 1 ]]; then OUTPUT="${TMPDIR:-/tmp}/gpu_check_dry_run"; else OUTPUT="$ROOT/benchmarks/results"; fi
fi
LOGS="$OUTPUT/gpu_check"
REPORT="$OUTPUT/gpu_check.md"
mkdir -p "$LOGS"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
STEPS=() # one markdown table row per step
FAILED=0

# run_step NAME LIMIT COMMAND...: run COMMAND with at most LIMIT seconds (less if the budget is nearly spent),
# its output in $LOGS/NAME.log; record the outcome.
run_step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - SECONDS))
    if ((left < 20)); then
        STEPS+=("| $name | not run: the ${BUDGET} s budget was spent | 0 |")
        FAILED=1
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (at most ${limit} s): $*" >&2
    local start=$SECONDS status=0
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || status=$?
    local took=$((SECONDS - start)) outcome="passed"
    if ((status == 124 || status == 137)); then
        outcome="timed out after ${limit} s"
    elif ((status != 0)); then
        outcome="failed (exit $status)"
    fi
    [[ $outcome != passed ]] && FAILED=1
    STEPS+=("| $name | $outcome | $took |")
    echo "    $outcome in ${took} s" >&2
    return $status
}

environment_ready() {
    local need_cuda="$1"
    "$PYTHON" - "$need_cuda" <<'EOF' >/dev/null 2>&1
import sys
import lightning, pytest, torch, transformers  # noqa: F401
sys.exit(0 if sys.argv[1] == "0" or torch.cuda.is_available() else 1)
EOF
}

# 1. Python environment.
need_cuda=$((1 - DRY_RUN))
if environment_ready "$need_cuda"; then
    STEPS+=("| environment | the active Python had everything ($("$PYTHON" -c 'import sys; print(sys.executable)')) | 0 |")
else
    run_step install 240 bash -c "'$PYTHON' -m venv .venv-gpu && .venv-gpu/bin/python -m pip install --quiet \
        --disable-pip-version-check -e '.[test]'"
    if [[ -x .venv-gpu/bin/python ]]; then
        . .venv-gpu/bin/activate
        PYTHON=python
    fi
fi
if ! "$PYTHON" -c "import lightning_distill" >/dev/null 2>&1; then
    run_step install_project 60 "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
fi
if [[ $DRY_RUN == 0 ]] && ! "$PYTHON" -c "import deepspeed" >/dev/null 2>&1; then
    run_step install_deepspeed 120 "$PYTHON" -m pip install --quiet --disable-pip-version-check deepspeed
fi

# 2. The GPU-only tests (on CPU every one of them skips: the dry run checks they are collected).
run_step pytest_gpu 200 "$PYTHON" -m pytest -m gpu -v -rfEs -p no:randomly

# 3. The overhead benchmark (the CPU one, on this machine's cores) and 4. the realistic model on the GPU.
if [[ $DRY_RUN == 1 ]]; then
    run_step overhead 120 "$PYTHON" benchmarks/overhead.py --quick --threads 1 --markdown "$LOGS/overhead.md"
    run_step gpu_model 120 "$PYTHON" benchmarks/gpu_model.py --quick --device cpu --markdown "$LOGS/gpu_model.md"
else
    run_step overhead 150 "$PYTHON" benchmarks/overhead.py --rounds 10 --epochs 3 --markdown "$LOGS/overhead.md"
    run_step gpu_model 200 "$PYTHON" benchmarks/gpu_model.py --markdown "$LOGS/gpu_model.md"
fi

# 5. The report.
section() { # section TITLE FILE: the file's text, or why there is none
    printf '\n## %s\n\n' "$1"
    if [[ -s "$2" ]]; then cat "$2"; else echo "(no output: see the step's log in $(basename "$LOGS")/)"; fi
    echo
}
{
    echo "# GPU check"
    echo
    if [[ $DRY_RUN == 1 ]]; then
        echo "**CPU dry run** (\`benchmarks/gpu_check.sh --cpu-dry-run\`): smoke sizes, no GPU; no figure here means anything."
    else
        echo "\`benchmarks/gpu_check.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    fi
    echo
    gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    echo "Machine: $(nproc) CPU cores; GPU: ${gpu:-none (nvidia-smi found none)}"
    echo
    echo "Python: $("$PYTHON" -c 'import sys, torch, lightning; print(sys.version.split()[0], "| torch", torch.__version__, "CUDA", torch.version.cuda, "| lightning", lightning.__version__)' 2>&1 | tail -1)"
    echo
    echo "| step | outcome | seconds |"
    echo "|---|---|---:|"
    printf '%s\n' "${STEPS[@]}"
    echo
    echo "Total ${SECONDS} s (budget ${BUDGET} s). Logs: \`$(basename "$LOGS")/<step>.log\`."
    printf '\n## `python -m pytest -m gpu`\n\n```\n'
    grep -E "(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)( |$)|^(FAILED|ERROR|SKIPPED) |=+ .*(passed|failed|skipped|error).* =+" \
        "$LOGS/pytest_gpu.log" 2>/dev/null | grep -v "^$" || echo "(no pytest output)"
    printf '```\n'
    section "Overhead (\`benchmarks/overhead.py\`, CPU)" "$LOGS/overhead.md"
    section "Realistic model (\`benchmarks/gpu_model.py\`)" "$LOGS/gpu_model.md"
} >"$REPORT"
echo "Report: $REPORT" >&2
exit $FAILED
