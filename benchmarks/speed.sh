#!/usr/bin/env bash
# The speed benchmark: `iared bench speed` on ViT-Tiny, DeiT-S/B at 224 and DeiT-B at 384, random
# weights, batch 1 and 64, CPU, linear layers through oneDNN and each block in one C++ call
# (`--kernels auto`: "native" where the extension builds), glibc told to keep freed memory
# (`--allocator steady`: no method pays page faults for fresh buffers).
# Each JSON records its exact command and the 1-minute load average before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
IARED=${IARED:-.venv/bin/iared}
R=benchmarks/results
FLAGS=${FLAGS:---warmup 1 --repeats 5 --device cpu}
# A batch-1 forward takes 40-700 ms and its time jitters by a few percent from call to
# call: more repeats make its median as steady as the batch-64 ones (each JSON also has
# `speedup_paired`, the median of per-round ratios, see `bench_speed`).
FLAGS_B1=${FLAGS_B1:---warmup 3 --repeats 40 --device cpu}
run() { echo "== $*"; $IARED bench speed "$@" $FLAGS; }
run1() { echo "== $*"; $IARED bench speed "$@" $FLAGS_B1; }
run1 --arch vit_tiny_patch16_224 --batch-size 1 --json $R/speed_vit_tiny_patch16_224_b1.json
run --arch vit_tiny_patch16_224 --batch-size 64 --json $R/speed_vit_tiny_patch16_224_b64.json
# What the C++ block buys at batch 1: the same runs with the oneDNN linears alone.
run1 --arch vit_tiny_patch16_224 --batch-size 1 --kernels onednn --json $R/speed_vit_tiny_patch16_224_b1_onednn.json
run1 --arch deit_small_patch16_224 --batch-size 1 --kernels onednn --json $R/speed_deit_small_patch16_224_b1_onednn.json
run1 --arch deit_small_patch16_224 --batch-size 1 --json $R/speed_deit_small_patch16_224_b1.json
run --arch deit_small_patch16_224 --batch-size 64 --json $R/speed_deit_small_patch16_224_b64.json
run1 --arch deit_base_patch16_224 --batch-size 1 --json $R/speed_deit_base_patch16_224_b1.json
run1 --arch deit_base_patch16_384 --batch-size 1 --json $R/speed_deit_base_patch16_384_b1.json
run --arch deit_base_patch16_224 --batch-size 64 --json $R/speed_deit_base_patch16_224_b64.json
run --arch deit_base_patch16_384 --batch-size 64 --json $R/speed_deit_base_patch16_384_b64.json
# bfloat16 (weights, activations, inputs; oneDNN's bf16 kernels where the CPU has native bf16):
# DeiT-S, the model whose batch-1 run is furthest from the limit in fp32.
run1 --arch deit_small_patch16_224 --batch-size 1 --dtype bfloat16 --json $R/speed_deit_small_patch16_224_b1_bf16.json
run --arch deit_small_patch16_224 --batch-size 64 --dtype bfloat16 --json $R/speed_deit_small_patch16_224_b64_bf16.json
