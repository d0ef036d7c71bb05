"""bench/layer_profile.py: its prefixes are the kernel's own layers, the last one the whole kernel."""
import json

import numpy as np

from conftest import load_bench


def test_layer_profile_times_the_kernels_own_cross_pass(tmp_path):
  from ntkdd.common import architectures, kernels
  bench = load_bench('layer_profile')
  names, functions, (x1, x2) = bench.prefix_functions((8, 8, 1), 0, 0)
  assert names == ['Conv', 'Relu', 'Flatten', 'Dense']
  ntk, nngp = kernels.kernel_fn(architectures.Architecture(name='convnet', depth=0))(x1, x2)
  np.testing.assert_allclose(float(functions[-1](x1)), float(ntk.sum() + nngp.sum()), rtol=1e-5)
  out = tmp_path / 'profile.json'
  report = bench.main(['--size', '8x8x1', '--depth', '0', '--rounds', '1', '--json', str(out)])
  saved = json.loads(out.read_text())
  assert [r['layer'] for r in saved['rows']] == names == [r['layer'] for r in report['rows']]
  assert all(r['forward_ms'] > 0 and r['gradient_ms'] > 0 for r in saved['rows'])
