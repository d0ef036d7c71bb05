"""KIP step time of the Ray launch type against in-process kernels (one core per process).

Times K KIP steps (`common.kip.kip_gradients`) on synthetic data after one warm-up step, like
bench/distributed_step.py (same sizes, data, one-thread XLA_FLAGS and columns), for:

  direct      InProcessKernels: the kernel engine in this process, no coordinator, no workers.
  inprocess   DistributedKernels over N KernelWorkers in this process (threads + wire bytes).
  ray         DistributedKernels over N KernelWorker Ray actors on a private local Ray started
              by this script (`ray.init(address='local')`), each actor asking for one CPU and
              getting the one-thread XLA_FLAGS through its runtime_env. A local Ray
              advertises the machine's non-loopback address, so the script runs itself
              inside `unshare -n` (where only loopback exists) before it starts Ray.

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

import step_args  # bench/: the flags, without importing JAX

SINGLE_THREAD_FLAGS = step_args.SINGLE_THREAD_FLAGS
LAUNCHES = ('direct', 'inprocess', 'ray')
RUN_LIMIT_S = 4 * 3600   # the whole benchmark, in its private network


def parse_args(argv=None) -> argparse.Namespace:
  return step_args.parse_args(__doc__, LAUNCHES, 'ray_step', argv)


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


def add_overheads(rows: list) -> None:
  """Parallel efficiencies (as distributed_step) and Ray's step time over in-process's."""
  ds.add_efficiency(rows)
  for r in rows:
    same = next((o['step_mean_s'] for o in rows
                 if o['launch'] == 'inprocess' and o['workers'] == r['workers']), None)
    r['vs_inprocess'] = r['step_mean_s'] / same - 1 if same and r['launch'] == 'ray' else None


def rerun_in_private_network() -> int:
  """This benchmark again, inside a network namespace where only loopback exists."""
  from ntkdd.launch import private_network
  prefix = private_network.unshare_prefix()
  if prefix is None:
    sys.exit('bench/ray_step.py starts a local Ray, which would listen on this machine\'s '
             'non-loopback address, so it runs inside `unshare -n`, which this machine does '
             'not allow (run it as root, or where user namespaces are allowed), or leave Ray '
             'out: --launches direct,inprocess.')
  done = private_network.run([sys.executable, *sys.argv], prefix, timeout_s=RUN_LIMIT_S,
                             capture=False)
  if done.returncode == 'timeout':
    sys.exit(f'bench/ray_step.py: stopped after {RUN_LIMIT_S} s.')
  return done.returncode


def main(args) -> None:
  launches, counts = ds.chosen_launches(args, LAUNCHES)
  if 'ray' in launches:
    from ntkdd.launch import private_network
    if not private_network.only_loopback():
      sys.exit(rerun_in_private_network())
  arch = architectures.Architecture('convnet', depth=args.depth)
  data, dataset = ds.synthetic(args)
  check = ds.matmul_check()
  ds.print_machine(check)
  ray_info = None
  if 'ray' in launches:
    from ntkdd.launch import ray_cluster
    ray = ray_cluster.import_ray()
    start = time.perf_counter()
    # One private local Ray for every ray row (its start is not a step cost); one CPU per
    # worker, at least as many as the machine has.
    ray_cluster.connect('local', local_cpus=max(max(counts), os.cpu_count() or 1))
    ray_info = {'version': ray.__version__, 'start_s': time.perf_counter() - start,
                'address': ray_cluster.cluster_address()}
    print(f"ray {ray.__version__}: local cluster up in {ray_info['start_s']:.1f} s",
          file=sys.stderr)
  try:
    rows = ds.measure_all(launches, counts, arch, data, args, dataset)
  finally:
    if ray_info is not None:
      ray.shutdown()
  add_overheads(rows)
  print(ds.header(args, f", ray {ray_info['version']}" if ray_info else ''))
  print()
  print(ds.table(rows))
  ds.write_results(args, 'ray_step', rows, check, ray=ray_info)


if __name__ == '__main__':
  main(ARGS)
