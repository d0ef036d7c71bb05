"""Seconds per RCIG meta-step: the reference step against the structured one, side by side.

Runs `rcig_loop.rcig_step` from one state twice per round, alternately: `reference` (the
meta-gradient by `rcig.rcig_step_gradients`: Python loops of jitted inner, Hessian-vector and
Adam steps, every one re-running the body's forward pass; pool steps as two dispatches) and
`structured` (`rcig.structured_step_gradients`: the body linearised once per step on the
support and on the target batch (in chunks of rcig.TARGET_CHUNK images), every derivative
through J and J^T, one jitted call per inner/Hessian-inverse step; fused pool steps). Both start each round from the same state and the same random
generator state, so they draw the same pool model, target batch and pool-training steps; the
table also gives how far apart their new support sets are (max |difference|, which is float
rounding). After one warm-up round (compilation), --rounds rounds are timed; the ratio is
median(reference) / median(structured). Each step's CPU seconds of this process are recorded
beside its wall seconds: on a shared core they show how much of the wall time was waiting. Defaults: MNIST, 1 image per class, width 128, depth 3,
target batch 256 (the `ntkdd distill --algorithm rcig` defaults).

Pin to one core on a shared machine, e.g.
  taskset -c 1 python bench/rcig_step.py --data-dir /work/shared/data/mnist --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              epilog=__doc__.split('\n\n', 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--dataset', default='mnist')
  p.add_argument('--data-dir', default='data/mnist')
  p.add_argument('--ipc', type=int, default=1)
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--depth', type=int, default=3)
  p.add_argument('--target-batch', type=int, default=256)
  p.add_argument('--inner-steps', type=int, default=20)
  p.add_argument('--hinv-steps', type=int, default=20)
  p.add_argument('--rounds', type=int, default=3, help='timed rounds after one warm-up')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default='bench/results/rcig_step.json')
  return p.parse_args(argv)


def _timed(fn):
  """(fn's result, wall seconds, CPU seconds of this process)."""
  import jax  # pylint: disable=import-outside-toplevel
  start, cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start, time.process_time() - cpu


def main(args) -> int:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ntkdd.common import rcig  # pylint: disable=import-outside-toplevel
  from ntkdd.server import distill, rcig_loop  # pylint: disable=import-outside-toplevel
  prepared = distill.prepare_data(distill.DistillConfig(dataset=args.dataset,
                                                        data_dir=args.data_dir))
  cfg = rcig.RcigConfig(width=args.width, depth=args.depth, target_batch=args.target_batch,
                        inner_steps=args.inner_steps, hinv_steps=args.hinv_steps,
                        flip_support=prepared.x_train.shape[-1] == 3)
  rng = np.random.default_rng(args.seed)
  state, _ = rcig_loop.initial_state(cfg, prepared, args.ipc, rng)
  times = {'reference': [], 'structured': []}
  cpu_times = {'reference': [], 'structured': []}
  differences, compile_seconds = [], {}
  for round_index in range(args.rounds + 1):
    results = {}
    for name in ('reference', 'structured'):
      step_rng = copy.deepcopy(rng)
      (new_state, record), seconds, cpu_seconds = _timed(lambda: rcig_loop.rcig_step(
          cfg, state, prepared, step_rng, round_index, structured=name == 'structured'))
      results[name] = (new_state, record, step_rng)
      if round_index == 0:
        compile_seconds[name] = seconds
      else:
        times[name].append(seconds)
        cpu_times[name].append(cpu_seconds)
      print(f'round {round_index} {name:10s} {seconds:8.2f} s (cpu {cpu_seconds:7.2f} s)  '
            f'loss {record["loss"]:.6f}  load {os.getloadavg()[0]:.1f}', flush=True)
    ref, fast = results['reference'][0]['learned'], results['structured'][0]['learned']
    differences.append(max(float(np.abs(np.asarray(ref[k]) - np.asarray(fast[k])).max())
                           for k in ('images', 'labels')))
    # Continue from the reference's state: the next round starts both from the same point.
    state, rng = results['reference'][0], results['reference'][2]
  rows = []
  for name in ('reference', 'structured'):
    rows.append({'step': name, 'median_s': statistics.median(times[name]),
                 'min_s': min(times[name]), 'max_s': max(times[name]),
                 'first_s': compile_seconds[name],
                 'median_cpu_s': statistics.median(cpu_times[name])})
  ratio = rows[0]['median_s'] / rows[1]['median_s']
  print(f'\n{args.dataset} {args.ipc} ipc, width {args.width}, depth {args.depth}, target '
        f'batch {args.target_batch}, {args.rounds} rounds (+1 warm-up)')
  print(f'{"step":12s}{"median s":>10s}{"min s":>10s}{"max s":>10s}{"first s":>10s}'
        f'{"cpu s":>10s}')
  for row in rows:
    print(f'{row["step"]:12s}{row["median_s"]:10.2f}{row["min_s"]:10.2f}{row["max_s"]:10.2f}'
          f'{row["first_s"]:10.2f}{row["median_cpu_s"]:10.2f}')
  cpu_ratio = rows[0]['median_cpu_s'] / rows[1]['median_cpu_s']
  print(f'ratio reference/structured: {ratio:.2f}x (CPU seconds: {cpu_ratio:.2f}x); max '
        f'|support difference| after a step: {max(differences):.2e}')
  out = Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      'args': vars(args), 'rows': rows, 'ratio': ratio, 'cpu_ratio': cpu_ratio,
      'max_support_difference': differences,
      'cpu_affinity': sorted(os.sched_getaffinity(0)), 'load_average': os.getloadavg(),
      'python': platform.python_version()}, indent=2))
  print(f'written to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main(parse_args()))
