#!/usr/bin/env bash
# Everything GPU-side: install from the working tree, build the CUDA extension, run the test suite (GPU
# tests included; they are skipped only without CUDA; the tests marked cpu_only, the same on any machine,
# are left to CI), `dit8 bench dit` and the benchmark suites, then
# print every result so far as markdown tables (bench/results_tables.py).
#
# Usage (on a CUDA machine, from the repository root):
#     bash bench/gpu_check.sh                 # every stage not yet done on this machine
#     bash bench/gpu_check.sh tests gemm      # these stages, even if done before (the dit stage still
#                                             # skips the runs whose $WORK/dit_*.json are there)
#     BUDGET=540 bash bench/gpu_check.sh      # finish within 540 s; the same command again goes on
#     bash bench/gpu_check.sh --help          # this text
# Stages, in the order of what their results are worth: tests dit gemm attention candidates (the forward
# with the Gluon candidates routed in, bench/gluon_choice.py) fused pipeline profile (Nsight Compute
# counters of the kernels short of their targets, bench/profile_kernels.py; PROFILE_ONLY="a;b" keeps the
# cases whose names hold a or b) sweep (every candidate configuration of the GEMM, attention and fused
# rows kernels, for tuning their tables; SWEEP_GEMM, SWEEP_ATTENTION, SWEEP_FUSED narrow each with a
# pytest -k expression, and DIT8_SWEEP_ONLY, a regular expression over the GEMM and attention
# configurations' names, narrows the candidates each case times to those and the table's own).
#
# While it runs, nvidia-smi samples the GPU's clock, power, temperature and why it held its clock down
# (clocks.csv, beside marks of when each stage and forward began: marks.csv; the GPU CUDA_VISIBLE_DEVICES
# names first, else GPU 0); the summary has a table of them per stage.
# Results collect in $WORK (default .gpu_check/ in the repository, which git ignores); a stage that
# finished is listed in $WORK/done and left out of a later run without named stages. Results of another
# GPU or another tree found there move to $WORK/previous/ first. Each stage runs for at most its own
# limit (seconds: TESTS_LIMIT for the tests, default 360, STAGE_LIMIT for each other stage, default
# 540); with BUDGET set, each stage gets what is left of it (at most its limit) and a stage that cannot
# get a minute is left for the next run; a stage cut off reports what ran (pytest writes its summary,
# JUnit XML and benchmark JSON on the interrupt). When $OUT is set, $OUT/dit8-gpu.tgz holds every result
# file, refreshed after each stage and when the script is stopped, so a command stopped from outside still
# returns what had finished (killed outright, what the last stage before it left).
#
# A machine without internet access gets the packages it lacks (PyAV for the video tests, diffusers for
# `--compare diffusers`) as wheels in .whl/ (git ignores it: copy it along with the working tree),
# installed into /tmp/site; fetch them on a machine with pip:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d .whl av==18.1.0 diffusers==0.42.1 importlib_metadata
# PYTHON names the interpreter (default python3). pytest-xdist (spreads the tests over TEST_WORKERS
# processes, default 12: most of their time is Triton compiling kernels, on the CPU) and pytest-timeout
# are used where installed.
# The stages after the tests run with DIT8_VERIFIED (the kernels the tests verified: what "auto" may run)
# and DIT8_SKIP_GLUON, the Gluon candidates whose GPU tests have not passed (no benchmark or profile);
# DIT8_GLUON, where set, chooses the Gluon kernels routed in (kernels/candidates.py) for every stage but
# candidates.
set -uo pipefail
case "${1:-}" in  # the comment above is the usage
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
esac
# The arguments and settings first: a mistake in them is reported on any machine, before anything is
# moved or written.
# (No leading zero, which bash's arithmetic reads as octal, and at most 9 digits, which it cannot wrap.)
for name in BUDGET TESTS_LIMIT STAGE_LIMIT TEST_WORKERS; do
    [[ -z "${!name:-}" || "${!name}" =~ ^(0|[1-9][0-9]{0,8})$ ]] || {
        echo "gpu_check: $name must be a whole number of at most 9 digits, without leading zeros, got ${!name}"
        exit 2; }
done
all_stages=(tests dit gemm attention candidates fused pipeline profile sweep)
stages=("$@")
for stage in "${stages[@]}"; do
    known=0
    for name in "${all_stages[@]}"; do [ "$stage" = "$name" ] && known=1; done
    [ "$known" = 1 ] || {
        echo "gpu_check: unknown stage '$stage' (${all_stages[*]}; --help for the usage)"; exit 2; }
