"""RCIG on the coordinator: its state, meta-step and finite-net evaluation, for loop.run_steps."""
from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntkdd.common import architectures, optim, preprocess, rcig
from ntkdd.server import loop, run_data

# Settings that may differ on resume without changing the result (the data's path may: its
# name and content fingerprint are checked instead; the start set's file and temperature are
# read only at the start), and the run's length with the cosine schedule's (lr_decay_steps
# follows --steps, as KIP's schedule: a longer run stretches it).
RESUMABLE = ('steps', 'lr_decay_steps', 'checkpoint_every', 'eval_every', 'eval_test_size',
             'data_dir', 'cache_dir', 'download', 'init_support', 'init_log_temp')


def _optimizer(cfg: rcig.RcigConfig, lr: float):
  import optax  # pylint: disable=import-outside-toplevel
  return optax.adabelief(lr) if cfg.optimizer == 'adabelief' else optax.adam(lr)


def _learning_rates(cfg: rcig.RcigConfig) -> dict[str, float]:
  """The base learning rate of each learned part of the support (before any schedule)."""
  return {'images': cfg.lr_images, 'labels': cfg.lr_labels, 'log_temp': cfg.lr_log_temp}


@functools.lru_cache(maxsize=8)
def _support_update(cfg: rcig.RcigConfig):
  """A jitted (grads, opt_states, learned, lr_factor) -> (learned, opt_states) for images,
  labels and log_temp, each with its own optimiser and learning rate, all three times lr_factor
  under a schedule (`lr_factor`); without one the factor is not applied (the same bits as
  before schedules existed)."""
  import optax  # pylint: disable=import-outside-toplevel
  lrs = _learning_rates(cfg)

  @jax.jit
  def update(grads, states, learned, lr_factor):
    new_learned, new_states = dict(learned), dict(states)
    for name in grads:
      updates, new_states[name] = _optimizer(cfg, lrs[name]).update(
          grads[name], states[name], learned[name])
      if cfg.lr_decay_steps:   # Adam's and AdaBelief's step is linear in the learning rate
        updates = updates * lr_factor.astype(updates.dtype)
      new_learned[name] = optax.apply_updates(learned[name], updates)
    return new_learned, new_states

  return update


def lr_factor(cfg: rcig.RcigConfig, step: int) -> float:
  """The support learning rates' factor at 0-based meta-step `step`: 1 without a schedule, else
  `optim.cosine_schedule`'s decay to 0 at cfg.lr_decay_steps."""
  if not cfg.lr_decay_steps:
    return 1.0
  return optim.cosine_schedule(1.0, cfg.lr_decay_steps)(step)


def _learned_names(cfg: rcig.RcigConfig) -> tuple[str, ...]:
  return ('images', 'labels', 'log_temp') if cfg.learn_labels else ('images', 'log_temp')


def _new_pool_model(cfg, seed: int, image_shape, num_classes: int) -> dict:
  params = rcig.init_model(cfg, jax.random.PRNGKey(seed), image_shape, num_classes)
  return {'params': params, 'adam': rcig.adam_init(params), 'age': np.int64(0)}


def start_log_temp(cfg: rcig.RcigConfig) -> float:
  """The outer loss's log temperature at a run's start: cfg.init_log_temp where set, else the
  one saved with the --init-support set (`run_data.saved_log_temp`), else 0 (the paper's)."""
  if cfg.init_log_temp is not None:
    return cfg.init_log_temp
  saved = run_data.saved_log_temp(cfg.init_support)
  if saved is not None:
    logging.info('Starting at log temperature %.4f, saved with %s.', saved, cfg.init_support)
  elif cfg.init_support:
    logging.warning('%s records no log temperature: starting at 0. For a set made by an RCIG '
                    'run, --rcig-init-log-temp with that run\'s last log_temp (its '
                    'metrics.jsonl) goes on where it stopped.', cfg.init_support)
  return 0.0 if saved is None else saved


