"""The `ntkdd` command line: kernel, distill, evaluate, show."""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

# --preprocess names (ntkdd.common.preprocess.PREPROCESSOR_KINDS, plus auto); zca = kip_zca.
PREPROCESS_CHOICES = ('auto', 'none', 'standardize', 'kip_zca', 'channel_zca', 'zca')

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
  g.add_argument('--depth', type=int, default=default_depth,
                 help='hidden layers (fc) or conv+pool blocks (convnet). Default %(default)s.')
  g.add_argument('--w-std', type=float, default=None,
                 help='weight standard deviation. Default sqrt(2) for kernels (NTK '
                      'parameterisation); 1 for RCIG\'s standard-parameterised net (LeCun '
                      'normal, as its paper).')
  g.add_argument('--b-std', type=float, default=None,
                 help='bias standard deviation. Default 0.1 for kernels; 0 for RCIG.')
  g.add_argument('--tile', type=int, default=None,
                 help='pair-block side for blocked evaluation; default: chosen from free memory.')
  g.add_argument('--dtype', choices=('float32', 'float64'), default='float32',
                 help='kernel precision. Default %(default)s.')
  g.add_argument('--launch', choices=('inprocess', 'launchpad', 'ray'), default='inprocess',
                 help='where kernel blocks run: inprocess (this process; the default), '
                      'launchpad (a local_mp program: one Courier process per worker plus the '
                      'coordinator; needs the Python 3.10 environment, ntkdd[launchpad]) or ray '
                      '(worker actors and a coordinator actor on a Ray cluster; ntkdd[ray]).')
  g.add_argument('--ray-address', default='auto',
                 help="with --launch ray: 'auto' (the cluster started on this machine with "
                      "`ray start`; the default), HOST:PORT of a cluster's head, or 'local' to "
                      'start a private Ray on this machine for this command only.')
  g.add_argument('--workers', type=int, default=0,
                 help='kernel workers; 0 computes kernels directly, N >= 1 farms tiles of '
                      '--block images to N workers through the coordinator (launchpad and '
                      'ray need N >= 1).')
  g.add_argument('--block', type=int, default=64,
                 help='coordinator tile side (images) when --workers >= 1. Default %(default)s.')


