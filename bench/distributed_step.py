"""KIP step time and parallel efficiency of the distributed kernel backends (one core each).

Times K KIP steps (`common.kip.kip_gradients`: one forward round K(support, support+target)
and one vjp round; nothing else) on synthetic data, after one warm-up step that compiles every
block shape, for each launch type:

  direct      InProcessKernels: the kernel engine called in this process (no coordinator).
  inprocess   DistributedKernels over N KernelWorkers in this process (threads + wire bytes).
  launchpad   DistributedKernels over N Launchpad local_mp Courier worker processes (only
              where `launchpad` imports, i.e. the Python 3.10 environment; skipped otherwise).

Fair parallel efficiency on a small machine needs every compute process on ONE core, so before
JAX is imported this script sets XLA_FLAGS='--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1' (unless --threads-per-process=all). The Launchpad launcher and
its worker processes inherit this environment (the flags are also passed as the nodes' env).
The coordinator keeps one block in flight per worker (--in-flight 1) so that a worker never
runs two computations at once on two threads; --in-flight 2 measures the pipelined default.

Columns:
  step s         mean +- std over the K timed steps.
  pairs/s        kernel pairs per step (forward + vjp, each n_s * (n_s + n_t)) / step time.
  eff vs 1w      T(same launch, 1 worker) / (N * T(N workers)).
  eff vs direct  T(direct) / (N * T(N workers)): against the plain one-core engine.
  MB/step        bytes sent + received by the coordinator per step (DistributedKernels.status).
  serialise %    coordinator encode/decode seconds (summed over its threads) / step time.
  RPC overhead % share of worker time not spent computing: 1 - sum(worker compute s) /
                 (N * step time); worker compute seconds come from each worker's ping() (its
                 time in kernel_block/vjp_block, request decode included). It covers RPC and
                 queueing latency, serialisation, the coordinator's KRR solve and load
                 imbalance at the end of a round.
  cpu/wall       process CPU seconds / wall seconds per compute process (this process for
                 direct/inprocess, each worker's /proc/<pid>/stat for launchpad): ~1 or less
                 means the one-core setting holds (less: the machine is shared).

Examples:
  python bench/distributed_step.py                                  # defaults: 16x16x3, d=2
  python bench/distributed_step.py --steps 3 --support 10 --target 20 --block 5
  python bench/distributed_step.py --size 32x32x3 --support 4 --target 4 --block 2 \\
      --launches launchpad --steps 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import step_args  # bench/: the flags, without importing JAX

SINGLE_THREAD_FLAGS = step_args.SINGLE_THREAD_FLAGS
LAUNCHES = ('direct', 'inprocess', 'launchpad')
PROCESS_LAUNCHES = ('launchpad', 'ray')   # workers in processes of their own (pin, cpu/wall)


def parse_args(argv=None) -> argparse.Namespace:
  return step_args.parse_args(__doc__, LAUNCHES, 'distributed_step', argv)


ARGS = parse_args() if __name__ == '__main__' else None
if ARGS is not None and ARGS.threads_per_process == '1':
  # Must happen before jax is imported (by ntkdd below); children inherit it.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + SINGLE_THREAD_FLAGS).strip()

import numpy as np  # noqa: E402

import jax  # noqa: E402

from ntkdd.common import architectures, kip  # noqa: E402
from ntkdd.launch import inprocess  # noqa: E402
from ntkdd.server import backend as backend_lib  # noqa: E402
from ntkdd.workers import protocol  # noqa: E402


def env_label() -> str:
  return f'py{sys.version_info.major}{sys.version_info.minor}'


def matmul_check(n: int = 1024, reps: int = 5) -> dict:
  """CPU seconds per wall second of a jitted matmul: ~1 (or less, if shared) at one thread."""
  x = jax.numpy.ones((n, n), np.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(reps):
    f(x).block_until_ready()
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return {'n': n, 'reps': reps, 'wall_s': wall, 'cpu_s': cpu, 'cpu_per_wall': cpu / wall,
          'gflops': 2 * n ** 3 * reps / wall / 1e9}


def synthetic(args) -> tuple[dict, dict | None]:
  """(kip_gradients arguments, the DataSpec dict workers load, or None for --targets pixels)."""
  h, w, c = (int(v) for v in args.size.lower().split('x'))
  rng = np.random.default_rng(args.seed)

  def labels(n):
    ids = rng.integers(0, args.classes, n)
    return np.eye(args.classes, dtype=np.float32)[ids] - 1.0 / args.classes, ids

  ys, _ = labels(args.support)
  yt, yt_ids = labels(args.target)
  support = rng.standard_normal((args.support, h, w, c)).astype(np.float32)
  targets = rng.standard_normal((args.target, h, w, c)).astype(np.float32)
  spec = None
  if args.targets == 'indices':
    # A dataset file the workers load themselves (as `ntkdd distill` workers do), four times
    # the target batch, of which the targets are rows.
    import tempfile
    from ntkdd.common import prepared
    folder = Path(tempfile.mkdtemp(prefix='ntkdd-bench-'))
    n_train = 4 * args.target
    x_train = rng.uniform(size=(n_train, h, w, c)).astype(np.float32)   # pixels in [0, 1]
    y_train = np.arange(n_train) % args.classes
    np.savez(folder / 'synthetic.npz', x_train=x_train, y_train=y_train,
             x_test=x_train[:args.classes], y_test=y_train[:args.classes])
    data_spec = prepared.DataSpec(dataset=str(folder / 'synthetic.npz'), data_dir=str(folder),
                                  preprocess='none', cache_dir=str(folder / 'cache'))
    rows = rng.choice(n_train, args.target, replace=False)
    targets = prepared.prepare(data_spec).rows('train', rows)
    spec = data_spec.to_dict()
  return ({'support_images': support, 'support_labels': ys, 'target_images': targets,
           'target_labels': yt, 'target_label_ids': yt_ids}, spec)


def _coordinator(backend):
  """The DistributedKernels inside a backend (itself, or LaunchpadKernels' one), or None."""
  return getattr(backend, '_backend', None) or (backend if hasattr(backend, 'status') else None)


def _proc_cpu_s(pid) -> float | None:
  try:
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError, TypeError):
    return None


