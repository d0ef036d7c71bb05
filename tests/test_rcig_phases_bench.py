"""bench/rcig_phases.py: it runs every phase of the structured RCIG step, and its phases make
the step that `rcig.structured_step_gradients` takes (the same meta-gradient)."""
import jax
import numpy as np

from conftest import load_bench

PHASES = ['linearise', 'inner', 'outer', 'hinv', 'mixed', 'pool8']


def test_rcig_phases_bench_times_the_structured_step(tiny_npz):
  from ntkdd.common import rcig
  bench = load_bench('rcig_phases')
  out = bench.run(['--dataset', tiny_npz, '--data-dir', '.', '--reps', '2', '--width', '8',
                   '--depth', '1', '--target-batch', '12', '--inner-steps', '2',
                   '--hinv-steps', '2'])
  assert len(out['seconds']) == 2
  for seconds in out['seconds']:
    assert list(seconds) == PHASES and all(v >= 0 for v in seconds.values())
  meta, _ = rcig.structured_step_gradients(*out['step_args'])
  leaves, timed = jax.tree_util.tree_leaves(meta), jax.tree_util.tree_leaves(out['meta'])
  assert len(leaves) == len(timed) > 0
  for a, b in zip(leaves, timed):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