def _add_data_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group('data')
  g.add_argument('--dataset', default='mnist',
                 help='mnist, fashion_mnist, cifar10, cifar100, a .npz with x_train, y_train, '
                      'x_test, y_test, or a folder with train/ and test/ class sub-folders.')
  g.add_argument('--data-dir', default='data',
                 help='folder holding the dataset files (idx .gz, CIFAR python tarballs). '
                      'Default %(default)s.')
  g.add_argument('--cache-dir', default=None, help='where decoded arrays are cached.')
  g.add_argument('--download', action='store_true',
                 help='fetch missing standard datasets from their official locations.')


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
                      'al. 2023) on the coordinator.')
  d.add_argument('--ipc', type=int, default=10, help='images per class in the support set.')
  d.add_argument('--steps', type=int, default=1000, help='KIP optimisation steps.')
  d.add_argument('--out', required=True, help='run directory.')
  d.add_argument('--resume', action='store_true', help='continue the run in --out.')
  d.add_argument('--seed', type=int, default=0, help='fixes every random draw.')
  _add_data_flags(d)
  _add_kernel_flags(d, 'fc', 1)
  o = d.add_argument_group('optimisation')
  o.add_argument('--kernel', choices=('ntk', 'nngp'), default='ntk', help='which kernel KRR uses.')
  o.add_argument('--reg', type=float, default=1e-6,
                 help='ridge lambda: K_ss + reg * tr(K_ss)/n * I.')
  o.add_argument('--lr', type=float, default=None,
                 help='support-image learning rate (default 0.01 for KIP\'s Adam, 0.003 for '
                      'RCIG\'s AdaBelief).')
  o.add_argument('--lr-schedule', choices=('constant', 'cosine'), default='constant',
                 help='cosine decays the learning rate to 0 at --steps.')
  o.add_argument('--learn-labels', action='store_true', help='KIP: learn the support labels too.')
  o.add_argument('--target-batch', type=int, default=1000,
                 help='class-balanced target images per step.')
  o.add_argument('--init', choices=('real', 'noise'), default='real',
                 help='support initialisation: class-balanced real images, or noise.')
  o.add_argument('--preprocess', choices=PREPROCESS_CHOICES, default='auto',
                 help='auto: per-channel standardisation (ZCA measured worse on our CIFAR-10 '
                      'copy; see BENCHMARKS.md). kip_zca: KIP\'s ZCA (per-image centring and '
                      'unit norm, then ZCA); channel_zca: RCIG/FRePo\'s (per-channel '
                      'standardisation, then ZCA; grayscale: standardisation only); zca: '
                      'the old name of kip_zca.')
  o.add_argument('--zca-strength', type=float, default=0.1,
                 help='ZCA regulariser, as a fraction of the mean eigenvalue.')
  o.add_argument('--image-size', type=int, default=None,
                 help='average-pool images to this side first (cheaper ConvNet kernels).')
  o.add_argument('--eval-every', type=int, default=50, help='steps between KRR test evaluations.')
  o.add_argument('--eval-test-size', type=int, default=0,
                 help='test images per evaluation (a fixed subset); 0 = all.')
  o.add_argument('--checkpoint-every', type=int, default=50, help='steps between checkpoints.')
  o.add_argument('--ls-target-size', type=int, default=0,
                 help='LS: class-balanced target images to solve over; 0 = the whole train split.')
  o.add_argument('--ls-rcond', type=float, default=1e-6,
                 help='LS: pseudo-inverse cut-off relative to the largest singular value.')
  r = d.add_argument_group('rcig (finite-width ConvNet; paper defaults)')
  r.add_argument('--width', type=int, default=128, help='ConvNet channels.')
  r.add_argument('--l2-rate', type=float, default=5e-4, help='L2 rate of the inner problem.')
  r.add_argument('--inner-steps', type=int, default=20, help='Adam steps on the inner problem.')
  r.add_argument('--hinv-steps', type=int, default=20,
                 help='optimisation steps of the Hessian-inverse-vector product.')
  r.add_argument('--pool-size', type=int, default=30, help='partially trained models.')
  r.add_argument('--max-pool-steps', type=int, default=100,
                 help='training steps after which a pool model is re-initialised.')
  r.add_argument('--pool-train-steps', type=int, default=15,
                 help='each meta-step trains its pool model for 1 to this many Adam steps.')
  r.add_argument('--rcig-target-batch', type=int, default=256,
                 help='real images per outer loss (the paper uses 1024).')
  r.add_argument('--batch-norm', action='store_true',
                 help='batch normalisation after each convolution of the distillation net '
                      '(default: none, as the paper).')
  r.add_argument('--rcig-flip', choices=('auto', 'on', 'off'), default='auto',
                 help='also use the support mirrored left-right in the inner problem and pool '
                      'training (auto: on for RGB images, as the paper does).')
  r.add_argument('--eval-models', type=int, default=1,
                 help='finite ConvNets trained per evaluation (--eval-every).')
  d.add_argument('--no-progress', action='store_true', help='no progress bar.')

  e = sub.add_parser(
      'evaluate', help='KRR and finite-width accuracy of a support set.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      description='Evaluates a support.npz (ours or made elsewhere) on the full test split: '
                  'KRR test accuracy with the kernel, and networks trained on the support set.')
  e.add_argument('--support', required=True,
                 help='support .npz: images (model space) or images_pixels (raw [0,1] pixels, '
                      'then preprocessed as the run was) plus labels (n x C) or label_ids.')
  e.add_argument('--run', default=None, help='run directory whose config.json sets the '
                 'dataset, preprocessing and kernel; default: the support file\'s folder.')
  e.add_argument('--pixels', action='store_true',
                 help='the support images are raw pixels in [0,1]; preprocess them first.')
  _add_data_flags(e)
  _add_kernel_flags(e, 'fc', 1)
  e.add_argument('--kernel', choices=('ntk', 'nngp'), default='ntk')
  e.add_argument('--reg', type=float, default=1e-6)
  e.add_argument('--preprocess', choices=PREPROCESS_CHOICES, default='auto',
                 help='as in distill (a run directory\'s config.json overrides it).')
  e.add_argument('--zca-strength', type=float, default=0.1)
  e.add_argument('--image-size', type=int, default=None)
  e.add_argument('--transfer', default='convnet,fc',
                 help='finite networks to train on the support set (comma list; empty: none).')
  e.add_argument('--width', type=int, default=128, help='finite network width.')
  e.add_argument('--parameterization', choices=('ntk', 'standard'), default='ntk',
                 help='finite networks in the NTK parameterisation (as the kernel) or the '
                      'standard one (as the papers train them).')
  e.add_argument('--train-lr', type=float, default=None,
                 help='Adam learning rate for the finite networks; default 1e-3 (ntk) or '
                      '1e-4 (standard, as RCIG evaluates).')
  e.add_argument('--train-steps', type=int, default=1000, help='training steps per network.')
  e.add_argument('--seeds', type=int, default=3, help='networks per architecture.')
  e.add_argument('--augment', action='store_true', help='flip/crop augmentation in training.')
  e.add_argument('--baselines', action='store_true',
                 help='also evaluate random real images of the same size.')
  e.add_argument('--out', default=None, help='evaluation.json path; default beside the support.')

  s = sub.add_parser('show', help='summarise a run directory and re-render its pictures.')
  s.add_argument('run_dir', help='a directory made by ntkdd distill.')

  st = sub.add_parser(
      'status', help="query a running coordinator's status over RPC.",
      description='Prints step, loss, accuracies, kernel pairs/s, ETA, checkpoint age and each '
                  'worker\'s state. The coordinator writes its address to '
                  'RUN_DIR/coordinator_address.txt at start. The RPC has no authentication.')
  st.add_argument('--address', default=None,
                  help='HOST:PORT of the coordinator, or a run directory holding '
                       'coordinator_address.txt (Launchpad runs); the run directory of an '
                       'in-process run (KIP, LS, RCIG) is read directly.')
  st.add_argument('--ray-address', default=None,
                  help="Ray runs: the cluster's HOST:PORT, 'auto', or a run directory holding "
                       'ray_address.txt.')
  st.add_argument('--run', default=None,
                  help='Ray runs: the run name (the run directory\'s basename unless set); '
                       'default: the cluster\'s only run.')
  st.add_argument('--json', action='store_true', help='print the raw JSON snapshot.')
  return parser


