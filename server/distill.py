"""KIP and LS on the coordinator: DistillConfig, data checks, Label Solve and KIP's step."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ntkdd.common import architectures, choices, kip, optim, preprocess
from ntkdd.common import prepared as prepared_lib
from ntkdd.server import checkpoint, loop, run_data
from ntkdd.server import run_dir as run_files
from ntkdd.server.progress import KernelProgress, PairsReported

ALGORITHMS = ('kip', 'ls')   # the algorithms `distill` runs (RCIG: jobs.RcigJob)
# The support set's parameters: what support.npz and the evaluations hold, and what the moving
# average (--ema-decay) averages.
SUPPORT = ('images', 'labels')


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Every setting of a distillation run; saved in config.json and checked on --resume.

  The defaults are the command line's for KIP and LS (RCIG's net: `jobs.defaults_for`).
  """
  algorithm: str = 'kip'
  dataset: str = 'mnist'
  data_dir: str = 'data'
  cache_dir: Optional[str] = None
  download: bool = False
  ipc: int = 10
  steps: int = 1000
  seed: int = 0
  arch: str = 'fc'
  depth: int = 1
  w_std: float = math.sqrt(2.0)
  b_std: float = 0.1
  kernel: str = 'ntk'
  reg: float = 1e-6
  dtype: str = 'float32'
  tile: Optional[int] = None
  preprocess: str = 'auto'          # auto: per-channel standardisation (see prepare_data)
  zca_strength: float = 0.1
  image_size: Optional[int] = None  # average-pool images down to this side (CPU budgets)
  init: str = 'real'
  init_support: str = ''            # start from this support set's file instead (--init-support)
  learning_rate: float = 0.01
  lr_schedule: str = 'constant'     # constant | cosine (decays to 0 at --steps)
  learn_labels: bool = False
  loss: str = 'mse'                 # KIP: mse, or platt (cross-entropy, learned temperature)
  ema_decay: float = 0.0            # KIP: save and evaluate this moving average of the support
  target_batch: int = 1000
  eval_every: int = 50
  eval_test_size: int = 0           # 0: the whole test split
  checkpoint_every: int = 50
  ls_target_size: int = 0           # LS: 0 = the whole train split
  ls_rcond: float = 1e-6

  def validate(self) -> None:
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f'Unknown algorithm {self.algorithm!r}: choose one of {ALGORITHMS}.')
    if self.ipc < 1:
      raise ValueError(f'--ipc must be >= 1 image per class, got {self.ipc}.')
    if self.steps < 0:
      raise ValueError(f'--steps must be >= 0, got {self.steps}.')
    if not self.reg > 0:
      raise ValueError(f'--reg (the ridge lambda) must be > 0, got {self.reg}; the papers use 1e-6.')
    if not self.learning_rate > 0:
      raise ValueError(f'--lr must be > 0, got {self.learning_rate}.')
    if self.kernel not in choices.KERNELS:
      raise ValueError(f'--kernel must be one of {choices.KERNELS}, got {self.kernel!r}.')
    if self.lr_schedule not in choices.LR_SCHEDULES:
      raise ValueError(f"--lr-schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}.")
    if self.init not in choices.INITS:
      raise ValueError(f'--init must be one of {choices.INITS}, got {self.init!r}.')
    if self.target_batch < 1:
      raise ValueError(f'--target-batch must be >= 1, got {self.target_batch}.')
    if self.loss not in choices.KIP_LOSSES:
      raise ValueError(f'--loss must be one of {choices.KIP_LOSSES}, got {self.loss!r}.')
    if self.loss != 'mse' and self.algorithm != 'kip':
      raise ValueError(f'--loss {self.loss} is a KIP setting; Label Solve solves the squared '
                       f'error in closed form. Leave --loss out for LS.')
    optim.check_ema_decay(self.ema_decay)
    if self.tile is not None and self.tile < 1:
      raise ValueError(f'--tile must be >= 1, got {self.tile}; leave it out to have it chosen '
                       f'from free memory.')
    if self.algorithm == 'kip' and self.eval_every < 1:
      raise ValueError(f'--eval-every must be >= 1 step for KIP, got {self.eval_every}.')
    if self.checkpoint_every < 1:
      raise ValueError(f'--checkpoint-every must be >= 1 step, got {self.checkpoint_every}.')
    for name in ('eval_test_size', 'ls_target_size'):
      if getattr(self, name) < 0:
        raise ValueError(f'--{name.replace("_", "-")} must be >= 0 (0: all), got '
                         f'{getattr(self, name)}.')
    if self.image_size is not None and self.image_size < 1:
      raise ValueError(f'--image-size must be >= 1 pixel, got {self.image_size}.')
    if self.seed < 0:
      raise ValueError(f'--seed must be >= 0, got {self.seed}.')
    if self.preprocess not in choices.PREPROCESS_CHOICES:
      raise ValueError(f'--preprocess must be auto or one of {preprocess.PREPROCESSOR_KINDS}.')
    architectures.Architecture(self.arch, self.depth, self.w_std, self.b_std)
    if self.algorithm == 'kip':
      optim.require_optax("KIP's Adam")

  def architecture(self) -> architectures.Architecture:
    return architectures.Architecture(self.arch, self.depth, self.w_std, self.b_std)

  def data_spec(self) -> prepared_lib.DataSpec:
    """What kernel workers need to load the same model-space images themselves."""
    return prepared_lib.DataSpec(
        dataset=self.dataset, data_dir=self.data_dir, cache_dir=self.cache_dir,
        download=self.download, image_size=self.image_size, preprocess=self.preprocess,
        zca_strength=self.zca_strength)

  # Settings that may differ on --resume without changing the result.
  # (init_support: its file is read only at the start.)
  RESUMABLE = ('steps', 'eval_every', 'checkpoint_every', 'data_dir', 'cache_dir', 'download',
               'tile', 'init_support')


