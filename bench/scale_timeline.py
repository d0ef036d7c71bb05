"""One KIP step's timeline in the scale simulation: when group requests arrive, are ready, land.

Runs `scale_sim.run_config` for one stage, worker count and ipc (2 steps, --step-wall 40: at
50 ipc a shorter wall lets the simulation's own CPU delay its calls, BENCHMARKS.md round 6)
with the fleet's call trace on, and prints for the last step's kernel and vjp rounds (ms
from the round's start, unscaled GPU time): when the leaders held the round's caches, when
the group requests reached their leaders, when the leaders were ready to answer (min /
median / max) and when the answers were in; and, from the leaders' calls to their members,
when each member's first block reached it, the idle time between its blocks, when its last
block was done (median member, and the last member of each group).

  python bench/scale_timeline.py lean 256 10
  python bench/scale_timeline.py fused 256 10   # its phases: K_ss, fused round + sum, K_ss vjp
  python bench/scale_timeline.py overlap 256 10   # fused round (K_ss gathered, alpha sent
                                                  # during it) + sum, K_ss vjp
"""
from __future__ import annotations

import sys
import time

import scale_sim  # bench/ (first: it sets one BLAS thread before numpy loads)

import numpy as np

from ntkdd.common import sources
from ntkdd.server import distributed_kernels, overlap_exchange
from ntkdd.workers import simulated_worker as sim

WALL = '40'   # --step-wall (seconds of wall per ideal step)


def _traced(fleets: list, marks: list, member_calls: list, fused: bool = False) -> None:
  """Turns on the trace of every Fleet made from now on, times the rounds' calls (`fused`:
  the fused step's phases) and logs the leaders' calls to members: (member, leader, method,
  arrived, ready, returned)."""
  fleet_init, kernel, vjp = sim.Fleet.__init__, scale_sim._Timed.kernel, scale_sim._Timed.vjp
  member_call = sim._PeerHandle._call

  def logged(self, method, *args):
    out = member_call(self, method, *args)
    clock = self.source.clock   # this thread's view of the member's call
    member_calls.append((self.source.worker_id, self.dest.worker_id, method, clock.arrived,
                         clock.ready, time.monotonic()))
    return out

  def init(self, *args, **kwargs):
    fleet_init(self, *args, **kwargs)
    self.trace = []
    fleets.append(self)

  def timed(name: str, call):
    def wrapped(self, *args, **kwargs):
      start = time.monotonic()
      out = call(self, *args, **kwargs)
      marks.append((name, start, time.monotonic()))
      return out
    return wrapped

  sim.Fleet.__init__ = init
  sim._PeerHandle._call = logged
  scale_sim._Timed.kernel, scale_sim._Timed.vjp = timed('kernel', kernel), timed('vjp', vjp)
  if fused:   # the fused step calls the backend's own kernel() and vjp(): its four phases
    backend = distributed_kernels.DistributedKernels
    for name, method in (('K_ss', 'kernel'), ('fused+sum', '_fused_targets'),
                         ('sum', '_sum_kept'), ('K_ss vjp', 'vjp')):
      setattr(backend, method, timed(name, getattr(backend, method)))
    exchange = overlap_exchange.OverlapExchange   # the overlapped step's per-group calls
    for name, method in (('gather', '_gather'), ('alpha sent', '_send_alpha'),
                         ('K r summed', '_sum_k_r')):
      setattr(exchange, method, timed(name, getattr(exchange, method)))
    # The early K_ss vjp (sent mid-round): its own line, from beta to its last answer.
    exchange._early_kss_vjp = timed('early K_ss vjp', exchange._early_kss_vjp)


def round_line(name: str, start: float, end: float, trace: list, k: float) -> str:
  """One round's summary from the trace's (worker, method, arrived, ready, done) calls."""
  calls = [t for t in trace if t[2] >= start - 1e-3 and t[4] <= end + 1e-3]
  groups = [t for t in calls if t[1] == 'group_blocks']
  caches = [t[3] for t in calls if t[1] in ('set_images', 'fetch_images')]
  ms = lambda value: (value - start) / k * 1e3   # noqa: E731 (unscaled ms into the round)
  arrived, ready, done = (sorted(ms(t[i]) for t in groups) for i in (2, 3, 4))
  cached = f'{ms(min(caches)):.1f}-{ms(max(caches)):.1f}' if caches else '-'
  if not groups:
    return f'  {name} round {ms(end):.1f} ms: no group requests'
  return (f'  {name} round {ms(end):.1f} ms: {len(groups)} group requests; leaders\' caches '
          f'{cached} ms; requests arrive {arrived[0]:.1f}-{arrived[-1]:.1f}; leaders ready '
          f'{ready[0]:.1f} / {np.median(ready):.1f} / {ready[-1]:.1f}; answers in '
          f'{done[0]:.1f} / {np.median(done):.1f} / {done[-1]:.1f}')


