"""Infinite-width NTK/NNGP kernels: jitted tile functions, their vjp, and blocked evaluation.

A *tile* is the unit of work a kernel worker runs: the kernels of a row block x1 against a
column block x2, or the vjp of <G_ntk, NTK> + <G_nngp, NNGP> with respect to x1 for
cotangent blocks G. Blocked evaluation walks a large kernel matrix tile by tile with tiles of
one fixed shape (the last ones padded), so every tile reuses one compiled function and peak
memory is bounded by the tile size.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntkdd.common import architectures, stax

KERNELS = ('ntk', 'nngp')


def kernel_fn(arch: architectures.Architecture, split: Optional[bool] = None,
              band: Optional[bool] = None, legacy: bool = False) -> Callable:
  """Pure `f(x1, x2) -> (ntk, nngp)` for batches of images (NHWC) or vectors (N, D).

  split (default: for the ConvNet on images) computes each image's self-covariance once, image
  by image (its ReLU variances are all the cross kernel needs of it), then the cross kernel
  pair by pair, both with `lax.map`, so a pair's covariances stay in cache instead of
  streaming n1*n2 of them through memory; each pair's body is rematerialised in a vjp rather
  than stored. split=False is the plain batched stax evaluation.

  band (split passes; default: where it is at most half the full covariance) keeps only the
  pixel displacements the readout and the ReLU variances depend on (stax's displacement
  bands): at 32x32, depth 3, 225 of 1024 per pixel in the cross pass and 49 in the self pass.
  band=True uses bands whenever the layers allow, band=False never.

  legacy=True evaluates the previous formulation (bands whose vjp scatters; see `stax.Kernel`):
  equal values and gradients to float rounding, slower vjp.
  It is kept callable for side-by-side benchmarks (bench/kernel_throughput.py --compare-legacy)
  and the equality tests.
  """
  layer = architectures.build(_ntk_parameterized(arch))

  def batched(x1, x2):
    k = layer.kernel_fn(stax.inputs_to_kernel(x1, x2, legacy=legacy))
    return k.ntk, k.nngp

  def f(x1, x2):
    if not (split if split is not None else (x1.ndim == 4 and arch.name == 'convnet')):
      return batched(x1, x2)
    radii = band_radii(layer, x1.shape[1:3], band) if x1.ndim == 4 else (None, None)
    return _split_kernel(layer, x1, x2, *radii, legacy=legacy)

  return f


def band_radii(layer: stax.Layer, image_size: tuple,
               band: Optional[bool] = None) -> tuple[Optional[int], Optional[int]]:
  """Displacement radii (cross pass, self pass) for images of `image_size` (H, W); None for a
  pass that keeps full covariances."""
  if band is False or layer.band_fn is None:
    return None, None
  pixels = image_size[0] * image_size[1]

  def chosen(radius):
    if radius is None or (band is None and 2 * (2 * radius + 1) ** 2 > pixels):
      return None
    return radius

  return chosen(layer.band_fn(0, 'cross')), chosen(layer.band_fn(None, 'self'))


def _split_kernel(layer: stax.Layer, x1, x2, cross_band: Optional[int] = None,
                  self_band: Optional[int] = None, legacy: bool = False):
  """(ntk, nngp) of `layer` by a per-image self pass and a per-pair cross pass."""
  var1 = _self_variances(layer, x1, self_band, legacy)
  var2 = _self_variances(layer, x2, self_band, legacy)
  variances = tuple(zip(var1, var2))
  n1, n2 = x1.shape[0], x2.shape[0]

  @jax.checkpoint
  def pair(index):
    i, j = index // n2, index % n2
    take1 = lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1)
    take2 = lambda a: jax.lax.dynamic_slice_in_dim(a, j, 1)
    given = tuple((take1(v1), take2(v2)) for v1, v2 in variances)
    k = layer.kernel_fn(stax.inputs_to_kernel(take1(x1), take2(x2), 'cross', given,
                                              band=cross_band, legacy=legacy))
    return k.ntk.reshape(()), k.nngp.reshape(())

  ntk, nngp = jax.lax.map(pair, jnp.arange(n1 * n2))
  return ntk.reshape(n1, n2), nngp.reshape(n1, n2)


def _self_variances(layer: stax.Layer, x, band: Optional[int] = None, legacy: bool = False):
  """Per ReLU, the per-pixel variances (n, H, W) of each image's own covariance, image by image
  (the second batch of the self pass is empty, so only cov1 is computed)."""

  @jax.checkpoint
  def one(image):
    image = image[None]
    k = layer.kernel_fn(stax.inputs_to_kernel(image, image[:0], parts='self', band=band,
                                              legacy=legacy))
    return tuple(v1[0] for v1, _ in k.variances)

  return jax.lax.map(one, x)


def _ntk_parameterized(arch: architectures.Architecture) -> architectures.Architecture:
  """Kernels are always those of the NTK parameterisation, whatever a finite net uses."""
  return dataclasses.replace(arch, parameterization='ntk')


@functools.lru_cache(maxsize=None)
def tile_fn(arch: architectures.Architecture, legacy: bool = False) -> Callable:
  """Jitted `(x1_tile, x2_tile) -> (ntk, nngp)`; legacy: see `kernel_fn`."""
  return jax.jit(kernel_fn(arch, legacy=legacy))


@functools.lru_cache(maxsize=None)
def tile_vjp_fn(arch: architectures.Architecture, legacy: bool = False) -> Callable:
  """Jitted `(x1_tile, x2_tile, g_ntk, g_nngp) -> d<G, K>/dx1` (x2 held fixed)."""
  f = kernel_fn(arch, legacy=legacy)

  def vjp(x1, x2, g_ntk, g_nngp):
    _, pullback = jax.vjp(lambda a: f(a, x2), x1)
    return pullback((g_ntk, g_nngp))[0]

  return jax.jit(vjp)


# ----------------------------------------------------------------------------------------------
# Tiling.

def tile_ranges(n: int, tile: int) -> Iterator[tuple[int, int]]:
  """[start, stop) ranges covering range(n) in steps of `tile`."""
  for start in range(0, n, tile):
    yield start, min(start + tile, n)


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Pads a block to `rows` rows by repeating its last row (a valid image, so no 0/0)."""
  if x.shape[0] == rows:
    return x
  reps = np.repeat(x[-1:], rows - x.shape[0], axis=0)
  return np.concatenate([x, reps], axis=0)


