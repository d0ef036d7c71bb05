"""Kernel engine: blocked evaluation, vjp, symmetry and an independent closed form."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from ntkdd.common import architectures, kernels

CONVNET = architectures.Architecture('convnet', depth=2)
FC = architectures.Architecture('fc', depth=2)


def _images(n, shape=(8, 8, 2), seed=0):
  return np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)


def test_blocked_equals_direct_with_ragged_tiles():
  x1, x2 = _images(5), _images(7, seed=1)
  ntk, nngp = kernels.kernel_fn(CONVNET)(x1, x2)
  blocked = kernels.compute_kernel(CONVNET, x1, x2, tile=3)
  np.testing.assert_allclose(blocked['ntk'], ntk, rtol=1e-5)
  np.testing.assert_allclose(blocked['nngp'], nngp, rtol=1e-5)


def test_symmetric_kernel_uses_upper_tiles_and_is_psd():
  x = _images(7)
  sym = kernels.compute_kernel(CONVNET, x, tile=3)
  full = kernels.compute_kernel(CONVNET, x, x, tile=3)
  np.testing.assert_allclose(sym['ntk'], full['ntk'], rtol=1e-5)
  np.testing.assert_allclose(sym['ntk'], sym['ntk'].T, rtol=1e-6)
  assert np.linalg.eigvalsh(sym['ntk'].astype(np.float64)).min() > -1e-4 * sym['ntk'].max()


def test_blocked_vjp_equals_autodiff():
  x1, x2 = _images(5), _images(4, seed=1)
  rng = np.random.default_rng(2)
  g_ntk = rng.normal(size=(5, 4)).astype(np.float32)
  g_nngp = rng.normal(size=(5, 4)).astype(np.float32)
  f = kernels.kernel_fn(CONVNET)

  def inner(a):
    ntk, nngp = f(a, x2)
    return jnp.sum(ntk * g_ntk) + jnp.sum(nngp * g_nngp)

  expected = jax.grad(inner)(x1)
  got = kernels.kernel_vjp(CONVNET, x1, x2, g_ntk, g_nngp, tile=2)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_symmetrised_cotangent_gives_gradient_of_self_kernel():
  # d<G, K(x, x)>/dx = vjp_x1(G + G^T): what KIP uses for K_ss.
  x = _images(4)
  g = np.random.default_rng(3).normal(size=(4, 4)).astype(np.float32)
  f = kernels.kernel_fn(CONVNET)
  expected = jax.grad(lambda a: jnp.sum(f(a, a)[0] * g))(x)
  got = kernels.kernel_vjp(CONVNET, x, x, g_ntk=g + g.T, tile=4)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def _fc_closed_form(x1, x2, depth, w_std, b_std):
  """Textbook arc-cosine recursion, written independently in numpy float64."""
  d = x1.shape[1]
  k12 = w_std**2 * x1 @ x2.T / d + b_std**2
  k11 = w_std**2 * np.sum(x1 * x1, 1) / d + b_std**2
  k22 = w_std**2 * np.sum(x2 * x2, 1) / d + b_std**2
  ntk = k12.copy()
  for _ in range(depth):
    norms = np.sqrt(np.outer(k11, k22))
    cos = np.clip(k12 / norms, -1, 1)
    theta = np.arccos(cos)
    relu = norms / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos)
    relu_dot = (np.pi - theta) / (2 * np.pi)
    k12 = w_std**2 * relu + b_std**2
    ntk = k12 + w_std**2 * ntk * relu_dot
    k11 = w_std**2 * k11 / 2 + b_std**2
    k22 = w_std**2 * k22 / 2 + b_std**2
  return ntk, k12


@pytest.mark.parametrize('depth', [1, 3])
def test_fc_matches_closed_form(depth):
  rng = np.random.default_rng(depth)
  x1, x2 = rng.normal(size=(5, 11)), rng.normal(size=(3, 11))
  arch = architectures.Architecture('fc', depth=depth)
  ntk, nngp = kernels.compute_kernel(arch, x1, x2, tile=2).values()
  ref_ntk, ref_nngp = _fc_closed_form(x1, x2, depth, arch.w_std, arch.b_std)
  np.testing.assert_allclose(ntk, ref_ntk, rtol=1e-5)
  np.testing.assert_allclose(nngp, ref_nngp, rtol=1e-5)


def test_convnet_with_1x1_images_reduces_to_fc_like_values():
  # At 1x1 pixels (depth 0) SAME padding leaves only the centre tap: conv = dense / 9.
  rng = np.random.default_rng(5)
  x1, x2 = rng.normal(size=(3, 1, 1, 4)), rng.normal(size=(2, 1, 1, 4))
  arch = architectures.Architecture('convnet', depth=0, w_std=3.0, b_std=0.0)
  ntk, nngp = kernels.kernel_fn(arch)(x1.astype(np.float32), x2.astype(np.float32))
  # Layer 1: W^2/9 <x,x'>/C; then relu; then dense readout.
  ref_ntk, ref_nngp = _fc_closed_form(x1.reshape(3, 4) / 3, x2.reshape(2, 4) / 3, 1, 3.0, 0.0)
  np.testing.assert_allclose(nngp, ref_nngp, rtol=1e-5)
  np.testing.assert_allclose(ntk, ref_ntk, rtol=1e-5)


def test_float64_agrees_with_float32():
  x1, x2 = _images(3), _images(2, seed=1)
  f32 = kernels.compute_kernel(CONVNET, x1, x2)
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  try:
    f64 = kernels.compute_kernel(CONVNET, x1, x2, dtype='float64')
  finally:
    jax.config.update('jax_enable_x64', previous)
  assert f64['ntk'].dtype == np.float64
  np.testing.assert_allclose(f32['ntk'], f64['ntk'], rtol=1e-4)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match='same image shape'):
    kernels.compute_kernel(CONVNET, _images(2), _images(2, shape=(4, 4, 2)))
  bad = _images(2)
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    kernels.compute_kernel(CONVNET, bad)
  with pytest.raises(ValueError, match='g_ntk has shape'):
    kernels.kernel_vjp(CONVNET, _images(2), _images(3), g_ntk=np.zeros((3, 2)))


def test_auto_tile_follows_memory_and_the_architecture(monkeypatch):
  arch = architectures.Architecture('convnet', depth=3)
  # The memory model grows with the image, and a vjp needs more than a forward.
  small, large = kernels.tile_memory(arch, (8, 8, 3)), kernels.tile_memory(arch, (32, 32, 3))
  assert small.bytes(4, 4) < large.bytes(4, 4) < kernels.tile_memory(
      arch, (32, 32, 3), vjp=True).bytes(4, 4)
  assert kernels.tile_memory(FC, (8, 8, 3)).per_pair > 0
  # A budget of the fixed working set plus 200 images' worth: the tile shrinks to fit.
  budget = large.fixed + 200 * large.per_image
  monkeypatch.setattr(kernels, 'available_memory_bytes', lambda: 4 * budget)
  tile = kernels.auto_tile(arch, (32, 32, 3))
  assert 1 <= tile < 256 and large.bytes(tile, tile) <= budget
  monkeypatch.setattr(kernels, 'available_memory_bytes', lambda: 1 << 40)
  assert kernels.auto_tile(arch, (32, 32, 3), max_tile=64) == 64


def test_tiles_fit_the_problem_shape():
  assert [kernels.fitted_tile(n, 8) for n in (1, 5, 8, 10, 16, 17, 100)] == [1, 5, 8, 5, 8, 6, 8]
  assert kernels.fitted_tile(10, 256) == 10
  for bad in (0, -1, 2.5):
    with pytest.raises(ValueError, match='tile must be an integer >= 1'):
      kernels.fitted_tile(10, bad)
  with pytest.raises(ValueError, match='tile must be'):
    kernels.compute_kernel(CONVNET, _images(2), tile=0)


def test_compute_kernel_runs_fitted_tiles(monkeypatch):
  shapes = []
  real = kernels.tile_fn(CONVNET)

  def spy(x1, x2):
    shapes.append((len(x1), len(x2)))
    return real(x1, x2)

  monkeypatch.setattr(kernels, 'tile_fn', lambda arch, legacy=False: spy)
  x1, x2 = _images(10), _images(7, seed=1)
  out = kernels.compute_kernel(CONVNET, x1, x2, tile=8)
  assert set(shapes) == {(5, 7)} and len(shapes) == 2    # not (8, 7) with 6 padded rows
  ntk, nngp = kernels.kernel_fn(CONVNET)(x1, x2)
  np.testing.assert_allclose(out['ntk'], ntk, rtol=1e-5)
  shapes.clear()
  kernels.compute_kernel(CONVNET, x1, x2, tile=8, legacy=True)
  assert set(shapes) == {(8, 7)}                          # the previous tiling, kept callable


# The split path (per-image self pass, per-pair cross pass) against the plain batched stax path.

def _valid_padding_net():
  from ntkdd.common import stax
  return stax.serial(stax.Conv(1, (3, 3), 'VALID', 1.5, 0.2), stax.Relu(),
                     stax.Conv(1, (3, 3), 'SAME', 1.5, 0.2), stax.Relu(), stax.AvgPool(),
                     stax.Flatten(), stax.Dense(1, 1.5, 0.2), stax.Relu(), stax.Dense(1, 1.5, 0.2))


@pytest.mark.parametrize('name,depth,shape', [('convnet', 0, (5, 6, 1)), ('convnet', 1, (7, 9, 2)),
                                              ('convnet', 2, (8, 8, 3)),
                                              ('convnet', 3, (8, 8, 1)), ('fc', 2, (4, 5, 2))])
def test_split_path_equals_batched_values_and_vjp(name, depth, shape):
  arch = architectures.Architecture(name, depth=depth)
  x1, x2 = _images(3, shape), _images(2, shape, seed=1)
  g = np.random.default_rng(4).normal(size=(2, 3, 2)).astype(np.float32)
  results = []
  for split in (False, True):
    f = kernels.kernel_fn(arch, split=split)
    values = jax.jit(f)(x1, x2)
    inner = lambda a: jnp.sum(f(a, x2)[0] * g[0]) + jnp.sum(f(a, x2)[1] * g[1])
    grad = jax.jit(jax.grad(inner))(x1)
    results.append((values, grad))
  (v_batched, g_batched), (v_split, g_split) = results
  for a, b in zip(v_split, v_batched):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(g_split, g_batched, rtol=1e-4, atol=1e-5 * np.abs(g_batched).max())


@pytest.fixture
def x64():
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


@pytest.mark.parametrize('depth,shape', [(0, (6, 5, 2)), (1, (9, 7, 1)), (2, (12, 10, 3)),
                                         (3, (16, 16, 2))])
def test_displacement_bands_equal_full_covariances(depth, shape, x64):
  """Values and vjp of the banded passes equal the full-covariance ones to float64 rounding."""
  arch = architectures.Architecture('convnet', depth=depth)
  rng = np.random.default_rng(depth)
  x1, x2 = rng.normal(size=(2,) + shape), rng.normal(size=(3,) + shape)
  g = rng.normal(size=(2, 2, 3))
  results = []
  for band in (False, True):
    f = kernels.kernel_fn(arch, band=band)
    inner = lambda a: jnp.sum(f(a, x2)[0] * g[0]) + jnp.sum(f(a, x2)[1] * g[1])
    results.append((jax.jit(f)(x1, x2), jax.jit(jax.grad(inner))(x1)))
  (v_full, g_full), (v_band, g_band) = results
  for a, b in zip(v_band, v_full):
    np.testing.assert_allclose(a, b, rtol=1e-12)
  np.testing.assert_allclose(g_band, g_full, rtol=1e-10, atol=1e-12 * np.abs(g_full).max())


def test_band_radii_follow_the_layers():
  layer = lambda depth: architectures.build(architectures.Architecture('convnet', depth=depth))
  # Readout sees displacement 0; each 2x2 pool below it widens the band to 2r + 1.
  assert kernels.band_radii(layer(3), (32, 32)) == (7, 3)
  assert kernels.band_radii(layer(2), (16, 16)) == (3, 1)
  # Bands as large as the image are not used by default (8x8 at depth 3: 15x15 > 8x8).
  assert kernels.band_radii(layer(3), (8, 8)) == (None, None)
  assert kernels.band_radii(layer(3), (8, 8), band=True) == (7, 3)
  assert kernels.band_radii(layer(3), (32, 32), band=False) == (None, None)
  # VALID convolutions do not keep displacements: no bands.
  assert kernels.band_radii(_valid_padding_net(), (16, 16), band=True) == (None, None)


def test_split_path_with_valid_padding_and_hidden_dense():
  from ntkdd.common import stax
  layer = _valid_padding_net()
  x1, x2 = _images(2, (7, 6, 2)), _images(3, (7, 6, 2), seed=1)
  k = layer.kernel_fn(stax.inputs_to_kernel(x1, x2))
  split = kernels._split_kernel(layer, x1, x2)
  np.testing.assert_allclose(split[0], k.ntk, rtol=1e-5)
  np.testing.assert_allclose(split[1], k.nngp, rtol=1e-5)


def test_cross_pass_needs_given_variances():
  from ntkdd.common import stax
  with pytest.raises(ValueError, match="'self' pass"):
    _valid_padding_net().kernel_fn(stax.inputs_to_kernel(_images(1), _images(1), 'cross'))
  with pytest.raises(ValueError, match='parts'):
    stax.inputs_to_kernel(_images(1), _images(1), 'both')


@pytest.mark.parametrize('size', [2, 3, 4])
def test_shifted_sum_vjp_is_its_transpose(size):
  from ntkdd.common import stax
  rng = np.random.default_rng(size)
  cov = jnp.asarray(rng.normal(size=(2, 5, 4, 5, 4)).astype(np.float32))
  ct = jnp.asarray(rng.normal(size=(2, 5, 4, 5, 4)).astype(np.float32))
  op = lambda c: stax._diagonal_conv(c, (size, size), 'SAME')
  _, pullback = jax.vjp(op, cov)
  # <ct, A cov> == <A^T ct, cov> with A^T from the custom vjp; and A matches pad-and-slice.
  np.testing.assert_allclose(jnp.sum(ct * op(cov)), jnp.sum(pullback(ct)[0] * cov), rtol=1e-5)
  low, high = (size - 1) // 2, size // 2
  padded = jnp.pad(cov, [(0, 0), (low, high), (low, high), (low, high), (low, high)])
  ref = sum(padded[:, i:i + 5, j:j + 4, i:i + 5, j:j + 4]
            for i in range(size) for j in range(size)) / size ** 2
  np.testing.assert_allclose(op(cov), ref, rtol=1e-5, atol=1e-6)


# The current formulation (band vjps without scatters) against the legacy one, in float64.

@pytest.mark.parametrize('depth,shape', [(1, (9, 7, 1)), (2, (12, 10, 3)), (3, (16, 16, 2))])
def test_current_formulation_equals_legacy_to_float64_rounding(depth, shape, x64):
  arch = architectures.Architecture('convnet', depth=depth)
  rng = np.random.default_rng(depth)
  x1, x2 = rng.normal(size=(3,) + shape), rng.normal(size=(2,) + shape)
  g_ntk, g_nngp = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
  results = []
  for legacy in (True, False):
    f = kernels.kernel_fn(arch, band=True, legacy=legacy)
    inner = lambda a: jnp.sum(f(a, x2)[0] * g_ntk) + jnp.sum(f(a, x2)[1] * g_nngp)
    results.append((jax.jit(f)(x1, x2), jax.jit(jax.grad(inner))(x1)))
  (v_old, g_old), (v_new, g_new) = results
  for a, b in zip(v_new, v_old):
    np.testing.assert_allclose(a, b, rtol=1e-12)
  np.testing.assert_allclose(g_new, g_old, rtol=1e-11, atol=1e-12 * np.abs(g_old).max())
  # And through the blocked entry points (fitted tiles against the legacy tiling).
  blocked = [kernels.kernel_vjp(arch, x1, x2, g_ntk, g_nngp, tile=2, dtype='float64',
                                legacy=legacy) for legacy in (True, False)]
  np.testing.assert_allclose(blocked[1], blocked[0], rtol=1e-11, atol=1e-12 * np.abs(g_old).max())


@pytest.mark.parametrize('h,w,f,r', [(5, 7, 3, 2), (9, 9, 4, 3), (4, 4, 2, 7)])
def test_band_vjps_equal_the_gathers_autodiff(h, w, f, r, x64):
  from ntkdd.common import stax
  rng = np.random.default_rng(h + r)
  a, b = rng.normal(size=(h, w, f)), rng.normal(size=(h, w, f))
  g = rng.normal(size=(h, w, 2 * r + 1, 2 * r + 1))
  expected = jax.vjp(lambda a, b: stax._gram_band_gather(a, b, r), a, b)[1](g)
  got = jax.vjp(lambda a, b: stax._local_gram(a, b, r), a, b)[1](g)
  for e, o in zip(expected, got):      # both arguments: the self pass differentiates both
    np.testing.assert_allclose(o, e, rtol=1e-12, atol=1e-13 * np.abs(e).max())
  v = rng.normal(size=(2, h, w))
  gv = rng.normal(size=(2, h, w, 2 * r + 1, 2 * r + 1))
  np.testing.assert_array_equal(stax._shifted_band_skewed(v, r), stax._shifted_band_gather(v, r))
  expected = jax.vjp(lambda u: stax._shifted_band_gather(u, r), v)[1](gv)[0]
  got = jax.vjp(lambda u: stax._shifted_band(u, r), v)[1](gv)[0]
  np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13 * np.abs(expected).max())


@pytest.mark.parametrize('shape,r', [((1, 1, 8, 8, 15, 15), 7), ((1, 7, 9, 7, 7), 3),
                                     ((1, 1, 6, 6, 3, 3), 1)])
def test_band_pool_vjp_equals_the_strided_slices_autodiff(shape, r, x64):
  from ntkdd.common import stax
  rng = np.random.default_rng(r)
  r_out = stax._pooled_radius((2, 2), r)
  cov = rng.normal(size=shape)
  out = stax._band_pool(cov, (2, 2), r, r_out, legacy=True)
  g = rng.normal(size=out.shape)
  np.testing.assert_array_equal(stax._band_pool(cov, (2, 2), r, r_out), out)
  np.testing.assert_allclose(stax._band_pool_reshaped(cov, (2, 2), r, r_out), out, rtol=1e-13,
                             atol=1e-14)
  expected = jax.vjp(lambda c: stax._band_pool(c, (2, 2), r, r_out, legacy=True), cov)[1](g)[0]
  got = jax.vjp(lambda c: stax._band_pool(c, (2, 2), r, r_out), cov)[1](g)[0]
  np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-14)
