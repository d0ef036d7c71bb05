"""The RCIG distillation loop: model pool, meta-steps, checkpoints, metrics, resume."""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkdd.common import architectures, preprocess, rcig
from ntkdd.server import checkpoint, distill

# Settings that may differ on resume without changing the result.
RESUMABLE = ('steps', 'checkpoint_every', 'eval_every', 'eval_test_size')


def _optimizer(cfg: rcig.RcigConfig, lr: float):
  import optax  # pylint: disable=import-outside-toplevel
  return optax.adabelief(lr) if cfg.optimizer == 'adabelief' else optax.adam(lr)


@functools.lru_cache(maxsize=8)
def _support_update(cfg: rcig.RcigConfig):
  """A jitted (grads, opt_states, learned) -> (learned, opt_states) for images, labels and
  log_temp, each with its own optimiser and learning rate."""
  import optax  # pylint: disable=import-outside-toplevel
  lrs = {'images': cfg.lr_images, 'labels': cfg.lr_labels, 'log_temp': cfg.lr_log_temp}

  @jax.jit
  def update(grads, states, learned):
    new_learned, new_states = dict(learned), dict(states)
    for name in grads:
      updates, new_states[name] = _optimizer(cfg, lrs[name]).update(
          grads[name], states[name], learned[name])
      new_learned[name] = optax.apply_updates(learned[name], updates)
    return new_learned, new_states

  return update


def _learned_names(cfg: rcig.RcigConfig) -> tuple[str, ...]:
  return ('images', 'labels', 'log_temp') if cfg.learn_labels else ('images', 'log_temp')


def _new_pool_model(cfg, seed: int, image_shape, num_classes: int) -> dict:
  params = rcig.init_model(cfg, jax.random.PRNGKey(seed), image_shape, num_classes)
  return {'params': params, 'adam': rcig.adam_init(params), 'age': np.int64(0)}


