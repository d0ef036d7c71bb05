"""Command-line flags shared by the KIP step-time benchmarks (no JAX import: the benchmarks
set XLA_FLAGS after parsing them and before importing JAX)."""
from __future__ import annotations

import argparse

SINGLE_THREAD_FLAGS = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'


def parse_args(doc: str, launches: tuple, name: str, argv=None) -> argparse.Namespace:
  """The flags of bench/distributed_step.py and bench/ray_step.py (`name`: the JSON's stem)."""
  p = argparse.ArgumentParser(
      description=doc.split('\n\n')[0],
      epilog=doc.split('\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--size', default='16x16x3', help='image HxWxC (default 16x16x3)')
  p.add_argument('--depth', type=int, default=2, help='ConvNet depth (default 2)')
  p.add_argument('--support', type=int, default=20, help='support images n_s (default 20)')
  p.add_argument('--target', type=int, default=40, help='target batch n_t (default 40)')
  p.add_argument('--classes', type=int, default=10, help='label classes (default 10)')
  p.add_argument('--dtype', default='float32', choices=('float32', 'float64'))
  p.add_argument('--kernel', default='ntk', choices=('ntk', 'nngp'))
  p.add_argument('--steps', type=int, default=5, help='timed KIP steps K (default 5)')
  p.add_argument('--block', type=int, default=10,
                 help='coordinator block size (default 10: 2 x 6 = 12 blocks per round at the '
                      'default sizes, several per worker)')
  p.add_argument('--tile', type=int, default=None, help='kernel engine tile (default: auto)')
  p.add_argument('--workers', default='1,2', help='worker counts, comma-separated (default 1,2)')
  p.add_argument('--launches', default=','.join(launches),
                 help=f'launch types to run, comma-separated (default {",".join(launches)})')
  p.add_argument('--in-flight', type=int, default=1,
                 help='coordinator blocks in flight per worker (default 1)')
  p.add_argument('--threads-per-process', default='1', choices=('1', 'all'),
                 help="'1' (default) sets the single-thread XLA_FLAGS; 'all' leaves XLA alone")
  p.add_argument('--targets', default='indices', choices=('indices', 'pixels'),
                 help="indices (default, as ntkdd distill): the workers hold the synthetic "
                      "dataset and get target rows by index; pixels: targets sent as images")
  p.add_argument('--pin', action='store_true',
                 help='launchpad/ray: pin worker i (every thread) to core i mod CPUs after the '
                      'warm-up, so each worker (and the one-worker baseline) gets one core')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default=None,
                 help=f'where to write results (default bench/results/{name}_<env>.json)')
  return p.parse_args(argv)
