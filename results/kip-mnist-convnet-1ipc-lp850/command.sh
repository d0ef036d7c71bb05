#!/bin/sh
# Issue 12 §3, KIP ConvNet MNIST 1 ipc (goal >= 94% within 2 h, both cores): the service's
# fastest path here, two Launchpad workers pinned one per core (8.3 s/step measured 2026-12-05),
# a cosine schedule that ends within the budget (~850 steps). In-run evaluations on a fixed
# 2,000-image test subset (the curve); the final set is evaluated on the whole test split
# afterwards. Add --resume to continue.
cd .
exec taskset -c 0,1 .venv-lp/bin/ntkdd distill --algorithm kip --dataset mnist --data-dir ../shared/data \
  --cache-dir cache --ipc 1 --arch convnet --depth 3 --learn-labels --lr 0.2 --lr-schedule cosine --steps 850 \
  --target-batch 100 --eval-every 170 --eval-test-size 2000 --checkpoint-every 10 --launch launchpad --workers 2 \
  --pin-workers --out runs/kip-mnist-lp --no-progress "$@"
