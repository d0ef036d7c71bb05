"""Our kernels against neural-tangents' stax, value by value (runs in .venv-lp)."""
import sys
import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.lp

if sys.version_info < (3, 11):   # .venv-lp: neural-tangents must import, a failure is an error
  import nt_reference
else:                            # .venv collects this file only to deselect it (-m 'not lp')
  nt_reference = pytest.importorskip('nt_reference', reason='neural-tangents lives in .venv-lp')
import jax  # noqa: E402

from ntkdd.common import architectures, kernels  # noqa: E402

# max |ours - reference| / max |reference|: measured at most 1.0e-15 in float64 and 2.9e-7 in
# float32 (jax 0.4.23), so 1e-13 fails an engine that loses float64 anywhere.
TOLERANCES = [('float64', 1e-13), ('float32', 1e-4)]


@pytest.fixture(autouse=True, scope='module')
def float64():
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


def _nt_kernel_fn(arch):
  return nt_reference.nt_kernel_fn(arch.name, arch.depth, arch.w_std, arch.b_std)


def _rng(*case):
  """A generator seeded by the case itself, the same in every process (unlike hash())."""
  return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


CASES = [
    ('convnet', 3, (8, 8, 3), 3, 5),
    ('convnet', 3, (16, 16, 1), 5, 2),
    ('convnet', 1, (7, 9, 2), 1, 3),
    ('convnet', 2, (20, 18, 1), 2, 3),    # displacement bands in both passes
    ('fc', 1, (8, 8, 3), 4, 3),
    ('fc', 4, (16, 16, 1), 3, 5),
]


@pytest.mark.parametrize('name,depth,shape,n1,n2', CASES)
@pytest.mark.parametrize('dtype,tol', TOLERANCES)
def test_kernel_values_match_neural_tangents(name, depth, shape, n1, n2, dtype, tol):
  rng = _rng(name, depth, shape)
  x1, x2 = rng.normal(size=(n1,) + shape), rng.normal(size=(n2,) + shape)
  arch = architectures.Architecture(name, depth=depth)
  ref = _nt_kernel_fn(arch)(x1, x2, ('ntk', 'nngp'))
  ours = kernels.compute_kernel(arch, x1, x2, tile=2, dtype=dtype)
  assert ours['ntk'].dtype == np.dtype(dtype)
  assert _rel(ours['ntk'], np.asarray(ref.ntk)) <= tol
  assert _rel(ours['nngp'], np.asarray(ref.nngp)) <= tol


@pytest.mark.parametrize('name,depth,shape,n1,n2', CASES[:4] + CASES[5:])
@pytest.mark.parametrize('dtype,tol', TOLERANCES)
def test_vjp_matches_neural_tangents(name, depth, shape, n1, n2, dtype, tol):
  rng = _rng(name, depth, shape, 'vjp')
  x1, x2 = rng.normal(size=(n1,) + shape), rng.normal(size=(n2,) + shape)
  g_ntk, g_nngp = rng.normal(size=(n1, n2)), rng.normal(size=(n1, n2))
  arch = architectures.Architecture(name, depth=depth)
  ref = nt_reference.nt_vjp(_nt_kernel_fn(arch), x1, x2, g_ntk, g_nngp)
  ours = kernels.kernel_vjp(arch, x1, x2, g_ntk, g_nngp, tile=2, dtype=dtype)
  assert ours.dtype == np.dtype(dtype)
  assert _rel(ours, ref) <= tol