def members_line(start: float, end: float, member_calls: list, k: float) -> str:
  """The members' blocks in one round: first arrival, idle gaps, last block done."""
  ms = lambda value: (value - start) / k * 1e3   # noqa: E731
  blocks = [c for c in member_calls if c[2] in ('kernel_block', 'vjp_block', 'kip_block')
            and c[3] >= start - 1e-3 and c[5] <= end + 1e-3]
  by_member, by_leader = {}, {}
  for call in blocks:
    by_member.setdefault(call[0], []).append(call)
    by_leader.setdefault(call[1], []).append(call)
  if not by_member:
    return '    members: none'
  first = [ms(min(c[3] for c in calls)) for calls in by_member.values()]
  last = [ms(max(c[4] for c in calls)) for calls in by_member.values()]
  group_last = [ms(max(c[4] for c in calls)) for calls in by_leader.values()]
  group_back = [ms(max(c[5] for c in calls)) for calls in by_leader.values()]
  idle = []
  for calls in by_member.values():   # from one block's end to the next one's arrival
    calls = sorted(calls, key=lambda c: c[3])
    free, gaps = calls[0][4], 0.0
    for call in calls[1:]:
      gaps += max(0.0, ms(call[3]) - ms(free))
      free = max(free, call[4])
    idle.append(gaps)
  return (f'    members: {np.median([len(c) for c in by_member.values()]):.0f} blocks each; '
          f'first block arrives {np.median(first):.1f} ms (median); idle between blocks '
          f'{np.mean(idle):.2f} ms (mean); last block done {np.median(last):.1f} (median '
          f'member), {np.median(group_last):.1f} (median over groups of their last member); '
          f'last answer back at its leader {np.median(group_back):.1f} / {np.max(group_back):.1f}'
          f' (median / max over groups)')


def main(argv: list[str]) -> int:
  stage, workers, ipc = argv[0], int(argv[1]), int(argv[2])
  fleets, marks, member_calls = [], [], []
  _traced(fleets, marks, member_calls, fused=stage in ('fused', 'overlap'))
  args = scale_sim.parse_args(['--steps', '2', '--step-wall', WALL])
  h, w, c = (int(v) for v in args.image_shape.split('x'))
  train = np.random.default_rng(args.seed + 1).standard_normal(
      (args.train_size, h, w, c)).astype(np.float32)
  key = 'train:' + sources.fingerprint(train[:64])
  result = scale_sim.run_config(args, stage, workers, ipc, train, key)
  k = result['time_scale']
  print(f"{stage}, {ipc} ipc, {workers} workers: efficiency {100 * result['efficiency']:.0f}%, "
        f"step {1e3 * result['step_s']:.1f} ms, KRR step {1e3 * result['solve_s']:.1f} ms")
  # The last step's phases: from the last call of its first phase on.
  first = {'fused': 'K_ss', 'overlap': 'fused+sum'}.get(stage, 'kernel')
  step_start = max(start for name, start, _ in marks if name == first)
  last = [mark for mark in marks if mark[1] >= step_start]
  ms = lambda value: (value - step_start) / k * 1e3   # noqa: E731
  for name in ('gather', 'alpha sent', 'K r summed'):   # per group: when each call ended
    ends = sorted(ms(end) for mark, _, end in last if mark == name)
    if ends:
      print(f'  {name}: {len(ends)} calls, done {ends[0]:.1f} / {np.median(ends):.1f} / '
            f'{ends[-1]:.1f} ms into the step')
  held = [ms(at) for worker in fleets[0].workers for name, (_, at) in
          worker.cache_ready_at.items() if name == distributed_kernels.ROWS and at >= step_start]
  if held:   # the support images (the rows cache): when each worker had them all
    print(f'  support held by {len(held)} workers: {np.min(held):.1f} / '
          f'{np.percentile(held, 10):.1f} / {np.median(held):.1f} / {np.percentile(held, 90):.1f}'
          f' / {np.max(held):.1f} ms into the step (min / 10% / median / 90% / max)')
  last = [mark for mark in last if mark[0] not in ('gather', 'alpha sent', 'K r summed')]
  for name, start, end in sorted(last, key=lambda mark: mark[1]):
    print(f'  {name} starts {(start - step_start) / k * 1e3:.1f} ms into the step')
    print(round_line(name, start, end, fleets[0].trace, k))
    print(members_line(start, end, member_calls, k))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
