"""KIP steps of the real coordinator against simulated GPU fleets (8 to 256 workers), and the model.

Drives the real `DistributedKernels` through whole KIP steps (`common.kip.kip_gradients`: the
kernel round K(support, [support; targets]), the KRR solve here, the vjp round) with
`workers/simulated_worker.Fleet` workers: each block holds a simulated GPU for its modelled
time and every byte crosses modelled links (the coordinator's shared FIFO, each worker's
own). Targets go as dataset indices (the workers hold the "train split", as in `ntkdd
distill`); the support images change every step, so they are published every step.

Time scale: all modelled sleeps are multiplied by k = --step-wall / (ideal step), so every
configuration's ideal step takes about --step-wall seconds here. Reported times are unscaled
(GPU seconds): step_s = (kernel round + vjp round wall) / k + the KRR solve (see below). The
coordinator's own CPU is real and not scaled: the KRR solve between the rounds counts the CPU
seconds of the thread that runs it (its wall time here is stretched by the other jobs and the
simulation's threads on the machine); coordinator_cpu_s
is the CPU per step of the coordinator's threads (the calling one, its slot and call threads,
read from their thread CPU clocks) less what the simulated handles spent on them (the
simulated workers' own threads, e.g. group leaders' lanes, are not the coordinator's);
coordinator_cpu_process_s is the older estimate, the process CPU per step minus the simulated
workers' and links' thread CPU and the idle polling rate measured before the steps times the
step's wall (it also charges the coordinator with the thread switching of the simulation's
hundreds of threads on this machine's one core). Inside the scaled run the coordinator's CPU
costs 1/k of what it would, so it is compared with the
unscaled step instead: where coordinator_cpu_s > step_s a real coordinator of this code could
not keep up (limit 'coordinator cpu'), whatever the sim's efficiency says.

Columns: efficiency = (useful pairs x per-pair seconds) / (workers x step_s), the same
compute-only ideal for every row; device % = modelled device-busy seconds (padded pairs) /
(workers x step_s); MB/step = bytes the coordinator sent + received; limit = the largest
loss: 'coordinator link' (its busiest direction's bytes / bandwidth), 'solve' (the KRR solve
here), 'coordinator cpu' (more than the step), else 'tail+latency' (workers idle at the ends
of rounds, waiting for images, blocks and answers), or 'compute' at >= 90% efficiency.

Stages (--stages, each plan/broadcast/tail_halvings): the coordinator's options before and
after the scaling work, measured side by side; 'groups' is 'tree' with one request per group
of --group-size workers per round (`DistributedKernels(group_size=...)`; 'auto': about
sqrt(workers), 1 up to 16 workers), led over the group by one of its workers; 'factors' adds
the vjp cotangents as low-rank factors the group leaders expand (`cotangent_factors=True`),
'lean' also answers only the kernel KIP reads (`one_kernel=True`), 'split' also sends each
group's request as a head (3/4 of its pairs) and a tail beside it (`requests_per_group=2`);
'fused' is 'lean' with the fused KIP step (`fused_step=True`, server/fused_step.py: K_ss first,
then each target block's forward, residual and vjp in one member call, the leaders' sums
added on a worker, then K_ss's vjp); 'overlap' is 'fused' with K_ss computed inside the fused
round and alpha sent to the members mid-round (`fused_step='overlap'`,
server/overlap_exchange.py: no K_ss round). Each result is
checked against the surrogate kernel computed here on the whole arrays (first step).
`requests` counts the coordinator's block or group requests per step (`blocks` the blocks).

  python bench/scale_sim.py --workers 8,64,256 --ipc 10,50 --target-batch 5000 \\
      --json bench/results/scale_sim.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

# The coordinator's KRR solve on one BLAS thread: idle BLAS threads spinning on a shared
# machine would count as its CPU. Set before numpy is imported.
for _var in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ.setdefault(_var, '1')

import numpy as np  # noqa: E402

import scaling_model  # noqa: E402  (bench/)

from ntkdd.common import kip, sources  # noqa: E402
from ntkdd.server import distributed_kernels, overlap_exchange  # noqa: E402
from ntkdd.workers import kernel_worker, simulated_worker as sim  # noqa: E402

STAGES = {
    'before': ('tiles', 'direct', 0),           # today's defaults: 64x64 tiles, direct sends
    'strips': ('balanced', 'direct', 0),        # blocks from the worker count, summed per strip
    'tail': ('balanced', 'direct', 2),          # ... and shrinking at the end of a round
    'tree': ('balanced', 'tree', 2),            # ... and the support passed worker to worker
    'groups': ('balanced', 'tree', 2),          # ... and one request per group of workers
    'factors': ('balanced', 'tree', 2),         # ... and the vjp cotangents as factors
    'lean': ('balanced', 'tree', 2),            # ... and only the kernel KIP reads answered
    'split': ('balanced', 'tree', 2),           # ... and a head and a tail request per group
    'fused': ('balanced', 'tree', 2),           # lean, and the fused KIP step (no barrier)
    'overlap': ('balanced', 'tree', 2),         # fused, with K_ss inside the fused round
}
GROUPED = ('groups', 'factors', 'lean', 'split', 'fused', 'overlap')   # group_size = --group-size (else 1)
# DistributedKernels options of the round-3 stages (issue 18): the KIP round's wire.
STAGE_OPTIONS = {'factors': {'cotangent_factors': True},
                 'lean': {'cotangent_factors': True, 'one_kernel': True},
                 'split': {'cotangent_factors': True, 'one_kernel': True,
                           'requests_per_group': 2},
                 'fused': {'cotangent_factors': True, 'one_kernel': True, 'fused_step': True},
                 'overlap': {'cotangent_factors': True, 'one_kernel': True,
                             'fused_step': 'overlap'}}


def group_size(args, stage: str, workers: int) -> int:
  """--group-size for the grouped stages ('auto': about sqrt(workers), 1 up to 16 workers)."""
  if stage not in GROUPED:
    return 1
  if args.group_size != 'auto':
    return int(args.group_size)
  return 1 if workers <= 16 else int(np.ceil(np.sqrt(workers)))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workers', default='8,64,256')
  p.add_argument('--ipc', default='10,50', help='support images per class')
  p.add_argument('--classes', type=int, default=10)
  p.add_argument('--target-batch', type=int, default=5000)
  p.add_argument('--image-shape', default='32x32x3')
  p.add_argument('--train-size', type=int, default=6000, help='rows of the simulated split')
  p.add_argument('--stages', default='before,strips,tail,tree',
                 help=f'comma-separated, of {sorted(STAGES)}')
  p.add_argument('--steps', type=int, default=2, help='timed KIP steps per configuration')
  p.add_argument('--step-wall', type=float, default=40.0,
                 help='wall seconds the ideal step is stretched to (sets k per configuration). '
                      'Long enough that the simulation\'s own CPU (the simulated answers\' '
                      'content, computed for real) stays a small part of it: at 10 s it was '
                      'half of a 50-ipc fused step and delayed the calls (BENCHMARKS.md, scale '
                      'round 6); rows where it exceeds 15%% get a note')
  p.add_argument('--time-scale', type=float, default=None, help='a fixed k instead')
  p.add_argument('--t-fwd', type=float, default=sim.GPU_SECONDS_PER_FORWARD_PAIR)
  p.add_argument('--t-vjp', type=float, default=sim.GPU_SECONDS_PER_VJP_PAIR)
  p.add_argument('--coordinator-bandwidth', type=float, default=sim.COORDINATOR_BANDWIDTH)
  p.add_argument('--worker-bandwidth', type=float, default=sim.WORKER_BANDWIDTH)
  p.add_argument('--round-trip', type=float, default=sim.ROUND_TRIP_S)
  p.add_argument('--block', type=int, default=64, help="the 'tiles' plan's block")
  p.add_argument('--in-flight', type=int, default=2, help='blocks in flight per worker')
  p.add_argument('--tasks-per-worker', type=int, default=2)
  p.add_argument('--tree-fanout', type=int, default=8)
  p.add_argument('--group-size', default='auto',
                 help="workers per group request in the 'groups' stage ('auto': ~sqrt(workers))")
  p.add_argument('--solve-flops', type=float, default=5e10, help="the model's coordinator")
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default='bench/results/scale_sim.json')
  return p.parse_args(argv)


class _Timed:
  """A backend wrapper that times kernel() and vjp() and keeps their last arguments."""

  def __init__(self, backend):
    self.backend, self.seconds, self.last = backend, {'kernel': 0.0, 'vjp': 0.0}, {}
    self.marks = {}      # (wall, process CPU, this thread's CPU) when kernel() returned
                         # and vjp() began
    # What kip.kip_gradients asks the backend it drives (absent on main's code).
    self.one_kernel = getattr(backend, 'one_kernel', False)
    self.cotangent_factors = getattr(backend, 'cotangent_factors', False)
    self.fused_step = getattr(backend, 'fused_step', False)
    self.fused = None    # (wall, solve CPU seconds) of the last kip_step that ran fused

  def kip_step(self, *step_args):
    start, own = time.perf_counter(), time.thread_time()
    out = self.backend.kip_step(*step_args)
    if out is not None:   # (wall, the coordinator's arithmetic between its calls)
      self.fused = (time.perf_counter() - start, self.backend.fused_solve_s)
      self.last['kip_step'] = (step_args, out)
    return out

  def kernel(self, x1, x2=None, **names):
    start = time.perf_counter()
    out = self.backend.kernel(x1, x2, **names)
    self.seconds['kernel'] += time.perf_counter() - start
    self.marks['kernel_end'] = (time.perf_counter(), time.process_time(), time.thread_time())
    self.last['kernel'] = (x1, x2, out)
    return out

  def vjp(self, x1, x2, g_ntk=None, g_nngp=None):
    self.marks['vjp_start'] = (time.perf_counter(), time.process_time(), time.thread_time())
    start = time.perf_counter()
    out = self.backend.vjp(x1, x2, g_ntk, g_nngp)
    self.seconds['vjp'] += time.perf_counter() - start
    self.last['vjp'] = (x1, x2, g_ntk, g_nngp, out)
    return out


def _verify(timed: _Timed) -> float:
  """Largest relative error of the last kernel and vjp answers against the surrogate (a
  fused step: of its image gradient against the two-round step on the surrogate kernel)."""
  if 'kip_step' in timed.last:
    (support, targets, y_s, y_t, reg, _), (_, grad) = timed.last['kip_step']
    both = np.concatenate([support, sources.as_array(targets, np.float32)])
    k_s_all = sim.surrogate_kernel(support, both)['ntk'].astype(np.float64)
    _, cotangent = kip.krr_between_rounds(k_s_all, y_s, y_t, reg, factored=False)
    want = sim.surrogate_vjp(support, both, cotangent.astype(np.float32))
    return float(np.abs(grad - want).max() / max(np.abs(want).max(), 1e-30))
  x1, x2, out = timed.last['kernel']
  full = sources.as_array(x2, np.float32)
  want = sim.surrogate_kernel(x1, full)['ntk']
  errors = [np.abs(out['ntk'] - want).max() / np.abs(want).max()]
  x1, x2, g_ntk, g_nngp, grad = timed.last['vjp']
  g_ntk, g_nngp = (getattr(g, 'dense', lambda g=g: g)() for g in (g_ntk, g_nngp))
  want = sim.surrogate_vjp(x1, sources.as_array(x2, np.float32), g_ntk, g_nngp)
  errors.append(np.abs(grad - want).max() / max(np.abs(want).max(), 1e-30))
  return float(max(errors))


def _cpu_parts(fleet) -> tuple[float, float]:
  return time.process_time(), fleet.sim_cpu_s


def _coordinator_cpu(fleet, start: bool) -> float:
  """CPU seconds of the coordinator's threads (this one, its slot and calling threads:
  `ntkdd-worker*`), less what the simulated handles spent on them. This thread's clock is
  read last at the `start` of a step and first at its end, so reading the others (ms for
  hundreds of threads) is not counted."""
  own = 0.0 if start else time.thread_time()
  total = 0.0
  for thread in threading.enumerate():
    if thread.name.startswith('ntkdd-worker'):
      try:
        total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
      except (OSError, ProcessLookupError, TypeError):   # it ended meanwhile
        pass
  own = time.thread_time() if start else own
  return own + total - getattr(fleet, 'caller_sim_cpu_s', fleet.sim_cpu_s)


class _ReplayedCpu:
  """The overlapped step's exchange thread computes alpha and the inverse of K_ss (and, with
  the early K_ss vjp, beta and K_ss's cotangent) during the round, off the calling thread: real (unscaled) CPU that the scaled fleet would not see.
  While active, each of those computations is followed by a sleep of (k - 1) times its CPU
  seconds, so it takes its unscaled time in the simulation's virtual time too (and delays
  alpha's sending, or the round's end, where it would). And the workers' waits for announced
  cache entries (kernel_worker.PEER_WAIT_S, real seconds) are stretched by k: the overlapped
  step's sum asks the leaders for their sums a whole round (up to ~40 s here) early."""

  def __init__(self, k: float):
    self.k, self._init = k, overlap_exchange.OverlapExchange.__init__
    self._peer_wait_s = kernel_worker.PEER_WAIT_S

  def _replayed(self, fn):
    def run(*args):
      start = time.thread_time()
      out = fn(*args)
      time.sleep((self.k - 1) * (time.thread_time() - start))
      return out
    return run

  def __enter__(self):
    init, replayed = self._init, self._replayed

    def patched(exchange, *args, **kwargs):
      init(exchange, *args, **kwargs)
      exchange.solve, exchange.invert = replayed(exchange.solve), replayed(exchange.invert)
      if getattr(exchange, 'early', None) is not None:   # beta, K_ss's cotangent (not its vjp)
        exchange.early = (replayed(exchange.early[0]), exchange.early[1])
    overlap_exchange.OverlapExchange.__init__ = patched
    kernel_worker.PEER_WAIT_S = self._peer_wait_s * max(1.0, self.k)
    return self

  def __exit__(self, *exc):
    overlap_exchange.OverlapExchange.__init__ = self._init
    kernel_worker.PEER_WAIT_S = self._peer_wait_s


