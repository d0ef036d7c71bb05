"""The driver of test_ray's two-node test: runs a distillation on the cluster, kills node B.

Runs inside the test's network namespace, after `ray start` has started node A (the head,
custom resource node_a, temp dir WORK/a) and node B (node_b, WORK/b) on 127.0.0.1. It places
kernel worker 0 on node A and worker 1 on node B, waits for step `--kill-at-step`, SIGKILLs
every process of node B (its raylet, everything under it, and whatever names its temp dir),
waits for the run to finish and writes what the test checks to WORK/report.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
import traceback
from pathlib import Path

import ray

from ntkdd.launch import ray_cluster, ray_launch
from ntkdd.server import distill
from ntkdd.server import run_dir as run_dir_lib


def _processes() -> dict[int, tuple[int, str]]:
  """pid -> (parent pid, command line) of every process this one can see."""
  table = {}
  for entry in Path('/proc').iterdir():
    if not entry.name.isdigit():
      continue
    try:
      ppid = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
      cmdline = (entry / 'cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
    except (OSError, IndexError, ValueError):
      continue
    table[int(entry.name)] = (ppid, cmdline)
  return table


def _with_descendants(roots: set[int], table: dict) -> set[int]:
  found = set(roots)
  grew = True
  while grew:
    grew = False
    for pid, (ppid, _) in table.items():
      if ppid in found and pid not in found:
        found.add(pid)
        grew = True
  return found


def node_processes(temp_dir: str) -> set[int]:
  """Every process of the node whose --temp-dir is `temp_dir`, with their children."""
  table = _processes()
  marker = temp_dir.rstrip('/') + '/'
  roots = {pid for pid, (_, cmd) in table.items() if marker in cmd and pid != os.getpid()}
  return _with_descendants(roots, table)


def _last_step(run_dir: Path) -> int:
  try:
    lines = (run_dir / 'metrics.jsonl').read_text().splitlines()
    return max((json.loads(line)['step'] for line in lines), default=-1)
  except (OSError, ValueError, KeyError):
    return -1


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--work', required=True)
  p.add_argument('--address', required=True)
  p.add_argument('--run-dir', required=True)
  p.add_argument('--kill-at-step', type=int, default=2)
  p.add_argument('--timeout', type=float, default=120)
  args = p.parse_args()
  work, run_dir = Path(args.work), Path(args.run_dir)
  report: dict = {'driver_pid': os.getpid()}
  start = time.monotonic()
  try:
    ray_cluster.connect(args.address)
    nodes = {n['NodeID']: ('a' if 'node_a' in n['Resources'] else 'b')
             for n in ray.nodes() if n['Alive']}
    report['nodes'] = sorted(nodes.values())
    cfg = distill.DistillConfig(**json.loads((work / 'config.json').read_text()))
    run = ray_launch.start_ray(
        cfg, str(run_dir), workers=2, ray_address=args.address, block=8, deadline_s=30,
        startup_timeout_s=90, worker_resources=[{'node_a': 1}, {'node_b': 1}],
        ping_timeout_s=5, coordinator_kwargs={'retry_backoff_s': 0.5, 'max_backoff_s': 2.0})
    try:
      report['worker_nodes'] = [nodes[i] for i in ray_cluster.actor_node_ids(run.workers)]
      report['coordinator_node'] = nodes[ray_cluster.actor_node_ids([run.coordinator])[0]]
      deadline = time.monotonic() + args.timeout
      while _last_step(run_dir) < args.kill_at_step:
        if not run.running() or time.monotonic() > deadline:
          raise RuntimeError(f'The run ended or stalled before step {args.kill_at_step}.')
        time.sleep(0.02)
      worker_pids = {int(k): v for k, v in json.loads(
          (run_dir / run_dir_lib.WORKER_PIDS).read_text())['workers'].items()}
      node_a, node_b = node_processes(str(work / 'a')), node_processes(str(work / 'b'))
      report['worker_pids'] = worker_pids
      report['worker_on_node_a'] = {i: pid in node_a for i, pid in worker_pids.items()}
      report['worker_on_node_b'] = {i: pid in node_b for i, pid in worker_pids.items()}
      for pid in node_b:
        try:
          os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      report['killed'] = sorted(node_b)
      report['killed_at_step'] = _last_step(run_dir)
      report['seconds_to_kill'] = time.monotonic() - start
      # A snapshot once the coordinator has noticed: worker 1 down.
      while time.monotonic() < deadline and run.running():
        snap = run.status()
        if snap['workers'] and not snap['workers'][1]['alive']:
          report['status_after_kill'] = snap
          break
        time.sleep(0.05)
      report['result'] = run.wait(timeout_s=max(1.0, deadline - time.monotonic()))
      report['status_final'] = run.status()
    finally:
      run.stop()
  except BaseException as e:  # the test prints it
    report['error'] = f'{type(e).__name__}: {e}\n{traceback.format_exc()}'
  report['seconds'] = time.monotonic() - start
  (work / 'report.json').write_text(json.dumps(report, indent=1, default=str))


if __name__ == '__main__':
  main()
