"""Finite-width training: networks learn a separable toy problem, runs are reproducible, the
NTK learning-rate estimate is exact and predicts divergence, bad inputs fail loudly."""
import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkdd.common import architectures, train

pytest.importorskip('optax')

CLASSES = 4
CONVNET = architectures.Architecture('convnet', depth=1, width=32)
FC = architectures.Architecture('fc', depth=1, width=32)


def _problem(per_class, seed, noise=0.3, size=8):
  """Noisy copies of one fixed random 8x8 template per class: linearly separable, not trivial."""
  templates = np.random.default_rng(123).normal(size=(CLASSES, size, size, 1))
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(CLASSES), per_class)
  images = templates[labels] + noise * rng.normal(size=(len(labels), size, size, 1))
  return images.astype(np.float32), labels


SUPPORT_X, SUPPORT_Y = _problem(8, seed=1)
TEST_X, TEST_Y = _problem(50, seed=2)


def _adam(steps=200, learning_rate=1e-2, **overrides):
  return train.TrainConfig(steps=steps, batch_size=16, learning_rate=learning_rate,
                           schedule='constant', **overrides)


def _test_accuracy(arch, params):
  return train.accuracy(train.predict(arch, params, TEST_X, batch_size=64), TEST_Y)


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_convnet_learns_what_an_untrained_one_cannot():
  params = train.train_network(CONVNET, SUPPORT_X, SUPPORT_Y, _adam(), seed=0,
                               num_classes=CLASSES)
  untrained = train.init_params(CONVNET, SUPPORT_X.shape, CLASSES, seed=0)
  assert _test_accuracy(CONVNET, params) >= 0.9
  assert _test_accuracy(CONVNET, untrained) <= 0.5   # chance is 0.25


def test_rcig_protocol_trains_the_ntk_parameterised_convnet():
  # 2000 steps, 500 of warm-up, full batch (256 capped at the 32 support images); 1e-3 for the
  # NTK parameterisation.
  config = train.rcig_protocol(len(SUPPORT_X), learning_rate=1e-3)
  assert (config.steps, config.schedule_steps) == (5000, 2000) and not config.zero_readout
  # The schedule's 2000 steps (RCIG's code trains 3000 more at 1% of the peak rate).
  config = dataclasses.replace(config, steps=config.schedule_steps)
  params = train.train_network(CONVNET, SUPPORT_X, SUPPORT_Y, config, seed=0,
                               num_classes=CLASSES)
  assert _test_accuracy(CONVNET, params) >= 0.9


RCIG_NET = architectures.Architecture('rcig_convnet', depth=2, w_std=1.0, b_std=0.0, width=8,
                                      parameterization='standard')


def test_rcig_protocol_trains_rcigs_convnet_as_the_paper_with_and_without_augmentation():
  # The paper's setting: standard parameterisation, LeCun initialisation, Adam 1e-4, a random
  # readout; 10 support images give its schedule of 1000 steps, of which its loop takes 2500
  # without augmentation.
  x, y = SUPPORT_X[::3][:10], SUPPORT_Y[::3][:10]
  config = train.rcig_protocol(len(x))
  assert (config.steps, config.schedule_steps, config.learning_rate) == (2500, 1000, 1e-4)
  untrained = train.init_params(RCIG_NET, x.shape, CLASSES, seed=0, zero_readout=False)
  assert _test_accuracy(RCIG_NET, untrained) <= 0.5
  params = train.train_network(RCIG_NET, x, y, config, seed=0, num_classes=CLASSES)
  assert _test_accuracy(RCIG_NET, params) >= 0.9
  augmented = train.rcig_protocol(len(x), augmentations='crop_rotate_translate_cutout')
  assert (augmented.steps, augmented.schedule_steps) == (1000, 1000)
  params, losses = train.train_network(RCIG_NET, x, y, augmented, seed=0, num_classes=CLASSES,
                                       return_losses=True)
  assert np.all(np.isfinite(losses)) and _test_accuracy(RCIG_NET, params) >= 0.8
  with pytest.raises(ValueError, match='Unknown augmentation'):
    dataclasses.replace(config, augmentations='crop_wobble')