def run_config(args, stage: str, workers: int, ipc: int, train: np.ndarray, key: str) -> dict:
  plan, broadcast, tail_halvings = STAGES[stage]
  rng = np.random.default_rng(args.seed)
  n_s, n_t = ipc * args.classes, args.target_batch
  pairs = n_s * (n_s + n_t)              # per round: K(support, [support; targets]) and its vjp
  ideal = pairs * (args.t_fwd + args.t_vjp) / workers
  k = args.time_scale or args.step_wall / ideal
  params = sim.SimParams(t_fwd=args.t_fwd, t_vjp=args.t_vjp,
                         coordinator_bandwidth=args.coordinator_bandwidth,
                         worker_bandwidth=args.worker_bandwidth, round_trip_s=args.round_trip,
                         time_scale=k)
  fleet = sim.Fleet(workers, params, datasets={key: train})
  groups_of = group_size(args, stage, workers)
  grouping = {'group_size': groups_of} if groups_of > 1 else {}   # main's code has none
  grouping.update(STAGE_OPTIONS.get(stage, {}))
  backend = distributed_kernels.DistributedKernels(
      fleet.handles, block=args.block, max_in_flight_per_worker=args.in_flight,
      deadline_s=max(600.0, 50 * args.step_wall), grace_s=600.0, poll_s=0.2, plan=plan,
      tasks_per_worker=args.tasks_per_worker, tail_halvings=tail_halvings,
      broadcast=broadcast, tree_fanout=args.tree_fanout, **grouping)
  try:
    while backend.status()['alive_workers'] < workers or any(
        w['device'] is None for w in backend.status()['workers']):
      time.sleep(0.05)       # every worker pinged once
    # Idle polling CPU of the coordinator's threads (process CPU per wall second).
    wall, (cpu, sim_cpu) = time.perf_counter(), _cpu_parts(fleet)
    time.sleep(1.0)
    idle_rate = ((time.process_time() - cpu) - (fleet.sim_cpu_s - sim_cpu)) / (
        time.perf_counter() - wall)
    h, w, c = (int(v) for v in args.image_shape.split('x'))
    support = rng.standard_normal((n_s, h, w, c)).astype(np.float32)
    labels = np.eye(args.classes, dtype=np.float32)[np.arange(n_s) % args.classes] - 0.1
    steps, error = [], None
    for step in range(args.steps):
      support = support + 0.01 * rng.standard_normal(support.shape).astype(np.float32)
      rows = rng.choice(len(train), n_t, replace=False)
      targets = sources.DatasetRows(train[rows], key, rows)
      target_ids = rows % args.classes
      timed = _Timed(backend)
      before = backend.status()
      device0, link0 = fleet.device_seconds(), (fleet.coordinator_in.bytes,
                                                 fleet.coordinator_out.bytes)
      wall, (cpu, sim_cpu) = time.perf_counter(), _cpu_parts(fleet)
      threads_cpu = _coordinator_cpu(fleet, start=True)
      with _ReplayedCpu(k):
        kip.kip_gradients(timed, support, labels, targets,
                          np.eye(args.classes, dtype=np.float32)[target_ids] - 0.1, target_ids)
      wall = time.perf_counter() - wall
      cpu, sim_cpu = time.process_time() - cpu, fleet.sim_cpu_s - sim_cpu
      threads_cpu = _coordinator_cpu(fleet, start=False) - threads_cpu
      after = backend.status()
      rounds = timed.seconds['kernel'] + timed.seconds['vjp']
      # Between the rounds the coordinator solves the KRR problem on the calling thread (its
      # slot threads wait): that thread's CPU seconds, not its wall time, which the shared
      # machine stretches. solve_process_s is the earlier estimate (process CPU over the gap
      # less the idle pollers' rate); the two agree within a few percent.
      if timed.fused is not None:
        # The fused step solves twice (alpha, beta) between its calls, on this thread: those
        # CPU seconds count unscaled (as the two-round step's KRR step between its rounds),
        # the rest of its wall is the workers' scaled time.
        fused_wall, solve = timed.fused
        rounds = fused_wall - solve
        solve_process = solve_wall = solve
      else:
        (gap_wall0, gap_cpu0, gap_own0), (gap_wall1, gap_cpu1, gap_own1) = (
            timed.marks['kernel_end'], timed.marks['vjp_start'])
        solve = gap_own1 - gap_own0
        solve_process = max(0.0, (gap_cpu1 - gap_cpu0) - idle_rate * (gap_wall1 - gap_wall0))
        solve_wall = gap_wall1 - gap_wall0
      step_s = rounds / k + solve
      link_in = fleet.coordinator_in.bytes - link0[0]
      link_out = fleet.coordinator_out.bytes - link0[1]
      process_estimate = max(0.0, cpu - sim_cpu - idle_rate * wall)
      steps.append({
          'step_s': step_s, 'rounds_s': rounds / k, 'solve_s': solve, 'solve_wall_s': solve_wall,
          'solve_process_s': solve_process,
          'coordinator_cpu_s': threads_cpu, 'coordinator_cpu_process_s': process_estimate,
          'coordinator_cpu_raw_s': cpu - sim_cpu,
          'sim_cpu_s': sim_cpu, 'wall_s': wall,
          'bytes_per_step': (after['bytes_sent'] - before['bytes_sent']
                             + after['bytes_received'] - before['bytes_received']),
          'link_s': max(link_in, link_out) / args.coordinator_bandwidth,
          'blocks': after['blocks_done'] - before['blocks_done'],
          'requests': (after.get('requests_done', after['blocks_done'])
                       - before.get('requests_done', before['blocks_done'])),
          'device_s': fleet.device_seconds() - device0,
          'cache_sends': after['cache_sends'] - before['cache_sends'],
          'tree_fetches': after['tree_fetches'] - before['tree_fetches']})
      if step == 0:
        error = _verify(timed)
        if error > 1e-3:
          raise AssertionError(f'{stage} {workers}w {ipc}ipc: the coordinator\'s result is off '
                               f'the surrogate by {error:.2g}')
  finally:
    backend.close()
  mean = {key_: float(np.mean([s[key_] for s in steps])) for key_ in steps[0]}
  step_s = mean['step_s']
  result = {'stage': stage, 'plan': plan, 'broadcast': broadcast, 'tail_halvings': tail_halvings,
            'group_size': groups_of,
            'workers': workers, 'ipc': ipc, 'time_scale': k, 'ideal_step_s': ideal,
            'step_s': step_s, 'step_s_each': [s['step_s'] for s in steps],
            'efficiency': ideal / step_s, 'device_util': mean['device_s'] / (workers * step_s),
            'max_rel_error': error, 'idle_cpu_per_s': idle_rate, **{
                k_: mean[k_] for k_ in ('bytes_per_step', 'coordinator_cpu_s',
                                        'coordinator_cpu_process_s',
                                        'coordinator_cpu_raw_s', 'sim_cpu_s', 'solve_s',
                                        'solve_wall_s', 'solve_process_s',
                                        'link_s', 'blocks', 'requests', 'cache_sends',
                                        'tree_fetches',
                                        'rounds_s', 'wall_s')}}
  # The simulated workers compute their answers' content for real, on this machine's CPU: where
  # that fills much of a step's wall, later calls book their virtual times late (round 5's
  # fused row at 50 ipc, 256 workers: 64% at --step-wall 10, 75% at 40; BENCHMARKS.md round 6).
  result['sim_cpu_fraction'] = mean['sim_cpu_s'] / mean['wall_s']
  result['limit'] = _limit(result)
  return result