done
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || {
    echo "gpu_check: no NVIDIA driver here (nvidia-smi not found); run it on a CUDA machine"; exit 1; }
nvidia-smi -L >/dev/null 2>&1 || { echo "gpu_check: nvidia-smi fails here: $(nvidia-smi -L 2>&1 | head -1)"; exit 1; }
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" || exit 1; fi
start=$SECONDS
# Whatever still runs when the script ends (stopped by a signal: bash runs the EXIT trap then too) is
# stopped with it: a test run or the CUDA build left going would hold the GPU for the next command.
# (The CUDA build's `timeout` runs --foreground, in the script's process group, so that a signal sent to
# the group reaches it too; `limited` below signals a process group of its own.)
kill_tree() {
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
    [ "$1" = $$ ] || kill "$1" 2>/dev/null
}
# Then what the stages have left so far goes into $OUT's archive (pack, once defined), also when a stage
# was stopped part way: the tests stage, the first and the longest, packs only at its end otherwise.
trap 'kill_tree $$; declare -F pack >/dev/null && pack' EXIT
out=${WORK:-.gpu_check}
mkdir -p "$out" && out=$(cd "$out" && pwd -P)  # absolute: pytest-benchmark's file:// storage needs it
py=${PYTHON:-python3}
# Results of another machine or another tree (a results folder that came along with a copy of the
# repository, say) would pass for this run's, and their stages for done: they move to $out/previous/
# (replacing an older one), and this run starts from an empty folder. The machine files (the stamp,
# gpu.txt, the clock samples) name the GPU the stages run on, torch's first (an index or a UUID), not
# every GPU's lines mixed.
gpu=${CUDA_VISIBLE_DEVICES:-0}
gpu=${gpu%%,*}
stamp="$(nvidia-smi -i "$gpu" --query-gpu=uuid --format=csv,noheader 2>/dev/null | head -1) $(pwd -P)"
if [ -n "$(ls -A "$out" | grep -vx previous)" ] && [ "$(cat "$out/stamp.txt" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$out/previous" && mkdir "$out/previous"
    find "$out" -mindepth 1 -maxdepth 1 ! -name previous -exec mv {} "$out/previous/" \;
    echo "gpu_check: the results in $out were another machine's or tree's: moved to $out/previous/"
fi
echo "$stamp" >"$out/stamp.txt"
touch "$out/done"
# The GPU's clock, power, temperature and the reasons it held its clock down, twice a second, beside
# marks of what ran when: results_tables.py summarises them per stage (a kernel timed slower inside the
# forward than alone may be one run at a lower clock). Read-only queries: the card's settings stay.
fields=timestamp,clocks.sm,power.draw,temperature.gpu
for reasons in clocks_event_reasons.active clocks_throttle_reasons.active; do  # (the older drivers' name last)
    nvidia-smi -i "$gpu" --query-gpu=$fields,$reasons --format=csv,noheader >/dev/null 2>&1 &&
        { fields=$fields,$reasons; break; }
done
[ -s "$out/clocks.csv" ] || echo "$fields" >"$out/clocks.csv"
# The loop passes the samples on while this script lives: killed outright (SIGKILL runs no EXIT trap), the
# loop ends at the next sample and nvidia-smi with its next write.
nvidia-smi -i "$gpu" --query-gpu=$fields --format=csv,noheader,nounits -lms 500 2>/dev/null |
    while IFS= read -r line; do kill -0 $$ 2>/dev/null || break; echo "$line"; done >>"$out/clocks.csv" &
sampler=$!
mark() { echo "$(date '+%Y/%m/%d %H:%M:%S.%3N'),$*" >>"$out/marks.csv"; }
mark setup  # (also where the parts of an earlier run that was killed before its end mark end)
if [ ${#stages[@]} -eq 0 ]; then
    for stage in "${all_stages[@]}"; do grep -qx "$stage" "$out/done" || stages+=("$stage"); done
fi
pack() {  # every result file in one archive, for machines that hand back only a few files
    [ -n "${OUT:-}" ] || return 0
    # tar exits 1 when a file changed while it was read (a log still being written): still an archive.
    tar -czf "$OUT/dit8-gpu.tgz.part" --exclude=./previous -C "$out" . 2>/dev/null
    [ $? -le 1 ] && mv "$OUT/dit8-gpu.tgz.part" "$OUT/dit8-gpu.tgz"
    return 0
}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >"$out/wheels.log" 2>&1 ||
        { echo "installing .whl/ failed:"; tail -5 "$out/wheels.log"; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$py" - <<'PY' || exit 1
import importlib.util, sys
needed = ("torch", "triton", "safetensors", "numpy", "pytest", "pytest_benchmark")
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit("gpu_check: missing Python packages: " + ", ".join(missing) + " (carry their wheels in .whl/)")
for name, what in (("av", "the video tests"), ("diffusers", "--compare diffusers"),
                   ("pybind11", "the CUDA extension (its tests)"), ("ninja", "the CUDA extension without a system ninja")):
    if importlib.util.find_spec(name) is None:
        print(f"gpu_check: {name} is not installed; {what} will be skipped")
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (a CPU build of torch, or no GPU "
             f"visible): the stages would time the CPU")
PY
# Set up when this machine has not been, or when `dit8` is not this working tree's.
here=$(pwd -P)
if [ ! -f "$out/gpu.txt" ] || [ "$("$py" -c 'import dit8, pathlib; print(pathlib.Path(dit8.__file__).resolve().parents[1])' 2>/dev/null)" != "$here" ]; then
    "$py" -m pip install -q -e . --no-deps --no-build-isolation >"$out/install.log" 2>&1 || {
        echo "install failed:"; tail -20 "$out/install.log"; exit 1; }
    nvidia-smi -i "$gpu" --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    "$py" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
    # For this GPU's architecture, beside the first stage: tests that need the module wait for it (a
    # file lock), the others go on.
    timeout --foreground 300 "$py" -m dit8.kernels.cuda_ext build >"$out/cuda_build.log" 2>&1 &
    build_pid=$!
fi

# Seconds the next command may run: what is left of its stage's time (STAGE_LIMIT, default 540 s; the
# tests get TESTS_LIMIT, default 360 s, so that a hung test cannot take the benchmarks' time), or less
# where BUDGET leaves less (40 s are kept: for a process killed 20 s after its SIGINT, and the summary).
budget_left() { [ -n "${BUDGET:-}" ] && echo $((BUDGET - (SECONDS - start) - 40)) || echo 86400; }
seconds_left() {
    local own=$((stage_end - SECONDS)) budget
    budget=$(budget_left)
    echo $((own < budget ? own : budget))
}
pytest_args=(-q -p no:cacheprovider --durations=10)
"$py" -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout=240)  # a hung test fails alone
# A command of the stage did not run, or not to its end: where the BUDGET was what ran out, the stage is
# marked as not done, to run again next time (a file, since the commands run in pipelines, in
# subshells); where the stage's own limit was, it is noted and not run again, so that the next run
# reaches the later stages.
cut_short() {
    if [ "$(budget_left)" -le $((stage_end - SECONDS)) ]; then
        touch "$out/.cut"
    else
        echo "$stage: stopped at its own time limit ($*)" >>"$out/notes.txt"
    fi
}
# Runs a command for at most seconds_left. SIGINT: pytest stops like on Ctrl-C and still writes its
# summary, JUnit XML and benchmark JSON; a process that ignores it (stuck in a GPU wait) is killed 20 s
# later. Both signals go to the command's whole process group (timeout without --foreground), its
# pytest-xdist workers included: signalled alone, the controller left its workers running their tests
# on the GPU into the next stage's timings.
limited() {
    local left rc
    left=$(seconds_left)
    [ "$left" -lt 10 ] && { echo "not run (its time is spent): $*"; cut_short "not run: $*"; return 124; }
    local started=$SECONDS
    timeout -k 20 -s INT "$left" "$@"
    rc=$?
    # 124: stopped by its SIGINT; 137: killed 20 s later, or killed for memory before its time was up.
    if [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ $((SECONDS - started)) -ge "$left" ]; }; then
        cut_short "$*"
    fi
    return "$rc"
}
run_pytest() { limited "$py" -m pytest "${pytest_args[@]}" "$@"; }
# The kernels the tests stage verified on this machine in an earlier run: "auto" runs these and no
# others (DIT8_VERIFIED, kernels/registry.py).
if [ -s "$out/verified.json" ]; then export DIT8_VERIFIED="$(cd "$out" && pwd)/verified.json"; fi
# The Gluon candidates (kernels/scaled_mm_gluon.py) are benchmarked and profiled only after their GPU tests
# passed on this machine: a kernel that hangs there would spend the stage's time. DIT8_SKIP_GLUON names
# the others ("gemm", "gemm_fast", "gemm_int8"; verified_backends.py).
untested_gluon() {
    "$py" - "$out/tests.xml" "$out/test_outcomes.jsonl" "$out/kernel_tests.json" <<'PY'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, "bench")
from verified_backends import read_cases, untested_gluon

try:
    cases = read_cases(Path(sys.argv[1]), Path(sys.argv[2]))
    collected = json.loads(Path(sys.argv[3]).read_text())
except (OSError, ET.ParseError, ValueError):  # no report or map yet (or an unreadable one): nothing is tested
    cases, collected = [], {}
print(" ".join(untested_gluon(cases, collected)))
PY
}
export DIT8_SKIP_GLUON="$(untested_gluon)"
# The Gluon kernels adopted for this GPU (kernels/candidates.py ADOPTED) are routed in by default; where
# one of them is in DIT8_SKIP_GLUON, the later stages route the others only (DIT8_GLUON), unless
# DIT8_GLUON was set for this run.
gluon_setting=${DIT8_GLUON-unset}
route_tested_gluon() {
    [ "$gluon_setting" = unset ] || return 0
    local routed
    routed=$("$py" - <<'PY'
import os
import torch
from dit8.kernels import candidates
skip = set(os.environ.get("DIT8_SKIP_GLUON", "").split())
os.environ.pop(candidates.ENV_VAR, None)  # (set by an earlier call of this function)
adopted = candidates.chosen(torch.device("cuda")) if torch.cuda.is_available() else {}
print(" ".join(f"{name}={config}" for name, config in adopted.items() if name not in skip)
      if skip & set(adopted) else "-")
PY
)
    if [ "$routed" = - ]; then unset DIT8_GLUON; else export DIT8_GLUON="$routed"
        echo "gpu_check: adopted Gluon kernels whose tests did not pass here are not routed: DIT8_GLUON=\"$routed\""; fi
}
route_tested_gluon
for stage in "${stages[@]}"; do
    stage_end=$((SECONDS + $([ "$stage" = tests ] && echo "${TESTS_LIMIT:-360}" || echo "${STAGE_LIMIT:-540}")))
    if [ "$(budget_left)" -lt 60 ]; then
        echo "== $stage: left for the next run (BUDGET=${BUDGET:-} s is spent)"
        continue
    fi
    echo "== $stage ($(seconds_left) s at most)"
    mark "$stage"
    rm -f "$out/.cut"
    case $stage in
        tests)
            workers=()
            # loadgroup: the tests marked xdist_group (float64 references of 10 GB and more) run on
            # one worker, one at a time, so that they do not exhaust the shared GPU's memory together.
            "$py" -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-12}" --dist loadgroup)
            # (The outcome log stands in for the JUnit XML where a run stopped before pytest wrote that; an
            # earlier run's report must not stand in for this one's.)
            rm -f "$out/tests.xml"
            # The tests marked cpu_only run the same without a GPU: CI's, not this machine's.
            DIT8_KERNEL_TESTS="$out/kernel_tests.json" DIT8_TEST_OUTCOMES="$out/test_outcomes.jsonl" \
                run_pytest -rs -m "not cpu_only" "${workers[@]}" --junitxml="$out/tests.xml" tests 2>&1 | tail -40
            # The kernels whose GPU tests all ran and passed: the line to paste into registry.GPU_VERIFIED.
            # The later stages' "auto" runs these and no others (DIT8_VERIFIED), whatever the registry says.
            "$py" bench/verified_backends.py "$out/tests.xml" --collected "$out/kernel_tests.json" \
                --outcomes "$out/test_outcomes.jsonl" --json "$out/verified.json" | tee "$out/gpu_verified.txt"
            if [ -s "$out/verified.json" ]; then export DIT8_VERIFIED="$(cd "$out" && pwd)/verified.json"; fi
            export DIT8_SKIP_GLUON="$(untested_gluon)"
            route_tested_gluon ;;
        gemm|attention|fused)
            # Also saved in pytest-benchmark's storage layout: bench/baselines/ takes it as the committed
            # baseline that --benchmark-compare-fail checks later runs against (bench/RESULTS.md).
            run_pytest "bench/test_bench_$stage.py" --benchmark-json="$out/bench_$stage.json" \
                --benchmark-storage="file://$out/baselines" --benchmark-save="$stage" 2>&1 | tail -15
            # The chart for the README (kernel beside its baseline, per shape).
            "$py" bench/plot_results.py "$out/bench_$stage.json" "$out/bench_$stage.png" \
                --title "$(head -1 "$out/gpu.txt" | cut -d, -f1), $(sed -n 2p "$out/gpu.txt")" | tail -1
            if [ "$stage" = fused ]; then  # (bf16 attention's rows compete too, where that stage ran)
                timed=("$out/bench_fused.json")
                [ -s "$out/bench_attention.json" ] && timed+=("$out/bench_attention.json")
                "$py" bench/fastest_backends.py "${timed[@]}" | tee "$out/fastest.txt"
            fi ;;
        dit)
            # The headline first (issue 7's targets), with the 4-step loop; diffusers and the CUDA graph
            # ride on the bf16 run.
            for run in "--scheme fp8 --attention fp8" "--scheme fp8 --attention bf16 --steps 0" \
                       "--scheme int8 --attention int8 --steps 0" \
                       "--scheme bf16 --attention bf16 --steps 0 --compare diffusers --cuda-graph"; do
                name=$(echo "$run" | awk '{print $2 "_" $4}')
                # A run stopped part way left its numbers so far, marked partial: it runs again. One that
                # failed (its error is in the file: out of memory, say) would fail again: it does not.
                "$py" -c 'import json, sys; r = json.load(open(sys.argv[1]))
