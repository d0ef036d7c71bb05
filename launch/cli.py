"""The `ntkdd` command line: kernel, distill, evaluate, show."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ntkdd.common.choices import (EVAL_PROTOCOLS, FLIP_CHOICES, INITS, KERNELS, KIP_LOSSES,
                                  LR_SCHEDULES, PREPROCESS_CHOICES)
from ntkdd.launch import flag_uses, flags, launch_types

DESCRIPTION = """\
ntkdd distils a labelled image dataset into a few synthetic images per class with
neural tangent kernels: KIP (Kernel Inducing Points) learns the images (and optionally
labels), LS (Label Solve) solves labels for real images in closed form.

Typical use:
  ntkdd distill --algorithm kip --dataset mnist --data-dir DATA --ipc 10 --steps 500 --out runs/mnist
  ntkdd evaluate --support runs/mnist/support.npz --dataset mnist --data-dir DATA
  ntkdd show runs/mnist
  ntkdd kernel --arch convnet --x1 a.npy --x2 b.npy --out k.npz

Run `ntkdd COMMAND --help` for each command's flags.
"""


def _add_kernel_flags(p: argparse.ArgumentParser, default_arch: str, default_depth: int) -> None:
  g = p.add_argument_group('kernel')
  g.add_argument('--arch', choices=('fc', 'convnet'), default=default_arch,
                 help='fc: fully-connected ReLU net; convnet: the KIP ConvNet (3x3 conv + ReLU, '
                      'then DEPTH x [conv, ReLU, 2x2 avg pool], dense). Default %(default)s.')
  g.add_argument('--depth', type=flags.nonnegative_int, default=default_depth,
                 help='hidden layers (fc) or conv+pool blocks (convnet; and RCIG\'s ConvNet, '
                      'default 3 there). Default %(default)s.')
  g.add_argument('--w-std', type=flags.positive_float, default=None,
                 help='weight standard deviation. Default sqrt(2) for kernels (NTK '
                      'parameterisation); 1 for RCIG\'s standard-parameterised net (LeCun '
                      'normal, as its paper).')
  g.add_argument('--b-std', type=flags.nonnegative_float, default=None,
                 help='bias standard deviation. Default 0.1 for kernels; 0 for RCIG.')
  g.add_argument('--tile', type=flags.tile, default=None,
                 help='pair-block side (>= 1) for blocked evaluation; default: chosen from free '
                      'memory.')
  g.add_argument('--dtype', choices=('float32', 'float64'), default='float32',
                 help='kernel precision. Default %(default)s.')
  g.add_argument('--launch', choices=tuple(launch_types.LAUNCHES), default='inprocess',
                 help='where kernel blocks run: inprocess (this process; the default), '
                      'launchpad (a local_mp program: one Courier process per worker plus the '
                      'coordinator; needs the Python 3.10 environment, ntkdd[launchpad]) or ray '
                      '(worker actors and a coordinator actor on a Ray cluster; ntkdd[ray]).')
  g.add_argument('--ray-address', default=None,
                 help='with --launch ray: HOST:PORT of a cluster\'s head; \'auto\' (the cluster '
                      'started on this machine with `ray start`, else an error); \'local\' (a '
                      'private Ray on this machine for this command only). Default: a running '
                      'cluster (RAY_ADDRESS, or the one `ray start` began here) if there is '
                      'one, else a private local Ray, as ray.init() does; the log says which.')
  g.add_argument('--workers', type=flags.nonnegative_int, default=0,
                 help='kernel workers; 0 computes kernels directly, N >= 1 farms tiles of '
                      '--block images to N workers through the coordinator (launchpad and '
                      'ray need N >= 1; RCIG uses them for its KRR evaluation only).')
  g.add_argument('--block', type=flags.positive_int, default=None,
                 help='coordinator tile side (images) when --workers >= 1. Default: fitted to '
                      'each call\'s rows, the fewest equal tiles of at most 64 (a 10-image '
                      'support set gives 10 x 10 blocks, so two workers share a 1-image-per-'
                      'class step evenly).')
  g.add_argument('--expose-courier-ports', action='store_true',
                 help='with --launch launchpad where no private network namespace can be made '
                      '(unshare -n): run anyway, with every Courier port listening on all '
                      'interfaces of this machine. Courier executes what its callers send, so '
                      'anyone who can reach these ports can run code as you. Only for machines '
                      'whose whole network is trusted.')
  g.add_argument('--pin-workers', action='store_true',
                 help='with --launch launchpad or ray on one machine: worker i runs all its '
                      'threads on core i mod (the cores this command may use), set before its '
                      'first computation, so N workers on N cores do not preempt each other '
                      '(and each XLA CPU runtime starts one compute thread, not one per core). '
                      'Restrict the cores with taskset on the command (e.g. taskset -c 0,1). '
                      'Linux only.')


def _add_data_flags(p: argparse.ArgumentParser, data_dir_default: Optional[str] = 'data') -> None:
  g = p.add_argument_group('data')
  g.add_argument('--dataset', default='mnist',
                 help='mnist, fashion_mnist, cifar10, cifar100, a .npz with x_train, y_train, '
                      'x_test, y_test, or a folder with train/ and test/ class sub-folders.')
  g.add_argument('--data-dir', default=data_dir_default,
                 help='folder holding the dataset files (idx .gz, CIFAR python tarballs). '
                      + ('Default %(default)s.' if data_dir_default else
                         "Default: the run's (config.json), else data."))
  g.add_argument('--cache-dir', default=None, help='where decoded arrays are cached.')
  g.add_argument('--download', action='store_true',
                 help='fetch missing standard datasets from their official locations (or '
                      'from the mirror in $NTKDD_DOWNLOAD_URL), checksums verified.')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='ntkdd', description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('-v', '--verbose', action='store_true', help='debug logging.')
  sub = parser.add_subparsers(dest='command', metavar='COMMAND')
  sub.required = True

  k = sub.add_parser('kernel', help='compute NTK and NNGP matrices of arrays of images.',
                     description='Writes ntk and nngp (n1 x n2) to an .npz for NHWC images '
                                 '(or N x D vectors with --arch fc), tile by tile.')
  k.add_argument('--x1', required=True, help='.npy of the row inputs (NHWC, or N x D for fc).')
  k.add_argument('--x2', default=None, help='.npy of the column inputs; default: x1 (symmetric).')
  k.add_argument('--out', required=True, help='output .npz with ntk and nngp.')
  _add_kernel_flags(k, 'convnet', 3)

  d = sub.add_parser(
      'distill', help='distil a dataset with KIP or LS into a run directory.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      description='Learns ipc support images per class (KIP) or the labels of real ones (LS). '
                  'The run directory gets support.npz, config.json, metrics.jsonl, '
                  'checkpoint.npz, support.png and curves.png; --resume continues a stopped run.')
  d.add_argument('--algorithm', choices=('kip', 'ls', 'rcig'), default='kip',
                 help='kip: learn images (and --learn-labels); ls: solve labels in closed form; '
                      'rcig: finite-width ConvNet with convexified implicit gradients (Loo et '
                      'al. 2023) on the coordinator; its --workers serve the ConvNet NTK for the '
                      'KRR accuracy logged at --eval-every. Flags the chosen mode does not use '
                      'are refused.')
  d.add_argument('--ipc', type=flags.positive_int, default=10,
                 help='images per class in the support set.')
  d.add_argument('--steps', type=flags.nonnegative_int, default=1000,
                 help='KIP optimisation steps.')
  d.add_argument('--out', required=True, help='run directory.')
  d.add_argument('--resume', action='store_true', help='continue the run in --out.')
  d.add_argument('--overwrite', action='store_true',
                 help='replace the run already in --out (its config, checkpoint, support set, '
                      'metrics and summary); without it such a directory is refused.')
  d.add_argument('--seed', type=flags.seed, default=0, help='fixes every random draw.')
  _add_data_flags(d)
  _add_kernel_flags(d, 'fc', 1)
  o = d.add_argument_group('optimisation')
  o.add_argument('--kernel', choices=KERNELS, default='ntk', help='which kernel KRR uses.')
  o.add_argument('--reg', type=flags.positive_float, default=1e-6,
                 help='ridge lambda: K_ss + reg * tr(K_ss)/n * I.')
  o.add_argument('--lr', type=flags.positive_float, default=None,
                 help='support-image learning rate (default 0.01 for KIP\'s Adam, 0.003 for '
                      'RCIG\'s AdaBelief).')
  o.add_argument('--lr-schedule', choices=LR_SCHEDULES, default='constant',
                 help='cosine decays the learning rate to 0 at --steps (KIP: its Adam\'s; '
                      'RCIG: the images\', labels\' and temperature\'s together).')
  o.add_argument('--learn-labels', action='store_true', help='KIP: learn the support labels too.')
  o.add_argument('--loss', choices=KIP_LOSSES, default='mse',
                 help="KIP's loss on the target batch's KRR predictions P: mse, the KIP papers' "
                      "1/2 ||y_t - P||^2; platt, Platt scaling's cross-entropy of softmax(exp(t) "
                      "P) with t learned beside the support by the same Adam (RFAD, Loo et al. "
                      "2022; logged as temperature). KRR accuracy is the argmax of P either way.")
  o.add_argument('--ema-decay', type=flags.nonnegative_float, default=None,
                 help='save and evaluate an exponential moving average of the support with '
                      'this decay, bias-corrected (e.g. 0.99: about the last 100 steps); '
                      'evaluations then also log the current set as '
                      'krr_test_accuracy_current. Default: 0 (off) for KIP, 0.99 for RCIG '
                      '(its paper).')
  o.add_argument('--target-batch', type=flags.positive_int, default=1000,
                 help='class-balanced target images per step.')
  o.add_argument('--init', choices=INITS, default='real',
                 help='support initialisation: class-balanced real images, or noise.')
  o.add_argument('--init-support', default='', metavar='PATH',
                 help="start from this support set instead of --init: a support.npz written by "
                      "`ntkdd distill` (its images and labels, in this run's preprocessed "
                      "space: the same dataset, --image-size and --preprocess) or an RCIG/FRePo "
                      "checkpoint; it must hold --ipc images of every class. For refining a "
                      "published set, or going on from a run whose checkpoints are gone: the "
                      "optimiser state, RCIG's model pool and the EMA start afresh (with "
                      "--resume, a run's own checkpoint is used and this is not read).")
  o.add_argument('--preprocess', choices=PREPROCESS_CHOICES, default='auto',
                 help='auto: by kernel, as measured (BENCHMARKS.md): channel_zca for the '
                      'ConvNet kernel, standardize for the FC kernel; RCIG: channel_zca for '
                      'RGB images; with --resume, what the run used. kip_zca: KIP\'s ZCA '
                      '(per-image centring and unit norm, then ZCA); channel_zca: '
                      'RCIG/FRePo\'s (per-channel standardisation, then ZCA; grayscale: '
                      'standardisation only); zca: the old name of kip_zca.')
  o.add_argument('--zca-strength', type=flags.positive_float, default=0.1,
                 help='ZCA regulariser, as a fraction of the mean eigenvalue.')
  o.add_argument('--image-size', type=flags.positive_int, default=None,
                 help='average-pool images to this side first (cheaper ConvNet kernels).')
  o.add_argument('--eval-every', type=flags.nonnegative_int, default=50,
                 help='steps between test evaluations (>= 1 for KIP; 0: none, RCIG only).')
  o.add_argument('--eval-test-size', type=flags.nonnegative_int, default=0,
                 help='test images per evaluation (a fixed subset); 0 = all.')
  o.add_argument('--checkpoint-every', type=flags.positive_int, default=50,
                 help='steps between checkpoints.')
  o.add_argument('--ls-target-size', type=flags.nonnegative_int, default=0,
                 help='LS: class-balanced target images to solve over; 0 = the whole train split.')
  o.add_argument('--ls-rcond', type=flags.nonnegative_float, default=1e-6,
                 help='LS: pseudo-inverse cut-off relative to the largest singular value.')
  r = d.add_argument_group('rcig (finite-width ConvNet; paper defaults)')
  r.add_argument('--width', type=flags.positive_int, default=128, help='ConvNet channels.')
  r.add_argument('--l2-rate', type=flags.positive_float, default=5e-4,
                 help='L2 rate of the inner problem.')
  r.add_argument('--inner-steps', type=flags.positive_int, default=20,
                 help='Adam steps on the inner problem.')
  r.add_argument('--hinv-steps', type=flags.positive_int, default=20,
                 help='optimisation steps of the Hessian-inverse-vector product.')
  r.add_argument('--pool-size', type=flags.positive_int, default=30,
                 help='partially trained models.')
  r.add_argument('--max-pool-steps', type=flags.positive_int, default=100,
                 help='training steps after which a pool model is re-initialised.')
  r.add_argument('--pool-train-steps', type=flags.positive_int, default=15,
                 help='each meta-step trains its pool model for 1 to this many Adam steps.')
  r.add_argument('--rcig-target-batch', type=flags.positive_int, default=256,
                 help='real images per outer loss (the paper uses 1024).')
  r.add_argument('--rcig-init-log-temp', type=flags.finite_float, default=None,
                 help="the outer loss's log temperature at the start (learned after; logged as "
                      "log_temp in metrics.jsonl). Default: with --init-support, the one saved "
                      "with that set (RCIG's support.npz records it), else 0 as the paper; give "
                      "it for sets that do not record one (the log_temp their run reached).")
  r.add_argument('--batch-norm', action='store_true',
                 help='batch normalisation after each convolution of the distillation net '
                      '(default: none, as the paper).')
  r.add_argument('--rcig-flip', choices=FLIP_CHOICES, default='auto',
                 help='also use the support mirrored left-right in the inner problem and pool '
                      'training (auto: on for RGB images, as the paper does).')
  r.add_argument('--eval-models', type=flags.positive_int, default=1,
                 help='finite ConvNets trained per evaluation (--eval-every).')
  d.add_argument('--no-progress', action='store_true', help='no progress bar.')
  d.add_argument('--tensorboard', action='store_true',
                 help='also write TensorBoard events into --out (loss, KRR and finite-net '
                      'accuracy, kernel pairs/s per step, the support images at every '
                      'evaluation): `tensorboard --logdir runs/`. Needs tensorboardX '
                      "(pip install 'ntkdd[tensorboard]'); in-process runs.")

  e = sub.add_parser(
      'evaluate', help='KRR and finite-width accuracy of a support set.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      description='Evaluates a support.npz (ours or made elsewhere) on the full test split: '
                  'KRR test accuracy with the kernel, and networks trained on the support set.')
  e.add_argument('--support', required=True,
                 help='support .npz: images (model space) or images_pixels (raw [0,1] pixels, '
                      'then preprocessed as the run was) plus labels (n x C) or label_ids; or '
                      'a checkpoint of the RCIG or FRePo code (a flax msgpack checkpoint_<step> '
                      'file or its folder: x_proto, y_proto, the ema_average copy first; '
                      'needs msgpack and --preprocess naming the space it was made in).')
  e.add_argument('--run', default=None, help='run directory whose config.json sets the '
                 'dataset, preprocessing and kernel; default: the support file\'s folder.')
  e.add_argument('--pixels', action='store_true',
                 help='the support images are raw pixels in [0,1]; preprocess them first.')
  _add_data_flags(e, data_dir_default=None)
  _add_kernel_flags(e, 'fc', 1)
  e.add_argument('--kernel', choices=KERNELS, default='ntk')
  e.add_argument('--reg', type=flags.positive_float, default=1e-6)
  e.add_argument('--preprocess', choices=PREPROCESS_CHOICES, default='auto',
                 help='as in distill (a run directory\'s config.json overrides it); for an '
                      'RCIG/FRePo checkpoint, the preprocessing the set was made in (the test '
                      'split gets the same).')
  e.add_argument('--zca-strength', type=flags.positive_float, default=0.1)
  e.add_argument('--image-size', type=flags.positive_int, default=None)
  e.add_argument('--transfer', default='convnet,fc',
                 help='finite networks to train on the support set (comma list; empty: none).')
  e.add_argument('--width', type=flags.positive_int, default=128, help='finite network width.')
  e.add_argument('--protocol', choices=EVAL_PROTOCOLS, default='ntkdd',
                 help='how the finite networks are trained. ntkdd: this evaluator\'s quick '
                      'protocol: Adam warmed up over min(500, steps/4) steps, then a cosine to 0 '
                      'over --train-steps (1000 by default), a zero readout, the NTK '
                      'parameterisation. kip: the KIP paper\'s (Nguyen et al. 2021): the '
                      'kernel\'s architecture at --width (the paper\'s nets are 1024 wide) in '
                      'the standard parameterisation, SGD with momentum 0.9 at half the largest '
                      'stable learning rate of each network\'s empirical NTK, cosine decay, '
                      'batch 100, L2 1e-3, MSE: 5000 SGD steps per network. rcig: the RCIG '
                      'code\'s (Loo et al. 2023): standard parameterisation, Adam at 1e-4 '
                      'warmed up over 500 steps, then a cosine to 1%% of it, MSE, batch 256: '
                      '2500 Adam steps per network for a 10-image set, else 5000 (with '
                      '--augment 1000, else 2000); add rcig_convnet to --transfer for RCIG\'s '
                      'own ConvNet. Use a GPU for the papers\' step counts; --train-steps '
                      'shortens them for a smoke test. Flags a protocol does not use are '
                      'refused.')
  e.add_argument('--parameterization', choices=('ntk', 'standard'), default=None,
                 help='finite networks in the NTK parameterisation (as the kernel) or the '
                      'standard one (as the papers train them). Default: ntk for --protocol '
                      'ntkdd, standard for kip and rcig.')
  e.add_argument('--train-lr', type=flags.positive_float, default=None,
                 help='Adam\'s peak learning rate for the finite networks (--protocol ntkdd '
                      'and rcig); default 1e-3 (ntk) or 1e-4 (standard, as RCIG evaluates). '
                      'Refused with --protocol kip, whose rate comes from each network\'s '
                      'empirical NTK.')
  e.add_argument('--train-steps', type=flags.positive_int, default=None,
                 help='training steps per network. Default: 1000 for --protocol ntkdd, the '
                      'paper\'s for kip (5000) and rcig (2500 for 10 images, else 5000). With '
                      'kip or rcig a number is an explicit override of the paper\'s protocol, '
                      'its warm-up and schedule scaled in proportion (train.with_steps), '
                      'recorded in evaluation.json (train_config, beside paper_steps).')
  e.add_argument('--seeds', type=flags.positive_int, default=3, help='networks per architecture.')
  e.add_argument('--augment', action='store_true',
                 help='augmentation in training. --protocol ntkdd: random flips and crops; '
                      'rcig: RCIG\'s (one op per image from crop, rotate, translate, cutout, '
                      'plus flip and colour for RGB) and its code\'s shorter loop. Refused '
                      'with kip, which trains without.')
  e.add_argument('--mirror', choices=FLIP_CHOICES, default='auto',
                 help='train the finite networks on the set and its left-right mirror images '
                      '(the distilled set only; KRR and --baselines use the images as they '
                      'are). auto: when the run\'s config.json records flip_support (RCIG '
                      'distilled the set with its mirror images, --rcig-flip), as RCIG\'s own '
                      'evaluation does; RCIG\'s schedule still counts the set\'s own images. '
                      'Default %(default)s.')
  e.add_argument('--baselines', action='store_true',
                 help='also evaluate random real images of the same size.')
  e.add_argument('--no-krr', dest='krr', action='store_false',
                 help='skip the KRR test accuracy (the kernel\'s; a run\'s summary.json has it '
                      'already): finite networks only. Otherwise the KRR kernels run where '
                      '--launch and --workers put them.')
  e.add_argument('--out', default=None, help='evaluation.json path; default beside the support.')

  s = sub.add_parser('show', help='summarise a run directory and re-render its pictures.')
  s.add_argument('run_dir', help='a directory made by ntkdd distill.')

  x = sub.add_parser(
      'export', help='write a distilled set as an image-folder tree or an npz.',
      description='folders: OUT/<id>_<class>/NNNN.png (8-bit PNG of the images in [0, 1]; '
                  'the id prefix keeps the class order when tools sort folder names) plus '
                  'OUT/labels.csv (file, label_id, class_name, then the label vector, learned '
                  'or one-hot minus 1/C). npz: OUT.npz with the keys of support.npz.')
  x.add_argument('run_dir', help='a directory made by ntkdd distill.')
  x.add_argument('--format', choices=('folders', 'npz'), default='folders',
                 help='Default %(default)s.')
  x.add_argument('--out', required=True, help='a new folder (folders) or a .npz file (npz).')

  st = sub.add_parser(
      'status', help="a run's status: live, or how it ended.",
      description='Prints phase, step, loss, accuracies, kernel pairs/s, ETA, checkpoint age and '
                  'each worker\'s state. For RUN_DIR it asks the run\'s Unix socket '
                  'RUN_DIR/status.sock (mode 0600: only the run\'s user), else reads the '
                  'snapshot RUN_DIR/status.json that the run keeps and leaves at its end, and '
                  'says which it read, how old it is, and whether the run ended, was '
                  'interrupted or crashed. No network is used.')
  st.add_argument('run_dir', nargs='?', default=None,
                  help='the run directory (any launch type: inprocess, launchpad, ray).')
  st.add_argument('--address', default=None,
                  help='HOST:PORT of a multi-host Launchpad coordinator\'s status RPC (Courier, '
                       'no authentication: only inside the job\'s private network), or a run '
                       'directory.')
  st.add_argument('--ray-address', default=None,
                  help="Ray runs: the cluster's HOST:PORT, 'auto', or a run directory holding "
                       'ray_address.txt.')
  st.add_argument('--run', default=None,
                  help='Ray runs: the run name (the run directory\'s basename unless set); '
                       'default: the cluster\'s only run.')
  st.add_argument('--json', action='store_true', help='print the raw JSON snapshot.')
  st.add_argument('--timeout', type=float, default=10.0,
                  help='seconds to wait for an answer. Default %(default)s.')
  return parser


def _cmd_kernel(args) -> int:
  from ntkdd.common import architectures, kernels
  from ntkdd.server import checkpoint, run_dir as run_files
  flag_uses.refuse_unused_flags(args, getattr(args, 'given', set()))
  checkpoint.check_output_file(Path(args.out), '--out', 'kernel.npz')
  kernels.enable_float64_if(args.dtype)
  arch = architectures.Architecture(args.arch, args.depth, args.w_std, args.b_std)
  x1 = _load_array(args.x1, args.arch, '--x1')
  x2 = None if args.x2 is None else _load_array(args.x2, args.arch, '--x2')
  if x1.ndim == 4:
    architectures.check_input_shape(arch, x1.shape[1:])
  backend = launch_types.LAUNCHES[args.launch].backend_factory(args)(arch)
  try:
    out = backend.kernel(x1, x2)
  finally:
    getattr(backend, 'close', lambda: None)()
  for name, matrix in out.items():
    if not np.all(np.isfinite(matrix)):
      raise FloatingPointError(f'the {name} kernel came out NaN or inf, so nothing was written to '
                               f'{args.out}; try --dtype float64 or other --w-std/--b-std.')
  run_files.save_npz(Path(args.out), out)
  logging.info('Wrote ntk and nngp %s to %s.', out['ntk'].shape, args.out)
  return 0


def _load_array(path: str, arch: str, flag: str) -> np.ndarray:
  from ntkdd.server import checkpoint
  x = checkpoint.load_npy_file(Path(path), flag)
  if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
    raise ValueError(f'{flag} {path} holds {x.dtype} values; the kernel needs real numbers.')
  if x.ndim >= 1 and len(x) == 0:
    raise ValueError(f'{flag} {path} holds no rows (shape {x.shape}); give at least one input.')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{flag} {path} holds NaN or inf values; replace or drop those inputs.')
  if arch == 'convnet' and x.ndim != 4:
    raise SystemExit(f'ntkdd kernel: {path} has shape {x.shape}; the convnet kernel needs NHWC '
                     f'images (n, height, width, channels). Add a channel axis for grayscale.')
  if arch == 'fc' and x.ndim not in (2, 4):
    raise SystemExit(f'ntkdd kernel: {path} has shape {x.shape}; fc needs (n, d) or NHWC.')
  return x


def _distill_config(args: argparse.Namespace):
  """The `DistillConfig` of `ntkdd distill`'s flags (defaults filled in by `_fill_defaults`)."""
  from ntkdd.server import distill  # pylint: disable=import-outside-toplevel
  return distill.DistillConfig(
      algorithm=args.algorithm, dataset=args.dataset, data_dir=args.data_dir,
      cache_dir=args.cache_dir, download=args.download, ipc=args.ipc, steps=args.steps,
      seed=args.seed, arch=args.arch, depth=args.depth, w_std=args.w_std, b_std=args.b_std,
      kernel=args.kernel, reg=args.reg, dtype=args.dtype, tile=args.tile,
      preprocess=args.preprocess, zca_strength=args.zca_strength, image_size=args.image_size,
      init=args.init, init_support=args.init_support, learning_rate=args.lr,
      lr_schedule=args.lr_schedule,
      learn_labels=args.learn_labels, loss=args.loss, ema_decay=args.ema_decay,
      target_batch=args.target_batch, eval_every=args.eval_every,
      eval_test_size=args.eval_test_size, checkpoint_every=args.checkpoint_every,
      ls_target_size=args.ls_target_size, ls_rcond=args.ls_rcond)


