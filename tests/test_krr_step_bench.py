"""bench/krr_step.py: the timed KRR step is the one KIP runs (same factors as the dense path)."""
import json

import numpy as np

from conftest import load_bench


def test_krr_step_bench_times_a_real_kip_krr_step(tmp_path):
  from ntkdd.common import kip
  bench = load_bench('krr_step')
  p = bench.problem(12, 40, 3, np.random.default_rng(0))
  _, factors = kip.krr_between_rounds(p['k_s_all'], p['y_s'], p['y_t'], 1e-6, True)
  _, dense = kip.krr_between_rounds(p['k_s_all'], p['y_s'], p['y_t'], 1e-6, False)
  np.testing.assert_allclose(factors.dense(), dense, rtol=1e-9, atol=1e-12)
  assert np.all(np.linalg.eigvalsh(p['k_s_all'][:, :12]) > 0)   # the problem's K_ss is a kernel
  out = tmp_path / 'krr_step.json'
  report = bench.main(['--support', '12,20', '--target-batch', '40', '--classes', '3',
                       '--reps', '2', '--json', str(out)])
  saved = json.loads(out.read_text())
  assert [r['support'] for r in saved['rows']] == [12, 20] == [r['support'] for r in report['rows']]
  assert all(r['step']['min_s'] > 0 and r['step']['median_s'] >= r['step']['min_s']
             for r in saved['rows'])
