#!/bin/sh
# RCIG step (reference and structured, side by side) with and without XLA:CPU's library
# flags, one after the other on core 0 (2026-12-06 13:22-13:35 UTC, Intel Xeon family 6 model
# 207; core 1 idle but for a GPU-suite smoke test during the last run). JSONs: none-1,
# xnnpack, onednn, none-2 (in this order); log.txt is the printed tables.
cd "$(dirname "$0")/../../.."
for fl in none --xla_cpu_use_xnnpack=true --xla_cpu_use_onednn=true none; do
  if [ "$fl" = none ]; then X=""; else X="$fl"; fi
  echo "== $fl $(date -u +%H:%M:%S)"
  XLA_FLAGS="$X" taskset -c 0 .venv/bin/python bench/rcig_step.py --data-dir ../shared/data/mnist \
    --rounds 3 --json /tmp/rcig_step_$(echo "$fl" | tr -c 'a-z0-9\n' '_').json 2>&1 | tail -8
done