PreparedData = prepared_lib.PreparedData   # re-exported: the loops and tests use these names
downsample = prepared_lib.downsample
Interrupted = loop.Interrupted             # re-exported: the launches catch distill.Interrupted


def prepare_data(cfg: DistillConfig) -> PreparedData:
  """The run's data in model space (shared with in-process workers that hold the same spec)."""
  return prepared_lib.prepare(cfg.data_spec())


def check_fits_data(cfg: DistillConfig, prepared: PreparedData) -> None:
  """Checks the settings that depend on the data (before any file of the run is written)."""
  run_data.check_ipc_fits(prepared, cfg.ipc)
  if cfg.algorithm == 'kip':
    run_data.check_batch_fits(prepared, cfg.target_batch, '--target-batch')
  if cfg.algorithm == 'ls' and cfg.ls_target_size and cfg.ls_target_size < len(prepared.y_train):
    run_data.check_batch_fits(prepared, cfg.ls_target_size, '--ls-target-size')
  architectures.check_input_shape(cfg.architecture(), prepared.x_train.shape[1:])


def krr_test_accuracy(backend, prepared: PreparedData, images, labels,
                      cfg: DistillConfig) -> float:
  """KRR test accuracy of a support set with `cfg`'s kernel, reg and fixed test subset."""
  return run_data.krr_test_accuracy(backend, prepared, images, labels, cfg.kernel, cfg.reg,
                                    cfg.eval_test_size, cfg.seed)


def distill(cfg: DistillConfig, run_dir: str, backend_factory: Callable, resume: bool = False,
            progress: bool = True, prepared: Optional[PreparedData] = None,
            run_status: Any = None, tensorboard: bool = False,
            overwrite: bool = False) -> dict[str, Any]:
  """Runs KIP or LS into `run_dir`; returns the summary (also written to summary.json).

  Everything that can be checked (flags, the run directory, the data against the flags, on
  --resume the data's fingerprint) is checked before the first file is written; overwrite
  replaces a run already there. A fresh run that fails before its first checkpoint leaves
  nothing behind.

  Args:
    cfg: the run's settings.
    run_dir: the run directory (--out).
    backend_factory: architecture -> kernel backend (closed at the end if it has `close`).
    resume: continue the run in `run_dir` (KIP only).
    progress: show a progress bar.
    prepared: the data, if already loaded (else loaded from `cfg`).
    run_status: the caller's `status.RunStatus`, which the caller publishes (the Launchpad
      and Ray coordinators); without one the run publishes its own (status.sock, status.json).
    tensorboard: also TensorBoard events in `run_dir` (needs tensorboardX).
    overwrite: replace a run already in `run_dir`.

  Returns:
    The summary.
  """
  cfg.validate()
  run_dir = Path(run_dir)
  checkpoint.check_run_dir(run_dir, resume, overwrite)   # before the (slow) data load
  if resume and cfg.algorithm == 'ls':
    raise ValueError('--resume: Label Solve runs in one go and has no steps to resume; run it '
                     'again with --overwrite (or into a new --out directory).')
  prepared = prepared or prepare_data(cfg)
  check_fits_data(cfg, prepared)
  from ntkdd.server import status  # pylint: disable=import-outside-toplevel

  def body(saved, board):
    backend = backend_factory(cfg.architecture())
    try:
      if cfg.algorithm == 'ls':
        return _run_label_solve(cfg, run_dir, prepared, backend, board)
      return loop.run_steps(KipSteps(cfg, prepared, backend), saved, run_dir, prepared,
                            steps=cfg.steps, seed=cfg.seed, eval_every=cfg.eval_every,
                            checkpoint_every=cfg.checkpoint_every, progress=progress,
                            board=board)
    finally:
      getattr(backend, 'close', lambda: None)()  # distributed backends stop their threads

  flags = dataclasses.asdict(cfg)
  return loop.run_in_dir(run_dir, flags, DistillConfig.RESUMABLE, prepared, body,
                         resume=resume, overwrite=overwrite,
                         arrays_needed=SUPPORT + ('label_ids',) + (
                             tuple(f'ema/{k}' for k in SUPPORT) if cfg.ema_decay else ()) + (
                             (PLATT_TEMPERATURE,) if cfg.loss == 'platt' else ()),
                         total_steps=status.total_steps(flags), run_status=run_status,
                         tensorboard=tensorboard)