def _worker_snapshot(coord) -> list:
  """Per worker: compute seconds and blocks (its ping), pid and CPU seconds (/proc)."""
  out = []
  for w in coord._workers:   # pylint: disable=protected-access
    answer = protocol.decode(w.handle.ping())
    out.append({'pid': answer.get('pid'), 'compute_s': float(answer.get('compute_seconds', 0)),
                'blocks': int(answer.get('blocks_done', 0)),
                'cpu_s': _proc_cpu_s(answer.get('pid'))})
  return out


def pin_to_core(pid: int, core: int) -> int:
  """Pins every thread of process `pid` to `core`; returns how many threads were pinned."""
  pinned = 0
  for task in Path(f'/proc/{pid}/task').iterdir():
    try:
      os.sched_setaffinity(int(task.name), {core})
      pinned += 1
    except (ProcessLookupError, PermissionError, OSError):
      pass
  return pinned


def make_backend(launch: str, workers: int, arch, args, dataset=None):
  if launch == 'direct':
    return backend_lib.InProcessKernels(arch, tile=args.tile, dtype=args.dtype)
  kwargs = dict(max_in_flight_per_worker=args.in_flight)
  if launch == 'inprocess':
    return inprocess.make_inprocess_backend(arch, workers, tile=args.tile, dtype=args.dtype,
                                            block=args.block, dataset=dataset, **kwargs)
  env = {'XLA_FLAGS': os.environ['XLA_FLAGS']} if 'XLA_FLAGS' in os.environ else {}
  if launch == 'ray':   # bench/ray_step.py: a private local Ray it has started
    from ntkdd.launch import ray_launch
    return ray_launch.make_ray_backend(arch, workers, ray_address='local', tile=args.tile,
                                       dtype=args.dtype, block=args.block, env=env,
                                       dataset=dataset, **kwargs)
  from ntkdd.launch import launchpad_program   # lazily: needs launchpad (Python 3.10)
  return launchpad_program.make_launchpad_backend(arch, workers, tile=args.tile,
                                                  dtype=args.dtype, block=args.block,
                                                  env=env, dataset=dataset, **kwargs)


