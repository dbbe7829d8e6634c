#!/usr/bin/env bash
# IA-RED² on the cluttered-fashion backbone (D = 3 groups of 2 blocks): Algorithm 1 with
# the interpreters trained by REINFORCE and, by default here, no block fine-tuning (the
# paper's Table 2/3 setting; add --finetune to run Algorithm 1's fine-tuning stages).
#
# Budget: each interpreter gets EPOCHS*10/30 "epochs" of LIMIT steps of 64 images
# (defaults: 9 -> 3 epochs x 50 steps = 9.6k images per group, about 30 min on 2 shared
# cores). The paper's lr of 4e-5 is for 10 full ImageNet epochs; with a few thousand
# images per interpreter we use 1e-3.
#
# Usage: [EPOCHS=9 LIMIT=50 TAU=1.0] benchmarks/train_cluttered_fashion_iared.sh BACKBONE [OUT] [extra flags]
set -euo pipefail
BACKBONE=${1:?usage: $0 BACKBONE [OUT] [flags]}
OUT=${2:-runs/cf_iared}
shift; shift || true
DATA=${FASHION_DIR:-../shared/data/fashion_mnist}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "${PYTHON:-.venv/bin/python}" -m iared.cli train \
  --data "cluttered-fashion:${DATA}" --checkpoint "$BACKBONE" --groups 3 --out "$OUT" \
  --no-finetune --epochs ${EPOCHS:-9} --limit-batches ${LIMIT:-50} --batch-size 64 --lr 1e-3 \
  --tau ${TAU:-1.0} --val-size ${VAL_SIZE:-500} --checkpoint-every 25 --device cpu --seed 0 --no-progress "$@"
