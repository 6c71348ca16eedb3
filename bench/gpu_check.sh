#!/usr/bin/env bash
# Everything GPU-side in one call: install from the working tree, build the CUDA extension, run the
# whole test suite (GPU tests included; they are skipped only without CUDA), run the benchmark suites,
# and print a short table of both last. Results land in $OUT (default /tmp/dit8-gpu).
# Usage (on a CUDA machine, from the repository root): bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/dit8-gpu}
mkdir -p "$out"

python -m pip install -q -e . --no-deps --no-build-isolation >"$out/install.log" 2>&1 || {
    echo "install failed:"; tail -20 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

python -m dit8.kernels.cuda_ext build --archs 90a 2>&1 | tail -3
python -m pytest -q -p no:cacheprovider --junitxml="$out/tests.xml" tests 2>&1 | tail -25
python -m pytest -q -p no:cacheprovider bench --benchmark-json="$out/bench.json" 2>&1 | tail -25

python - "$out/tests.xml" "$out/bench.json" <<'PY'
import collections, json, os, sys, xml.etree.ElementTree as ET
counts = collections.defaultdict(collections.Counter)
for case in ET.parse(sys.argv[1]).iter("testcase"):
    outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    counts[case.get("classname", "?").split(".")[-1]][outcome] += 1
print(f"\n{'suite':<28}{'passed':>8}{'failed':>8}{'errors':>8}{'skipped':>9}")
for suite, c in sorted(counts.items()):
    print(f"{suite:<28}{c['passed']:>8}{c['failure']:>8}{c['error']:>8}{c['skipped']:>9}")
if os.path.exists(sys.argv[2]):
    print(f"\n{'benchmark':<56}{'ms':>10}{'TFLOP/s':>9}{'GB/s':>8}{'ratio':>7}")
    for b in json.load(open(sys.argv[2]))["benchmarks"]:
        e = b.get("extra_info", {})
        cells = [f"{e[k]:>{w}}" if k in e else " " * w for k, w in (("ms", 10), ("tflops", 9), ("gbps", 8), ("ratio", 7))]
        print(f"{b['name'][:56]:<56}" + "".join(cells))
PY
