#!/bin/sh
# RCIG CIFAR-10 1 ipc, the paper's preprocessing (auto = channel_zca for RGB), in-process.
# Steps 1-202 pinned to one core (taskset -c 0, session 7), 203-302 again on core 0 after
# --resume (session 8), 303-600 on both cores (taskset -c 0,1; session 8), 601-808 on both cores
# after --resume (session 9); stopped by SIGINT at step 808 of 3000 (checkpointed; in-run
# evaluation at step 800). Add --resume to continue a stopped run from its last checkpoint.
exec ntkdd distill --algorithm rcig --dataset cifar10 --data-dir ../shared/data \
  --ipc 1 --steps 3000 --eval-every 100 --eval-test-size 2000 --checkpoint-every 10 \
  --no-progress --out runs/rcig-cifar10-1 "$@"
# The set on the whole test split, RCIG's protocol with its mirror images (mirror auto reads
# flip_support from config.json), 2 networks:
# ntkdd evaluate --support results/rcig-cifar10-1ipc-step808/support.npz --data-dir ../shared/data \
#   --transfer rcig_convnet --width 128 --protocol rcig --seeds 2 --no-krr \
#   --out results/rcig-cifar10-1ipc-step808/evaluation-rcig-protocol.json
