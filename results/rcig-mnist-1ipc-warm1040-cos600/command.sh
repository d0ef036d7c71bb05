#!/bin/sh
# RCIG, MNIST 1 image per class, started from the step-1040 set of the lr-0.03 cosine run
# (../rcig-mnist-1ipc-cosine-lr0.03-ext1400-step1040; its run directory was gone with the
# machine) with --init-support: images and learned labels from that set, log temperature 2.25
# (its run's, metrics.jsonl), a fresh optimiser state, model pool and EMA; AdaBelief 0.005 on
# the images (labels 0.003, temperature 0.03), all three decayed by a cosine to 0 over 600
# steps; target batch 256; otherwise the defaults. 2026-12-06 03:48-05:10 UTC, AMD EPYC (a
# slower host than session 16's: 11.5 s per step on one core where that one took 5.9), both
# cores from step 36 (6.6 s per step), nothing else running. Stopped and resumed twice in the
# first 36 steps to change the launch (see BENCHMARKS.md): first with --steps 1100
# --eval-every 100 on core 1, then --steps 900 --eval-every 300 beside a second run on core 0.
ntkdd distill --algorithm rcig --dataset mnist --data-dir ../shared/data/mnist --ipc 1 \
  --init-support results/rcig-mnist-1ipc-cosine-lr0.03-ext1400-step1040/support.npz \
  --rcig-init-log-temp 2.25 --steps 600 --lr 0.005 --lr-schedule cosine --eval-every 300 \
  --eval-test-size 2000 --checkpoint-every 10 --no-progress --out runs/rcig-mnist-warm1040
# The paper's evaluation protocol (5 ReLU ConvNets, width 128, the whole test split):
python bench/rcig_eval.py --run runs/rcig-mnist-warm1040 --dataset mnist \
  --data-dir ../shared/data/mnist --models 5 --settings paper --json evaluation-rcig-protocol.json
