#!/bin/sh
# Issue 12 §3, KIP ConvNet MNIST 1 ipc (goal >= 94% within 2 h, both cores): the 400-step
# cosine schedule of the best runs so far (91.83% / 91.81%), with Platt scaling's loss
# (--loss platt: cross-entropy of the KRR predictions times a learned temperature, RFAD's)
# in place of the squared error; everything else as results/kip-mnist-convnet-1ipc-ema/
# without its moving average. Two Launchpad workers pinned one per core. In-run evaluations
# on a fixed 2,000-image test subset; the final set on the whole test split (evaluate.sh).
# Add --resume to continue.
cd .
exec taskset -c 0,1 .venv-lp/bin/ntkdd distill --algorithm kip --dataset mnist --data-dir ../shared/data \
  --cache-dir /work/cache --ipc 1 --arch convnet --depth 3 --learn-labels --loss platt --lr 0.2 \
  --lr-schedule cosine --steps 400 --target-batch 100 --eval-every 100 --eval-test-size 2000 \
  --checkpoint-every 10 --launch launchpad --workers 2 --pin-workers --out runs/kip-mnist-platt \
  --no-progress "$@"
