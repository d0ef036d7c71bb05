#!/bin/sh
# Issue 12 §3 probe: does a larger target batch (control: 100, the same 150-step schedule) lift KIP ConvNet MNIST 1 ipc
# above the 90-92% every batch-100 schedule reached? One core (core 0), in-process, .venv-lp
# (JAX 0.4.23, the faster JAX here), cosine schedule of 150 steps, lr 0.2. Add --resume to continue.
cd /work/main
exec taskset -c 0 .venv-lp/bin/ntkdd distill --algorithm kip --dataset mnist --data-dir /work/shared/data \
  --cache-dir /work/cache --ipc 1 --arch convnet --depth 3 --learn-labels --lr 0.2 --lr-schedule cosine --steps 150 \
  --target-batch 100 --eval-every 25 --eval-test-size 2000 --checkpoint-every 5 \
  --out /work/runs/kip-mnist-b100 --no-progress "$@"
