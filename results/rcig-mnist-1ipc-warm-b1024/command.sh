#!/bin/sh
# RCIG, MNIST 1 image per class: the warm1040-cos600 set (90.82 +- 0.43% under the paper's
# protocol) refined with the paper's 1024-image target batch: images and learned labels from
# that set, log temperature 2.2384 (its run's last, metrics.jsonl; sets saved since this
# session record it in support.npz), a fresh optimiser state, model pool (seed 1: new target
# batches and pool) and EMA; AdaBelief 0.005 on the images (labels 0.003, temperature 0.03),
# all decayed by a cosine to 0 over --steps; otherwise the defaults. Both cores, unpinned,
# 2026-12-06 07:40-09:13 UTC, session 18's Intel Xeon (family 6 model 207), nothing else
# running but short unit tests at nice 19 (steps ~30-80, ~100-140). Started with --steps 400
# --eval-every 200; stopped (SIGINT, checkpoint) and resumed (--resume, same command with the
# new values) at step 29 for --steps 500 --eval-every 250, at step 181 for --steps 450
# --eval-every 225, and at step 215 back to --steps 400 --eval-every 200 when the host's step
# time rose from ~10.6 to ~16 s: the cosine's length changed with each (lr_decay_steps
# follows --steps), so the schedule is not exactly a 400-step cosine.
cd /work/main
exec .venv/bin/ntkdd distill --algorithm rcig --dataset mnist --data-dir ../shared/data/mnist --ipc 1 \
  --init-support results/rcig-mnist-1ipc-warm1040-cos600/support.npz --rcig-init-log-temp 2.2384 \
  --rcig-target-batch 1024 --seed 1 --steps 400 --lr 0.005 --lr-schedule cosine --eval-every 200 \
  --eval-test-size 2000 --checkpoint-every 10 --no-progress --out /work/runs/rcig-mnist-warm-b1024 "$@"
# exec ends the script; the evaluation under the paper's protocol (5 ReLU ConvNets, width 128,
# the whole test split) is its own command:
# .venv/bin/python bench/rcig_eval.py --run /work/runs/rcig-mnist-warm-b1024 --dataset mnist \
#   --data-dir ../shared/data/mnist --models 5 --settings paper --json evaluation-rcig-protocol.json