SIM_CPU_WARN = 0.15   # the simulation's CPU share of a step's wall above which rows are suspect


def _limit(r: dict) -> str:
  if r['coordinator_cpu_s'] > r['step_s']:
    return 'coordinator cpu'
  if r['efficiency'] >= 0.9:
    return 'compute'
  loss = r['step_s'] - r['ideal_step_s']
  parts = {'coordinator link': r['link_s'], 'solve': r['solve_s']}
  parts['tail+latency'] = loss - max(parts.values())
  return max(parts, key=parts.get)


def model_row(args, stage: str, workers: int, ipc: int) -> dict:
  """bench/scaling_model.py's prediction for the stage's design, on the same inputs."""
  plan, broadcast, tail_halvings = STAGES[stage]
  h, w, c = (int(v) for v in args.image_shape.split('x'))
  n_s = ipc * args.classes
  m = scaling_model.step_model(workers, n_s, args.target_batch, h * w * c * 4, args.t_fwd,
                               args.t_vjp, args.block, args.coordinator_bandwidth,
                               args.round_trip, args.solve_flops, 'indices', plan, broadcast,
                               args.worker_bandwidth, args.tree_fanout, args.tasks_per_worker,
                               tail_halvings, args.classes,
                               # (no groups, e.g. at 8 workers: the two-round step runs)
                               step=('overlap' if stage == 'overlap'
                                     and group_size(args, stage, workers) > 1 else 'two-round'))
  ideal = n_s * (n_s + args.target_batch) * (args.t_fwd + args.t_vjp) / workers
  m['efficiency'] = ideal / m['step_s']
  return m


