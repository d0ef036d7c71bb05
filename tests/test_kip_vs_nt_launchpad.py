"""bench/kip_vs_nt.py's backend ntkdd-launchpad: the same KIP run over pinned Launchpad workers
(in a private network) follows the in-process run's batches and support to float rounding."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import load_bench

pytestmark = pytest.mark.lp


def test_launchpad_backend_follows_the_inprocess_run(tiny_npz, tmp_path):
  bench = load_bench('kip_vs_nt')
  out = tmp_path / 'kip_vs_nt.json'
  common = ['--dataset', tiny_npz, '--data-dir', str(tmp_path), '--cache-dir',
            str(tmp_path / 'cache'), '--depth', '1', '--target-batch', '6', '--steps', '2',
            '--budget-s', '600', '--eval-every', '2', '--ours-workers', '2',
            '--eval-workers', '1', '--runs-dir', str(tmp_path / 'runs')]
  # main() re-runs itself in a private network namespace: run it as a command.
  done = subprocess.run([sys.executable, bench.__file__, *common, '--backends',
                         'ntkdd,ntkdd-launchpad', '--json', str(out)], capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  saved = json.loads(out.read_text())
  assert [r['backend'] for r in saved['runs']] == ['ntkdd', 'ntkdd-launchpad']
  assert saved['checks'] == {'same_initial_support': True, 'same_target_batches': True}
  inproc, lp = (np.load(tmp_path / 'runs' / f'{name}-run.npz')
                for name in ('ntkdd', 'ntkdd-launchpad'))
  assert lp['images'].shape == inproc['images'].shape == (3, 3, 8, 8, 1)   # steps 0-2
  # Adam's normalised steps carry the blocks' float rounding into the images at ~1e-4.
  np.testing.assert_allclose(lp['images'], inproc['images'], rtol=0, atol=1e-3)
  assert [r['steps_done'] for r in saved['runs']] == [2, 2]
  assert all(0 <= p['test_accuracy'] <= 1 for r in saved['runs'] for p in r['curve'])
