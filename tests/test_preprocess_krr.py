"""Tests of bench/preprocess_krr.py's resumable kernel cache."""
import os

import numpy as np

from conftest import load_bench


class CountingKernels:
  """A stand-in backend: a linear kernel that counts its calls."""

  def __init__(self):
    self.calls = 0

  def kernel(self, x1, x2=None):
    self.calls += 1
    x2 = x1 if x2 is None else x2
    gram = x1.reshape(len(x1), -1) @ x2.reshape(len(x2), -1).T
    return {'ntk': 2 * gram, 'nngp': gram}


def test_kernel_cache_reuses_answers_and_resumes_a_killed_run(tmp_path):
  bench = load_bench('preprocess_krr')
  rng = np.random.default_rng(0)
  support, test = rng.normal(size=(4, 3, 3, 1)), rng.normal(size=(6, 3, 3, 1))
  inner = CountingKernels()
  cached = bench.DiskCachedKernels(inner, str(tmp_path), 'convnet depth 3 float32 cifar10')
  first = cached.kernel(support, test)
  k_ss = cached.kernel(support)
  assert inner.calls == 2 and len(os.listdir(tmp_path)) == 2
  # A new process (a resumed run) with the same directory computes nothing again.
  again_inner = CountingKernels()
  again = bench.DiskCachedKernels(again_inner, str(tmp_path), 'convnet depth 3 float32 cifar10')
  np.testing.assert_array_equal(again.kernel(support, test)['ntk'], first['ntk'])
  np.testing.assert_array_equal(again.kernel(support)['nngp'], k_ss['nngp'])
  assert again_inner.calls == 0 and again.hits == 2
  # Other images, another column block or other settings are other questions.
  again.kernel(support, test[:3])
  again.kernel(support + 1e-7, test)
  other = bench.DiskCachedKernels(again_inner, str(tmp_path), 'convnet depth 2 float32 cifar10')
  other.kernel(support, test)
  assert again_inner.calls == 3
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_chunk_cache_and_worker_flags():
  bench = load_bench('preprocess_krr')
  args = bench.parse_args(['--kernel-cache', '/tmp/x', '--chunk', '250', '--workers', '2'])
  assert args.kernel_cache == '/tmp/x' and args.chunk == 250 and args.workers == 2
  defaults = bench.parse_args([])
  assert defaults.kernel_cache is None and defaults.workers == 0