def _rcig_config(args: argparse.Namespace):
  """The `RcigConfig` of `ntkdd distill --algorithm rcig`'s flags (flip: see `jobs.rcig_job`)."""
  from ntkdd.common import rcig  # pylint: disable=import-outside-toplevel
  return rcig.RcigConfig(
      width=args.width, depth=args.depth, w_std=args.w_std,
      b_std=args.b_std, l2_rate=args.l2_rate, inner_steps=args.inner_steps,
      hinv_steps=args.hinv_steps, target_batch=args.rcig_target_batch,
      pool_size=args.pool_size, max_pool_steps=args.max_pool_steps,
      pool_train_steps=args.pool_train_steps, init=args.init, init_support=args.init_support,
      init_log_temp=args.rcig_init_log_temp,
      learn_labels=True, lr_images=args.lr, checkpoint_every=args.checkpoint_every,
      eval_models=args.eval_models, batch_norm=args.batch_norm, ema_decay=args.ema_decay,
      lr_decay_steps=args.steps if args.lr_schedule == 'cosine' else 0)


def given_flags(argv: Sequence[str]) -> set:
  """The dests of the flags given on the command line (defaults left out)."""
  parser = _parser()
  parsers = [parser]
  while parsers:
    p = parsers.pop()
    for action in p._actions:  # pylint: disable=protected-access
      if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
        parsers.extend(action.choices.values())
      elif action.dest != 'help':
        action.default = argparse.SUPPRESS
  return set(vars(parser.parse_args(list(argv))))


