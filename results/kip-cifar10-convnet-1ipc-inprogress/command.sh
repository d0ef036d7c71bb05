#!/bin/bash
# KIP ConvNet CIFAR-10 1 ipc, 32x32, depth 3, learned labels, channel ZCA (auto), Ray, 2 workers.
ip link set lo up
cd /work/main
exec .venv/bin/ntkdd distill --algorithm kip --dataset cifar10 --data-dir /work/shared/data --cache-dir /work/cache \
  --ipc 1 --arch convnet --depth 3 --learn-labels --lr 0.1 --lr-schedule cosine --steps 500 --target-batch 100 \
  --eval-every 100 --checkpoint-every 10 --launch ray --ray-address local --workers 2 --block 50 \
  --no-progress --out /work/runs/kip-cifar10-convnet-1ipc "$@"
