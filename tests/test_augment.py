"""RCIG's evaluation augmentations, and RCIG's ConvNet (widths, grayscale padding, kernel)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkdd.common import architectures, augment, stax

KEY = jax.random.PRNGKey(0)


def _image(h=12, w=10, c=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(h, w, c)), jnp.float32)


def test_ops_keep_shapes_and_vary_with_the_key():
  image = _image()
  for name, op in augment.OPS.items():
    outs = [np.asarray(op(jax.random.PRNGKey(k), image)) for k in range(6)]
    assert all(o.shape == image.shape and np.all(np.isfinite(o)) for o in outs), name
    assert any(not np.allclose(outs[0], o) for o in outs[1:]), name


def test_ops_at_zero_strength_are_the_identity():
  image = _image()
  np.testing.assert_allclose(augment.rotate(KEY, image, degrees=0.0), image, atol=1e-5)
  np.testing.assert_allclose(augment.crop(KEY, image, zoom=(1.0, 1.0)), image, atol=1e-5)
  np.testing.assert_array_equal(augment.translate(KEY, image, ratio=0.0), image)
  np.testing.assert_allclose(augment.color(KEY, image, strength=0.0), image, atol=1e-5)


def test_geometric_ops_do_what_they_say():
  image = _image(8, 8, 1)
  # A rotation by 90 degrees (reached through the resampler directly) is an exact transpose.
  quarter = augment._resample(image, jnp.array([[0.0, -1.0], [1.0, 0.0]]), jnp.zeros(2))
  np.testing.assert_allclose(quarter[..., 0], np.rot90(np.asarray(image[..., 0]), -1),
                             atol=1e-5)
  for k in range(5):
    out = np.asarray(augment.flip(jax.random.PRNGKey(k), image))
    assert np.array_equal(out, image) or np.array_equal(out, np.asarray(image)[:, ::-1])
    shifted = np.asarray(augment.translate(jax.random.PRNGKey(k), image, ratio=0.25))
    # Some whole-pixel shift by at most 2 in each direction, zeros shifted in.
    found = False
    for dy in range(-2, 3):
      for dx in range(-2, 3):
        expect = np.zeros_like(shifted)
        src = np.asarray(image)
        ys, xs = slice(max(dy, 0), 8 + min(dy, 0)), slice(max(dx, 0), 8 + min(dx, 0))
        yd, xd = slice(max(-dy, 0), 8 + min(-dy, 0)), slice(max(-dx, 0), 8 + min(-dx, 0))
        expect[ys, xs] = src[yd, xd]
        found |= np.array_equal(shifted, expect)
    assert found
    holed = np.asarray(augment.cutout(jax.random.PRNGKey(k), jnp.ones((8, 8, 1))))
    zeros = int(np.sum(holed == 0))
    assert 1 <= zeros <= 4 and np.all((holed == 0) | (holed == 1))


def test_one_of_applies_one_listed_op_per_image():
  images = jnp.asarray(np.random.default_rng(1).normal(size=(16, 6, 6, 1)), jnp.float32)
  out = np.asarray(augment.one_of('flip')(KEY, images))
  kinds = [np.array_equal(o, i) for o, i in zip(out, np.asarray(images))]
  assert all(np.array_equal(o, i) or np.array_equal(o, i[:, ::-1])
             for o, i in zip(out, np.asarray(images)))
  assert any(kinds) and not all(kinds)
  mixed = augment.one_of(augment.GRAYSCALE_STRATEGY)(KEY, images)
  assert mixed.shape == images.shape
  assert augment.default_strategy(1) == 'crop_rotate_translate_cutout'
  assert 'flip' in augment.default_strategy(3) and 'color' in augment.default_strategy(3)
  for bad in ('', 'crop_wobble'):
    with pytest.raises(ValueError, match='Unknown augmentation strategy'):
      augment.one_of(bad)
  with pytest.raises(ValueError, match='NHWC'):
    augment.one_of('flip')(KEY, images[0])


def test_rcig_convnet_doubles_widths_and_pads_grayscale_images():
  arch = architectures.Architecture('rcig_convnet', depth=3, w_std=1.0, b_std=0.0, width=4,
                                    parameterization='standard')
  net = architectures.build(arch, 10)
  shape, params = net.init_fn(KEY, (-1, 28, 28, 1))
  assert shape == (-1, 10)
  convs = [p[0] for p in params if isinstance(p, tuple) and len(p) == 2 and p[0].ndim == 4]
  assert [c.shape[-1] for c in convs] == [4, 8, 16]
  readout = params[-1][0]
  assert readout.shape == (4 * 4 * 16, 10)  # 28 + 2 * 2 = 32 -> 16 -> 8 -> 4
  # LeCun initialisation: weight variance 1 / fan_in, zero biases.
  assert np.std(np.asarray(convs[1])) == pytest.approx(1 / np.sqrt(9 * 4), rel=0.2)
  assert all(np.all(np.asarray(p[1]) == 0) for p in params if isinstance(p, tuple) and
             len(p) == 2)
  _, rgb = net.init_fn(KEY, (-1, 32, 32, 3))
  assert rgb[-1][0].shape == (4 * 4 * 16, 10)  # RGB images are not padded
  with pytest.raises(ValueError, match='depth'):
    architectures.Architecture('rcig_convnet', depth=0)


def test_zero_pad_kernel_is_the_kernel_of_padded_images():
  rng = np.random.default_rng(2)
  x1 = jnp.asarray(rng.normal(size=(2, 6, 5, 1)))
  x2 = jnp.asarray(rng.normal(size=(3, 6, 5, 1)))
  tail = [stax.Conv(1, (3, 3), 'SAME', 1.5, 0.1), stax.Relu(), stax.AvgPool((2, 2)),
          stax.Flatten(), stax.Dense(1, 1.5, 0.1)]
  padded = stax.serial(stax.ZeroPad(2, channels=1), *tail)
  plain = stax.serial(*tail)
  pad = lambda x: jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  got = padded.kernel_fn(stax.inputs_to_kernel(x1, x2))
  want = plain.kernel_fn(stax.inputs_to_kernel(pad(x1), pad(x2)))
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-5)
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-5)
  assert not np.allclose(got.ntk, plain.kernel_fn(stax.inputs_to_kernel(x1, x2)).ntk)
  three = jnp.asarray(rng.normal(size=(1, 6, 5, 3)))
  assert stax.ZeroPad(2, channels=1).apply_fn((), three).shape == three.shape
