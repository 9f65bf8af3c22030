#!/bin/bash
# The GPU checks and figures of issue 6 in one device call, for a session lent a GPU.
#
#   bash benchmarks/gpu_checks.sh        # from the repository root, on the GPU machine
#
# Needs only what bit_core needs (torch, numpy, pillow, safetensors, tqdm; timm for its
# rows), which the lent machines' image has. Each step has its own time limit so that
# one hang cannot eat the lease; the whole script stays under about 9 minutes. Results:
# $OUT (default /tmp/gpu_out): BENCHMARKS.md with the new GPU sections, one log per step,
# summary.txt with each step's exit status. Not run yet: no GPU was lent so far.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
cp BENCHMARKS.md "$out/BENCHMARKS.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' >>"$out/gpu.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run it, keep its log and exit status
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "$name: exit $?" >>"$out/summary.txt"
}

quiet="--max-load 100 --load-retries 0"  # a fresh machine: no load gate
step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -o addopts= -m gpu tests/bit_core
step engine 270 python3 benchmarks/engine_speed.py --device cuda --quick --compile \
    --out "$out/BENCHMARKS.md" $quiet
step predict 120 python3 benchmarks/predict_speed.py --device cuda --quick \
    --out "$out/BENCHMARKS.md" $quiet
cat "$out/summary.txt"