def pad_matrix(g: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """Zero-pads a cotangent block, so padded pairs contribute nothing to a vjp."""
  out = np.zeros((rows, cols), g.dtype)
  out[:g.shape[0], :g.shape[1]] = g
  return out


def bytes_per_pair(arch: architectures.Architecture, image_shape: tuple, dtype,
                   vjp: bool = False) -> int:
  """Rough peak bytes one pair of a tile costs (measured live-tensor count, with margin)."""
  itemsize = np.dtype(dtype).itemsize
  if arch.name == 'fc' or len(image_shape) < 3:
    return 64 * itemsize * (arch.depth + 1)
  # Images take the split path: self-covariances and cross kernels are computed one image or
  # one pair at a time (lax.map, rematerialised in the vjp), so beyond a fixed working set of a
  # few full-resolution covariances a pair costs only its outputs and per-pair cotangents.
  return 16 * itemsize


def working_set_bytes(arch: architectures.Architecture, image_shape: tuple, dtype,
                      vjp: bool = False) -> int:
  """Rough tile-independent peak of the split path: one image's or pair's live covariances."""
  if arch.name == 'fc' or len(image_shape) < 3:
    return 0
  pixels = image_shape[0] * image_shape[1]
  live = 24 if vjp else 8
  return live * pixels * pixels * np.dtype(dtype).itemsize


def available_memory_bytes() -> int:
  """Memory the kernel may use: free accelerator memory, else MemAvailable from /proc."""
  try:
    stats = jax.devices()[0].memory_stats()
    if stats and 'bytes_limit' in stats:
      return int(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
  except Exception:  # CPU devices have no memory_stats.
    pass
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 4 << 30


def auto_tile(arch: architectures.Architecture, image_shape: tuple, dtype='float32',
              vjp: bool = False, memory_fraction: float = 0.25, max_tile: int = 256) -> int:
  """Largest square tile whose estimated peak fits in a fraction of available memory (and, for
  images, whose work per call stays bounded)."""
  budget = available_memory_bytes() * memory_fraction
  budget -= working_set_bytes(arch, tuple(image_shape), dtype, vjp)
  per_pair = bytes_per_pair(arch, tuple(image_shape), dtype, vjp)
  tile = int((max(budget, 0) / per_pair) ** 0.5)
  if arch.name != 'fc' and len(image_shape) >= 3:
    # Memory no longer bounds image tiles; keep one call to ~2^26 covariance entries (64 pairs
    # at 32x32, seconds of work) so that tiles stay a fine-grained unit of work.
    tile = min(tile, (1 << 13) // (image_shape[0] * image_shape[1]))
  return int(max(1, min(tile, max_tile)))


# ----------------------------------------------------------------------------------------------
# Blocked evaluation.

def compute_kernel(arch: architectures.Architecture, x1: np.ndarray,
                   x2: Optional[np.ndarray] = None, tile: Optional[int] = None,
                   dtype: str = 'float32',
                   progress: Optional[Callable[[int, int], None]] = None) -> dict[str, np.ndarray]:
  """{'ntk', 'nngp'}: (n1, n2) kernels, computed tile by tile with bounded memory.

  With x2 None the kernel is K(x1, x1), and only tiles on and above the diagonal are computed.
  """
  x1 = np.asarray(x1, dtype)
  symmetric = x2 is None
  x2 = x1 if symmetric else np.asarray(x2, dtype)
  _check_pair(x1, x2)
  tile = tile or auto_tile(arch, x1.shape[1:], dtype)
  t1, t2 = min(tile, len(x1)), min(tile, len(x2))
  f = tile_fn(arch)
  out = {name: np.zeros((len(x1), len(x2)), dtype) for name in KERNELS}
  pairs = [(r, c) for r in tile_ranges(len(x1), t1) for c in tile_ranges(len(x2), t2)
           if not symmetric or c[1] > r[0]]
  for i, ((r0, r1), (c0, c1)) in enumerate(pairs):
    ntk, nngp = f(pad_rows(x1[r0:r1], t1), pad_rows(x2[c0:c1], t2))
    for name, block in zip(KERNELS, (ntk, nngp)):
      block = np.asarray(block)[:r1 - r0, :c1 - c0]
      out[name][r0:r1, c0:c1] = block
      if symmetric:
        out[name][c0:c1, r0:r1] = block.T
    if progress:
      progress(i + 1, len(pairs))
  return out


def kernel_vjp(arch: architectures.Architecture, x1: np.ndarray, x2: np.ndarray,
               g_ntk: Optional[np.ndarray] = None, g_nngp: Optional[np.ndarray] = None,
               tile: Optional[int] = None, dtype: str = 'float32') -> np.ndarray:
  """d/dx1 of <g_ntk, NTK(x1, x2)> + <g_nngp, NNGP(x1, x2)>, summed over column tiles.

  For the gradient of <G, K(x, x)> with respect to x (both arguments moving), pass x2 = x1
  and the symmetrised cotangent G + G^T.
  """
  x1, x2 = np.asarray(x1, dtype), np.asarray(x2, dtype)
  _check_pair(x1, x2)
  shape = (len(x1), len(x2))
  g_ntk = np.zeros(shape, dtype) if g_ntk is None else np.asarray(g_ntk, dtype)
  g_nngp = np.zeros(shape, dtype) if g_nngp is None else np.asarray(g_nngp, dtype)
  for name, g in (('g_ntk', g_ntk), ('g_nngp', g_nngp)):
    if g.shape != shape:
      raise ValueError(f'{name} has shape {g.shape}, expected {shape} (rows x1, columns x2).')
  tile = tile or auto_tile(arch, x1.shape[1:], dtype, vjp=True)
  t1, t2 = min(tile, len(x1)), min(tile, len(x2))
  f = tile_vjp_fn(arch)
  grad = np.zeros_like(x1)
  for r0, r1 in tile_ranges(len(x1), t1):
    x1_tile = pad_rows(x1[r0:r1], t1)
    for c0, c1 in tile_ranges(len(x2), t2):
      block = f(x1_tile, pad_rows(x2[c0:c1], t2),
                pad_matrix(g_ntk[r0:r1, c0:c1], t1, t2),
                pad_matrix(g_nngp[r0:r1, c0:c1], t1, t2))
      grad[r0:r1] += np.asarray(block)[:r1 - r0]
  return grad


def _check_pair(x1: np.ndarray, x2: np.ndarray) -> None:
  if x1.shape[1:] != x2.shape[1:]:
    raise ValueError(f'x1 and x2 must have the same image shape, got {x1.shape[1:]} and '
                     f'{x2.shape[1:]}.')
  if x1.ndim not in (2, 4):
    raise ValueError(f'Inputs must be NHWC images or (N, D) vectors, got shape {x1.shape}.')
  if not (np.all(np.isfinite(x1)) and np.all(np.isfinite(x2))):
    raise ValueError('Inputs contain NaN or inf; check the data or the preprocessing.')


def enable_float64_if(dtype: str) -> None:
  """float64 needs JAX's x64 mode, which must be on before any array is made."""
  if np.dtype(dtype) == np.float64 and not jax.config.jax_enable_x64:
    jax.config.update('jax_enable_x64', True)
    logging.info('Enabled JAX float64 (jax_enable_x64).')
