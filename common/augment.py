"""Random image augmentations for training networks on a support set (RCIG's evaluation)."""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

# RCIG's evaluation trains with one augmentation per image, drawn uniformly from a list (the
# "DSA" style): 'crop_rotate_translate_cutout' for MNIST and Fashion-MNIST, and
# 'flip_color_crop_rotate_translate_cutout' for RGB datasets. Each op here maps one HWC image
# and a key to an image of the same shape; strengths follow that code (zoom 0.8-1.25, shifts up
# to 1/8 of the side, rotations up to 15 degrees, one hole of a quarter of the side, colour
# jitter 0.25). Images are in model space (standardised or ZCA'd), so "black" is 0.

Op = Callable[[jax.Array, jax.Array], jax.Array]


def _resample(image, matrix, offset):
  """image sampled (bilinear, zeros outside) at matrix @ (y, x) + offset for every output
  pixel (y, x), coordinates centred on the image."""
  h, w, c = image.shape
  centre = jnp.array([(h - 1) / 2, (w - 1) / 2], image.dtype)
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=image.dtype), jnp.arange(w, dtype=image.dtype),
                        indexing='ij')
  grid = jnp.stack([ys.ravel(), xs.ravel()]) - centre[:, None]
  source = matrix @ grid + centre[:, None] + offset[:, None]
  channel = lambda plane: ndimage.map_coordinates(plane, [source[0], source[1]], order=1,
                                                  mode='constant', cval=0.0)
  return jax.vmap(channel, in_axes=2, out_axes=1)(image).reshape(h, w, c)


def flip(key, image):
  """Left-right mirror with probability 1/2."""
  return jnp.where(jax.random.bernoulli(key), image[:, ::-1, :], image)


def crop(key, image, zoom=(0.8, 1.25)):
  """A random crop resized to the image's size: zoom by a factor in `zoom` (log-uniform)
  about a random centre that keeps as much of the image in view as the zoom allows."""
  k_zoom, k_shift = jax.random.split(key)
  scale = jnp.exp(jax.random.uniform(k_zoom, (), image.dtype, math.log(zoom[0]),
                                     math.log(zoom[1])))
  size = jnp.array(image.shape[:2], image.dtype)
  # Output pixel u reads input pixel u / scale + shift; the crop spans size / scale pixels.
  slack = jnp.abs(size - size / scale) / 2
  shift = jax.random.uniform(k_shift, (2,), image.dtype, -1.0, 1.0) * slack
  return _resample(image, jnp.eye(2, dtype=image.dtype) / scale, shift)


def shift(key, image, max_h: int, max_w: int):
  """A whole-pixel shift by up to max_h rows and max_w columns either way (uniform), zeros
  shifted in."""
  offset = jax.random.randint(key, (2,), jnp.array([-max_h, -max_w]),
                              jnp.array([max_h + 1, max_w + 1]))
  padded = jnp.pad(image, ((max_h, max_h), (max_w, max_w), (0, 0)))
  return jax.lax.dynamic_slice(padded, (max_h - offset[0], max_w - offset[1], 0), image.shape)


def translate(key, image, ratio=0.125):
  """A shift by up to `ratio` of the side in each direction (whole pixels), zeros shifted in."""
  h, w, _ = image.shape
  return shift(key, image, round(ratio * h), round(ratio * w))


def rotate(key, image, degrees=15.0):
  """A rotation about the centre by an angle uniform in [-degrees, degrees]."""
  angle = jax.random.uniform(key, (), image.dtype, -degrees, degrees) * (math.pi / 180)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  matrix = jnp.array([[cos, -sin], [sin, cos]])
  return _resample(image, matrix, jnp.zeros(2, image.dtype))


def cutout(key, image, fraction=0.25):
  """One square hole of side `fraction` of the image, at a random centre (it may be partly
  outside the image), filled with zeros."""
  h, w, _ = image.shape
  side_h, side_w = max(1, int(h * fraction)), max(1, int(w * fraction))
  centre = jax.random.randint(key, (2,), 0, jnp.array([h, w]))
  ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  top, left = centre[0] - side_h // 2, centre[1] - side_w // 2
  hole = (ys >= top) & (ys < top + side_h) & (xs >= left) & (xs < left + side_w)
  return jnp.where(hole[:, :, None], 0.0, image).astype(image.dtype)


def color(key, image, strength=0.25):
  """Brightness, saturation and contrast jitter, each by a factor in 1 +- strength: a shift by
  up to `strength` (the data's unit scale), a scaling of each pixel's deviation from its grey
  value, and a scaling about the image mean."""
  k_b, k_s, k_c = jax.random.split(key, 3)
  factor = lambda k: jax.random.uniform(k, (), image.dtype, 1 - strength, 1 + strength)
  image = image + (factor(k_b) - 1)
  grey = jnp.mean(image, axis=-1, keepdims=True)
  image = grey + (image - grey) * factor(k_s)
  mean = jnp.mean(image)
  return mean + (image - mean) * factor(k_c)


OPS: dict[str, Op] = {'flip': flip, 'color': color, 'crop': crop, 'translate': translate,
                      'rotate': rotate, 'cutout': cutout}

# RCIG's evaluation strategies.
GRAYSCALE_STRATEGY = 'crop_rotate_translate_cutout'
RGB_STRATEGY = 'flip_color_crop_rotate_translate_cutout'


def parse_strategy(strategy: str) -> tuple[str, ...]:
  """'crop_rotate' -> ('crop', 'rotate'), checking every name."""
  names = tuple(s for s in strategy.split('_') if s)
  unknown = [n for n in names if n not in OPS]
  if unknown or not names:
    raise ValueError(f'Unknown augmentation strategy {strategy!r}: join names from '
                     f'{sorted(OPS)} with "_", e.g. {GRAYSCALE_STRATEGY!r}.')
  return names


def default_strategy(channels: int) -> str:
  """RCIG's: no flips or colour for single-channel images."""
  return RGB_STRATEGY if channels == 3 else GRAYSCALE_STRATEGY


def one_of(strategy: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """augment(key, images NHWC): each image gets one op drawn uniformly from `strategy`."""
  ops = [OPS[name] for name in parse_strategy(strategy)]

  def one(key, image):
    pick, op_key = jax.random.split(key)
    index = jax.random.randint(pick, (), 0, len(ops))
    return jax.lax.switch(index, ops, op_key, image)

  def augment(key, images):
    if images.ndim != 4:
      raise ValueError(f'augment needs NHWC images, got shape {images.shape}.')
    return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)

  return augment