def _cmd_distill(args: argparse.Namespace) -> int:
  from ntkdd.server import checkpoint, distill, jobs  # pylint: disable=import-outside-toplevel
  flag_uses.refuse_unused_flags(args, getattr(args, 'given', set()))
  if args.tensorboard and args.launch != 'inprocess':
    raise ValueError(f'--tensorboard writes events from in-process runs; with --launch '
                     f'{args.launch} leave it out (metrics.jsonl and `ntkdd status` still '
                     f'follow the run).')
  checkpoint.check_run_dir(Path(args.out), args.resume, args.overwrite)  # before the data load
  if args.init_support and not args.resume:
    from ntkdd.server import run_data  # pylint: disable=import-outside-toplevel
    run_data.check_start_support_exists(args.init_support)
  if args.algorithm != 'rcig':
    saved = (checkpoint.read_run_config(Path(args.out))['flags'].get('preprocess')
             if args.resume else None)
    args.preprocess = jobs.kernel_preprocess(args.preprocess, args.arch, saved)
  cfg, prepared = _distill_config(args), None
  if args.algorithm == 'rcig':
    cfg, prepared = jobs.rcig_job(cfg, _rcig_config(args), args.rcig_flip)
  try:
    summary = launch_types.LAUNCHES[args.launch].distill(cfg, args, prepared)
  except launch_types.LaunchFailed as e:
    print(e.message, file=sys.stderr)
    return e.exit_code
  except distill.Interrupted as e:
    print(e, file=sys.stderr)
    return 130
  pct = lambda v: 'not measured' if v is None else f'{100 * v:.2f}%'
  if args.algorithm == 'rcig':
    krr = (f"; KRR test accuracy (ConvNet NTK) {pct(summary['krr_test_accuracy_after'])}"
           if 'krr_test_accuracy_after' in summary else '')
    print(f"RCIG {args.dataset} ipc={args.ipc}: finite ConvNet test accuracy "
          f"{pct(summary.get('test_accuracy_before'))} -> "
          f"{pct(summary.get('test_accuracy_after'))}{krr} in {summary['minutes']:.1f} min. "
          f"Run directory: {args.out}")
    return 0
  before, after = summary['krr_test_accuracy_before'], summary['krr_test_accuracy_after']
  print(f'{cfg.algorithm.upper()} {cfg.dataset} ipc={cfg.ipc}: KRR test accuracy '
        f'{100 * before:.2f}% (random real images) -> {100 * after:.2f}% '
        f'in {summary["minutes"]:.1f} min. Run directory: {args.out}')
  return 0