def _run_label_solve(cfg, run_dir, prepared, backend, board=None) -> dict:
  """Label Solve in one go: labels of real support images in closed form, evaluated before
  and after; writes support.npz, one metrics row and summary.json."""
  start = time.time()
  rng = np.random.default_rng(cfg.seed)
  images, labels, label_ids = run_data.initial_support(prepared, cfg.ipc, cfg.init, rng,
                                                       cfg.init_support)
  targets = np.arange(len(prepared.x_train))
  if cfg.ls_target_size and cfg.ls_target_size < len(targets):
    targets = np.sort(preprocess.class_balanced_batch(prepared.y_train, cfg.ls_target_size, rng,
                                                      num_classes=prepared.num_classes))
  y_t = preprocess.one_hot_centered(prepared.y_train[targets], prepared.num_classes)
  logging.info('Label Solve over %d target images.', len(targets))
  # The whole run's kernel pairs: K_ss and K(support, targets) for the labels, K_ss again and
  # K(support, test) for the two accuracies; `ntkdd status` shows them as the run's progress.
  n_test = run_data.evaluated_test_size(prepared, cfg.eval_test_size)
  n_s = len(images)
  progress = KernelProgress('Label Solve', n_s * (2 * n_s + len(targets) + n_test),
                            field='run_progress')
  counted = PairsReported(backend, progress)
  try:
    solved = kip.label_solve(counted, images, prepared.rows('train', targets), y_t, cfg.kernel,
                             cfg.reg, cfg.ls_rcond)
    # One test kernel for both accuracies: LS changes the labels, not the images.
    before, after = run_data.krr_test_accuracies(counted, prepared, images, [labels, solved],
                                                 cfg.kernel, cfg.reg, cfg.eval_test_size,
                                                 cfg.seed)
  finally:
    progress.close()   # a failed solve leaves no stale progress (nor ETA) in the status
  run_data.write_support(run_dir, prepared, images, solved, label_ids)
  summary = {'algorithm': 'ls', 'krr_test_accuracy_before': before,
             'krr_test_accuracy_after': after, 'targets': int(len(targets)),
             'minutes': (time.time() - start) / 60, 'steps': 0}
  record = {'step': 0, 'loss': None, 'krr_test_accuracy': after,
            'wall_time': time.time() - start}
  run_files.append_metrics(run_dir / run_files.METRICS, record)
  if board:
    board(record, images, label_ids)
  run_files.write_json(run_dir / run_files.SUMMARY, summary)
  loop.render_pictures(run_dir)
  return summary


# The Platt loss's learned parameter: the log of the temperature the KRR predictions are
# multiplied by (a checkpoint array and an Adam parameter beside images and labels).
PLATT_TEMPERATURE = 'log_temperature'


