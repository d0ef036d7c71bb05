"""bench/krr_step.py: the timed KRR step is the one KIP runs (same factors as the dense path)."""
import json

import numpy as np

from conftest import load_bench


def test_krr_step_bench_times_a_real_kip_krr_step(tmp_path):
  from ntkdd.common import krr
  bench = load_bench('krr_step')
  p = bench.problem(12, 40, 3, np.random.default_rng(0))
  n_s = 12
  k_ss = 0.5 * (p['k_s_all'][:, :n_s] + p['k_s_all'][:, :n_s].T)
  g = krr.loss_and_gradients(k_ss, p['k_s_all'][:, n_s:].T, p['y_s'], p['y_t'], 1e-6)
  factors = krr.kip_cotangent_factors(g, 1e-6)
  dense = np.concatenate([g.d_k_ss + g.d_k_ss.T, g.d_k_ts.T], axis=1)
  np.testing.assert_allclose(factors.dense(), dense, rtol=1e-9, atol=1e-12)
  assert np.all(np.linalg.eigvalsh(k_ss) > 0)       # the problem's K_ss is a kernel
  out = tmp_path / 'krr_step.json'
  report = bench.main(['--support', '12,20', '--target-batch', '40', '--classes', '3',
                       '--reps', '2', '--json', str(out)])
  saved = json.loads(out.read_text())
  assert [r['support'] for r in saved['rows']] == [12, 20] == [r['support'] for r in report['rows']]
  assert all(r['step']['min_s'] > 0 and r['step']['median_s'] >= r['step']['min_s']
             for r in saved['rows'])
