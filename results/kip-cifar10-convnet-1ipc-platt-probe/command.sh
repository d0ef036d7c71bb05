#!/bin/sh
# Probe: does Platt scaling's loss (--loss platt) lift KIP ConvNet CIFAR-10 at 1 image per
# class as it lifted MNIST? results/kip-cifar10-convnet-1ipc/'s command (lr 0.1 cosine over 500
# steps, target batch 100, learned labels, channel ZCA, seed 0, whole-test-split evaluations
# every 100 steps) with --loss platt, through two pinned Launchpad workers; stopped part-way
# (SIGINT checkpoints it; add --resume to continue).
cd .
exec taskset -c 0,1 .venv-lp/bin/ntkdd distill --algorithm kip --dataset cifar10 --data-dir ../shared/data \
  --cache-dir /work/cache --ipc 1 --arch convnet --depth 3 --learn-labels --loss platt --lr 0.1 \
  --lr-schedule cosine --steps 500 --target-batch 100 --eval-every 100 --checkpoint-every 10 \
  --preprocess channel_zca --launch launchpad --workers 2 --pin-workers --out runs/kip-cifar10-platt \
  --no-progress "$@"