def _initial_state(cfg, prepared, ipc: int, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
  """The whole mutable state of a run (a pytree of arrays) and the support's class ids."""
  images, labels, label_ids = distill.initial_support(prepared, ipc, cfg.init, rng)
  learned = {'images': jnp.asarray(images), 'labels': jnp.asarray(labels),
             'log_temp': jnp.float32(cfg.init_log_temp)}
  lrs = {'images': cfg.lr_images, 'labels': cfg.lr_labels, 'log_temp': cfg.lr_log_temp}
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
  correction = 1 - cfg.ema_decay ** step
  return (np.asarray(state['ema']['images']) / correction,
          np.asarray(state['ema']['labels']) / correction)


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
  if test_size and test_size < len(x_test):
    # A fixed subset (same every evaluation) so accuracies are comparable across steps.
    pick = np.sort(np.random.default_rng(seed).choice(len(x_test), test_size, replace=False))
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
  learned, opt = _support_update(cfg)(grads, state['opt'], learned)
  if not all(bool(jnp.all(jnp.isfinite(v))) for v in learned.values()):
    raise FloatingPointError(f'Step {step + 1}: NaN or inf in the support set; lower the '
                             f'learning rates and resume from the last checkpoint.')
  train_steps = int(rng.integers(1, cfg.pool_train_steps + 1))
  params, adam = rcig.pool_train(cfg, pool[i]['params'], pool[i]['adam'], learned['images'],
                                 learned['labels'], train_steps, fused=structured)
  pool[i] = {'params': params, 'adam': adam, 'age': np.int64(pool[i]['age'] + train_steps)}
  d = cfg.ema_decay
  ema = {k: d * state['ema'][k] + (1 - d) * learned[k] for k in ('images', 'labels')}
  record = {'loss': float(meta.loss), 'target_accuracy': float(meta.accuracy),
            'log_temp': float(learned['log_temp']), 'pool_model': i,
            'inner_lr': float(state['inner_lr'])}
  new_state = {'learned': learned, 'opt': opt, 'pool': pool, 'ema': ema,
               'inner_lr': np.float64(inner_lr)}
  return new_state, record


def run_rcig(cfg: rcig.RcigConfig, prepared: distill.PreparedData, run_dir, *, ipc: int,
             steps: int, seed: int = 0, resume: bool = False, progress: bool = False,
             eval_every: int = 0, eval_test_size: int = 0) -> dict[str, Any]:
  """Distils `prepared` with RCIG into `run_dir` (config.json, metrics.jsonl, support.npz,
  checkpoint.npz, summary.json); returns the summary. eval_every = 0: no finite-net
  evaluation (it trains cfg.eval_models ConvNets each time, minutes on CPU)."""
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  if ipc < 1 or steps < 0:
    raise ValueError(f'Need ipc >= 1 and steps >= 0, got {ipc}, {steps}.')
  if ipc > np.bincount(prepared.y_train, minlength=prepared.num_classes).min():
    raise ValueError(f'ipc {ipc} exceeds the smallest class of the training set.')
  flags = dict(cfg.to_dict(), algorithm='rcig', ipc=ipc, steps=steps, seed=seed,
               eval_every=eval_every, eval_test_size=eval_test_size)
  config_path = run_dir / 'config.json'
  saved = checkpoint.open_run(run_dir, flags, RESUMABLE, resume)
  checkpoint.write_json(config_path, {
      'command': 'distill', 'flags': flags,
      'dataset': {'name': prepared.dataset.name, 'checksum': prepared.dataset.checksum(),
                  'image_shape': list(prepared.x_train.shape[1:]),
                  'num_classes': prepared.num_classes,
                  'class_names': list(prepared.dataset.class_names),
                  'preprocess': prepared.preprocessor.kind},
      'versions': distill.versions(), 'created': time.strftime('%Y-%m-%dT%H:%M:%S%z')})
  metrics_path = run_dir / 'metrics.jsonl'
  rng = np.random.default_rng(seed)
  state, label_ids = _initial_state(cfg, prepared, ipc, rng)
  measure = lambda step: evaluate(cfg, prepared, *saved_support(cfg, state, step),
                                  eval_test_size, seed)
  if saved is None:
    step, elapsed, best, before = 0, 0.0, None, None
    checkpoint.truncate_metrics(metrics_path, -1)
    record = {'step': 0, 'loss': None, 'wall_time': 0.0}
    if eval_every:
      before = measure(0)
      best = {'accuracy': before, 'step': 0}
      record['test_accuracy'] = before
    checkpoint.append_metrics(metrics_path, record)
  else:
    arrays, meta = saved
    state = _unflatten(state, arrays)
    label_ids = arrays['label_ids']
    rng.bit_generator.state = meta['rng_state']
    step, elapsed, best, before = meta['step'], meta['elapsed'], meta['best'], meta['before']
    checkpoint.truncate_metrics(metrics_path, step)
    logging.info('RCIG: resuming at step %d of %d.', step, steps)

  def save(step_done: int) -> None:
    arrays = _flatten(state)
    arrays['label_ids'] = np.asarray(label_ids)
    checkpoint.save_checkpoint(run_dir, arrays, {
        'step': step_done, 'rng_state': rng.bit_generator.state, 'elapsed': elapsed,
        'before': before, 'best': best})
    images, labels = saved_support(cfg, state, step_done)
    distill.write_support(run_dir, prepared, images, labels, label_ids)

  if saved is None:
    save(0)
  bar = None
  if progress:
    from ntkdd.server import progress as progress_bar  # pylint: disable=import-outside-toplevel
    bar = progress_bar.ProgressBar(steps, desc=f'RCIG {prepared.dataset.name}', initial=step)
  accuracy = None
  with distill._StopFlag() as stop:  # pylint: disable=protected-access
    while step < steps:
      t0 = time.time()
      state, record = rcig_step(cfg, state, prepared, rng, step)
      step += 1
      elapsed += time.time() - t0
      record = dict(step=step, **record, wall_time=elapsed)
      if eval_every and (step % eval_every == 0 or step == steps):
        accuracy = measure(step)
        record['test_accuracy'] = accuracy
        if best is None or accuracy > best['accuracy']:
          best = {'accuracy': accuracy, 'step': step}
      checkpoint.append_metrics(metrics_path, record)
      if bar:
        bar.update(step, loss=record['loss'], acc=accuracy)
      if step % cfg.checkpoint_every == 0 or step == steps or stop.signal:
        save(step)
      if stop.signal:
        if bar:
          bar.close()
        raise distill.Interrupted(f'Stopped by signal at step {step}; checkpoint saved in '
                                  f'{run_dir}. Continue with the same command plus --resume.')
  if bar:
    bar.close()
  summary = {'algorithm': 'rcig', 'steps': step, 'test_accuracy_before': before,
             'test_accuracy_after': accuracy, 'best': best, 'minutes': elapsed / 60,
             'seconds_per_step': elapsed / max(step, 1),
             'eval_test_size': eval_test_size or len(prepared.x_test)}
  checkpoint.write_json(run_dir / 'summary.json', summary)
  try:
    distill._render(run_dir)  # pylint: disable=protected-access
  except Exception as e:  # pictures are a nicety; a report module expecting KIP keys must not
    logging.warning('Pictures skipped: %s', e)  # fail the run
  return summary
