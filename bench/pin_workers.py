"""Owns the --pin-workers benchmark: one `ntkdd kernel` call on N worker processes, pinned or not.

Runs `ntkdd kernel --launch L --workers N` on the same random images (--size x --size x 3;
K(n1, n2), the ConvNet kernel of --depth), alternately with and without `--pin-workers`,
--rounds times, and reports per run the command's wall seconds and the rate its last kernel
progress line gives (pairs over the call's seconds, compilation included: the same in both
modes). The machine should be otherwise quiet; restrict the cores with taskset on this script.

  taskset -c 0,1 .venv-lp/bin/python bench/pin_workers.py --launch launchpad --workers 2
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_throughput import write_json  # noqa: E402  (bench/kernel_throughput.py)

RATE = re.compile(r'kernel: ([\d,]+)/([\d,]+) pairs \(100\.0%\), ([\d,.]+) pairs/s')
PINNED = re.compile(r'pinned to core (\d+)')   # the coordinator's log of each worker's ping


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--launch', choices=('launchpad', 'ray'), default='launchpad')
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--n1', type=int, default=10, help='row images (a 1-ipc support set)')
  parser.add_argument('--n2', type=int, default=4000, help='column images (targets)')
  parser.add_argument('--depth', type=int, default=3)
  parser.add_argument('--size', type=int, default=32, help='image side (size x size x 3)')
  parser.add_argument('--block', type=int, default=256, help='coordinator block side')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--timeout-s', type=float, default=1800)
  parser.add_argument('--json', default=None, help='default bench/results/pin_workers.json')
  return parser.parse_args(argv)


def kernel_command(args: argparse.Namespace, folder: str, pin: bool) -> list[str]:
  command = [sys.executable, '-m', 'ntkdd.launch.cli', '-v', 'kernel', '--arch', 'convnet',
             '--depth', str(args.depth), '--x1', os.path.join(folder, 'x1.npy'),
             '--x2', os.path.join(folder, 'x2.npy'), '--out', os.path.join(folder, 'k.npz'),
             '--launch', args.launch, '--workers', str(args.workers), '--block', str(args.block)]
  if args.launch == 'ray':
    command += ['--ray-address', 'local']
  return command + (['--pin-workers'] if pin else [])


def run_once(args: argparse.Namespace, folder: str, pin: bool) -> dict:
  """One `ntkdd kernel` command: its wall seconds, the last progress rate (None when the call
  was too short to log one), the cores its workers reported and a checksum."""
  start = time.perf_counter()
  done = subprocess.run(kernel_command(args, folder, pin), capture_output=True, text=True,
                        timeout=args.timeout_s)
  wall = time.perf_counter() - start
  if done.returncode != 0:
    raise RuntimeError(f'ntkdd kernel failed ({done.returncode}):\n{done.stderr[-3000:]}')
  rates = RATE.findall(done.stderr)
  with np.load(os.path.join(folder, 'k.npz')) as k:
    checksum = float(np.asarray(k['ntk'], np.float64).sum())
  return {'pinned': pin, 'wall_s': wall,
          'pairs_per_second': float(rates[-1][2].replace(',', '')) if rates else None,
          'worker_cores': sorted(int(c) for c in PINNED.findall(done.stderr)),
          'ntk_sum': checksum}


def main(argv: Optional[list[str]] = None) -> dict:
  args = parse_args(argv)
  rng = np.random.default_rng(0)
  runs = []
  with tempfile.TemporaryDirectory(prefix='ntkdd-pin-') as folder:
    for name, n in (('x1', args.n1), ('x2', args.n2)):
      images = rng.normal(size=(n, args.size, args.size, 3)).astype(np.float32)
      np.save(os.path.join(folder, f'{name}.npy'), images)
    for round_index in range(args.rounds):
      for pin in ((False, True) if round_index % 2 == 0 else (True, False)):
        run = run_once(args, folder, pin)
        run['round'] = round_index
        runs.append(run)
        rate = run['pairs_per_second'] or float('nan')
        print(f"round {round_index} {'pinned  ' if pin else 'unpinned'} wall "
              f"{run['wall_s']:7.1f} s  {rate:7.1f} pairs/s", flush=True)
  print(f'\nK({args.n1}, {args.n2}) at {args.size}x{args.size}x3, depth {args.depth}, '
        f'--launch {args.launch} --workers {args.workers} --block {args.block}; '
        f'affinity {sorted(os.sched_getaffinity(0))}')
  print('| mode | wall s (median) | pairs/s (median, compile included) |')
  print('|---|---:|---:|')
  for pin in (False, True):
    mine = [r for r in runs if r['pinned'] == pin]
    rates = [r['pairs_per_second'] for r in mine if r['pairs_per_second']]
    wall = np.median([r['wall_s'] for r in mine])
    rate = np.median(rates) if rates else float('nan')
    print(f"| {'--pin-workers' if pin else 'unpinned'} | {wall:.1f} | {rate:.1f} |")
  sums = {r['ntk_sum'] for r in runs}
  print(f'NTK sums equal in every run: {len(sums) == 1}')
  report = {'benchmark': 'pin_workers', 'argv': sys.argv, 'config': vars(args),
            'host': platform.node(), 'python': platform.python_version(),
            'affinity': sorted(os.sched_getaffinity(0)), 'runs': runs,
            'same_kernel': len(sums) == 1}
  write_json(report, args.json, 'pin_workers.json')
  return report


if __name__ == '__main__':
  main()