def _cmd_evaluate(args) -> int:
  from ntkdd.server import evaluate
  flag_uses.refuse_unused_flags(args, getattr(args, 'given', set()))
  # The KRR kernels where --launch/--workers put them (in this process by default).
  report = evaluate.evaluate_from_args(
      args, launch_types.LAUNCHES[args.launch].backend_factory(args) if args.krr else None)
  print(evaluate.format_report(report))
  return 0


def _cmd_show(args) -> int:
  from ntkdd.server import report
  report.summarize_run(args.run_dir)  # a clear error first if this is no run directory
  try:
    for path in report.render_run(args.run_dir):
      logging.info('Wrote %s.', path)
  except ImportError as e:
    print(f'pictures skipped: {e}', file=sys.stderr)
  print(report.summarize_run(args.run_dir))
  return 0


def _cmd_export(args) -> int:
  from ntkdd.server import report
  try:
    written = report.export_support(args.run_dir, args.out, args.format)
  except ImportError as e:
    raise ValueError(str(e)) from e
  print(f'Wrote the distilled set of {args.run_dir} to {written} ({args.format}).')
  return 0


def _cmd_status(args) -> int:
  """`ntkdd status`: a run directory or Courier HOST:PORT (launch/status_client.py), or a Ray
  run (launch/ray_launch.py)."""
  from ntkdd.launch import status_client
  if args.ray_address is None:
    address = args.run_dir or args.address
    if address is None:
      print('ntkdd status: error: give the run directory (ntkdd status RUN_DIR), --address '
            'HOST:PORT (a multi-host Launchpad coordinator) or --ray-address (a Ray run: the '
            'cluster address or its run directory, plus --run NAME).', file=sys.stderr)
      return 2
    return status_client.print_status(address, as_json=args.json, timeout_s=args.timeout)
  from ntkdd.launch import ray_status
  return ray_status.status_main(args.ray_address, args.run, as_json=args.json,
                                timeout_s=args.timeout)


