#!/bin/sh
# Whole-test-split KRR accuracy of the KIP MNIST set (two pinned Launchpad workers).
cd .
exec taskset -c 0,1 .venv-lp/bin/ntkdd evaluate --support runs/kip-mnist-lp/support.npz \
  --data-dir ../shared/data --cache-dir cache --transfer '' --launch launchpad --workers 2 \
  --pin-workers --out runs/kip-mnist-lp/evaluation-krr.json
