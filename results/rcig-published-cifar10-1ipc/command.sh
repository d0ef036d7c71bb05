#!/bin/sh
# RCIG's own published CIFAR-10 1-image-per-class set (github.com/yolky/RCIG, commit a9fb1fa,
# distilled_images_final/0/cifar10_1/checkpoint_15000: 15,000 distillation steps, its
# depth_3.txt config with flips), evaluated by ntkdd: RCIG's protocol, its ConvNet at width 128,
# the set and its mirror images (RCIG's eval.py adds them for sets distilled with flips), the
# whole CIFAR-10 test split in the channel-ZCA space RCIG distils in. The checkpoint is not
# committed here (it is RCIG's); take it from a clone of that repository:
#   git -C RCIG show HEAD:distilled_images_final/0/cifar10_1/checkpoint_15000 > checkpoint_15000
ntkdd evaluate --support checkpoint_15000 --dataset cifar10 --data-dir ../shared/data \
  --preprocess channel_zca --transfer rcig_convnet --width 128 --protocol rcig --seeds 2 \
  --no-krr --mirror on --out evaluation-rcig-protocol.json
