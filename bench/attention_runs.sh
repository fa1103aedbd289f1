#!/bin/sh
# Issue 14's evidence that the attention patterns learn: four CIFAR-10 32x32 pretraining runs of
# `tiny` (4 layers, width 128), one per positions x attention choice, each given about 20 minutes of
# optimizer steps on a 2-core CPU (the step counts come from timing each pattern's step first).
# Then bench/attention_report.py evaluates them (test bits/pixel, layer-sweep probe) and draws the plot.
# Its minutes come from each pattern's step timed alone, not from these runs' clocks, so the runs
# may share the machine (OMP_NUM_THREADS=1, two at once): the steps they take are the same.
#
#   bench/attention_runs.sh [CIFAR10_TARBALL] [OUT]      # about 90 minutes on 2 cores; one run at a time
set -eu
D=${1:-../shared/datasets/cifar10/cifar10-jpeg.tar.gz}
OUT=${2:-runs/attention}
IGPT=${IGPT:-igpt}
run() {  # name, steps, flags...
    name=$1 steps=$2
    shift 2
    echo "== $name: $steps steps, started $(date -u +%H:%M:%S)"
    $IGPT train --data "$D" --resolution 32 --palette openai --model tiny --batch-size 32 --lr 3e-3 \
        --precision fp32 --device cpu --eval-every 25 --eval-batches 4 --save-every 100 --sample-every 1000 \
        --steps "$steps" "$@" --out "$OUT/$name"
    echo "== $name: finished $(date -u +%H:%M:%S)"
}
run dense-1d 200 --positions 1d --attention dense
run dense-2d 200 --positions 2d --attention dense
run local-2d 225 --positions 2d --attention local --window-rows 2
run strided-2d 330 --positions 2d --attention strided