COMMANDS = {'kernel': _cmd_kernel, 'distill': _cmd_distill, 'evaluate': _cmd_evaluate,
            'show': _cmd_show, 'status': _cmd_status, 'export': _cmd_export}


def _fill_defaults(args: argparse.Namespace) -> None:
  """The flags whose default depends on the algorithm, left unset: its defaults
  (`jobs.defaults_for`: the kernels' for kernel, evaluate, KIP and LS; RCIG's net's)."""
  if not hasattr(args, 'w_std'):
    return
  from ntkdd.server import jobs  # pylint: disable=import-outside-toplevel
  algorithm = getattr(args, 'algorithm', 'kip')
  defaults = jobs.defaults_for(algorithm)
  if algorithm == 'rcig' and 'depth' not in getattr(args, 'given', ()):
    args.depth = defaults.depth   # --depth's default is the kernels'
  if args.w_std is None:
    args.w_std = defaults.w_std
  if args.b_std is None:
    args.b_std = defaults.b_std
  if getattr(args, 'lr', 0) is None:
    args.lr = defaults.learning_rate
  if getattr(args, 'ema_decay', 0) is None:
    args.ema_decay = defaults.ema_decay


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:  # argparse: --help (0) or a refused flag (2), already printed
    return e.code if isinstance(e.code, int) else 2
  args.given = given_flags(sys.argv[1:] if argv is None else argv)
  if args.command in ('kernel', 'evaluate'):   # their kernels may go to Courier workers
    try:
      exit_code = launch_types.LAUNCHES[args.launch].isolate_kernel_command(
          args, sys.argv[1:] if argv is None else argv)
    except launch_types.LaunchFailed as e:
      print(e.message, file=sys.stderr)
      return e.exit_code
    if exit_code is not None:
      return exit_code
  _fill_defaults(args)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
  try:
    return COMMANDS[args.command](args)
  except (ValueError, OSError, FloatingPointError, ImportError) as e:
    # Bad input (DataError is a ValueError; ConnectionError and FileNotFoundError are
    # OSErrors) or a missing optional package (the message says how to install it): one
    # clear line, no traceback (use -v for one).
    if args.verbose:
      raise
    print(f'ntkdd {args.command}: error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    if args.verbose:
      raise
    after = (' A run that had not reached its first checkpoint left nothing behind; one that '
             'had continues with the same command plus --resume.'
             if args.command == 'distill' else '')
    print(f'ntkdd {args.command}: interrupted (Ctrl-C).{after}', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