class KipSteps:
  """KIP's step for `loop.run_steps`: Adam on the support images (and labels, and with the
  Platt loss its log temperature) against the KRR loss of a class-balanced target batch;
  evaluated by KRR test accuracy."""
  name = 'KIP'
  accuracy_key = 'krr_test_accuracy'

  def __init__(self, cfg: DistillConfig, prepared: PreparedData, backend):
    self.cfg, self.prepared, self.backend = cfg, prepared, backend
    self.learning_rate = cfg.learning_rate
    self.optimizer = optim.adam(optim.cosine_schedule(cfg.learning_rate, cfg.steps)
                                if cfg.lr_schedule == 'cosine' else cfg.learning_rate)
    self.y_train_centered = preprocess.one_hot_centered(prepared.y_train, prepared.num_classes)
    self.params = self.opt_state = self.label_ids = None

  def start(self, rng: np.random.Generator) -> None:
    images, labels, self.label_ids = run_data.initial_support(
        self.prepared, self.cfg.ipc, self.cfg.init, rng, self.cfg.init_support)
    self.params = {'images': images, 'labels': labels}
    if self.cfg.loss == 'platt':   # temperature 1 to start, as RFAD's and RCIG's code, or the
      # one saved with the --init-support set
      saved = run_data.saved_log_temp(self.cfg.init_support)
      self.params[PLATT_TEMPERATURE] = np.asarray(0.0 if saved is None else saved, np.float64)
    self.opt_state = self.optimizer.init(self.params)
    self.average = ({k: np.zeros_like(self.params[k]) for k in SUPPORT}
                    if self.cfg.ema_decay else None)

  def restore(self, arrays: dict, rng: np.random.Generator) -> None:
    self.params = {'images': arrays['images'], 'labels': arrays['labels']}
    if self.cfg.loss == 'platt':
      self.params[PLATT_TEMPERATURE] = arrays[PLATT_TEMPERATURE]
    self.label_ids = arrays['label_ids']
    self.opt_state = {k[len('opt/'):]: v for k, v in arrays.items() if k.startswith('opt/')}
    self.average = ({k: arrays[f'ema/{k}'] for k in SUPPORT} if self.cfg.ema_decay
                    else None)

  def step(self, step: int, rng: np.random.Generator) -> dict:
    cfg, prepared = self.cfg, self.prepared
    target = preprocess.class_balanced_batch(prepared.y_train, cfg.target_batch, rng,
                                             num_classes=prepared.num_classes)
    # FloatingPointError: K_ss or the loss non-finite, the support set has blown up.
    platt = cfg.loss == 'platt'
    result = kip.kip_gradients(self.backend, self.params['images'], self.params['labels'],
                               prepared.rows('train', target), self.y_train_centered[target],
                               prepared.y_train[target], cfg.kernel, cfg.reg, cfg.loss,
                               float(self.params[PLATT_TEMPERATURE]) if platt else 0.0)
    grads = {'images': result.grad_images}
    if cfg.learn_labels:
      grads['labels'] = result.grad_labels
    if platt:
      grads[PLATT_TEMPERATURE] = np.asarray(result.grad_log_temperature, np.float64)
    new_params, new_state = self.optimizer.update(grads, self.opt_state, self.params)
    if not all(np.all(np.isfinite(v)) for v in new_params.values()):
      raise FloatingPointError('The support set became NaN or inf.')
    self.params, self.opt_state = new_params, new_state
    if self.average is not None:
      self.average = optim.ema_update(self.average, self.params, cfg.ema_decay)
    fields = {'loss': result.loss / cfg.target_batch, 'target_accuracy': result.target_accuracy}
    if platt:
      fields['temperature'] = float(np.exp(self.params[PLATT_TEMPERATURE]))
    return fields

  def rates(self) -> dict:
    return {'pairs_per_second': self.backend.pairs_per_second()}

  def evaluate(self, step: int) -> dict:
    out = {'krr_test_accuracy': krr_test_accuracy(self.backend, self.prepared,
                                                  *self.support(step), self.cfg)}
    if self.average is not None and step:   # the current set too: what the average adds
      out['krr_test_accuracy_current'] = krr_test_accuracy(
          self.backend, self.prepared, self.params['images'], self.params['labels'], self.cfg)
    return out

  def arrays(self) -> dict:
    arrays = {**self.params, 'label_ids': self.label_ids}
    arrays.update({f'opt/{k}': v for k, v in self.opt_state.items()})
    if self.average is not None:
      arrays.update({f'ema/{k}': v for k, v in self.average.items()})
    return arrays

  def support(self, step: int) -> tuple:
    """The current set, or with --ema-decay its moving average (from step 1)."""
    if self.average is None or step == 0:
      return self.params['images'], self.params['labels']
    return tuple(optim.ema_value(self.average[k], self.cfg.ema_decay, step)
                 for k in SUPPORT)

  def support_scalars(self) -> dict:
    if self.cfg.loss != 'platt':
      return {}
    return {run_data.SUPPORT_LOG_TEMP: float(self.params[PLATT_TEMPERATURE])}

  def summary(self, end: loop.LoopEnd) -> dict:
    final = end.accuracy
    if final is None:   # no evaluation in this process: the start's, or one now
      final = end.before if end.fresh else self.evaluate(end.step)['krr_test_accuracy']
    return {'algorithm': 'kip', 'steps': end.step, 'krr_test_accuracy_before': end.before,
            'krr_test_accuracy_after': final, 'best': end.best, 'minutes': end.elapsed / 60,
            'pairs_per_second': self.backend.pairs_per_second(),
            'eval_test_size': self.cfg.eval_test_size or len(self.prepared.x_test)}
