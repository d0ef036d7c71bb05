"""The RCIG distillation loop: model pool, meta-steps, checkpoints, metrics, resume."""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntkdd.common import architectures, preprocess, rcig
from ntkdd.server import checkpoint, distill, status
from ntkdd.server import run_dir as run_files

# Settings that may differ on resume without changing the result (the data's path may: its
# name and content fingerprint are checked instead).
RESUMABLE = ('steps', 'checkpoint_every', 'eval_every', 'eval_test_size', 'data_dir',
             'cache_dir', 'download')


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


def _krr_record(krr_eval: Optional[Callable], cfg: rcig.RcigConfig, state: dict,
                step: int) -> dict[str, float]:
  """{'krr_test_accuracy': ...} of the saved support at `step`; {} without a KRR evaluator."""
  if krr_eval is None:
    return {}
  return {'krr_test_accuracy': float(krr_eval(*saved_support(cfg, state, step)))}


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
             eval_every: int = 0, eval_test_size: int = 0, overwrite: bool = False,
             data_spec: Optional[dict] = None, tensorboard: bool = False,
             krr_eval: Optional[Callable[[Any, Any], float]] = None,
             krr_flags: Optional[dict] = None, run_status: Any = None) -> dict[str, Any]:
  """Distils `prepared` with RCIG into `run_dir` (config.json, metrics.jsonl, support.npz,
  checkpoint.npz, summary.json); returns the summary. eval_every = 0: no finite-net
  evaluation (it trains cfg.eval_models ConvNets each time, minutes on CPU).

  Everything is checked before the first file is written; overwrite replaces a run already in
  `run_dir`; a fresh run that fails before its first checkpoint leaves nothing.

  data_spec: a `DataSpec` dict, recorded in config.json's flags, so that `ntkdd evaluate` can
    load the same data. tensorboard: also TensorBoard events in `run_dir` (needs tensorboardX).
  krr_eval: (images, labels) -> the infinite-width KRR test accuracy of the support set (a
    kernel backend's, see server/jobs.py), logged as krr_test_accuracy at each evaluation;
    krr_flags: its settings, saved in config.json. run_status: the caller's published
    `status.RunStatus` (the Launchpad and Ray coordinators); without one the run publishes
    its own (status.sock, status.json).
  """
  run_dir = Path(run_dir)
  if ipc < 1 or steps < 0 or eval_every < 0 or eval_test_size < 0 or seed < 0:
    raise ValueError(f'Need --ipc >= 1, --steps >= 0, --eval-every >= 0, --eval-test-size >= 0 '
                     f'and --seed >= 0, got {ipc}, {steps}, {eval_every}, {eval_test_size}, '
                     f'{seed}.')
  distill.check_ipc_fits(prepared, ipc)
  distill.check_batch_fits(prepared, cfg.target_batch, '--rcig-target-batch')
  architectures.check_input_shape(
      architectures.Architecture('rcig_convnet', cfg.depth, cfg.w_std, cfg.b_std, cfg.width,
                                 'standard'), prepared.x_train.shape[1:])
  flags = dict(data_spec or {}, **cfg.to_dict(), algorithm='rcig', ipc=ipc, steps=steps,
               seed=seed, eval_every=eval_every, eval_test_size=eval_test_size,
               **(krr_flags or {}))
  record = distill.dataset_record(prepared)
  made_dir = not run_dir.exists()
  saved = checkpoint.open_run(run_dir, flags, RESUMABLE, resume, dataset=record,
                              overwrite=overwrite, arrays_needed=('label_ids',))
  try:
    run_files.write_json(run_dir / run_files.CONFIG, {
        'command': 'distill', 'flags': flags, 'dataset': record,
        'versions': distill.versions(), 'created': time.strftime('%Y-%m-%dT%H:%M:%S%z')})
    with status.published(run_status, run_dir, steps):
      return _run_steps(cfg, prepared, run_dir, saved, ipc=ipc, steps=steps, seed=seed,
                        progress=progress, eval_every=eval_every,
                        eval_test_size=eval_test_size, krr_eval=krr_eval,
                        tensorboard=tensorboard)
  except BaseException:
    if saved is None:
      checkpoint.discard_failed_start(run_dir, made_dir,
                                      also=(run_files.STATUS_JSON, run_files.STATUS_SOCKET))
    raise