def initial_state(cfg, prepared, ipc: int, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
  """The whole mutable state of a run (a pytree of arrays) and the support's class ids."""
  images, labels, label_ids = run_data.initial_support(prepared, ipc, cfg.init, rng,
                                                       cfg.init_support)
  learned = {'images': jnp.asarray(images), 'labels': jnp.asarray(labels),
             'log_temp': jnp.float32(start_log_temp(cfg))}
  lrs = _learning_rates(cfg)
  opt = {name: _optimizer(cfg, lrs[name]).init(learned[name]) for name in _learned_names(cfg)}
  image_shape = prepared.x_train.shape[1:]
  pool = [_new_pool_model(cfg, int(rng.integers(2 ** 31)), image_shape, prepared.num_classes)
          for _ in range(cfg.pool_size)]
  # EMA of the support, bias-corrected as Adam's moments: ema / (1 - decay^t) is what is saved.
  ema = {'images': jnp.zeros_like(learned['images']), 'labels': jnp.zeros_like(learned['labels'])}
  state = {'learned': learned, 'opt': opt, 'pool': pool, 'ema': ema,
           'inner_lr': np.float64(cfg.inner_lr)}
  return state, label_ids


def _flatten(state: dict) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_leaves(state)
  return {f'state/{i:05d}': np.asarray(leaf) for i, leaf in enumerate(leaves)}


def _unflatten(template: dict, arrays: dict) -> dict:
  leaves, treedef = jax.tree_util.tree_flatten(template)
  missing = [f'state/{i:05d}' for i in range(len(leaves)) if f'state/{i:05d}' not in arrays]
  if missing:
    raise ValueError(f'The checkpoint lacks {len(missing)} of the {len(leaves)} state arrays this '
                     f'configuration needs ({missing[0]}, ...): it is damaged or from another '
                     f'version. Start the run again with --overwrite or into a new --out.')
  saved = [arrays[f'state/{i:05d}'] for i in range(len(leaves))]
  for old, new in zip(leaves, saved):
    if np.shape(old) != new.shape:
      raise ValueError('The checkpoint does not fit this configuration (array shapes differ).')
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(new) if isinstance(old, jax.Array) else new
                for old, new in zip(leaves, saved)])


def saved_support(cfg: rcig.RcigConfig, state: dict, step: int) -> tuple[np.ndarray, np.ndarray]:
  """The support that is saved and evaluated: the EMA where enabled and started, else the
  current one."""
  learned = state['learned']
  if cfg.ema_decay == 0 or step == 0:
    return np.asarray(learned['images']), np.asarray(learned['labels'])
  return tuple(optim.ema_value(np.asarray(state['ema'][k]), cfg.ema_decay, step)
               for k in ('images', 'labels'))


