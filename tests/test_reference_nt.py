"""Our kernels against neural-tangents' stax, value by value (runs in .venv-lp)."""
import numpy as np
import pytest

pytestmark = pytest.mark.lp

nt_stax = pytest.importorskip('neural_tangents.stax', reason='neural-tangents lives in .venv-lp')
import jax  # noqa: E402

from ntkdd.common import architectures, kernels  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def float64():
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


def _nt_kernel_fn(arch):
  w, b = arch.w_std, arch.b_std
  if arch.name == 'convnet':
    layers = [nt_stax.Conv(1, (3, 3), (1, 1), 'SAME', W_std=w, b_std=b), nt_stax.Relu()]
    for _ in range(arch.depth):
      layers += [nt_stax.Conv(1, (3, 3), (1, 1), 'SAME', W_std=w, b_std=b), nt_stax.Relu(),
                 nt_stax.AvgPool((2, 2), (2, 2))]
    layers += [nt_stax.Flatten(), nt_stax.Dense(1, w, b)]
  else:
    layers = [nt_stax.Flatten()]
    for _ in range(arch.depth):
      layers += [nt_stax.Dense(1, w, b), nt_stax.Relu()]
    layers += [nt_stax.Dense(1, w, b)]
  return nt_stax.serial(*layers)[2]


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
@pytest.mark.parametrize('dtype,tol', [('float64', 1e-6), ('float32', 1e-4)])
def test_kernel_values_match_neural_tangents(name, depth, shape, n1, n2, dtype, tol):
  rng = np.random.default_rng(abs(hash((name, depth, shape))) % 2**32)
  x1, x2 = rng.normal(size=(n1,) + shape), rng.normal(size=(n2,) + shape)
  arch = architectures.Architecture(name, depth=depth)
  ref = _nt_kernel_fn(arch)(x1, x2, ('ntk', 'nngp'))
  ours = kernels.compute_kernel(arch, x1, x2, tile=2, dtype=dtype)
  assert ours['ntk'].dtype == np.dtype(dtype)
  assert _rel(ours['ntk'], np.asarray(ref.ntk)) <= tol
  assert _rel(ours['nngp'], np.asarray(ref.nngp)) <= tol


@pytest.mark.parametrize('name,depth,shape,n1,n2', CASES[:4] + CASES[5:])
@pytest.mark.parametrize('dtype,tol', [('float64', 1e-6), ('float32', 1e-4)])
def test_vjp_matches_neural_tangents(name, depth, shape, n1, n2, dtype, tol):
  rng = np.random.default_rng(7)
  x1, x2 = rng.normal(size=(n1,) + shape), rng.normal(size=(n2,) + shape)
  g_ntk, g_nngp = rng.normal(size=(n1, n2)), rng.normal(size=(n1, n2))
  arch = architectures.Architecture(name, depth=depth)
  nt_fn = _nt_kernel_fn(arch)

  def inner(a):
    k = nt_fn(a, x2, ('ntk', 'nngp'))
    return (k.ntk * g_ntk).sum() + (k.nngp * g_nngp).sum()

  ref = np.asarray(jax.grad(inner)(x1))
  ours = kernels.kernel_vjp(arch, x1, x2, g_ntk, g_nngp, tile=2, dtype=dtype)
  assert _rel(ours, ref) <= tol
