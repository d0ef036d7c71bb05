"""KIP's Adam (optax run in float64) against optax itself and the numpy Adam it replaced."""
import numpy as np
import pytest

from ntkdd.common import optim

optax = pytest.importorskip('optax')


@pytest.mark.parametrize('schedule', ['constant', 'cosine'])
def test_adam_matches_optax(schedule):
  rng = np.random.default_rng(0)
  params = {'images': rng.normal(size=(3, 4)), 'labels': rng.normal(size=(3, 2))}
  if schedule == 'cosine':
    ours = optim.adam(optim.cosine_schedule(0.1, 10))
    theirs = optax.adam(optax.cosine_decay_schedule(0.1, 10))
  else:
    ours, theirs = optim.adam(0.1), optax.adam(0.1)
  state, ref_state = ours.init(params), theirs.init(params)
  ref = dict(params)
  for _ in range(12):
    grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
    params, state = ours.update(grads, state, params)
    updates, ref_state = theirs.update(grads, ref_state, ref)
    ref = optax.apply_updates(ref, updates)
  for k in params:
    # optax computes in float32 (JAX default), we in float64.
    np.testing.assert_allclose(params[k], np.asarray(ref[k]), rtol=1e-4, atol=1e-5)


def test_frozen_parameters_do_not_move_and_bad_rate_is_named():
  params = {'images': np.ones(3), 'labels': np.ones(2)}
  opt = optim.adam(0.1)
  new, _ = opt.update({'images': np.ones(3)}, opt.init(params), params)
  np.testing.assert_array_equal(new['labels'], params['labels'])
  assert np.all(new['images'] < 1)
  with pytest.raises(ValueError, match='learning rate must be > 0'):
    optim.adam(0.0)


def _numpy_adam_reference(schedule, grads_seq, params, b1=0.9, b2=0.999, eps=1e-8):
  """The float64 numpy Adam that KIP used before optax (the formula its checkpoints hold)."""
  mu = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
  nu = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
  for count, grads in enumerate(grads_seq, start=1):
    for k, g in grads.items():
      mu[k] = b1 * mu[k] + (1 - b1) * g
      nu[k] = b2 * nu[k] + (1 - b2) * g * g
      step = schedule(count - 1) * (mu[k] / (1 - b1**count)) / (
          np.sqrt(nu[k] / (1 - b2**count)) + eps)
      params = dict(params, **{k: (params[k] - step).astype(params[k].dtype)})
  return params, mu, nu


def test_float32_support_moves_as_under_the_numpy_adam_and_state_names_are_kept():
  """KIP's support (float32) after optax's Adam in float64 is bit for bit the numpy Adam's, over
  a cosine schedule with the labels frozen; the state keeps the checkpoint names."""
  rng = np.random.default_rng(1)
  params = {'images': rng.normal(size=(6, 20)).astype(np.float32),
            'labels': rng.normal(size=(6, 3)).astype(np.float32)}
  schedule = optim.cosine_schedule(0.04, 30)
  grads_seq = [{'images': rng.normal(size=(6, 20))} for _ in range(30)]
  opt = optim.adam(schedule)
  state, ours = opt.init(params), dict(params)
  for grads in grads_seq:
    ours, state = opt.update(grads, state, ours)
  ref, mu, nu = _numpy_adam_reference(schedule, grads_seq, params)
  assert set(state) == {'count', 'mu/images', 'nu/images', 'mu/labels', 'nu/labels'}
  assert state['count'].dtype == np.int64 and int(state['count']) == 30
  assert ours['images'].dtype == np.float32
  np.testing.assert_array_equal(ours['images'], ref['images'])
  np.testing.assert_array_equal(ours['labels'], params['labels'])   # frozen
  np.testing.assert_array_equal(state['mu/labels'], 0)
  np.testing.assert_allclose(state['mu/images'], mu['images'], rtol=1e-14, atol=0)
  np.testing.assert_allclose(state['nu/images'], nu['images'], rtol=1e-14, atol=0)
