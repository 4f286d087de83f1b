#!/usr/bin/env bash
# The GPU benchmark set of docs/benchmarks.md ("GPU") in one command, within a time budget.
#
#   benchmarks/gpu_suite.sh OUTDIR [SECONDS]
#   ONLY="latency-tiny-30fps multistream-tiny-bf16" benchmarks/gpu_suite.sh OUTDIR   # some steps
#
# Every step is a `streamtrack bench` run (each one measures its own baseline in the
# same process); steps run in priority order and a step that would outlast the budget
# is cut short or skipped, so a fixed-length GPU lease always returns what fit.  The
# tables go to OUTDIR/log.txt as they are printed (a step cut short keeps the rows it
# finished), the benchmarks' stderr to OUTDIR/stderr.txt.  GPU_SUITE_DRY=1 prints each
# step's name and arguments (separated by \x1f) instead of running it (tests check them).
set -u -o pipefail
out=${1:-gpu-results}
budget=${2:-570}
mkdir -p "$out"
start=$(date +%s)
export PYTHONUNBUFFERED=1
ckpts=${CKPT_DIR:-/tmp/streamtrack-ckpts}
mkdir -p "$ckpts"
py=${PYTHON:-python3}

left() { echo $((budget - ($(date +%s) - start))); }

# step NAME LIMIT_SECONDS ARGS...   (ARGS go to `streamtrack bench`)
step() { run_step "$1" "$2" -m streamtrack bench "${@:3}"; }
# script_step NAME LIMIT_SECONDS SCRIPT ARGS...   (a benchmark script of its own)
script_step() { run_step "$@"; }

run_step() {
    local name=$1 limit=$2 remaining t0 rc
    shift 2
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then
        return
    fi
    if [[ -n ${GPU_SUITE_DRY:-} ]]; then
        printf '%s' "$name"
        printf '\x1f%s' "$@"
        echo
        return
    fi
    remaining=$(left)
    if ((remaining < 30)); then
        echo "== $name: skipped ($remaining s left)" | tee -a "$out/log.txt"
        return
    fi
    ((limit > remaining)) && limit=$remaining
    echo "== $name (limit $limit s, $remaining s left): $*" | tee -a "$out/log.txt"
    t0=$(date +%s)
    timeout "$limit" "$py" "$@" 2>>"$out/stderr.txt" | tee -a "$out/log.txt"
    rc=$?
    echo "-- $name: rc $rc, $(($(date +%s) - t0)) s" | tee -a "$out/log.txt"
}

if [[ -z ${GPU_SUITE_DRY:-} ]]; then
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/log.txt"
# The host matters as much as the card: a step is mostly Python launching kernels, and thread
# hand-offs cost far more under some sandboxed kernels (gVisor reports 4.4.0) than on Linux.
echo "kernel $(uname -r), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)" | tee -a "$out/log.txt"
"$py" -c "import torch, sam2; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/log.txt"
"$py" - "$ckpts" <<'EOF' 2>>"$out/stderr.txt" | tee -a "$out/log.txt"
import sys
from pathlib import Path
from streamtrack.models import save_random_checkpoint
for name in ("sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large"):
    p = Path(sys.argv[1]) / f"{name}.pt"
    if not p.exists():
        save_random_checkpoint(name, p)
print("random checkpoints ready")
EOF
fi

m() { echo "--model sam2.1_hiera_$1 --checkpoint $ckpts/sam2.1_hiera_$1.pt"; }
hd=${BENCH_ARGS:-"--device cuda --image-size 1024 --frame-size 1280x720"}