def test_fc_evaluate_transfer_is_per_seed_and_reproducible():
  seen = []
  # The fc net keeps a large random function from its (NTK-parameterised) initialisation,
  # which costs it a few test points on some seeds: a looser bar than the ConvNet's.
  result = train.evaluate_transfer(FC, SUPPORT_X, SUPPORT_Y, TEST_X, TEST_Y, _adam(),
                                   seeds=(0, 1, 0), num_classes=CLASSES,
                                   progress=lambda seed, acc: seen.append((seed, acc)))
  accs = result['accuracies']
  assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs)
  assert accs[0] == accs[2]                     # same seed, same run
  assert result['mean'] >= 0.85
  assert result['std'] == pytest.approx(np.std(accs))
  assert result['steps'] == 200 and result['seconds'] > 0
  assert result['diverged'] == [False] * 3
  assert [s for s, _ in seen] == [0, 1, 0]

  first = train.train_network(FC, SUPPORT_X, SUPPORT_Y, _adam(50), seed=0, num_classes=CLASSES)
  again = train.train_network(FC, SUPPORT_X, SUPPORT_Y, _adam(50), seed=0, num_classes=CLASSES)
  other = train.train_network(FC, SUPPORT_X, SUPPORT_Y, _adam(50), seed=1, num_classes=CLASSES)
  assert _leaves_equal(first, again)
  assert not _leaves_equal(first, other)


def test_augment_keeps_shapes_and_only_flips_or_shifts():
  images = jnp.asarray(SUPPORT_X)
  flipped_only = train.augment(jax.random.PRNGKey(0), images, crop_padding=0)
  assert flipped_only.shape == images.shape
  for original, out in zip(np.asarray(images), np.asarray(flipped_only)):
    assert np.array_equal(out, original) or np.array_equal(out, original[:, ::-1])
  cropped = train.augment(jax.random.PRNGKey(1), images, crop_padding=2)
  assert cropped.shape == images.shape and not np.array_equal(cropped, flipped_only)
  # Zero padding: a crop never invents mass, it can only lose pixels off the edge.
  assert float(jnp.sum(jnp.abs(cropped))) <= float(jnp.sum(jnp.abs(images))) + 1e-3

  config = _adam(30, augment=True, crop_padding=1)
  params, losses = train.train_network(CONVNET, SUPPORT_X, SUPPORT_Y, config, seed=0,
                                       num_classes=CLASSES, return_losses=True)
  assert losses.shape == (30,) and np.all(np.isfinite(losses))
  assert train.predict(CONVNET, params, TEST_X).shape == (len(TEST_X), CLASSES)


def test_learned_float_labels_with_mse():
  # Learned labels: rescaled centred one-hot plus noise, as a distilled set might carry.
  rng = np.random.default_rng(0)
  labels = 2.0 * (np.eye(CLASSES)[SUPPORT_Y] - 1.0 / CLASSES) + 0.1 * rng.normal(
      size=(len(SUPPORT_Y), CLASSES))
  params = train.train_network(FC, SUPPORT_X, labels.astype(np.float32), _adam(), seed=0,
                               num_classes=CLASSES)
  assert _test_accuracy(FC, params) >= 0.9


def test_cross_entropy_with_int_labels_and_not_with_float_labels():
  params, losses = train.train_network(FC, SUPPORT_X, SUPPORT_Y, _adam(loss='xent'), seed=0,
                                       num_classes=CLASSES, return_losses=True)
  assert losses[-1] < 0.1 * losses[0]
  assert _test_accuracy(FC, params) >= 0.9
  float_labels = np.eye(CLASSES, dtype=np.float32)[SUPPORT_Y]
  with pytest.raises(ValueError, match='xent'):
    train.train_network(FC, SUPPORT_X, float_labels, _adam(loss='xent'), num_classes=CLASSES)


def _nan_images():
  images = SUPPORT_X.copy()
  images[3, 2, 2, 0] = np.nan
  return images


@pytest.mark.parametrize('support_x, support_y, x_test, match', [
    (SUPPORT_X[:-1], SUPPORT_Y, TEST_X, '31 images but support_y has 32'),
    (SUPPORT_X, SUPPORT_Y, TEST_X[:, :6, :6], 'Test images have shape'),
    (_nan_images(), SUPPORT_Y, TEST_X, 'support_x contains 1 NaN'),
    (SUPPORT_X, SUPPORT_Y + CLASSES, TEST_X, 'must lie in 0..3'),
    (SUPPORT_X, np.zeros((32, CLASSES + 1), np.float32), TEST_X, r'shape \(n, num_classes=4\)'),
])
def test_bad_inputs_name_the_problem(support_x, support_y, x_test, match):
  with pytest.raises(ValueError, match=match):
    train.evaluate_transfer(FC, support_x, support_y, x_test, TEST_Y, _adam(5),
                            seeds=(0,), num_classes=CLASSES)


@pytest.mark.parametrize('fields, match', [
    (dict(steps=0), 'steps must be > 0'),
    (dict(optimizer='rmsprop'), 'optimizer must be one of'),
    (dict(learning_rate=None), "needs optimizer='sgd_momentum'"),
    (dict(warmup_steps=10, steps=10), 'warmup_steps'),
    (dict(warmup_steps=10, steps=100, schedule_steps=200), 'schedule_steps'),
    (dict(final_lr_fraction=1.0), 'final_lr_fraction'),
])
def test_bad_configs_name_the_problem(fields, match):
  with pytest.raises(ValueError, match=match):
    train.TrainConfig(**fields)


