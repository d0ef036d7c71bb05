"""Which flags each mode uses (`ntkdd distill`: its algorithm and launch; `ntkdd evaluate`: its
--protocol and where its KRR kernels run; `ntkdd kernel`: its launch); a flag the mode would
ignore is refused."""
from __future__ import annotations

import argparse


def _kip(a) -> bool:
  return a.algorithm == 'kip'


def _rcig_krr(a) -> bool:
  """RCIG computes kernels only for its KRR evaluation: with workers, at --eval-every."""
  return a.algorithm != 'rcig' or (a.workers >= 1 and a.eval_every > 0)


_RCIG_KERNEL = ('sets the kernel computations, which RCIG runs only for the KRR evaluation '
                'of its support set: with --workers N >= 1 and --eval-every > 0')
_RCIG_WORKERS = ('RCIG runs its loop on the coordinator; the workers only serve the ConvNet '
                 'NTK for the KRR evaluation at --eval-every, which is 0 here')
# dest -> (is the flag used by these arguments?, what the flag is for). Checked in this order.
# Where kernel blocks run: the flags distill, kernel and evaluate share.
LAUNCH_FLAG_USES = {
    'ray_address': (lambda a: a.launch == 'ray', 'is the Ray cluster of --launch ray'),
    'expose_courier_ports': (lambda a: a.launch == 'launchpad',
                             'concerns the Courier ports of --launch launchpad'),
    'block': (lambda a: a.workers >= 1, 'is the tile side farmed to --workers N >= 1'),
    'pin_workers': (lambda a: a.launch in ('launchpad', 'ray') and a.workers >= 1,
                    'pins the worker processes of --launch launchpad or ray (--workers N >= 1) '
                    'to one core each'),
}
DISTILL_FLAG_USES = {
    'launch': (lambda a: a.algorithm != 'rcig' or a.eval_every > 0, _RCIG_WORKERS),
    'workers': (lambda a: a.algorithm != 'rcig' or a.eval_every > 0, _RCIG_WORKERS),
    **LAUNCH_FLAG_USES,
    'steps': (lambda a: a.algorithm != 'ls', 'counts KIP and RCIG steps (LS solves in closed '
                                             'form)'),
    'lr': (lambda a: a.algorithm != 'ls', 'is the support learning rate of KIP and RCIG'),
    'lr_schedule': (lambda a: a.algorithm != 'ls', 'is the learning-rate schedule of KIP and '
                                                   'RCIG'),
    'ema_decay': (lambda a: a.algorithm != 'ls', 'averages the support KIP and RCIG learn (LS '
                                                 'solves it once)'),
    'learn_labels': (_kip, 'makes KIP learn labels (RCIG always learns them; LS solves them)'),
    'loss': (_kip, "is KIP's loss (LS solves the squared error in closed form; RCIG's outer loss "
                   'is always the cross-entropy with a learned temperature)'),
    'target_batch': (_kip, "is KIP's target batch (RCIG: --rcig-target-batch; LS: "
                           '--ls-target-size)'),
    'eval_every': (lambda a: a.algorithm != 'ls', 'is the evaluation cadence of KIP and RCIG '
                                                  '(LS evaluates once, at the end)'),
    'checkpoint_every': (lambda a: a.algorithm != 'ls',
                         'is the checkpoint cadence of KIP and RCIG (LS keeps no checkpoint)'),
    'ls_target_size': (lambda a: a.algorithm == 'ls', 'is an LS setting'),
    'ls_rcond': (lambda a: a.algorithm == 'ls', 'is an LS setting'),
    'arch': (lambda a: a.algorithm != 'rcig',
             "chooses KIP's and LS's kernel (RCIG distils with its ConvNet, evaluates KRR with "
             'the ConvNet NTK, and --depth sets both)'),
    'kernel': (_rcig_krr, _RCIG_KERNEL),
    'reg': (_rcig_krr, _RCIG_KERNEL),
    'tile': (_rcig_krr, _RCIG_KERNEL),
    'dtype': (_rcig_krr, _RCIG_KERNEL),
    **{dest: (lambda a: a.algorithm == 'rcig', 'is an RCIG setting') for dest in (
        'width', 'l2_rate', 'inner_steps', 'hinv_steps', 'pool_size', 'max_pool_steps',
        'pool_train_steps', 'rcig_target_batch', 'batch_norm', 'rcig_flip',
        'rcig_init_log_temp')},
    'init': (lambda a: not a.init_support,
             'chooses how a support set starts, which --init-support PATH sets instead'),
    'eval_models': (lambda a: a.algorithm == 'rcig' and a.eval_every > 0,
                    "sets RCIG's evaluation (at --eval-every > 0)"),
    'eval_test_size': (lambda a: a.algorithm != 'rcig' or a.eval_every > 0,
                       'sets the evaluations, which RCIG runs at --eval-every > 0'),
}


