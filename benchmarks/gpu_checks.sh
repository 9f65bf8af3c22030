#!/bin/bash
# The GPU checks and figures of issue 6, for a session lent a GPU, in two device calls:
#
#   bash benchmarks/gpu_checks.sh tests engine predict   # at most 7.5 min
#   bash benchmarks/gpu_checks.sh service data           # at most 5 min; needs .whl (below)
#   bash benchmarks/gpu_checks.sh backends               # issue 20, 2.5 min; needs .whl
#
# from the repository root on the GPU machine (no step named: the first three). A
# session's 15 device minutes hold both, the machine's start and little else: make the
# second call at once (the machine stays warm for 30 s), then give it back. Between the
# calls, copy the returned BENCHMARKS.md over the repository's, so that the second call
# adds its sections to the first's. `engine101` (R101x1, no compile rows, at most 4 min)
# is for a session with time left.
#
# tests, engine, predict and data need only what bit_core needs (torch, numpy, pillow,
# safetensors, tqdm; timm for its rows), which the lent machines' image has. service runs
# the API there, whose packages the image lacks: fetch them here first with
# `bash benchmarks/gpu_wheels.sh` (into .whl/, which git ignores) and name `.whl` in the
# call's carry; this script installs them with pip, offline, before the step.
#
# Each step has its own time limit, so that one hang cannot eat the lease. Results: $OUT
# (default /tmp/gpu_out): BENCHMARKS.md with the new GPU sections, one log per step,
# summary.txt with each step's exit status. DEVICE=cpu rehearses the steps on a CPU
# machine (with python3 an environment like the GPU machine's). Not run on a GPU yet: no
# GPU was lent so far. Rehearsed on 2026-12-02 with the GPU image's Python 3.12 and torch
# 2.11.0 (a CPU run): all of tests/bit_core passed; tests, predict, data and service (both
# install paths) ran to the end; engine ran out of its limit, as it must on 2 CPU cores.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD  # absolute: some tests run the CLI from elsewhere
device=${DEVICE:-cuda}
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
cp BENCHMARKS.md "$out/BENCHMARKS.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
python3 -c 'import torch as t; print(t.__version__, t.cuda.is_available() and t.cuda.get_device_name())' \
    >>"$out/gpu.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run it, keep its log and exit status
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status" >>"$out/summary.txt"
    return $status
}

quiet="--max-load 100 --load-retries 0 --block-waits 0"  # a fresh machine: no load gate
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests engine predict)
for name in "${steps[@]}"; do
    case $name in
    tests)
        step tests 120 python3 -m pytest -q -p no:cacheprovider -o addopts= -m gpu tests/bit_core
        ;;
    engine)
        step engine 240 python3 benchmarks/engine_speed.py --device "$device" --quick --compile \
            --out "$out/BENCHMARKS.md" $quiet
        ;;
    engine101)
        step engine101 240 python3 benchmarks/engine_speed.py --device "$device" --quick \
            --arch R101x1 --no-compile --out "$out/BENCHMARKS.md" $quiet
        ;;
    predict)
        step predict 90 python3 benchmarks/predict_speed.py --device "$device" --quick \
            --out "$out/BENCHMARKS.md" $quiet
        ;;
    service)
        if [ ! -f .whl/requirements.txt ]; then
            echo "service: skipped, no .whl/requirements.txt (run gpu_wheels.sh here)" \
                >>"$out/summary.txt"
            continue
        fi
        # Into the machine's own environment (bare, and given back after the session): pip
        # adds only what is missing there, from the carried wheels. Should that environment
        # be read-only, all the wheels go to a folder of their own, ahead on the path.
        step service_install 45 python3 -m pip install --no-index --find-links .whl \
            -r .whl/requirements.txt ||
            { step service_install_target 45 python3 -m pip install --no-index --no-deps \
                --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site; }
        step service 150 python3 benchmarks/service_speed.py --device "$device" --quick \
            --out "$out/BENCHMARKS.md" $quiet
        ;;
    data)
        step data 90 python3 benchmarks/data_pipeline.py --device "$device" --quick \
            --out "$out/BENCHMARKS.md" $quiet
        ;;
    backends)
        # Issue 20: torch (bf16 autocast, channels_last) against onnxruntime's CUDA and
        # TensorRT providers, batch-1 p50/p99 and images/s at batch 64, model only. The
        # image's onnxruntime is the CPU build and onnxruntime-gpu's wheel is past the
        # 64 MiB carry: without a CUDA provider only torch is measured, and the section
        # says which backends ran. Needs the service's wheels too (for its API rows).
        step backends 150 python3 benchmarks/backend_speed.py --device "$device" --quick \
            --out "$out/BENCHMARKS.md" $quiet
        ;;
    *)
        echo "unknown step '$name': tests, engine, engine101, predict, service, data or" \
            "backends" >&2
        exit 2
        ;;
    esac
done
cat "$out/summary.txt"
