#!/bin/sh
# RCIG CIFAR-10 1 ipc, the paper's preprocessing (auto = channel_zca for RGB), core 0.
cd /work/main
exec taskset -c 0 .venv/bin/ntkdd distill --algorithm rcig --dataset cifar10 \
  --data-dir /work/shared/data --cache-dir /work/cache --ipc 1 --steps 3000 \
  --eval-every 100 --eval-test-size 2000 --checkpoint-every 10 \
  --out /work/runs/rcig-cifar10-1 --no-progress "$@"
