"""The names runs are configured with (kernels, inits, ...), importable without JAX for the CLI."""
from ntkdd.common import preprocess

KERNELS = ('ntk', 'nngp')              # the two infinite-width kernels every backend computes
INITS = ('real', 'noise')              # a support set starts from real train images or noise
# auto: per-channel standardisation (DistillConfig; RCIG's is channel_zca for RGB, see jobs.py).
PREPROCESS_CHOICES = ('auto',) + preprocess.PREPROCESSOR_KINDS
LR_SCHEDULES = ('constant', 'cosine')  # KIP's learning rate: constant, or cosine decay to 0
FLIP_CHOICES = ('auto', 'on', 'off')   # RCIG's mirrored support (auto: on for RGB images)
# ntkdd evaluate's finite-net training: ntkdd's own protocol, or the KIP or RCIG paper's
# (train.paper_protocol).
PAPER_PROTOCOLS = ('kip', 'rcig')
EVAL_PROTOCOLS = ('ntkdd',) + PAPER_PROTOCOLS
