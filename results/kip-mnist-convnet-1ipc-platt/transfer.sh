#!/bin/sh
# Finite-width transfer of the KIP MNIST Platt-loss set: the KIP kernel's ConvNet (depth 3,
# width 128), 2 networks each, beside the same random real images (--baselines), under the
# KIP paper's protocol (core 0) and RCIG's code's protocol (core 1), whole test split.
cd .
S=results/kip-mnist-convnet-1ipc-platt
taskset -c 0 .venv/bin/ntkdd evaluate --support $S/support.npz --data-dir ../shared/data \
  --cache-dir /work/cache --transfer convnet --width 128 --protocol kip --seeds 2 --baselines \
  --no-krr --out $S/evaluation-kip-protocol.json > runs/platt-kip-protocol.log 2>&1 &
taskset -c 1 .venv/bin/ntkdd evaluate --support $S/support.npz --data-dir ../shared/data \
  --cache-dir /work/cache --transfer convnet --width 128 --protocol rcig --seeds 2 --baselines \
  --no-krr --out $S/evaluation-rcig-protocol.json > runs/platt-rcig-protocol.log 2>&1 &
wait
