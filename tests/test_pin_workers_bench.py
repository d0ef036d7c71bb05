"""bench/pin_workers.py: both modes run the real `ntkdd kernel --launch launchpad` command and
give the same kernel; the pinned workers really are pinned (their ping's core, in the log)."""
import json

import pytest

from conftest import load_bench

pytestmark = pytest.mark.lp


def test_pin_workers_bench_runs_both_modes(tmp_path):
  bench = load_bench('pin_workers')
  out = tmp_path / 'pin.json'
  report = bench.main(['--n1', '2', '--n2', '6', '--depth', '1', '--size', '8', '--block', '4',
                       '--rounds', '1', '--timeout-s', '600', '--json', str(out)])
  saved = json.loads(out.read_text())
  assert [r['pinned'] for r in saved['runs']] == [False, True]
  assert saved['same_kernel'] and report['same_kernel']
  assert all(r['wall_s'] > 0 for r in saved['runs'])
  unpinned, pinned = saved['runs']
  assert unpinned['worker_cores'] == []
  assert len(pinned['worker_cores']) == 2   # each worker's ping reported its core
  assert len(set(pinned['worker_cores'])) == min(2, len(saved['affinity']))
