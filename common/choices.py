"""The names runs are configured with (kernels, inits, ...), importable without JAX for the CLI."""
from ntkdd.common import preprocess

KERNELS = ('ntk', 'nngp')              # the two infinite-width kernels every backend computes
INITS = ('real', 'noise')              # a support set starts from real train images or noise
# auto: per kernel family for `ntkdd distill`'s fresh KIP/LS runs (AUTO_KERNEL_PREPROCESS), RCIG's
# channel_zca for RGB (jobs.rcig_job); in a DistillConfig or a saved config.json, 'auto' is
# per-channel standardisation, what it meant before the per-family choice.
PREPROCESS_CHOICES = ('auto',) + preprocess.PREPROCESSOR_KINDS
# What 'auto' becomes for a new KIP/LS run, by kernel architecture. ConvNet: the channel ZCA
# (KRR of 10 random real CIFAR-10 images per class, ConvNet NTK 32x32 depth 3, whole test split,
# mean of 2 seeds: 31.04%, tied with KIP's ZCA, against 27.03% for standardisation on seed 0;
# BENCHMARKS.md, issue 12 §2; on grayscale data it is standardisation, bitwise, as KIP does).
# FC: standardisation (ZCA cut the FC kernel's KRR accuracy of 100 random real CIFAR-10 images
# from 26% to 12%).
AUTO_KERNEL_PREPROCESS = {'convnet': 'channel_zca', 'fc': 'standardize'}
# What 'auto' means where a DistillConfig or an older run's config.json holds it.
LEGACY_AUTO_PREPROCESS = 'standardize'
# KIP's loss on the KRR predictions (common/krr.py): squared error (the KIP papers'), or Platt
# scaling's cross-entropy with a learned temperature (RFAD's).
KIP_LOSSES = ('mse', 'platt')
# KIP's and RCIG's learning rates: constant, or a cosine decay to 0 at --steps.
LR_SCHEDULES = ('constant', 'cosine')
FLIP_CHOICES = ('auto', 'on', 'off')   # RCIG's mirrored support (auto: on for RGB images)
# ntkdd evaluate's finite-net training: ntkdd's own protocol, or the KIP or RCIG paper's
# (train.paper_protocol).
PAPER_PROTOCOLS = ('kip', 'rcig')
EVAL_PROTOCOLS = ('ntkdd',) + PAPER_PROTOCOLS
