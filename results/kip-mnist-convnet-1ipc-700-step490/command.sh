#!/bin/bash
# KIP ConvNet MNIST 1 ipc, 28x28, depth 3, learned labels, through Ray with 2 workers.
ip link set lo up
cd /work/main
exec .venv/bin/ntkdd distill --algorithm kip --dataset mnist --data-dir /work/shared/data --cache-dir /work/cache \
  --ipc 1 --arch convnet --depth 3 --learn-labels --lr 0.2 --lr-schedule cosine --steps 700 --target-batch 100 \
  --eval-every 140 --checkpoint-every 10 --launch ray --ray-address local --workers 2 \
  --no-progress --out /work/runs/kip-mnist-convnet-1ipc-700 "$@"