def main(argv=None) -> int:
  args = parse_args(argv)
  stages = args.stages.split(',')
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise SystemExit(f'Unknown --stages {unknown}; choose from {sorted(STAGES)}.')
  h, w, c = (int(v) for v in args.image_shape.split('x'))
  train = np.random.default_rng(args.seed + 1).standard_normal(
      (args.train_size, h, w, c)).astype(np.float32)
  key = 'train:' + sources.fingerprint(train[:64])
  rows = []
  print(f'| stage | ipc | workers | k | step s | ideal s | efficiency | device % | MB/step | '
        f'coord CPU s | solve s | link s | blocks | requests | limit | model step s | model eff |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for ipc in (int(v) for v in args.ipc.split(',')):
    for workers in (int(v) for v in args.workers.split(',')):
      for stage in stages:
        m = model_row(args, stage, workers, ipc)
        r = run_config(args, stage, workers, ipc, train, key)
        r['model'] = {k_: m[k_] for k_ in ('step_s', 'efficiency', 'compute_s', 'straggler_s',
                                            'broadcast_s', 'transfer_s', 'solve_s',
                                            'bytes_per_step')}
        rows.append(r)
        print(f"| {stage} | {ipc} | {workers} | {r['time_scale']:.3g} | {r['step_s']:.3g} | "
              f"{r['ideal_step_s']:.3g} | {100 * r['efficiency']:.0f}% | "
              f"{100 * r['device_util']:.0f}% | {r['bytes_per_step'] / 1e6:.1f} | "
              f"{r['coordinator_cpu_s']:.3g} | {r['solve_s']:.3g} | {r['link_s']:.3g} | "
              f"{r['blocks']:.0f} | {r['requests']:.0f} | {r['limit']} | {m['step_s']:.3g} | "
              f"{100 * m['efficiency']:.0f}% |", flush=True)
  for r in rows:
    if r['sim_cpu_fraction'] > SIM_CPU_WARN:
      print(f"Note: {r['stage']}, {r['ipc']} ipc, {r['workers']} workers: the simulation's own "
            f"CPU was {100 * r['sim_cpu_fraction']:.0f}% of the step's wall, so its calls booked "
            f"their virtual times late and the step reads slower than modelled; rerun with a "
            f"larger --step-wall (this one: {args.step_wall:g} s).")
  print('\nSim against the model (same inputs and design; model = bench/scaling_model.py):')
  for r in rows:
    gap = r['model']['step_s'] / r['step_s'] - 1
    flag = '  <-- differ by more than 10%' if abs(gap) > 0.1 else ''
    print(f"  {r['stage']}, {r['ipc']} ipc, {r['workers']} workers: sim {r['step_s']:.3g} s, "
          f"model {r['model']['step_s']:.3g} s ({100 * gap:+.0f}%){flag}")
  Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  Path(args.json).write_text(json.dumps({
      'args': vars(args), 'host': platform.node(), 'cpus': os.cpu_count(),
      'load_average': os.getloadavg(), 'rows': rows}, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