# `ntkdd evaluate`: dest -> (is the flag used by these arguments?, what the flag is for).
EVALUATE_FLAG_USES = {
    'train_lr': (lambda a: a.protocol != 'kip',
                 "is Adam's peak learning rate (--protocol ntkdd and rcig); KIP's SGD takes half "
                 "the largest stable learning rate of each network's empirical NTK"),
    'augment': (lambda a: a.protocol != 'kip',
                'adds flips and crops (--protocol ntkdd) or RCIG\'s augmentation (--protocol '
                'rcig); KIP\'s protocol trains without augmentation'),
}
# `ntkdd evaluate`'s KRR flags: its kernel and where it runs (all unused with --no-krr).
EVALUATE_KRR_FLAG_USES = {
    'kernel': (lambda a: a.krr, 'chooses the kernel of the KRR accuracy'),
    'reg': (lambda a: a.krr, 'is the KRR ridge'),
    'launch': (lambda a: a.krr, 'says where the KRR kernels run'),
    'workers': (lambda a: a.krr, 'farms the KRR kernels to workers'),
    **{dest: (lambda a, used=used: a.krr and used(a), what)
       for dest, (used, what) in LAUNCH_FLAG_USES.items()},
}


def _mode(args) -> str:
  text = f'--algorithm {args.algorithm} --launch {args.launch} --workers {args.workers}'
  if args.algorithm == 'rcig':
    text += f' --eval-every {args.eval_every}'
  return text


def _refuse(uses: dict, args: argparse.Namespace, given: set, mode: str, fix: str) -> None:
  for dest, (used, what) in uses.items():
    if dest in given and not used(args):
      flag = '--' + dest.replace('_', '-')
      raise ValueError(f'{flag} is not used by {mode}: it {what}. Drop {flag}, or {fix}.')


def refuse_unused_flags(args: argparse.Namespace, given: set) -> None:
  """Raises a ValueError naming the first flag given on the command line that this mode would
  ignore (and what the flag is for): `ntkdd distill` by its algorithm and launch, `ntkdd
  evaluate` by its --protocol and where its KRR kernels run, `ntkdd kernel` by its launch.

  Args:
    args: the parsed arguments of one of those commands (`args.command`).
    given: the dests of the flags on the command line (`cli.given_flags`).
  """
  if args.command == 'kernel':
    _refuse(LAUNCH_FLAG_USES, args, given, _launch_mode(args), 'choose the launch that uses it')
  elif args.command == 'evaluate':
    _refuse(EVALUATE_FLAG_USES, args, given, f'--protocol {args.protocol}',
            'choose a --protocol that uses it')
    if not args.krr:
      _refuse(EVALUATE_KRR_FLAG_USES, args, given, '--no-krr', 'drop --no-krr')
    else:
      _refuse(EVALUATE_KRR_FLAG_USES, args, given, _launch_mode(args),
              'choose the launch that uses it')
  else:
    _refuse(DISTILL_FLAG_USES, args, given, _mode(args), 'choose the mode that uses it')


def _launch_mode(args) -> str:
  return f'--launch {args.launch} --workers {args.workers}'
