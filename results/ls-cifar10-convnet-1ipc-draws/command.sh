#!/bin/sh
# LS ConvNet CIFAR-10 1 ipc, whole train split, channel ZCA, NTK: the run of
# ../ls-cifar10-convnet-1ipc (seed 0) repeated with other draws of the 10 support images
# (seeds 1, 2 and 3, chosen before any was run), through Launchpad (JAX 0.4.23), 2 workers pinned.
# Usage: sh command.sh SEED
cd /work/main
seed=${1:?give the seed}
exec /usr/bin/time -v taskset -c 0,1 .venv-lp/bin/ntkdd distill --algorithm ls --dataset cifar10 \
  --data-dir /work/shared/data --cache-dir /work/cache --ipc 1 --arch convnet --depth 3 \
  --preprocess channel_zca --launch launchpad --workers 2 --pin-workers --block 256 \
  --seed "$seed" --out /work/runs/ls-cifar10-lp-seed$seed --no-progress
