"""Where one structured RCIG meta-step spends its time: each phase's CPU seconds, one by one.

Calls the jitted phases of `rcig.structured_step_gradients` (`rcig._structured_phases`) one at
a time with `block_until_ready` (so the sum exceeds a dispatched step slightly), plus 8 pool
steps, at the `ntkdd distill --algorithm rcig` defaults on MNIST, 1 image per class (or the
sizes given). The first repetition includes compilation. Pin to one core, e.g.
  taskset -c 0 python bench/rcig_phases.py --data-dir /work/shared/data/mnist --reps 3
"""
from __future__ import annotations

import argparse
import sys
import time


def run(argv=None) -> dict:
  """Times the phases; returns each repetition's CPU seconds per phase ('seconds'), the last
  repetition's meta-gradient ('meta') and the arguments of `rcig.structured_step_gradients`
  that give that step in one call ('step_args')."""
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--dataset', default='mnist', help='a dataset name or a .npz path')
  p.add_argument('--data-dir', default='data/mnist')
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--depth', type=int, default=3)
  p.add_argument('--target-batch', type=int, default=256)
  p.add_argument('--inner-steps', type=int, default=20)
  p.add_argument('--hinv-steps', type=int, default=20)
  args = p.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ntkdd.common import preprocess, rcig  # pylint: disable=import-outside-toplevel
  from ntkdd.server import distill, rcig_loop  # pylint: disable=import-outside-toplevel
  prepared = distill.prepare_data(distill.DistillConfig(dataset=args.dataset,
                                                        data_dir=args.data_dir))
  cfg = rcig.RcigConfig(width=args.width, depth=args.depth, target_batch=args.target_batch,
                        inner_steps=args.inner_steps, hinv_steps=args.hinv_steps)
  rng = np.random.default_rng(0)
  state, _ = rcig_loop.initial_state(cfg, prepared, 1, rng)
  params0, learned = state['pool'][0]['params'], state['learned']
  support = {'images': learned['images'], 'labels': learned['labels']}
  target = preprocess.class_balanced_batch(prepared.y_train, cfg.target_batch, rng,
                                           num_classes=prepared.num_classes)
  x_target = jnp.asarray(prepared.x_train[target])
  y_target = jnp.asarray(prepared.y_train[target].astype(np.int32))
  phases = rcig._structured_phases(rcig._network_key(cfg), cfg.l2_rate, cfg.flip_support)  # pylint: disable=protected-access
  seconds, reps = {}, []

  def timed(name, fn, *a, **kw):
    start = time.process_time()
    out = jax.block_until_ready(fn(*a, **kw))
    seconds[name] = seconds.get(name, 0.0) + time.process_time() - start
    return out

  body0, readout0 = params0
  for rep in range(args.reps):
    seconds.clear()
    lin, labels = timed('linearise', phases['linearise_support'], body0, support)
    delta = rcig.zeros_like_body(params0)
    adam = rcig.adam_init(delta)
    for i in range(cfg.inner_steps):
      delta, adam = timed('inner', phases['inner_step'], lin, delta, adam, labels, readout0,
                          cfg.inner_lr, at_zero=i == 0)
    delta, _, phi_s, g_delta, x, step_size, hx, outer_parts = timed(
        'outer', phases['outer'], params0, lin, delta, support, labels, learned['log_temp'],
        x_target, y_target, cfg.hinv_lr)
    adam = rcig.adam_init(x)
    for i in range(cfg.hinv_steps):
      x, adam = timed('hinv', phases['hinv_step'], lin, phi_s, x, adam, g_delta, labels,
                      readout0, step_size, hx if i == 0 else None)
    meta = timed('mixed', phases['finish'], body0, readout0, delta, x, support, outer_parts,
                 clip_implicit=cfg.clip_implicit)
    timed('pool8', rcig.pool_train, cfg, params0, state['pool'][0]['adam'], support['images'],
          support['labels'], 8)
    print(f'rep {rep}: ' + '  '.join(f'{k} {v:.2f}' for k, v in seconds.items())
          + f'  sum {sum(seconds.values()):.2f} CPU s', flush=True)
    reps.append(dict(seconds))
  return {'seconds': reps, 'meta': meta,
          'step_args': (cfg, params0, support, learned['log_temp'], x_target, y_target,
                        cfg.inner_lr)}


def main(argv=None) -> int:
  run(argv)
  return 0


if __name__ == '__main__':
  sys.exit(main())
