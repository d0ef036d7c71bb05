#!/bin/sh
# Whole-test-split KRR accuracy of the KIP MNIST Platt-loss run's final set, two pinned
# Launchpad workers.
cd .
exec taskset -c 0,1 .venv-lp/bin/ntkdd evaluate --support runs/kip-mnist-platt/support.npz \
  --data-dir ../shared/data --cache-dir /work/cache --transfer '' --launch launchpad --workers 2 \
  --pin-workers --out runs/kip-mnist-platt/evaluation-krr.json
