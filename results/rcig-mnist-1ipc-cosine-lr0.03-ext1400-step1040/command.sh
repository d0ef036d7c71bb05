#!/bin/sh
# The lr-0.03 cosine run (../rcig-mnist-1ipc-cosine-lr0.03) continued from its step-700
# checkpoint with the schedule stretched to 1400 steps (the rate rises to 0.015 at step 700 and
# decays again); this set is its step-1040 checkpoint (a run in progress; 2026-12-06, core 1).
taskset -c 1 ntkdd distill --algorithm rcig --dataset mnist --data-dir ../shared/data/mnist \
  --ipc 1 --steps 1400 --lr 0.03 --lr-schedule cosine --eval-every 100 --eval-test-size 2000 \
  --checkpoint-every 10 --no-progress --out runs/rcig-mnist-cos-0.03 --resume
taskset -c 0 python bench/rcig_eval.py --run RUN_WITH_THIS_SET --dataset mnist \
  --data-dir ../shared/data/mnist --models 5 --settings paper