def _run_steps(cfg: rcig.RcigConfig, prepared: distill.PreparedData, run_dir: Path, saved, *,
               ipc: int, steps: int, seed: int, progress: bool, eval_every: int,
               eval_test_size: int, krr_eval: Optional[Callable],
               tensorboard: bool) -> dict[str, Any]:
  """`run_rcig` in an opened run directory (`saved`: its checkpoint, None for a new run)."""
  metrics_path = run_dir / run_files.METRICS
  board = distill.open_board(run_dir, prepared) if tensorboard else None
  rng = np.random.default_rng(seed)
  state, label_ids = _initial_state(cfg, prepared, ipc, rng)
  measure = lambda step: evaluate(cfg, prepared, *saved_support(cfg, state, step),
                                  eval_test_size, seed)
  if saved is None:
    step, elapsed, best, before = 0, 0.0, None, None
    run_files.truncate_metrics(metrics_path, -1)
    record = {'step': 0, 'loss': None, 'wall_time': 0.0}
    if eval_every:
      before = measure(0)
      best = {'accuracy': before, 'step': 0}
      record['test_accuracy'] = before
      record.update(_krr_record(krr_eval, cfg, state, 0))
    run_files.append_metrics(metrics_path, record)
    if board:
      board(record, saved_support(cfg, state, 0)[0], label_ids)
  else:
    arrays, meta = saved
    state = _unflatten(state, arrays)
    label_ids = arrays['label_ids']
    rng.bit_generator.state = meta['rng_state']
    step, elapsed, best, before = meta['step'], meta['elapsed'], meta['best'], meta['before']
    run_files.truncate_metrics(metrics_path, step)
    logging.info('RCIG: resuming at step %d of %d.', step, steps)

  def save(step_done: int) -> None:
    arrays = _flatten(state)
    arrays['label_ids'] = np.asarray(label_ids)
    checkpoint.save_checkpoint(run_dir, arrays, {
        'step': step_done, 'rng_state': rng.bit_generator.state, 'elapsed': elapsed,
        'before': before, 'best': best})
    images, labels = saved_support(cfg, state, step_done)
    distill.write_support(run_dir, prepared, images, labels, label_ids)

  last_saved = step
  if saved is None:
    save(0)
  bar = None
  if progress:
    from ntkdd.server import progress as progress_bar  # pylint: disable=import-outside-toplevel
    bar = progress_bar.ProgressBar(steps, desc=f'RCIG {prepared.dataset.name}', initial=step)
  accuracy = krr_after = None
  with distill._StopFlag() as stop:  # pylint: disable=protected-access
    while step < steps:
      t0 = time.time()
      try:
        state, record = rcig_step(cfg, state, prepared, rng, step)
      except FloatingPointError:
        raise FloatingPointError(distill.nan_advice(step + 1, last_saved, run_dir, '--lr',
                                                    cfg.lr_images)) from None
      step += 1
      elapsed += time.time() - t0
      record = dict(step=step, **record, wall_time=elapsed)
      if eval_every and (step % eval_every == 0 or step == steps):
        accuracy = measure(step)
        record['test_accuracy'] = accuracy
        record.update(_krr_record(krr_eval, cfg, state, step))
        krr_after = record.get('krr_test_accuracy')
        if best is None or accuracy > best['accuracy']:
          best = {'accuracy': accuracy, 'step': step}
      run_files.append_metrics(metrics_path, record)
      if board:
        board(record, saved_support(cfg, state, step)[0] if eval_every and
              'test_accuracy' in record else None, label_ids)
      if bar:
        bar.update(step, loss=record['loss'], acc=accuracy)
      if step % cfg.checkpoint_every == 0 or step == steps or stop.signal:
        save(step)
        last_saved = step
      if stop.signal:
        if bar:
          bar.close()
        if board:
          board.close()
        raise distill.Interrupted(f'Stopped by signal at step {step}; checkpoint saved in '
                                  f'{run_dir}. Continue with the same command plus --resume.')
  if bar:
    bar.close()
  if board:
    board.close()
  summary = {'algorithm': 'rcig', 'steps': step, 'test_accuracy_before': before,
             'test_accuracy_after': accuracy, 'best': best, 'minutes': elapsed / 60,
             'seconds_per_step': elapsed / max(step, 1),
             'eval_test_size': eval_test_size or len(prepared.x_test)}
  if krr_eval is not None:
    summary['krr_test_accuracy_after'] = krr_after
  run_files.write_json(run_dir / run_files.SUMMARY, summary)
  try:
    distill._render(run_dir)  # pylint: disable=protected-access
  except Exception as e:  # pictures are a nicety; a report module expecting KIP keys must not
    logging.warning('Pictures skipped: %s', e)  # fail the run
  return summary