def _backend_factory(args, dataset: Optional[dict] = None):
  """arch -> kernel backend for the chosen launch type; workers load `dataset` themselves."""
  from ntkdd.server import backend
  if args.workers < 0:
    raise ValueError(f'--workers must be >= 0, got {args.workers}.')
  if args.launch == 'launchpad':
    from ntkdd.launch import launchpad_program
    return lambda arch: launchpad_program.make_launchpad_backend(
        arch, workers=args.workers, tile=args.tile, dtype=args.dtype, block=args.block)
  if args.launch == 'ray':
    from ntkdd.launch import ray_launch
    return lambda arch: ray_launch.make_ray_backend(
        arch, workers=args.workers, ray_address=args.ray_address, tile=args.tile,
        dtype=args.dtype, block=args.block, dataset=dataset)
  if args.workers == 0:
    return lambda arch: backend.InProcessKernels(arch, tile=args.tile, dtype=args.dtype)
  from ntkdd.launch import inprocess
  return lambda arch: inprocess.make_inprocess_backend(
      arch, workers=args.workers, tile=args.tile, dtype=args.dtype, block=args.block,
      dataset=dataset)


def _cmd_kernel(args) -> int:
  from ntkdd.common import architectures, kernels
  kernels.enable_float64_if(args.dtype)
  arch = architectures.Architecture(args.arch, args.depth, args.w_std, args.b_std)
  x1 = _load_array(args.x1, args.arch)
  x2 = None if args.x2 is None else _load_array(args.x2, args.arch)
  backend = _backend_factory(args)(arch)
  try:
    out = backend.kernel(x1, x2)
  finally:
    getattr(backend, 'close', lambda: None)()
  from ntkdd.server import checkpoint
  checkpoint.save_npz(Path(args.out), out)
  logging.info('Wrote ntk and nngp %s to %s.', out['ntk'].shape, args.out)
  return 0