sys.exit(bool(r.get("partial")) and not r.get("error"))' "$out/dit_$name.json" 2>/dev/null &&
                    { echo "dit $name: run before (in $out)"; continue; }
                if [ "$(seconds_left)" -lt 45 ]; then
                    echo "dit $name: left for the next run"; cut_short "dit $name not run"; continue
                fi
                mark "dit $name"
                # shellcheck disable=SC2086
                limited "$py" -m dit8 bench dit $run --backend auto --repeat 2 \
                    --json "$out/dit_$name.json" 2>&1 | tail -12
            done ;;
        candidates)
            # The forward with the Gluon candidates routed in (DIT8_GLUON, kernels/candidates.py): each one
            # that beat the Triton kernel it would replace in the gemm stage, in its fastest
            # configuration there (bench/gluon_choice.py), beside the dit stage's runs.
            choice=$("$py" bench/gluon_choice.py "$out")
            if [ -z "$choice" ]; then  # not done: a later run, after those stages, tries again
                echo "candidates: no Gluon candidate beat its Triton kernel here (or none was timed yet)"
                touch "$out/.cut"
            fi
            # FP8 forwards with bf16 and 8-bit attention; an INT8 one where the INT8 GEMM is routed too.
            int8_run=$(echo "$choice" | grep -q gemm_int8 && echo "--scheme int8 --attention int8")
            for run in ${choice:+"--scheme fp8 --attention bf16" "--scheme fp8 --attention fp8"} \
                       ${int8_run:+"$int8_run"}; do
                name=$(echo "$run" | awk '{print $2 "_" $4}')_gluon
                if [ "$(seconds_left)" -lt 45 ]; then
                    echo "dit $name: left for the next run"; cut_short "dit $name not run"; continue
                fi
                echo "dit $name: DIT8_GLUON=\"$choice\""
                mark "candidates $name"
                # shellcheck disable=SC2086
                DIT8_GLUON="$choice" limited "$py" -m dit8 bench dit $run --steps 0 --backend auto --repeat 2 \
                    --json "$out/dit_$name.json" 2>&1 | tail -12
            done ;;
        sweep)
            # SWEEP_GEMM / SWEEP_ATTENTION / SWEEP_FUSED: a pytest -k expression narrowing that sweep, e.g.
            # SWEEP_GEMM="fp8 and 32760x5120x13824" SWEEP_ATTENTION="fp8 or pv16".
            DIT8_GEMM_SWEEP=1 run_pytest bench/test_bench_gemm.py -k "sweep${SWEEP_GEMM:+ and ($SWEEP_GEMM)}" \
                --benchmark-json="$out/bench_sweep_gemm.json" 2>&1 | tail -5
            DIT8_ATTN_SWEEP=1 run_pytest bench/test_bench_attention.py \
                -k "sweep${SWEEP_ATTENTION:+ and ($SWEEP_ATTENTION)}" \
                --benchmark-json="$out/bench_sweep_attention.json" 2>&1 | tail -5
            DIT8_FUSED_SWEEP=1 run_pytest bench/test_bench_fused.py -k "sweep${SWEEP_FUSED:+ and ($SWEEP_FUSED)}" \
                --benchmark-json="$out/bench_sweep_fused.json" 2>&1 | tail -5
            # The rows kernel's configurations that beat its defaults: the line for fused_triton.ROWS_TUNED.
            "$py" bench/rows_choice.py "$out/bench_sweep_fused.json" | tee "$out/rows_tuned.txt" ;;
        profile)
            # Hardware counters of the kernels short of their targets: the measured cause of a gap.
            if command -v ncu >/dev/null; then
                # PROFILE_ONLY="attention fp8;layer_norm": only the cases whose names hold one of these.
                only=()
                IFS=';' read -ra parts <<<"${PROFILE_ONLY:-}"
                for part in "${parts[@]}"; do [ -n "$part" ] && only+=(--only "$part"); done
                # One pass of the profiler over the cases into CSV file $1, with ncu's options $2...
                # --clock-control none: the clocks as the benchmarks run them (ncu would lock them to base).
                ncu_pass() {
                    local log=$1
                    shift
                    limited ncu --clock-control none --profile-from-start off --csv --page details --log-file "$log" \
                        "$@" "$py" bench/profile_kernels.py run "${only[@]}" 2>&1 | tail -12
                }
                ncu_pass "$out/ncu.csv" --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
                    --section LaunchStats --section SchedulerStats --section WarpStateStats
                # Why warps waited (stall reasons) and how busy each issue pipe was: passes of their own, so
                # that the first table stands if one fails.
                ncu_pass "$out/ncu_stalls.csv" --metrics "$("$py" bench/profile_kernels.py metrics)"
                ncu_pass "$out/ncu_pipes.csv" --metrics "$("$py" bench/profile_kernels.py metrics --pipes)"
                "$py" bench/profile_kernels.py table "$out/ncu.csv" --stalls "$out/ncu_stalls.csv" \
                    --pipes "$out/ncu_pipes.csv" >"$out/profile.txt"
                # Done only with a row of counters (a launch ID): a profiler cut off or refused (no
                # permission for the counters) leaves none, and a later run tries again.
                if ! grep -q '^| [0-9]' "$out/profile.txt"; then
                    echo "profile: Nsight Compute measured no kernel (ncu.csv); not marked done"
                    touch "$out/.cut"
                fi
            else
                echo "profile: Nsight Compute (ncu) is not installed here; skipped (not marked done)"
                touch "$out/.cut"
            fi ;;
        pipeline)
            run_pytest bench/test_bench_pipeline.py -k "t5 or clip" \
                --benchmark-json="$out/bench_encoders.json" 2>&1 | tail -8
            run_pytest bench/test_bench_pipeline.py -k vae \
                --benchmark-json="$out/bench_vae.json" 2>&1 | tail -8 ;;
    esac
    # A stage cut off by its time limit runs again next time; one that ran to its end does not.
    [ -e "$out/.cut" ] || grep -qx "$stage" "$out/done" || echo "$stage" >>"$out/done"
    pack
done
mark end
kill "$sampler" 2>/dev/null  # (it runs until stopped: the `wait` below, for the CUDA build, would wait for it too)

# The CUDA build, if it is still running: waited for while the budget lasts (its own limit: 300 s).
if [ -n "${build_pid:-}" ]; then
    while kill -0 "$build_pid" 2>/dev/null && [ "$(budget_left)" -gt 0 ]; do sleep 1; done
    kill "$build_pid" 2>/dev/null
fi
wait
[ -f "$out/cuda_build.log" ] && tail -3 "$out/cuda_build.log"
echo
"$py" bench/results_tables.py "$out" | tee "$out/summary.txt"
done_stages=$(tr '\n' ' ' <"$out/done")
left=$(for stage in "${all_stages[@]}"; do grep -qx "$stage" "$out/done" || printf '%s ' "$stage"; done)
[ -f "$out/notes.txt" ] && tee -a "$out/summary.txt" <"$out/notes.txt"
echo "stages done: ${done_stages:-none}; left: ${left:-none}" | tee -a "$out/summary.txt"
# (The EXIT trap packs the archive, the summary with it.)