def finite_accuracy(images, labels, x_test, y_test, num_classes: int, *, depth: int,
                    width: int = 128, w_std: float = 1.0, b_std: float = 0.0,
                    parameterization: str = 'standard', learning_rate: float = 1e-4,
                    flip: bool = False, augmentations: str = '', models: int = 1,
                    train_steps: int = 0) -> dict[str, Any]:
  """RCIG's evaluation of a support set: `models` ReLU ConvNets of RCIG's architecture trained
  by `train.rcig_protocol` (optionally with its augmentation), tested on (x_test, y_test).
  flip: train on the support and its mirror images, as RCIG does for sets distilled with
  flips. Returns `train.evaluate_transfer`'s dict (mean, std, accuracies, ...)."""
  from ntkdd.common import train  # pylint: disable=import-outside-toplevel
  import dataclasses  # pylint: disable=import-outside-toplevel
  arch = architectures.Architecture('rcig_convnet', depth, w_std, b_std, width,
                                    parameterization)
  # The protocol's step count follows the distilled set's size, before any mirror images.
  protocol = train.rcig_protocol(len(images), learning_rate, augmentations)
  if train_steps:
    protocol = dataclasses.replace(protocol, steps=train_steps, schedule_steps=0,
                                   warmup_steps=min(protocol.warmup_steps, train_steps // 2))
  if flip:
    images, labels = rcig.with_flips(jnp.asarray(images), jnp.asarray(labels))
  return train.evaluate_transfer(arch, np.asarray(images), np.asarray(labels), x_test, y_test,
                                 protocol, seeds=tuple(range(models)), num_classes=num_classes)


def evaluate(cfg: rcig.RcigConfig, prepared, images, labels, test_size: int,
             seed: int) -> float:
  """Test accuracy of the finite ReLU ConvNet trained on the support (`finite_accuracy`,
  without augmentation)."""
  x_test, y_test = prepared.x_test, prepared.y_test
  pick = run_data.fixed_test_rows(prepared, test_size, seed)
  if pick is not None:
    x_test, y_test = x_test[pick], y_test[pick]
  return finite_accuracy(images, labels, x_test, y_test, prepared.num_classes, depth=cfg.depth,
                         width=cfg.eval_width, w_std=cfg.w_std, b_std=cfg.b_std,
                         parameterization=cfg.eval_parameterization,
                         learning_rate=cfg.eval_lr, flip=cfg.flip_support,
                         models=cfg.eval_models, train_steps=cfg.eval_train_steps)['mean']


def rcig_step(cfg: rcig.RcigConfig, state: dict, prepared, rng: np.random.Generator,
              step: int, structured: bool = True) -> tuple[dict, dict]:
  """One meta-step (draw a pool model and a target batch, meta-gradient, update the support,
  train the pool model); returns the new state and the step's record. structured: the
  meta-gradient by `rcig.structured_step_gradients` and fused pool steps (the default), else
  by the reference `rcig.rcig_step_gradients` (the same numbers to float rounding; slower)."""
  num_classes = prepared.num_classes
  pool = list(state['pool'])
  i = int(rng.integers(cfg.pool_size))
  if pool[i]['age'] >= cfg.max_pool_steps:
    pool[i] = _new_pool_model(cfg, int(rng.integers(2 ** 31)), prepared.x_train.shape[1:],
                              num_classes)
  target = preprocess.class_balanced_batch(prepared.y_train, cfg.target_batch, rng,
                                           num_classes=num_classes)
  learned = state['learned']
  support = {'images': learned['images'], 'labels': learned['labels']}
  step_gradients = (rcig.structured_step_gradients if structured
                    else rcig.rcig_step_gradients)
  meta, inner_lr = step_gradients(
      cfg, pool[i]['params'], support, learned['log_temp'],
      jnp.asarray(prepared.x_train[target]),
      jnp.asarray(prepared.y_train[target].astype(np.int32)), float(state['inner_lr']))
  grads = {'images': meta.support['images'], 'labels': meta.support['labels'],
           'log_temp': meta.log_temp}
  grads = {name: grads[name] for name in _learned_names(cfg)}
  learned, opt = _support_update(cfg)(grads, state['opt'], learned,
                                      jnp.float32(lr_factor(cfg, step)))
  if not all(bool(jnp.all(jnp.isfinite(v))) for v in learned.values()):
    raise FloatingPointError(f'Step {step + 1}: NaN or inf in the support set; lower the '
                             f'learning rates and resume from the last checkpoint.')
  train_steps = int(rng.integers(1, cfg.pool_train_steps + 1))
  params, adam = rcig.pool_train(cfg, pool[i]['params'], pool[i]['adam'], learned['images'],
                                 learned['labels'], train_steps, fused=structured)
  pool[i] = {'params': params, 'adam': adam, 'age': np.int64(pool[i]['age'] + train_steps)}
  ema = optim.ema_update(state['ema'], learned, cfg.ema_decay)
  record = {'loss': float(meta.loss), 'target_accuracy': float(meta.accuracy),
            'log_temp': float(learned['log_temp']), 'pool_model': i,
            'inner_lr': float(state['inner_lr'])}
  new_state = {'learned': learned, 'opt': opt, 'pool': pool, 'ema': ema,
               'inner_lr': np.float64(inner_lr)}
  return new_state, record


def run_rcig(cfg: rcig.RcigConfig, prepared: run_data.PreparedData, run_dir, *, ipc: int,
             steps: int, seed: int = 0, resume: bool = False, progress: bool = False,
             eval_every: int = 0, eval_test_size: int = 0, overwrite: bool = False,
             data_spec: Optional[dict] = None, tensorboard: bool = False,
             krr_eval: Optional[Callable[[Any, Any], float]] = None,
             krr_flags: Optional[dict] = None, run_status: Any = None) -> dict[str, Any]:
  """Distils `prepared` with RCIG into `run_dir` (config.json, metrics.jsonl, support.npz,
  checkpoint.npz, summary.json).

  Everything is checked before the first file is written; overwrite replaces a run already in
  `run_dir`; a fresh run that fails before its first checkpoint leaves nothing.

  Args:
    cfg: the RCIG settings. prepared: the data. run_dir: the run directory.
    ipc, steps, seed: images per class, meta-steps, the seed of every draw.
    resume, overwrite: --resume, --overwrite. progress: show a progress bar.
    eval_every: steps between finite-net evaluations; 0: none (each trains cfg.eval_models
      ConvNets, minutes on CPU). eval_test_size: test images per evaluation (0: all).
    data_spec: a `DataSpec` dict, recorded in config.json's flags, so that `ntkdd evaluate`
      can load the same data.
    tensorboard: also TensorBoard events in `run_dir` (needs tensorboardX).
    krr_eval: (images, labels) -> the infinite-width KRR test accuracy of the support set (a
      kernel backend's, see server/jobs.py), logged as krr_test_accuracy at each evaluation;
      krr_flags: its settings, saved in config.json.
    run_status: the caller's published `status.RunStatus` (the Launchpad and Ray
      coordinators); without one the run publishes its own (status.sock, status.json).

  Returns:
    The summary.
  """
  if ipc < 1 or steps < 0 or eval_every < 0 or eval_test_size < 0 or seed < 0:
    raise ValueError(f'Need --ipc >= 1, --steps >= 0, --eval-every >= 0, --eval-test-size >= 0 '
                     f'and --seed >= 0, got {ipc}, {steps}, {eval_every}, {eval_test_size}, '
                     f'{seed}.')
  run_data.check_ipc_fits(prepared, ipc)
  run_data.check_batch_fits(prepared, cfg.target_batch, '--rcig-target-batch')
  architectures.check_input_shape(
      architectures.Architecture('rcig_convnet', cfg.depth, cfg.w_std, cfg.b_std, cfg.width,
                                 'standard'), prepared.x_train.shape[1:])
  flags = dict(data_spec or {}, **cfg.to_dict(), algorithm='rcig', ipc=ipc, steps=steps,
               seed=seed, eval_every=eval_every, eval_test_size=eval_test_size,
               **(krr_flags or {}))

  def body(saved, board):
    return loop.run_steps(RcigSteps(cfg, prepared, ipc, eval_test_size, seed, krr_eval), saved,
                          Path(run_dir), prepared, steps=steps, seed=seed, eval_every=eval_every,
                          checkpoint_every=cfg.checkpoint_every, progress=progress, board=board)

  return loop.run_in_dir(Path(run_dir), flags, RESUMABLE, prepared, body, resume=resume,
                         overwrite=overwrite, arrays_needed=('label_ids',), total_steps=steps,
                         run_status=run_status, tensorboard=tensorboard)


class RcigSteps:
  """RCIG's meta-step for `loop.run_steps` (`rcig_step`); evaluated by a finite ConvNet trained
  on the (EMA) support, plus the KRR accuracy where a kernel backend serves it."""
  name = 'RCIG'
  accuracy_key = 'test_accuracy'

  def __init__(self, cfg: rcig.RcigConfig, prepared: run_data.PreparedData, ipc: int,
               eval_test_size: int, seed: int, krr_eval: Optional[Callable]):
    self.cfg, self.prepared, self.ipc = cfg, prepared, ipc
    self.eval_test_size, self.seed, self.krr_eval = eval_test_size, seed, krr_eval
    self.learning_rate = cfg.lr_images
    self.state = self.label_ids = self.krr_after = None

  def start(self, rng: np.random.Generator) -> None:
    self.state, self.label_ids = initial_state(self.cfg, self.prepared, self.ipc, rng)

  def restore(self, arrays: dict, rng: np.random.Generator) -> None:
    # The template needs only shapes: not the --init-support file, which may have moved.
    template, _ = initial_state(dataclasses.replace(self.cfg, init_support=''), self.prepared,
                                self.ipc, rng)
    self.state = _unflatten(template, arrays)
    self.label_ids = arrays['label_ids']

  def step(self, step: int, rng: np.random.Generator) -> dict:
    self.state, record = rcig_step(self.cfg, self.state, self.prepared, rng, step)
    return record

  def rates(self) -> dict:
    return {}

  def evaluate(self, step: int) -> dict:
    images, labels = self.support(step)
    record = {'test_accuracy': evaluate(self.cfg, self.prepared, images, labels,
                                        self.eval_test_size, self.seed)}
    if self.krr_eval is not None:
      record['krr_test_accuracy'] = self.krr_after = float(self.krr_eval(images, labels))
    return record

  def arrays(self) -> dict:
    arrays = _flatten(self.state)
    arrays['label_ids'] = np.asarray(self.label_ids)
    return arrays

  def support(self, step: int) -> tuple:
    return saved_support(self.cfg, self.state, step)

  def support_scalars(self) -> dict:
    return {run_data.SUPPORT_LOG_TEMP: float(self.state['learned']['log_temp'])}

  def summary(self, end: loop.LoopEnd) -> dict:
    summary = {'algorithm': 'rcig', 'steps': end.step, 'test_accuracy_before': end.before,
               'test_accuracy_after': end.accuracy, 'best': end.best,
               'minutes': end.elapsed / 60, 'seconds_per_step': end.elapsed / max(end.step, 1),
               'eval_test_size': self.eval_test_size or len(self.prepared.x_test)}
    if self.krr_eval is not None:   # the loop's last evaluation's (None if it made none)
      summary['krr_test_accuracy_after'] = None if end.accuracy is None else self.krr_after
    return summary