def _load_array(path: str, arch: str) -> np.ndarray:
  if not Path(path).exists():
    raise SystemExit(f'ntkdd kernel: {path} does not exist.')
  x = np.load(path, allow_pickle=False)
  if arch == 'convnet' and x.ndim != 4:
    raise SystemExit(f'ntkdd kernel: {path} has shape {x.shape}; the convnet kernel needs NHWC '
                     f'images (n, height, width, channels). Add a channel axis for grayscale.')
  if arch == 'fc' and x.ndim not in (2, 4):
    raise SystemExit(f'ntkdd kernel: {path} has shape {x.shape}; fc needs (n, d) or NHWC.')
  return x


def _distill_config(args):
  from ntkdd.server import distill
  return distill.DistillConfig(
      algorithm=args.algorithm, dataset=args.dataset, data_dir=args.data_dir,
      cache_dir=args.cache_dir, download=args.download, ipc=args.ipc, steps=args.steps,
      seed=args.seed, arch=args.arch, depth=args.depth, w_std=args.w_std, b_std=args.b_std,
      kernel=args.kernel, reg=args.reg, dtype=args.dtype, tile=args.tile,
      preprocess=args.preprocess, zca_strength=args.zca_strength, image_size=args.image_size,
      init=args.init, learning_rate=args.lr or 0.01, lr_schedule=args.lr_schedule,
      learn_labels=args.learn_labels,
      target_batch=args.target_batch, eval_every=args.eval_every,
      eval_test_size=args.eval_test_size, checkpoint_every=args.checkpoint_every,
      ls_target_size=args.ls_target_size, ls_rcond=args.ls_rcond)


def _run_rcig(args) -> dict:
  from ntkdd.common import rcig
  from ntkdd.server import distill, rcig_loop
  prepared = distill.prepare_data(_distill_config(args))
  flip = (args.rcig_flip == 'on' or
          (args.rcig_flip == 'auto' and prepared.x_train.shape[-1] == 3))
  rcig_cfg = rcig.RcigConfig(
      width=args.width, depth=args.depth if args.arch != 'fc' else 3, w_std=args.w_std,
      b_std=args.b_std, l2_rate=args.l2_rate, inner_steps=args.inner_steps,
      hinv_steps=args.hinv_steps, target_batch=args.rcig_target_batch,
      pool_size=args.pool_size, max_pool_steps=args.max_pool_steps,
      pool_train_steps=args.pool_train_steps, init=args.init,
      learn_labels=True, lr_images=args.lr or 3e-3, checkpoint_every=args.checkpoint_every,
      eval_models=args.eval_models, flip_support=flip, batch_norm=args.batch_norm)
  return rcig_loop.run_rcig(rcig_cfg, prepared, args.out, ipc=args.ipc, steps=args.steps,
                            seed=args.seed, resume=args.resume, progress=not args.no_progress,
                            eval_every=args.eval_every, eval_test_size=args.eval_test_size)


