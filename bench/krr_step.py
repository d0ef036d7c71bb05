"""Owns the coordinator's KRR step benchmark: CPU seconds of what a KIP step does between its kernel and vjp rounds.

Between the rounds the coordinator runs `common/kip.krr_between_rounds` on the gathered kernel
(`krr.loss_and_gradients` in float64 numpy: K_ts to float64, alpha = A^-1 y_s, predictions,
residuals, beta = A^-1 K_ts^T r; then `krr.kip_cotangent_factors`); nothing else runs then, so at hundreds of
workers this is pure loss (bench/scale_sim.py charges it to every step). This times it and
its parts on the calling thread's CPU clock (min and median over --reps), per support size.

  taskset -c 1 .venv/bin/python bench/krr_step.py --support 100,500 --target-batch 5000

Pin it to one core (numpy's BLAS would use both otherwise; the coordinator's step runs
beside its own threads).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_throughput import write_json  # noqa: E402  (bench/kernel_throughput.py)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--support', default='100,500', help='support sizes (ipc x classes)')
  parser.add_argument('--target-batch', type=int, default=5000)
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--reg', type=float, default=1e-6)
  parser.add_argument('--reps', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None, help='default bench/results/krr_step.json')
  return parser.parse_args(argv)


def thread_seconds(fn: Callable[[], object], reps: int) -> dict:
  """Min and median CPU seconds of this thread over `reps` calls of fn (after one warm-up)."""
  fn()
  times = []
  for _ in range(reps):
    start = time.thread_time()
    fn()
    times.append(time.thread_time() - start)
  return {'min_s': float(np.min(times)), 'median_s': float(np.median(times))}


def problem(n_s: int, n_t: int, classes: int, rng: np.random.Generator) -> dict:
  """A KIP step's gathered kernel K(support, [support; targets]) (float32, K_ss positive
  definite) and its labels, one-hot minus 1/C."""
  features = rng.standard_normal((n_s + n_t, 4 * n_s)).astype(np.float32)
  k_s_all = features[:n_s] @ features.T / features.shape[1]
  eye = np.eye(classes, dtype=np.float32)
  return {'k_s_all': k_s_all,
          'y_s': eye[np.arange(n_s) % classes] - 1.0 / classes,
          'y_t': eye[rng.integers(0, classes, n_t)] - 1.0 / classes}


def time_step(p: dict, reg: float, reps: int) -> dict:
  """The whole KRR step (`common/kip.krr_between_rounds` with factored cotangents, as
  `kip_gradients` runs it), and its parts."""
  from ntkdd.common import kip, krr  # pylint: disable=import-outside-toplevel
  n_s = len(p['y_s'])
  k_ss = p['k_s_all'][:, :n_s]
  k_ss = 0.5 * (k_ss + k_ss.T)
  k_ts = p['k_s_all'][:, n_s:].T
  k_ts64 = np.asarray(k_ts, np.float64)
  alpha = krr.solve(k_ss, p['y_s'], reg)
  residual = k_ts64 @ alpha - p['y_t']

  return {
      'step': thread_seconds(
          lambda: kip.krr_between_rounds(p['k_s_all'], p['y_s'], p['y_t'], reg, True), reps),
      'k_ts_to_float64': thread_seconds(lambda: np.asarray(k_ts, np.float64), reps),
      'one_solve': thread_seconds(lambda: krr.solve(k_ss, p['y_s'], reg), reps),
      # The fused step's solve (server/fused_step.py): one LAPACK gesv instead of Cholesky
      # and two general solves with its factor.
      'one_solve_lu': thread_seconds(lambda: krr.solve(k_ss, p['y_s'], reg, method='lu'), reps),
      'products': thread_seconds(lambda: k_ts64.T @ (k_ts64 @ alpha - p['y_t']), reps),
      'residual_norm': float(np.linalg.norm(residual)),
  }


def main(argv: Optional[list[str]] = None) -> dict:
  args = parse_args(argv)
  rng = np.random.default_rng(args.seed)
  rows = []
  for n_s in (int(v) for v in args.support.split(',')):
    parts = time_step(problem(n_s, args.target_batch, args.classes, rng), args.reg, args.reps)
    rows.append({'support': n_s, 'target_batch': args.target_batch, **parts})
  print(f'| support images | KRR step ms (min / median) | K_ts to float64 ms | one krr.solve ms '
        f'(cholesky / lu) | K_ts alpha, K_ts^T r ms |\n|---:|---:|---:|---:|---:|')
  for r in rows:
    print(f"| {r['support']} | {1e3 * r['step']['min_s']:.2f} / {1e3 * r['step']['median_s']:.2f} "
          f"| {1e3 * r['k_ts_to_float64']['min_s']:.2f} | {1e3 * r['one_solve']['min_s']:.2f} / "
          f"{1e3 * r['one_solve_lu']['min_s']:.2f} | {1e3 * r['products']['min_s']:.2f} |")
  report = {'benchmark': 'krr_step', 'config': vars(args), 'rows': rows,
            'cpus': sorted(os.sched_getaffinity(0)), 'load_average': os.getloadavg(),
            'python': platform.python_version(), 'numpy': np.__version__}
  write_json(report, args.json, 'krr_step.json')
  return report


if __name__ == '__main__':
  main()
