"""Kernel ridge regression: closed-form cotangents against finite differences, Label Solve."""
import numpy as np
import pytest

from ntkdd.common import krr


def _problem(n_s=6, n_t=9, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  feats_s, feats_t = rng.normal(size=(n_s, 4)), rng.normal(size=(n_t, 4))
  k_ss = feats_s @ feats_s.T + 0.5 * np.eye(n_s)
  k_ts = feats_t @ feats_s.T
  y_s, y_t = rng.normal(size=(n_s, classes)), rng.normal(size=(n_t, classes))
  return k_ss, k_ts, y_s, y_t


def _loss(k_ss, k_ts, y_s, y_t, reg, loss='mse', log_temperature=0.0):
  return krr.loss_and_gradients(k_ss, k_ts, y_s, y_t, reg, loss=loss,
                                log_temperature=log_temperature).loss


@pytest.mark.parametrize('reg,loss', [(1e-6, 'mse'), (0.3, 'mse'), (1e-6, 'platt'),
                                      (0.3, 'platt')])
def test_cotangents_match_finite_differences(reg, loss):
  k_ss, k_ts, y_s, y_t = _problem()
  if loss == 'platt':   # one-hot minus 1/C targets: the class is each row's argmax
    y_t = np.eye(y_t.shape[1])[np.arange(len(y_t)) % y_t.shape[1]] - 1 / y_t.shape[1]
  _loss_here = lambda *a: _loss(*a, loss=loss, log_temperature=0.7)   # noqa: E731
  g = krr.loss_and_gradients(k_ss, k_ts, y_s, y_t, reg, loss=loss, log_temperature=0.7)
  eps = 1e-6
  rng = np.random.default_rng(1)
  if loss == 'platt':
    fd = (_loss(k_ss, k_ts, y_s, y_t, reg, loss, 0.7 + eps) -
          _loss(k_ss, k_ts, y_s, y_t, reg, loss, 0.7 - eps)) / (2 * eps)
    assert np.isclose(fd, g.d_log_temperature, rtol=1e-5, atol=1e-7)
    assert g.d_log_temperature != 0
  else:
    assert g.d_log_temperature == 0
  for _ in range(3):
    # Symmetric perturbation of K_ss: the cotangent is paired through <G, dK>.
    d = rng.normal(size=k_ss.shape); d = d + d.T
    fd = (_loss_here(k_ss + eps * d, k_ts, y_s, y_t, reg) -
          _loss_here(k_ss - eps * d, k_ts, y_s, y_t, reg)) / (2 * eps)
    assert np.isclose(fd, np.sum(g.d_k_ss * d), rtol=1e-5, atol=1e-7)
    d = rng.normal(size=k_ts.shape)
    fd = (_loss_here(k_ss, k_ts + eps * d, y_s, y_t, reg) -
          _loss_here(k_ss, k_ts - eps * d, y_s, y_t, reg)) / (2 * eps)
    assert np.isclose(fd, np.sum(g.d_k_ts * d), rtol=1e-5, atol=1e-7)
    d = rng.normal(size=y_s.shape)
    fd = (_loss_here(k_ss, k_ts, y_s + eps * d, y_t, reg) -
          _loss_here(k_ss, k_ts, y_s - eps * d, y_t, reg)) / (2 * eps)
    assert np.isclose(fd, np.sum(g.d_y_s * d), rtol=1e-5, atol=1e-7)


def test_lu_solve_equals_the_cholesky_path_and_falls_back_on_a_singular_matrix():
  k_ss, _, y_s, _ = _problem()
  np.testing.assert_allclose(krr.solve(k_ss, y_s, 0.1, method='lu'), krr.solve(k_ss, y_s, 0.1),
                             rtol=1e-10)
  singular = np.diag([1.0, -1.0, 0.0])   # trace 0, so no ridge: exactly singular
  lu = krr.solve(singular, np.ones((3, 2)), 1e-6, method='lu')
  np.testing.assert_allclose(lu, np.linalg.lstsq(singular, np.ones((3, 2)), rcond=None)[0])
  with pytest.raises(ValueError, match='method'):
    krr.solve(k_ss, y_s, 0.1, method='qr')


def test_predict_matches_explicit_inverse_and_accuracy():
  k_ss, k_ts, y_s, _ = _problem()
  a = k_ss + 0.1 * np.trace(k_ss) / 6 * np.eye(6)
  np.testing.assert_allclose(krr.predict(k_ts, k_ss, y_s, 0.1), k_ts @ np.linalg.inv(a) @ y_s,
                             rtol=1e-8)
  assert krr.accuracy(np.eye(3), np.array([0, 1, 0])) == pytest.approx(2 / 3)


def test_label_solve_minimises_the_loss():
  k_ss, k_ts, y_s, y_t = _problem(n_t=40)
  solved = krr.label_solve(k_ss, k_ts, y_t, 1e-3)
  best = _loss(k_ss, k_ts, solved, y_t, 1e-3)
  assert best < _loss(k_ss, k_ts, y_s, y_t, 1e-3)
  # A stationary point: the label gradient vanishes.
  g = krr.loss_and_gradients(k_ss, k_ts, solved, y_t, 1e-3)
  assert np.abs(g.d_y_s).max() < 1e-6 * max(1.0, np.abs(y_t).max())


def test_regulariser_must_be_positive():
  k_ss, k_ts, y_s, y_t = _problem()
  with pytest.raises(ValueError, match='must be > 0'):
    krr.predict(k_ts, k_ss, y_s, 0.0)


@pytest.mark.parametrize('reg,loss', [(1e-6, 'mse'), (0.3, 'mse'), (0.3, 'platt')])
def test_kip_cotangent_factors_equal_the_dense_cotangent(reg, loss):
  """Factors (rank 2 C plus a diagonal) give KIP's dense cotangent to float64 rounding,
  whole and block by block, through their packed form (either loss: both act through dL/dP)."""
  from ntkdd.common import cotangents
  k_ss, k_ts, y_s, y_t = _problem(n_s=7, n_t=11)
  g = krr.loss_and_gradients(k_ss, k_ts, y_s, y_t, reg, loss=loss, log_temperature=-0.3)
  dense = np.concatenate([g.d_k_ss + g.d_k_ss.T, g.d_k_ts.T], axis=1)
  factors = krr.kip_cotangent_factors(g, reg)
  assert factors.shape == dense.shape and factors.left.shape[1] == 2 * y_s.shape[1]
  scale = np.abs(dense).max()
  np.testing.assert_allclose(factors.dense(), dense, rtol=0, atol=1e-13 * scale)
  unpacked = cotangents.unpack(cotangents.pack(factors), 7)
  for r0, r1, c0, c1 in [(0, 7, 0, 18), (2, 5, 1, 6), (3, 7, 7, 18), (6, 7, 0, 7), (0, 1, 9, 10)]:
    np.testing.assert_allclose(unpacked.block(r0, r1, c0, c1), dense[r0:r1, c0:c1], rtol=0,
                               atol=1e-13 * scale)
  lean = krr.loss_and_gradients(k_ss, k_ts, y_s, y_t, reg, dense=False, loss=loss,
                                log_temperature=-0.3)
  assert lean.d_k_ss is None and lean.d_k_ts is None and lean.loss == g.loss
  np.testing.assert_array_equal(krr.kip_cotangent_factors(lean, reg).right, factors.right)
  with pytest.raises(ValueError, match='float64'):
    cotangents.unpack(cotangents.pack(factors).astype(np.float32), 7)


def test_platt_loss_is_the_cross_entropy_of_the_scaled_predictions():
  """The Platt loss against a direct softmax cross-entropy, stable at large logits, and refused
  names."""
  rng = np.random.default_rng(3)
  predictions = rng.normal(size=(5, 4))
  y_t = np.eye(4)[[0, 3, 1, 1, 2]] - 0.25
  loss, d_p, _ = krr.platt_loss(predictions, y_t, np.log(2.0))
  logits = 2.0 * predictions
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  assert np.isclose(loss, -np.sum(np.log(probs[np.arange(5), [0, 3, 1, 1, 2]])), rtol=1e-12)
  np.testing.assert_allclose(d_p, 2.0 * (probs - (y_t + 0.25)), rtol=1e-12, atol=1e-15)
  big, d_big, _ = krr.platt_loss(1e3 * predictions, y_t, 2.0)   # logits ~1e4: no overflow
  assert np.isfinite(big) and np.all(np.isfinite(d_big))
  with pytest.raises(ValueError, match="one of \\('mse', 'platt'\\)"):
    krr.loss_and_gradients(*_problem(), 1e-6, loss='hinge')


def test_inverse_gives_the_solves_to_float64_rounding():
  """krr.inverse (the overlapped KIP step's beta: one product with it) equals krr.solve on the
  same right-hand sides to float64 rounding, at a realistic condition number."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 12))
  k_ss = x @ x.T   # rank 12: the regulariser alone makes it invertible
  rhs = rng.normal(size=(40, 5))
  want = krr.solve(k_ss, rhs, 1e-6, method='lu')
  got = krr.inverse(k_ss, 1e-6) @ rhs
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7 * np.abs(want).max())
  assert not np.array_equal(got, np.zeros_like(got))
  with pytest.raises(FloatingPointError):
    krr.inverse(np.full((3, 3), np.nan), 1e-6)