def test_protocol_presets_and_schedule():
  # RCIG's code (eval.py): a schedule of 1000 steps for a support of 10 images (1 per class),
  # else 2000; its loop takes 2.5 times that without augmentation, the schedule with it.
  for size, augmentations, steps, schedule_steps in ((10, '', 2500, 1000),
                                                     (10, 'crop', 1000, 1000),
                                                     (100, '', 5000, 2000),
                                                     (100, 'crop', 2000, 2000)):
    protocol = train.rcig_protocol(size, augmentations=augmentations)
    assert (protocol.steps, protocol.schedule_steps) == (steps, schedule_steps)
  # optax's linear warm-up from 0, then the cosine to 1% of the peak, held to the end.
  unit = train.learning_rate_schedule(train.rcig_protocol(10))
  values = np.array([float(unit(s)) for s in (0, 250, 500, 750, 1000, 2499)])
  np.testing.assert_allclose(values, [0, 0.5, 1, 0.505, 0.01, 0.01], rtol=1e-5, atol=1e-7)
  rcig = train.rcig_protocol(500)
  assert (rcig.optimizer, rcig.warmup_steps, rcig.batch_size, rcig.loss) == (
      'adam', 500, 256, 'mse')
  kip = train.kip_protocol()
  assert (kip.optimizer, kip.momentum, kip.steps, kip.batch_size, kip.weight_decay,
          kip.learning_rate) == ('sgd_momentum', 0.9, 5000, 100, 1e-3, None)
  schedule = train.learning_rate_schedule(train.TrainConfig(steps=100, warmup_steps=10))
  values = np.array([float(schedule(s)) for s in range(100)])
  assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
  assert np.all(np.diff(values[10:]) <= 0) and values[-1] < 1e-3


def test_predict_is_independent_of_batching():
  params = train.init_params(FC, TEST_X.shape, CLASSES, seed=0)
  np.testing.assert_allclose(train.predict(FC, params, TEST_X, batch_size=7),
                             train.predict(FC, params, TEST_X, batch_size=1000), rtol=1e-5,
                             atol=1e-5)


def test_stable_learning_rate_is_exact_and_predicts_divergence():
  apply_fn = architectures.build(FC, CLASSES).apply_fn
  params = train.init_params(FC, SUPPORT_X.shape, CLASSES, seed=0)
  lr = train.stable_learning_rate(apply_fn, params, SUPPORT_X)
  assert np.isfinite(lr) and lr > 0

  # Against the explicit flattened (nC, nC) Gram of the empirical NTK.
  jac = jax.jacobian(lambda p: apply_fn(p, jnp.asarray(SUPPORT_X)).reshape(-1))(params)
  jac = np.concatenate([j.reshape(j.shape[0], -1) for j in jax.tree_util.tree_leaves(jac)], 1)
  top = np.linalg.eigvalsh(jac.astype(np.float64) @ jac.T.astype(np.float64))[-1]
  assert lr == pytest.approx(2 * jac.shape[0] / top, rel=1e-3)
  assert train.stable_learning_rate(apply_fn, params, SUPPORT_X, momentum=0.9) == pytest.approx(
      1.9 * lr, rel=1e-3)

  def final_loss(lr_factor):
    config = train.kip_protocol(lr_factor=lr_factor, steps=100)
    _, losses = train.train_network(FC, SUPPORT_X, SUPPORT_Y, config, seed=0,
                                    num_classes=CLASSES, return_losses=True)
    return float(np.mean(losses[-10:]))

  # learning_rate=None resolves to lr_factor times the estimate (with momentum), per seed.
  result = train.evaluate_transfer(FC, SUPPORT_X, SUPPORT_Y, TEST_X, TEST_Y,
                                   train.kip_protocol(lr_factor=0.5, steps=5), seeds=(0,),
                                   num_classes=CLASSES)
  assert result['learning_rates'][0] == pytest.approx(0.5 * 1.9 * lr, rel=1e-3)

  safe, unstable = final_loss(0.5), final_loss(10.0)
  assert np.isfinite(safe) and safe < 0.05   # from ~2.4 at initialisation
  # Written as `not <=` so that a diverged (NaN) run counts as the higher loss.
  assert not unstable <= 10 * safe


def test_module_imports_without_optax_and_training_asks_for_it(monkeypatch):
  code = ("import sys; sys.modules['optax'] = None\n"
          "import ntkdd.common.train\n"
          "assert 'optax' not in sys.modules or sys.modules['optax'] is None\n")
  subprocess.run([sys.executable, '-c', code], check=True)
  monkeypatch.setitem(sys.modules, 'optax', None)
  with pytest.raises(ImportError, match='pip install optax'):
    train.train_network(FC, SUPPORT_X, SUPPORT_Y, _adam(5), num_classes=CLASSES)