# shellcheck disable=SC2046  # word splitting of $(m ...) and $hd is intended
{
# CUDA graphs (compile mode reduce-overhead): the per-frame step is host-bound on a GPU.
# Steps that have not run on a GPU yet come first (docs/benchmarks.md says which have).
cg="--compile-mode reduce-overhead"
fl=${FLEET_ARGS:-"--device cuda --gpus 1 --cpus 8 --image-size 1024 --frame-size 1280x720"}
# The latency goal with no capture thread in the tracker, then the same run with threads;
# each also times the bare engine at the source's pace and splits the engine's thread's
# time per frame (read, launch, finish, hand over) on both sides.
step latency-tiny-cudagraphs-bothprocess 150 latency $(m tiny) $hd --frames 300 --fps 30 $cg --compile-slots 1 --emit process --decode process
step latency-tiny-cudagraphs 150 latency $(m tiny) $hd --frames 300 --fps 30 $cg --compile-slots 1
# The pipeline's frames/s with its per-phase split, threads and child processes.
step pipeline-tiny-cudagraphs 120 pipeline $(m tiny) $hd --frames 300 $cg --compile-slots 1
step pipeline-tiny-cudagraphs-bothprocess 120 pipeline $(m tiny) $hd --frames 300 $cg --compile-slots 1 --emit process --decode process
# The official VOS build against the engine, both as CUDA graphs (the VOS build in
# reduce-overhead mode: its own max-autotune compilation did not fit a run).
step engine-tiny-cudagraphs-vos 300 engine $(m tiny) $hd --bf16 $cg --compile-slots 1 --official-vos-optimized --official-vos-mode reduce-overhead --frames 61 --objects 1 --repeats 3
# Host time per phase of a CUDA-graph step launched ahead: what stands between 9.7 ms and 8.3.
script_step phases-tiny-cudagraphs 150 benchmarks/profile_step.py --checkpoint "$ckpts/sam2.1_hiera_tiny.pt" --compile-mode reduce-overhead --phases --steps 100
# Dynamo's guard checks per compiled call, one by one vs by dict tags (the engine's
# setting); the guards are dynamo's whatever the backend, so eager keeps it short.
script_step guards-tiny 90 benchmarks/profile_step.py --checkpoint "$ckpts/sam2.1_hiera_tiny.pt" --guards --backend eager --steps 20
# CUDA-graph actors in the fleet on Ray (needs `ray` importable), one stream each.
script_step fleet-tiny-cudagraphs 300 benchmarks/fleet_bench.py $fl --compile-mode reduce-overhead --streams 1 2 4 --frames 300
# The larger models with CUDA graphs, and the official VOS-optimized build.
for size in small base_plus large; do
    step "engine-$size-cudagraphs" 200 engine $(m $size) $hd --bf16 $cg --compile-slots 1 --frames 41 --objects 1 --repeats 2 --state-frames --launch-ahead
done
step engine-tiny-bf16-vos 400 engine $(m tiny) $hd --bf16 --official-vos-optimized --frames 31 --objects 1 4 --repeats 3 --state-frames
step latency-tiny-cudagraphs-emitprocess 150 latency $(m tiny) $hd --frames 300 --fps 30 $cg --compile-slots 1 --emit process
step pipeline-tiny-cudagraphs-emitprocess 120 pipeline $(m tiny) $hd --frames 300 $cg --compile-slots 1 --emit process
step pipeline-tiny-cudagraphs-decodeprocess 120 pipeline $(m tiny) $hd --frames 300 $cg --compile-slots 1 --decode process
step multistream-large-processes-4 120 multistream $(m large) $hd --bf16 --frames 40 --streams 4 --processes
# Run before: the tiny CUDA-graph engine, pipeline and latency, launching ahead or not.
step engine-tiny-cudagraphs 240 engine $(m tiny) $hd --bf16 $cg --compile-slots 1 --frames 61 --objects 1 --repeats 3 --state-frames --launch-ahead
# Launching a waiting frame before finishing the last (launch_ahead): the GPU works on the
# next frame while the host builds this one's result.
step pipeline-tiny-cudagraphs-ahead 120 pipeline $(m tiny) $hd --frames 300 $cg --compile-slots 1 --launch-ahead
step latency-tiny-cudagraphs-ahead 150 latency $(m tiny) $hd --frames 300 --fps 30 $cg --compile-slots 1 --launch-ahead
step pipeline-tiny-cudagraphs-bothprocess-ahead 120 pipeline $(m tiny) $hd --frames 300 $cg --compile-slots 1 --emit process --decode process --launch-ahead
# The fleet, eager: an actor per stream against one actor batching the streams
# (docs/scaling.md, GPU sizing).
script_step fleet-tiny 200 benchmarks/fleet_bench.py $fl --streams 1 2 4 --frames 150
for size in small base_plus large; do
    step "multistream-$size-processes" 120 multistream $(m $size) $hd --bf16 --frames 40 --streams 2 4 --processes
done
# Threads on one model, batched and not.
step multistream-tiny-threads 80 multistream $(m tiny) $hd --bf16 --frames 60 --streams 1 2 4
if [[ -z ${GPU_SUITE_DRY:-} ]] && [[ -z ${ONLY:-} || " $ONLY " == *" profile-tiny "* ]] && (($(left) > 60)); then
    echo "== profile-tiny" | tee -a "$out/log.txt"
    timeout $(($(left) < 120 ? $(left) : 120)) "$py" benchmarks/profile_step.py --checkpoint "$ckpts/sam2.1_hiera_tiny.pt" \
        --out "$out" 2>>"$out/stderr.txt" | head -40 | tee -a "$out/log.txt"
fi
step engine-tiny-bf16 75 engine $(m tiny) $hd --bf16 --frames 31 --objects 1 4 16 --repeats 2 --state-frames --launch-ahead
step engine-tiny-fp32 75 engine $(m tiny) $hd --frames 31 --objects 1 4 16 --repeats 2 --state-frames 50 500
# A 30 fps 720p camera (the latency goal), then a source 3x faster than the engine (queue build-up).
step latency-tiny-30fps 40 latency $(m tiny) $hd --frames 300 --fps 30
step latency-tiny-bf16 40 latency $(m tiny) $hd --frames 300
# Streams per process and per GPU: one after another, threads, batched, and (tiny) a process per stream.
step multistream-tiny-processes 120 multistream $(m tiny) $hd --bf16 --frames 60 --streams 1 2 4 8 --processes
for size in small base_plus large; do
    step "multistream-$size-bf16" 50 multistream $(m $size) $hd --bf16 --frames 30 --streams 1 2 4 8
done
step engine-tiny-bf16-compiled 170 engine $(m tiny) $hd --bf16 --compile --frames 31 --objects 1 4 --repeats 3 --state-frames
for size in small base_plus large; do
    step "engine-$size-bf16" 40 engine $(m $size) $hd --bf16 --frames 21 --objects 1 4 --repeats 2 --state-frames
done
step pipeline-tiny 35 pipeline $(m tiny) $hd --frames 200
step latency-tiny-compiled 120 latency $(m tiny) $hd --frames 300 --fps 30 --compile
step engine-tiny-cudagraphs-4obj 240 engine $(m tiny) $hd --bf16 $cg --frames 31 --objects 1 4 --repeats 2 --state-frames
}
echo "done in $(($(date +%s) - start)) s" | tee -a "$out/log.txt"
