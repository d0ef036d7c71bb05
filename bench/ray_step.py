"""KIP step time of the Ray launch type against in-process kernels (one core per process).

Times K KIP steps (`common.kip.kip_gradients`) on synthetic data after one warm-up step, like
bench/distributed_step.py (same sizes, data, one-thread XLA_FLAGS and columns), for:

  direct      InProcessKernels: the kernel engine in this process, no coordinator, no workers.
  inprocess   DistributedKernels over N KernelWorkers in this process (threads + wire bytes).
  ray         DistributedKernels over N KernelWorker Ray actors on a private local Ray started
              by this script (`ray.init(address='local')`), each actor asking for one CPU and
              getting the one-thread XLA_FLAGS through its runtime_env.

Columns as in distributed_step.py, plus:
  vs inprocess   T(ray, N workers) / T(inprocess, N workers) - 1: what Ray's actor calls and
                 object transfers add over calling the same workers in this process.
  cpu/wall       per worker process (ray; from /proc) or this process (direct, inprocess).

Examples:
  python bench/ray_step.py                                           # defaults: 16x16x3, d=2
  python bench/ray_step.py --size 8x8x3 --depth 1 --support 4 --target 8 --block 4 --steps 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SINGLE_THREAD_FLAGS = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
LAUNCHES = ('direct', 'inprocess', 'ray')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      epilog=__doc__.split('\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--size', default='16x16x3', help='image HxWxC (default 16x16x3)')
  p.add_argument('--depth', type=int, default=2, help='ConvNet depth (default 2)')
  p.add_argument('--support', type=int, default=20, help='support images n_s (default 20)')
  p.add_argument('--target', type=int, default=40, help='target batch n_t (default 40)')
  p.add_argument('--classes', type=int, default=10, help='label classes (default 10)')
  p.add_argument('--dtype', default='float32', choices=('float32', 'float64'))
  p.add_argument('--kernel', default='ntk', choices=('ntk', 'nngp'))
  p.add_argument('--steps', type=int, default=5, help='timed KIP steps K (default 5)')
  p.add_argument('--block', type=int, default=10, help='coordinator block size (default 10)')
  p.add_argument('--tile', type=int, default=None, help='kernel engine tile (default: auto)')
  p.add_argument('--workers', default='1,2', help='worker counts, comma-separated (default 1,2)')
  p.add_argument('--launches', default=','.join(LAUNCHES),
                 help=f'launch types to run, comma-separated (default {",".join(LAUNCHES)})')
  p.add_argument('--in-flight', type=int, default=1,
                 help='coordinator blocks in flight per worker (default 1)')
  p.add_argument('--threads-per-process', default='1', choices=('1', 'all'),
                 help="'1' (default) sets the single-thread XLA_FLAGS; 'all' leaves XLA alone")
  p.add_argument('--targets', default='indices', choices=('indices', 'pixels'),
                 help="indices (default, as ntkdd distill): the workers hold the synthetic "
                      "dataset and get target rows by index; pixels: targets sent as images")
  p.add_argument('--pin', action='store_true',
                 help='ray: pin worker i (every thread) to core i mod CPUs after the warm-up')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default=None,
                 help='where to write results (default bench/results/ray_step_<env>.json)')
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == '__main__' else None
if ARGS is not None and ARGS.threads_per_process == '1':
  # Before jax is imported (by distributed_step below, which uses the same flags); the Ray
  # workers get them through their runtime_env.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                             + SINGLE_THREAD_FLAGS).strip()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import distributed_step as ds  # noqa: E402  the data, checks and snapshots we share

assert ds.SINGLE_THREAD_FLAGS == SINGLE_THREAD_FLAGS

from ntkdd.common import architectures  # noqa: E402
from ntkdd.launch import inprocess  # noqa: E402
from ntkdd.server import backend as backend_lib  # noqa: E402


def make_backend(launch: str, workers: int, arch, args, dataset=None):
  if launch == 'direct':
    return backend_lib.InProcessKernels(arch, tile=args.tile, dtype=args.dtype)
  kwargs = dict(max_in_flight_per_worker=args.in_flight)
  if launch == 'inprocess':
    return inprocess.make_inprocess_backend(arch, workers, tile=args.tile, dtype=args.dtype,
                                            block=args.block, dataset=dataset, **kwargs)
  from ntkdd.launch import ray_launch
  env = {'XLA_FLAGS': os.environ['XLA_FLAGS']} if 'XLA_FLAGS' in os.environ else {}
  return ray_launch.make_ray_backend(arch, workers, ray_address='local', tile=args.tile,
                                     dtype=args.dtype, block=args.block, env=env,
                                     dataset=dataset, **kwargs)


def add_overheads(rows: list) -> None:
  """Parallel efficiencies (as distributed_step) and Ray's step time over in-process's."""
  ds.add_efficiency(rows)
  for r in rows:
    same = next((o['step_mean_s'] for o in rows
                 if o['launch'] == 'inprocess' and o['workers'] == r['workers']), None)
    r['vs_inprocess'] = r['step_mean_s'] / same - 1 if same and r['launch'] == 'ray' else None


def table(rows: list) -> str:
  pct = lambda v: '-' if v is None else f'{100 * v:.0f}%'  # noqa: E731
  lines = ['| launch | workers | step s | pairs/s | eff vs 1w | eff vs direct | vs inprocess | '
           'MB/step | serialise % | RPC overhead % | cpu/wall |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|']
  for r in rows:
    if r.get('worker_cpu_per_wall'):
      cpu = '/'.join('?' if c is None else f'{c:.2f}' for c in r['worker_cpu_per_wall'])
    else:
      cpu = f"{r['coordinator_cpu_per_wall']:.2f}"
    mb, ser, rpc = r.get('mb_per_step'), r.get('serialise_pct'), r.get('rpc_overhead_pct')
    vs = r['vs_inprocess']
    lines.append(
        f"| {r['launch']} | {r['workers']} | {r['step_mean_s']:.2f} ± {r['step_std_s']:.2f} | "
        f"{r['pairs_per_s']:.1f} | {'-' if r['launch'] == 'direct' else pct(r['eff_vs_1w'])} | "
        f"{pct(r['eff_vs_direct'])} | {'-' if vs is None else f'{100 * vs:+.0f}%'} | "
        f"{'-' if mb is None else f'{mb:.2f}'} | {'-' if ser is None else f'{ser:.1f}%'} | "
        f"{'-' if rpc is None else f'{rpc:.1f}%'} | {cpu} |")
  return '\n'.join(lines)


def main(args) -> None:
  launches, counts = ds.chosen_launches(args, LAUNCHES)
  arch = architectures.Architecture('convnet', depth=args.depth)
  data, dataset = ds.synthetic(args)
  check = ds.matmul_check()
  ds.print_machine(check)
  ray_info = None
  if 'ray' in launches:
    from ntkdd.launch import ray_launch
    ray = ray_launch.import_ray()
    start = time.perf_counter()
    # One private local Ray for every ray row (its start is not a step cost); one CPU per
    # worker, at least as many as the machine has.
    ray_launch.connect('local', local_cpus=max(max(counts), os.cpu_count() or 1))
    ray_info = {'version': ray.__version__, 'start_s': time.perf_counter() - start,
                'address': ray_launch.cluster_address()}
    print(f"ray {ray.__version__}: local cluster up in {ray_info['start_s']:.1f} s",
          file=sys.stderr)
  try:
    rows = ds.measure_all(launches, counts, arch, data, args, dataset, make_backend)
  finally:
    if ray_info is not None:
      ray.shutdown()
  add_overheads(rows)
  print(ds.header(args, f", ray {ray_info['version']}" if ray_info else ''))
  print()
  print(table(rows))
  ds.write_results(args, 'ray_step', rows, check, ray=ray_info)


if __name__ == '__main__':
  main(ARGS)
