#!/bin/sh
# LS ConvNet CIFAR-10 1 ipc, whole train split, channel ZCA, the NNGP kernel (the NTK run:
# ../ls-cifar10-convnet-1ipc), through Launchpad (JAX 0.4.23), 2 workers pinned, same seed.
cd /work/main
exec /usr/bin/time -v taskset -c 0,1 .venv-lp/bin/ntkdd distill --algorithm ls --dataset cifar10 \
  --data-dir /work/shared/data --cache-dir /work/cache --ipc 1 --arch convnet --depth 3 \
  --kernel nngp --preprocess channel_zca --launch launchpad --workers 2 --pin-workers --block 256 \
  --out /work/runs/ls-cifar10-lp-nngp --no-progress "$@"
