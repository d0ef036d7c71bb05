"""The distillation loop on the coordinator: data, KIP/LS steps, checkpoints, metrics, resume."""
from __future__ import annotations

import dataclasses
import logging
import math
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ntkdd.common import architectures, kip, optim, preprocess
from ntkdd.common import prepared as prepared_lib
from ntkdd.server import checkpoint
from ntkdd.server import run_dir as run_files

ALGORITHMS = ('kip', 'ls')
INITS = ('real', 'noise')


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Every setting of a distillation run; saved in config.json and checked on --resume."""
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
  learning_rate: float = 0.01
  lr_schedule: str = 'constant'     # constant | cosine (decays to 0 at --steps)
  learn_labels: bool = False
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
    if self.kernel not in kip.KERNEL_NAMES:
      raise ValueError(f'--kernel must be one of {kip.KERNEL_NAMES}, got {self.kernel!r}.')
    if self.lr_schedule not in ('constant', 'cosine'):
      raise ValueError(f"--lr-schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}.")
    if self.init not in INITS:
      raise ValueError(f'--init must be one of {INITS}, got {self.init!r}.')
    if self.target_batch < 1:
      raise ValueError(f'--target-batch must be >= 1, got {self.target_batch}.')
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
    if self.preprocess not in ('auto',) + preprocess.PREPROCESSOR_KINDS:
      raise ValueError(f'--preprocess must be auto or one of {preprocess.PREPROCESSOR_KINDS}.')
    architectures.Architecture(self.arch, self.depth, self.w_std, self.b_std)

  def architecture(self) -> architectures.Architecture:
    return architectures.Architecture(self.arch, self.depth, self.w_std, self.b_std)

  def data_spec(self) -> prepared_lib.DataSpec:
    """What kernel workers need to load the same model-space images themselves."""
    return prepared_lib.DataSpec(
        dataset=self.dataset, data_dir=self.data_dir, cache_dir=self.cache_dir,
        download=self.download, image_size=self.image_size, preprocess=self.preprocess,
        zca_strength=self.zca_strength)

  # Settings that may differ on --resume without changing the result.
  RESUMABLE = ('steps', 'eval_every', 'checkpoint_every', 'data_dir', 'cache_dir', 'download',
               'tile')


PreparedData = prepared_lib.PreparedData   # re-exported: the loops and tests use these names
downsample = prepared_lib.downsample


def prepare_data(cfg: DistillConfig) -> PreparedData:
  """The run's data in model space (shared with in-process workers that hold the same spec)."""
  return prepared_lib.prepare(cfg.data_spec())


def check_batch_fits(prepared: PreparedData, size: int, flag: str) -> None:
  """A class-balanced draw of `size` train images (each class size // C, the remainder one more
  each) must fit every class; refuses with the largest size that does."""
  counts = np.bincount(prepared.y_train, minlength=prepared.num_classes)
  classes = len(counts)
  need = size // classes + (1 if size % classes else 0)
  smallest = int(counts.min())
  if need > smallest:
    raise ValueError(f'{flag} {size} draws up to {need} images of each class, but class '
                     f'{int(counts.argmin())} of {prepared.dataset.name} has {smallest} training '
                     f'images: use {flag} {classes * smallest} or less.')


def check_ipc_fits(prepared: PreparedData, ipc: int) -> None:
  """ipc real images of every class must exist (the support starts from them)."""
  counts = np.bincount(prepared.y_train, minlength=prepared.num_classes)
  if not counts.all():
    empty = np.flatnonzero(counts == 0).tolist()
    raise ValueError(f'{prepared.dataset.name}: classes {empty} of {prepared.num_classes} have no '
                     f'training images (the labels skip those ids), so no support set can hold '
                     f'every class. Relabel the classes consecutively from 0, or drop the empty '
                     f'ones from class_names.')
  if ipc > counts.min():
    raise ValueError(f'--ipc {ipc} exceeds the smallest class of {prepared.dataset.name} '
                     f'(class {int(counts.argmin())}: {int(counts.min())} training images); use '
                     f'--ipc {int(counts.min())} or less.')


def check_fits_data(cfg: DistillConfig, prepared: PreparedData) -> None:
  """Checks the settings that depend on the data (before any file of the run is written)."""
  check_ipc_fits(prepared, cfg.ipc)
  if cfg.algorithm == 'kip':
    check_batch_fits(prepared, cfg.target_batch, '--target-batch')
  if cfg.algorithm == 'ls' and cfg.ls_target_size and cfg.ls_target_size < len(prepared.y_train):
    check_batch_fits(prepared, cfg.ls_target_size, '--ls-target-size')
  architectures.check_input_shape(cfg.architecture(), prepared.x_train.shape[1:])