def measure(launch: str, workers: int, arch, data: dict, args, dataset=None,
            backend_fn=None) -> dict:
  """One row: startup, warm-up, K timed steps, the coordinator's and workers' counters.

  `backend_fn(launch, workers, arch, args, dataset)` makes the backend (default
  `make_backend`; bench/ray_step.py passes its own).
  """
  step = lambda b: kip.kip_gradients(b, **data, kernel_name=args.kernel)  # noqa: E731
  start = time.perf_counter()
  backend = (backend_fn or make_backend)(launch, workers, arch, args, dataset)
  try:
    startup = time.perf_counter() - start
    start = time.perf_counter()
    step(backend)     # warm-up: compiles every block shape
    warmup = time.perf_counter() - start
    coord = _coordinator(backend)
    if getattr(args, 'pin', False) and launch in PROCESS_LAUNCHES:
      # After the warm-up, so every thread XLA will use exists; one core per worker.
      for i, w in enumerate(_worker_snapshot(coord)):
        pin_to_core(w['pid'], i % os.cpu_count())
    status0 = coord.status() if coord else None
    workers0 = _worker_snapshot(coord) if coord else None
    cpu0, times = time.process_time(), []
    wall0 = time.perf_counter()
    for _ in range(args.steps):
      t = time.perf_counter()
      result = step(backend)
      times.append(time.perf_counter() - t)
    wall = time.perf_counter() - wall0
    own_cpu = time.process_time() - cpu0
    status1 = coord.status() if coord else None
    workers1 = _worker_snapshot(coord) if coord else None
  finally:
    if hasattr(backend, 'close'):
      backend.close()
  n_s, n_t = args.support, args.target
  pairs = 2 * n_s * (n_s + n_t)
  mean = float(np.mean(times))
  row = {'launch': launch, 'workers': workers if launch != 'direct' else 1,
         'step_s': times, 'step_mean_s': mean, 'step_std_s': float(np.std(times)),
         'pairs_per_step': pairs, 'pairs_per_s': pairs / mean, 'startup_s': startup,
         'warmup_s': warmup, 'loss': float(result.loss),
         'coordinator_cpu_per_wall': own_cpu / wall}
  if coord:
    d = {k: status1[k] - status0[k] for k in ('bytes_sent', 'bytes_received',
                                             'seconds_serialising', 'seconds_waiting',
                                             'blocks_done', 'block_pairs_done',
                                             'index_blocks', 'pixel_fallback_blocks')}
    busy = [b['compute_s'] - a['compute_s'] for a, b in zip(workers0, workers1)]
    cpu = [None if a['cpu_s'] is None or b['cpu_s'] is None else b['cpu_s'] - a['cpu_s']
           for a, b in zip(workers0, workers1)]
    row.update({
        'mb_per_step': (d['bytes_sent'] + d['bytes_received']) / args.steps / 1e6,
        'serialise_pct': 100 * d['seconds_serialising'] / wall,
        'rpc_overhead_pct': 100 * (1 - sum(busy) / (len(busy) * wall)),
        'worker_compute_s': busy, 'blocks_per_step': d['blocks_done'] / args.steps,
        'coordinator_deltas': d,
        'worker_cpu_per_wall': ([None if c is None else c / wall for c in cpu]
                                if launch in PROCESS_LAUNCHES else None)})
  return row


def add_efficiency(rows: list) -> None:
  direct = next((r['step_mean_s'] for r in rows if r['launch'] == 'direct'), None)
  for r in rows:
    one = next((o['step_mean_s'] for o in rows
                if o['launch'] == r['launch'] and o['workers'] == 1), None)
    n = r['workers']
    r['eff_vs_1w'] = one / (n * r['step_mean_s']) if one else None
    r['eff_vs_direct'] = direct / (n * r['step_mean_s']) if direct else None