def _cmd_distill(args) -> int:
  from ntkdd.server import distill
  if args.algorithm == 'rcig':
    try:
      summary = _run_rcig(args)
    except distill.Interrupted as e:
      print(e, file=sys.stderr)
      return 130
    pct = lambda v: 'not measured' if v is None else f'{100 * v:.2f}%'
    print(f"RCIG {args.dataset} ipc={args.ipc}: finite ConvNet test accuracy "
          f"{pct(summary.get('test_accuracy_before'))} -> "
          f"{pct(summary.get('test_accuracy_after'))} in {summary['minutes']:.1f} min. "
          f"Run directory: {args.out}")
    return 0
  cfg = _distill_config(args)
  try:
    if args.launch == 'launchpad':
      from ntkdd.launch import launchpad_program
      try:
        summary = launchpad_program.run_local_mp(cfg, args.out, workers=args.workers,
                                                 resume=args.resume, block=args.block,
                                                 worker_tile=args.tile)
      except launchpad_program.CoordinatorFailed as e:
        print(f'ntkdd distill: the coordinator failed: {e}', file=sys.stderr)
        return 1
    elif args.launch == 'ray':
      from ntkdd.launch import ray_launch
      try:
        summary = ray_launch.run_ray(cfg, args.out, workers=args.workers,
                                     ray_address=args.ray_address, resume=args.resume,
                                     block=args.block, worker_tile=args.tile)
      except (ray_launch.CoordinatorFailed, ConnectionError) as e:
        print(f'ntkdd distill: {e}', file=sys.stderr)
        return 1
    else:
      factory = _backend_factory(args, dataset=cfg.data_spec().to_dict())
      summary = distill.distill(cfg, args.out, factory, resume=args.resume,
                                progress=not args.no_progress)
  except distill.Interrupted as e:
    print(e, file=sys.stderr)
    return 130
  before, after = summary['krr_test_accuracy_before'], summary['krr_test_accuracy_after']
  print(f'{cfg.algorithm.upper()} {cfg.dataset} ipc={cfg.ipc}: KRR test accuracy '
        f'{100 * before:.2f}% (random real images) -> {100 * after:.2f}% '
        f'in {summary["minutes"]:.1f} min. Run directory: {args.out}')
  return 0


def _cmd_evaluate(args) -> int:
  from ntkdd.server import evaluate
  report = evaluate.evaluate_from_args(args)
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


def _cmd_status(args) -> int:
  from ntkdd.server import status
  if args.ray_address is None:
    if args.address is None:
      print('ntkdd status: error: give --address (a Launchpad run: HOST:PORT or its run '
            'directory) or --ray-address (a Ray run: the cluster address or its run '
            'directory, plus --run NAME).', file=sys.stderr)
      return 2
    return status.main([args.address] + (['--json'] if args.json else []))
  from ntkdd.launch import ray_launch
  return ray_launch.status_main(args.ray_address, args.run, as_json=args.json)


COMMANDS = {'kernel': _cmd_kernel, 'distill': _cmd_distill, 'evaluate': _cmd_evaluate,
            'show': _cmd_show, 'status': _cmd_status}


def _default_initialisation(args: argparse.Namespace) -> None:
  """--w-std / --b-std left unset: the kernels' sqrt(2) / 0.1, or RCIG's paper init 1 / 0."""
  if not hasattr(args, 'w_std'):
    return
  rcig_net = getattr(args, 'algorithm', None) == 'rcig'
  if args.w_std is None:
    args.w_std = 1.0 if rcig_net else math.sqrt(2.0)
  if args.b_std is None:
    args.b_std = 0.0 if rcig_net else 0.1


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  _default_initialisation(args)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
  try:
    return COMMANDS[args.command](args)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # Bad input: one clear line, no traceback (use -v for one).
    if args.verbose:
      raise
    print(f'ntkdd {args.command}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