def dataset_record(prepared: PreparedData) -> dict:
  """What config.json records of the data: resume compares its name and checksum."""
  return {'name': prepared.dataset.name, 'checksum': prepared.dataset.checksum(),
          'image_shape': list(prepared.x_train.shape[1:]), 'num_classes': prepared.num_classes,
          'class_names': list(prepared.dataset.class_names),
          'preprocess': prepared.preprocessor.kind}


def nan_advice(step: int, last_checkpoint: int, run_dir: Path, lr_flag: str, lr: float) -> str:
  """The message of a run whose support set turned NaN/inf: what to do that works."""
  return (f'Step {step}: the support set or its kernel became NaN or inf; the learning rate '
          f'({lr_flag} {lr:g}) is probably too large for this data. The run in {run_dir} keeps '
          f'its last good checkpoint (step {last_checkpoint}). Run again with a smaller '
          f'{lr_flag} (e.g. {lr / 10:g}) or a larger --reg, into a new --out directory or with '
          f'--overwrite.')


def versions() -> dict[str, str]:
  import jax
  import ntkdd
  return {'ntkdd': ntkdd.__version__, 'jax': jax.__version__, 'numpy': np.__version__,
          'python': platform.python_version()}


class _StopFlag:
  """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the end of the step."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: the caller handles signals
        pass
    return self

  def _handle(self, signum, frame):
    if self.signal is not None:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.signal = signum
    logging.warning('Signal %d: checkpointing after this step, then stopping.', signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Interrupted(RuntimeError):
  pass


def _config_to_json(cfg: DistillConfig) -> dict:
  return dataclasses.asdict(cfg)


def initial_support(prepared: PreparedData, ipc: int, init: str, rng: np.random.Generator):
  """(images, centred one-hot labels, class ids): class-balanced real images or noise."""
  idx = preprocess.class_balanced_indices(prepared.y_train, ipc, rng,
                                          num_classes=prepared.num_classes)
  label_ids = prepared.y_train[idx]
  if init == 'real':
    images = prepared.x_train[idx].astype(np.float32)
  else:
    scale = float(np.std(prepared.x_train[:1000]))
    images = (rng.normal(size=(len(idx),) + prepared.x_train.shape[1:]) * scale).astype(np.float32)
  labels = preprocess.one_hot_centered(label_ids, prepared.num_classes)
  return images, labels, label_ids


def _evaluate(backend, prepared, images, labels, cfg, rng_seed: int) -> float:
  # Test images go as rows of the test split: distributed workers holding it get indices.
  x_test, y_test = prepared.rows('test'), prepared.y_test
  if cfg.eval_test_size and cfg.eval_test_size < len(x_test):
    # A fixed subset (same every evaluation) so accuracies are comparable across steps.
    pick = np.sort(np.random.default_rng(rng_seed).choice(len(x_test), cfg.eval_test_size,
                                                          replace=False))
    x_test, y_test = prepared.rows('test', pick), y_test[pick]
  return kip.krr_accuracy(backend, images, labels, x_test, y_test, cfg.kernel, cfg.reg)


def write_support(run_dir: Path, prepared: PreparedData, images, labels, label_ids) -> None:
  run_files.save_npz(run_dir / run_files.SUPPORT, {
      'images': np.asarray(images, np.float32),
      'images_pixels': prepared.preprocessor.inverse(images).astype(np.float32),
      'labels': np.asarray(labels, np.float32),
      'label_ids': np.asarray(label_ids, np.int32),
      'class_names': np.asarray(prepared.dataset.class_names),
  })


def _render(run_dir: Path) -> None:
  try:
    from ntkdd.server import report
    report.render_run(run_dir)
  except ImportError as e:  # pictures need Pillow; the run itself does not
    logging.warning('Pictures skipped: %s', e)


def distill(cfg: DistillConfig, run_dir: str, backend_factory: Callable, resume: bool = False,
            progress: bool = True, prepared: Optional[PreparedData] = None,
            run_status: Any = None, tensorboard: bool = False,
            overwrite: bool = False) -> dict[str, Any]:
  """Runs KIP or LS into `run_dir`; returns the summary (also written to summary.json).

  Everything that can be checked (flags, the run directory, the data against the flags, on
  --resume the data's fingerprint) is checked before the first file is written; overwrite
  replaces a run already there. A fresh run that fails before its first checkpoint leaves
  nothing behind.

  `run_status`: the caller's `status.RunStatus`, which the caller publishes (the Launchpad and
  Ray coordinators); without one the run publishes its own (status.sock, status.json).
  `tensorboard`: also TensorBoard events in `run_dir` (needs tensorboardX).
  """
  cfg.validate()
  run_dir = Path(run_dir)
  checkpoint.check_run_dir(run_dir, resume, overwrite)   # before the (slow) data load
  if resume and cfg.algorithm == 'ls':
    raise ValueError('--resume: Label Solve runs in one go and has no steps to resume; run it '
                     'again with --overwrite (or into a new --out directory).')
  prepared = prepared or prepare_data(cfg)
  check_fits_data(cfg, prepared)
  record = dataset_record(prepared)
  made_dir = not run_dir.exists()
  saved = checkpoint.open_run(run_dir, _config_to_json(cfg), DistillConfig.RESUMABLE, resume,
                              dataset=record, overwrite=overwrite,
                              arrays_needed=('images', 'labels', 'label_ids'))
  from ntkdd.server import status
  try:
    run_files.write_json(run_dir / run_files.CONFIG, {
        'command': 'distill', 'flags': _config_to_json(cfg), 'dataset': record,
        'versions': versions(), 'created': time.strftime('%Y-%m-%dT%H:%M:%S%z')})
    # The run's status (the caller's, or published here), which long kernel computations (LS,
    # KRR evaluation) report their progress to; its final status.json says how the run ended.
    with status.published(run_status, run_dir, status.total_steps(_config_to_json(cfg))):
      board = open_board(run_dir, prepared) if tensorboard else None
      try:
        backend = backend_factory(cfg.architecture())
        try:
          if cfg.algorithm == 'ls':
            return _run_label_solve(cfg, run_dir, prepared, backend, board)
          return _run_kip(cfg, run_dir, prepared, backend, saved, progress, board)
        finally:
          getattr(backend, 'close', lambda: None)()  # distributed backends stop their threads
      finally:
        if board:
          board.close()
  except BaseException:
    if saved is None:
      checkpoint.discard_failed_start(run_dir, made_dir,
                                      also=(run_files.STATUS_JSON, run_files.STATUS_SOCKET))
    raise


def open_board(run_dir: Path, prepared: PreparedData) -> Callable:
  """A `board(record, images, label_ids)` that writes TensorBoard events into `run_dir`: the
  record's scalars, and the grid of `images` (model space; None: none) when the record is an
  evaluation; `board.close()` ends the event file."""
  from ntkdd.server import tensorboard_log
  log = tensorboard_log.TensorBoardLog(run_dir)

  def board(record: dict, images: Optional[np.ndarray], label_ids) -> None:
    pixels = (prepared.preprocessor.inverse(np.asarray(images))
              if images is not None and tensorboard_log.is_evaluation(record) else None)
    log.log(record, pixels, label_ids, prepared.num_classes)

  board.close = log.close
  return board


def _run_label_solve(cfg, run_dir, prepared, backend, board=None) -> dict:
  start = time.time()
  rng = np.random.default_rng(cfg.seed)
  images, labels, label_ids = initial_support(prepared, cfg.ipc, cfg.init, rng)
  before = _evaluate(backend, prepared, images, labels, cfg, cfg.seed)
  targets = np.arange(len(prepared.x_train))
  if cfg.ls_target_size and cfg.ls_target_size < len(targets):
    targets = np.sort(preprocess.class_balanced_batch(prepared.y_train, cfg.ls_target_size, rng,
                                                      num_classes=prepared.num_classes))
  y_t = preprocess.one_hot_centered(prepared.y_train[targets], prepared.num_classes)
  logging.info('Label Solve over %d target images.', len(targets))
  solved = kip.label_solve(backend, images, prepared.rows('train', targets), y_t, cfg.kernel,
                           cfg.reg, cfg.ls_rcond)
  after = _evaluate(backend, prepared, images, solved, cfg, cfg.seed)
  write_support(run_dir, prepared, images, solved, label_ids)
  summary = {'algorithm': 'ls', 'krr_test_accuracy_before': before,
             'krr_test_accuracy_after': after, 'targets': int(len(targets)),
             'minutes': (time.time() - start) / 60, 'steps': 0}
  record = {'step': 0, 'loss': None, 'krr_test_accuracy': after,
            'wall_time': time.time() - start}
  run_files.append_metrics(run_dir / run_files.METRICS, record)
  if board:
    board(record, images, label_ids)
  run_files.write_json(run_dir / run_files.SUMMARY, summary)
  _render(run_dir)
  return summary


def _run_kip(cfg, run_dir, prepared, backend, saved, show_progress, board=None) -> dict:
  metrics_path = run_dir / run_files.METRICS
  optimizer = optim.adam(optim.cosine_schedule(cfg.learning_rate, cfg.steps)
                         if cfg.lr_schedule == 'cosine' else cfg.learning_rate)
  if saved is None:
    rng = np.random.default_rng(cfg.seed)
    images, labels, label_ids = initial_support(prepared, cfg.ipc, cfg.init, rng)
    params = {'images': images, 'labels': labels}
    opt_state = optimizer.init(params)
    step, elapsed = 0, 0.0
    before = _evaluate(backend, prepared, images, labels, cfg, cfg.seed)
    best = {'accuracy': before, 'step': 0}
    run_files.truncate_metrics(metrics_path, -1)
    first = {'step': 0, 'loss': None, 'krr_test_accuracy': before, 'wall_time': 0.0}
    run_files.append_metrics(metrics_path, first)
    if board:
      board(first, images, label_ids)
    logging.info('Step 0: KRR test accuracy %.4f (initial support).', before)
  else:
    arrays, meta = saved
    params = {'images': arrays['images'], 'labels': arrays['labels']}
    label_ids = arrays['label_ids']
    opt_state = {k[len('opt/'):]: v for k, v in arrays.items() if k.startswith('opt/')}
    rng = np.random.default_rng()
    rng.bit_generator.state = meta['rng_state']
    step, elapsed, before, best = meta['step'], meta['elapsed'], meta['before'], meta['best']
    run_files.truncate_metrics(metrics_path, step)
    logging.info('Resuming at step %d of %d.', step, cfg.steps)

  def save(step_done: int) -> None:
    arrays = {'images': params['images'], 'labels': params['labels'], 'label_ids': label_ids}
    arrays.update({f'opt/{k}': v for k, v in opt_state.items()})
    checkpoint.save_checkpoint(run_dir, arrays, {
        'step': step_done, 'rng_state': rng.bit_generator.state, 'elapsed': elapsed,
        'before': before, 'best': best})
    write_support(run_dir, prepared, params['images'], params['labels'], label_ids)

  last_saved = step
  if saved is None:
    save(0)
  bar = None
  if show_progress:
    from ntkdd.server import progress
    bar = progress.ProgressBar(cfg.steps, desc=f'KIP {prepared.dataset.name}', initial=step)
  y_train_centered = preprocess.one_hot_centered(prepared.y_train, prepared.num_classes)
  accuracy = best['accuracy'] if saved is None else None
  with _StopFlag() as stop:
    while step < cfg.steps:
      t0 = time.time()
      target = preprocess.class_balanced_batch(prepared.y_train, cfg.target_batch, rng,
                                               num_classes=prepared.num_classes)
      try:
        result = kip.kip_gradients(backend, params['images'], params['labels'],
                                   prepared.rows('train', target), y_train_centered[target],
                                   prepared.y_train[target], cfg.kernel, cfg.reg)
      except FloatingPointError:   # K_ss or the loss non-finite: the support set has blown up
        raise FloatingPointError(nan_advice(step + 1, last_saved, run_dir, '--lr',
                                            cfg.learning_rate)) from None
      grads = {'images': result.grad_images}
      if cfg.learn_labels:
        grads['labels'] = result.grad_labels
      new_params, new_state = optimizer.update(grads, opt_state, params)
      if not all(np.all(np.isfinite(v)) for v in new_params.values()):
        raise FloatingPointError(nan_advice(step + 1, last_saved, run_dir, '--lr',
                                            cfg.learning_rate))
      params, opt_state = new_params, new_state
      step += 1
      elapsed += time.time() - t0
      record = {'step': step, 'loss': result.loss / cfg.target_batch,
                'target_accuracy': result.target_accuracy, 'wall_time': elapsed,
                'pairs_per_second': backend.pairs_per_second()}
      if step % cfg.eval_every == 0 or step == cfg.steps:
        try:
          accuracy = _evaluate(backend, prepared, params['images'], params['labels'], cfg,
                               cfg.seed)
        except FloatingPointError:   # the support set is finite but its kernel is not
          raise FloatingPointError(nan_advice(step, last_saved, run_dir, '--lr',
                                              cfg.learning_rate)) from None
        record['krr_test_accuracy'] = accuracy
        if accuracy > best['accuracy']:
          best = {'accuracy': accuracy, 'step': step}
      run_files.append_metrics(metrics_path, record)
      if board:
        board(record, params['images'], label_ids)
      if bar:
        bar.update(step, loss=record['loss'], acc=accuracy)
      if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.signal:
        save(step)
        last_saved = step
      if stop.signal:
        if bar:
          bar.close()
        raise Interrupted(f'Stopped by signal at step {step}; checkpoint saved in {run_dir}. '
                          f'Continue with the same command plus --resume.')
  if bar:
    bar.close()
  final = accuracy if accuracy is not None else _evaluate(
      backend, prepared, params['images'], params['labels'], cfg, cfg.seed)
  summary = {'algorithm': 'kip', 'steps': step, 'krr_test_accuracy_before': before,
             'krr_test_accuracy_after': final, 'best': best, 'minutes': elapsed / 60,
             'pairs_per_second': backend.pairs_per_second(),
             'eval_test_size': cfg.eval_test_size or len(prepared.x_test)}
  run_files.write_json(run_dir / run_files.SUMMARY, summary)
  _render(run_dir)
  return summary