def table(rows: list) -> str:
  """The markdown table; a 'vs inprocess' column where rows carry `vs_inprocess` (ray_step)."""
  pct = lambda v: '-' if v is None else f'{100 * v:.0f}%'  # noqa: E731
  vs_column = any('vs_inprocess' in r for r in rows)
  head = ['launch', 'workers', 'step s', 'pairs/s', 'eff vs 1w', 'eff vs direct'] + (
      ['vs inprocess'] if vs_column else []) + ['MB/step', 'serialise %', 'RPC overhead %',
                                                  'cpu/wall']
  lines = ['| ' + ' | '.join(head) + ' |',
           '|---|' + '---:|' * (len(head) - 2) + '---|']
  for r in rows:
    if r.get('worker_cpu_per_wall'):
      cpu = '/'.join('?' if c is None else f'{c:.2f}' for c in r['worker_cpu_per_wall'])
    else:
      cpu = f"{r['coordinator_cpu_per_wall']:.2f}"
    mb, ser, rpc = r.get('mb_per_step'), r.get('serialise_pct'), r.get('rpc_overhead_pct')
    cells = [r['launch'], str(r['workers']), f"{r['step_mean_s']:.2f} ± {r['step_std_s']:.2f}",
             f"{r['pairs_per_s']:.1f}", '-' if r['launch'] == 'direct' else pct(r['eff_vs_1w']),
             pct(r['eff_vs_direct'])]
    if vs_column:
      vs = r.get('vs_inprocess')
      cells.append('-' if vs is None else f'{100 * vs:+.0f}%')
    cells += ['-' if mb is None else f'{mb:.2f}', '-' if ser is None else f'{ser:.1f}%',
              '-' if rpc is None else f'{rpc:.1f}%', cpu]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def chosen_launches(args, allowed) -> tuple[list, list]:
  """(launch types, worker counts) from --launches and --workers; exits on an unknown one."""
  launches = [l.strip() for l in args.launches.split(',') if l.strip()]
  for launch in launches:
    if launch not in allowed:
      sys.exit(f'Unknown launch type {launch!r}; choose from {allowed}.')
  return launches, [int(w) for w in args.workers.split(',')]


def print_machine(check: dict) -> None:
  print(f"{env_label()}, jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; one-thread check: "
        f"matmul cpu/wall {check['cpu_per_wall']:.2f} ({check['gflops']:.1f} GFLOP/s)",
        file=sys.stderr)


def measure_all(launches, counts, arch, data, args, dataset, backend_fn=None) -> list:
  """A row per launch type and worker count (direct: one), with progress on stderr."""
  rows = []
  for launch in launches:
    for n in ([1] if launch == 'direct' else counts):
      print(f'{launch} x{n} ...', file=sys.stderr, flush=True)
      rows.append(measure(launch, n, arch, data, args, dataset, backend_fn))
      r = rows[-1]
      print(f"  step {r['step_mean_s']:.2f} ± {r['step_std_s']:.2f} s "
            f"(startup {r['startup_s']:.1f} s, warm-up {r['warmup_s']:.1f} s)",
            file=sys.stderr, flush=True)
  return rows


def header(args, extra: str = '') -> str:
  return (f"{args.size}, ConvNet depth {args.depth}, n_s={args.support}, n_t={args.target}, "
          f"{args.dtype}, block {args.block}, {args.in_flight} in flight/worker, "
          f"targets as {args.targets}, K={args.steps} steps; {env_label()}, "
          f"jax {jax.__version__}{extra}")


def write_results(args, name: str, rows: list, check: dict, **extra) -> None:
  """Writes the rows and the run's settings to --json or bench/results/<name>_<env>.json."""
  h, w, c = (int(v) for v in args.size.lower().split('x'))
  out = Path(args.json or Path(__file__).parent / 'results' / f'{name}_{env_label()}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      'args': vars(args), 'env': env_label(), 'python': platform.python_version(),
      'jax': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS'),
      'cpus': os.cpu_count(), 'load_average': os.getloadavg(), 'matmul_check': check,
      'image_shape': [h, w, c], 'rows': rows, **extra}, indent=1, default=str))
  print(f'\nWrote {out}', file=sys.stderr)


def main(args) -> None:
  launches, counts = chosen_launches(args, LAUNCHES)
  if 'launchpad' in launches:
    try:
      import launchpad  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      print(f'Skipping launchpad: {e} (it needs the Python 3.10 environment).', file=sys.stderr)
      launches.remove('launchpad')
  arch = architectures.Architecture('convnet', depth=args.depth)
  data, dataset = synthetic(args)
  check = matmul_check()
  print_machine(check)
  rows = measure_all(launches, counts, arch, data, args, dataset)
  add_efficiency(rows)
  print(header(args))
  print()
  print(table(rows))
  write_results(args, 'distributed_step', rows, check)


if __name__ == '__main__':
  if 'launchpad' in ARGS.launches:   # this process coordinates Courier workers: in private
    from ntkdd.launch import launchpad_program
    code = launchpad_program.rerun_in_private_network([sys.executable, *sys.argv])
    if code is not None:
      sys.exit(code)
  main(ARGS)
