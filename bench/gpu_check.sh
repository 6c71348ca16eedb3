#!/usr/bin/env bash
# Everything GPU-side: install from the working tree, build the CUDA extension, run the test suite (GPU
# tests included; they are skipped only without CUDA), run the benchmark suites and `dit8 bench dit`,
# then print a short table of all results so far. Results land in $OUT (default /tmp/dit8-gpu).
#
# Usage (on a CUDA machine, from the repository root):
#     bash bench/gpu_check.sh                 # every stage
#     bash bench/gpu_check.sh tests gemm      # some stages; the table covers the results found in $OUT
# Stages: tests gemm attention fused dit pipeline. Setup (install, CUDA build) runs once per machine.
# Each stage fits in a few minutes, so a machine that limits one command's time can run them apart;
# a stage still running after $STAGE_LIMIT seconds (default 540) is interrupted and reports what ran.
#
# A machine without internet access gets the packages it lacks (PyAV for the video tests, diffusers for
# `--compare diffusers`) as wheels in .whl/ (git ignores it: copy it along with the working tree),
# installed into /tmp/site; fetch them on a machine with pip:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d .whl av==18.1.0 diffusers==0.42.1 importlib_metadata
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/dit8-gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests gemm attention fused dit pipeline)

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
PY
# Set up when this machine has not been, or when `dit8` is not this working tree's.
here=$(pwd -P)
if [ ! -f "$out/gpu.txt" ] || [ "$("$py" -c 'import dit8, pathlib; print(pathlib.Path(dit8.__file__).resolve().parents[1])' 2>/dev/null)" != "$here" ]; then
    "$py" -m pip install -q -e . --no-deps --no-build-isolation >"$out/install.log" 2>&1 || {
        echo "install failed:"; tail -20 "$out/install.log"; exit 1; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    "$py" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
    "$py" -m dit8.kernels.cuda_ext build 2>&1 | tail -3  # for this GPU's architecture
fi

limit=${STAGE_LIMIT:-540}
pytest_args=(-q -p no:cacheprovider --durations=10)
# SIGINT: pytest stops like on Ctrl-C and still writes its summary, JUnit XML and benchmark JSON.
run_pytest() { timeout -s INT "$limit" "$py" -m pytest "${pytest_args[@]}" "$@"; }
for stage in "${stages[@]}"; do
    echo "== $stage"
    case $stage in
        tests)
            run_pytest -rs --junitxml="$out/tests.xml" tests 2>&1 | tail -40
            # The kernels whose GPU tests passed: the line to paste into registry.GPU_VERIFIED.
            "$py" bench/verified_backends.py "$out/tests.xml" ;;
        gemm|attention|fused)
            # Also saved in pytest-benchmark's storage layout: bench/baselines/ takes it as the committed
            # baseline that --benchmark-compare-fail checks later runs against (bench/RESULTS.md).
            run_pytest "bench/test_bench_$stage.py" --benchmark-json="$out/bench_$stage.json" \
                --benchmark-storage="file://$out/baselines" --benchmark-save="$stage" 2>&1 | tail -15
            # The chart for the README (kernel beside its baseline, per shape).
            "$py" bench/plot_results.py "$out/bench_$stage.json" "$out/bench_$stage.png" \
                --title "$(head -1 "$out/gpu.txt" | cut -d, -f1), $(sed -n 2p "$out/gpu.txt")" | tail -1
            if [ "$stage" = fused ]; then "$py" bench/fastest_backends.py "$out/bench_fused.json"; fi ;;
        dit)
            for run in "--scheme bf16 --attention bf16 --compare diffusers --cuda-graph" \
                       "--scheme fp8 --attention bf16" "--scheme fp8 --attention fp8" \
                       "--scheme int8 --attention int8"; do
                name=$(echo "$run" | awk '{print $2 "_" $4}')
                # shellcheck disable=SC2086
                timeout -s INT "$limit" "$py" -m dit8 bench dit $run --backend triton \
                    --json "$out/dit_$name.json" 2>&1 | tail -12
            done ;;
        pipeline)
            run_pytest bench/test_bench_pipeline.py -k "t5 or clip" \
                --benchmark-json="$out/bench_encoders.json" 2>&1 | tail -8
            run_pytest bench/test_bench_pipeline.py -k vae \
                --benchmark-json="$out/bench_vae.json" 2>&1 | tail -8 ;;
        *) echo "unknown stage $stage (tests gemm attention fused dit pipeline)"; exit 2 ;;
    esac
done

"$py" - "$out" <<'PY'
import collections, glob, json, os, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
print()
print(open(os.path.join(out, "gpu.txt")).read().strip())
if os.path.exists(os.path.join(out, "tests.xml")):
    counts = collections.defaultdict(collections.Counter)
    for case in ET.parse(os.path.join(out, "tests.xml")).iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        counts[case.get("classname", "?").split(".")[-1]][outcome] += 1
    print(f"\n{'suite':<28}{'passed':>8}{'failed':>8}{'errors':>8}{'skipped':>9}")
    for suite, c in sorted(counts.items()):
        print(f"{suite:<28}{c['passed']:>8}{c['failure']:>8}{c['error']:>8}{c['skipped']:>9}")
rows = [b for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))) for b in json.load(open(path))["benchmarks"]]
if rows:
    print(f"\n{'benchmark':<56}{'ms':>10}{'TFLOP/s':>9}{'GB/s':>8}{'ratio':>7}")
    for b in rows:
        e = b.get("extra_info", {})
        cells = [f"{e[k]:>{w}}" if k in e else " " * w for k, w in (("ms", 10), ("tflops", 9), ("gbps", 8), ("ratio", 7))]
        print(f"{b['name'][:56]:<56}" + "".join(cells))
dits = sorted(glob.glob(os.path.join(out, "dit_*.json")))
if dits:
    print(f"\n{'dit forward (480P, 81 frames)':<32}{'ms':>9}{'loop ms':>9}{'peak GiB':>9}{'graph ms':>9}{'diffusers ms':>13}{'speed-up':>9}")
    for path in dits:
        r = json.load(open(path))
        d, g = r.get("diffusers", {}), r.get("cuda_graph", {})
        print(f"{os.path.basename(path)[4:-5]:<32}{r['forward_ms']:>9.1f}{r.get('loop', {}).get('total_ms', 0):>9.1f}"
              f"{r['peak_memory']['forward'] / 2**30:>9.2f}{g.get('forward_ms', 0):>9.1f}"
              + (f"{d['forward_ms']:>13.1f}{d['ratio']:>8.2f}x" if "forward_ms" in d else ""))
PY
