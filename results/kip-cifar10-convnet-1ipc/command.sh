#!/bin/bash
# KIP ConvNet CIFAR-10 1 ipc, 32x32, depth 3, learned labels, channel ZCA (auto), Ray, 2 workers.
# Run inside `unshare -n` (private network, loopback only); then pin the two KernelWorker
# processes one per core (taskset -a -cp 0 PID; taskset -a -cp 1 PID2) and renice them to 0.
# Steps 1-150 ran with --block 50, steps 151-500 with --block 10 (what --block unset now gives).
# Add --resume to continue a stopped run from its last checkpoint.
ip link set lo up
exec ntkdd distill --algorithm kip --dataset cifar10 --data-dir ../shared/data \
  --ipc 1 --arch convnet --depth 3 --learn-labels --lr 0.1 --lr-schedule cosine --steps 500 --target-batch 100 \
  --eval-every 100 --checkpoint-every 10 --launch ray --ray-address local --workers 2 \
  --no-progress --out runs/kip-cifar10-convnet-1ipc "$@"
