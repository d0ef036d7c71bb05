#!/bin/sh
# Whole-test-split KRR accuracy of the KIP MNIST EMA run: its saved set (the moving average)
# and the current set of its last step (from checkpoint.npz), two pinned Launchpad workers.
cd .
set -e
.venv-lp/bin/python -c "
import numpy as np
with np.load('runs/kip-mnist-ema/checkpoint.npz') as f:
    np.savez('runs/kip-mnist-ema/current.npz', images=f['images'], labels=f['labels'])
"
for set in support current; do
  taskset -c 0,1 .venv-lp/bin/ntkdd evaluate --support runs/kip-mnist-ema/$set.npz \
    --data-dir ../shared/data --cache-dir /work/cache --transfer '' --launch launchpad --workers 2 \
    --pin-workers --out runs/kip-mnist-ema/evaluation-krr-$set.json
done
