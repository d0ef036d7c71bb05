"""One KIP step's timeline in the scale simulation: when group requests arrive, are ready, land.

Runs `scale_sim.run_config` for one stage, worker count and ipc (2 steps, --step-wall 10)
with the fleet's call trace on, and prints for the last step's kernel and vjp rounds (ms
from the round's start, unscaled GPU time): when the leaders held the round's caches, when
the group requests reached their leaders, when the leaders were ready to answer (min /
median / max) and when the answers were in.

  python bench/scale_timeline.py lean 256 10
"""
from __future__ import annotations

import sys
import time

import numpy as np

import scale_sim  # bench/

from ntkdd.common import sources
from ntkdd.workers import simulated_worker as sim


def _traced(fleets: list, marks: list) -> None:
  """Turns on the trace of every Fleet made from now on and times the rounds' calls."""
  fleet_init, kernel, vjp = sim.Fleet.__init__, scale_sim._Timed.kernel, scale_sim._Timed.vjp

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
  scale_sim._Timed.kernel, scale_sim._Timed.vjp = timed('kernel', kernel), timed('vjp', vjp)


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


def main(argv: list[str]) -> int:
  stage, workers, ipc = argv[0], int(argv[1]), int(argv[2])
  fleets, marks = [], []
  _traced(fleets, marks)
  args = scale_sim.parse_args(['--steps', '2', '--step-wall', '10'])
  h, w, c = (int(v) for v in args.image_shape.split('x'))
  train = np.random.default_rng(args.seed + 1).standard_normal(
      (args.train_size, h, w, c)).astype(np.float32)
  key = 'train:' + sources.fingerprint(train[:64])
  result = scale_sim.run_config(args, stage, workers, ipc, train, key)
  k = result['time_scale']
  print(f"{stage}, {ipc} ipc, {workers} workers: efficiency {100 * result['efficiency']:.0f}%, "
        f"step {1e3 * result['step_s']:.1f} ms, KRR step {1e3 * result['solve_s']:.1f} ms")
  for name, start, end in marks[-2:]:
    print(round_line(name, start, end, fleets[0].trace, k))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
