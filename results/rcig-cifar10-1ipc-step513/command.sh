#!/bin/sh
# RCIG CIFAR-10 1 ipc, the paper's preprocessing (auto = channel_zca for RGB), in-process.
# Steps 1-202 pinned to one core (taskset -c 0, session 7), 203-302 again on core 0 after
# --resume (session 8), 303-513 on both cores (taskset -c 0,1); stopped by SIGINT at step 513
# of 3000 (checkpointed). Add --resume to continue a stopped run from its last checkpoint.
exec ntkdd distill --algorithm rcig --dataset cifar10 --data-dir ../shared/data \
  --ipc 1 --steps 3000 --eval-every 100 --eval-test-size 2000 --checkpoint-every 10 \
  --no-progress --out runs/rcig-cifar10-1 "$@"
