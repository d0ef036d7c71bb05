"""Infinite-width NTK/NNGP kernels: jitted tile functions, their vjp, tile sizing and blocked evaluation.

A *tile* is one call of a jitted tile function: the kernels of a row block x1 against a
column block x2, or the vjp of <G_ntk, NTK> + <G_nngp, NNGP> with respect to x1 for
cotangent blocks G. Blocked evaluation walks a large kernel matrix tile by tile with tiles of
one shape per call, fitted to the matrix (`fitted_tile`: 10 rows with tile 8 are two tiles of
5, not a tile of 8 and one padded to 8), so every tile reuses one compiled function and peak
memory is bounded by the tile size (`tile_memory`, `auto_tile`).
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
from ntkdd.common.choices import KERNELS


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


@dataclasses.dataclass(frozen=True)
class TileMemory:
  """Estimated peak bytes of one tile call: fixed + (rows + cols) * per_image + rows * cols *
  per_pair (see `tile_memory`)."""
  fixed: int
  per_image: int
  per_pair: int

  def bytes(self, rows: int, cols: int) -> int:
    return self.fixed + (rows + cols) * self.per_image + rows * cols * self.per_pair


def tile_memory(arch: architectures.Architecture, image_shape: tuple, dtype='float32',
                vjp: bool = False) -> TileMemory:
  """Peak-memory model of a tile call, from the architecture's layer shapes.

  Images (split path): a pair's covariances are computed one pair at a time, so they are a
  fixed working set: the first convolution's full patch Gram matrix (P^2 entries, P = H * W)
  plus a few live kernels of P * (2R+1)^2 entries (R the cross band radius; P^2 without
  bands), 8 live in a forward and 24 in a vjp (rematerialised forward, cotangents). Each
  image holds its pixels and 3x3 patches and its ReLU variances (P per full-resolution
  ReLU, a quarter per pooling after them); each pair its NTK and NNGP (and their cotangents
  and per-pair scan buffers in a vjp). Vectors (fc, or split=False): every pair holds its
  (n1, n2, ...) kernels at every layer.
  """
  itemsize = np.dtype(dtype).itemsize
  factor = 3 if vjp else 1
  image_shape = tuple(image_shape)
  if arch.name == 'fc' or len(image_shape) < 3:
    features = int(np.prod(image_shape))
    layers = arch.depth + 2
    return TileMemory(fixed=0, per_image=itemsize * factor * (features + 2 * layers),
                      per_pair=itemsize * factor * 4 * layers)
  h, w, c = image_shape
  pixels = h * w
  layer = architectures.build(_ntk_parameterized(arch))
  cross_band, _ = band_radii(layer, (h, w))
  per_pair_entries = pixels * pixels if cross_band is None else pixels * (2 * cross_band + 1) ** 2
  fixed = itemsize * (pixels * pixels + 8 * factor * per_pair_entries)
  relu_variances = pixels * (2 + sum(4.0 ** -i for i in range(1, arch.depth + 1)))
  per_image = itemsize * factor * int(pixels * c * 10 + relu_variances)
  per_pair = itemsize * (2 * len(KERNELS) if vjp else len(KERNELS))
  return TileMemory(fixed=fixed, per_image=per_image, per_pair=per_pair)


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
  """The largest square tile side (at most max_tile) whose `tile_memory` estimate fits in
  memory_fraction of `available_memory_bytes()` (the device's free memory where JAX reports
  it, else the host's available memory); at least 1.

  This is what compute_kernel and kernel_vjp use when tile is None, then fitted to the
  problem's shape (`fitted_tile`). On the split path a pair costs only its outputs, so on a
  CPU host this is max_tile: one call computes up to max_tile^2 pairs.
  """
  budget = available_memory_bytes() * memory_fraction
  memory = tile_memory(arch, tuple(image_shape), dtype, vjp)
  tile = max_tile
  while tile > 1 and memory.bytes(tile, tile) > budget:
    tile = max(1, int(tile * 0.9))
  return int(tile)


def fitted_tile(n: int, tile: int) -> int:
  """The tile side for n rows given the largest allowed side `tile`: the fewest tiles of at
  most `tile` rows, all of one size, ceil(n / ceil(n / tile)); padding stays below the number
  of tiles. 10 rows with tile 8 give tiles of 5 (not 8 and a padded 8); 100 give 8 (104)."""
  if not isinstance(tile, (int, np.integer)) or isinstance(tile, bool) or tile < 1:
    raise ValueError(f'tile must be an integer >= 1, got {tile!r} (None: the largest tile '
                     f'that fits memory).')
  if n <= 0:
    return 1
  count = -(-n // tile)
  return -(-n // count)


# ----------------------------------------------------------------------------------------------
# Blocked evaluation.

def compute_kernel(arch: architectures.Architecture, x1: np.ndarray,
                   x2: Optional[np.ndarray] = None, tile: Optional[int] = None,
                   dtype: str = 'float32',
                   progress: Optional[Callable[[int, int], None]] = None,
                   legacy: bool = False) -> dict[str, np.ndarray]:
  """{'ntk', 'nngp'}: (n1, n2) kernels, computed tile by tile with bounded memory.

  With x2 None the kernel is K(x1, x1), and only tiles on and above the diagonal are computed.

  tile: the largest tile side; None (the default) asks for the largest tile that fits memory
  (`auto_tile`). Rows and columns are each split into the fewest tiles of at most `tile` of
  one size (`fitted_tile`), so K(10, 100) with tile 8 runs tiles of 5 x 8, not 8 x 8 with
  the rows padded to 16. legacy: the previous formulation (see `kernel_fn`) and tiling (square
  tiles, the last ones padded), kept for side-by-side comparisons.
  """
  x1 = np.asarray(x1, dtype)
  symmetric = x2 is None
  x2 = x1 if symmetric else np.asarray(x2, dtype)
  _check_pair(x1, x2, arch, tile)
  t1, t2 = _tiles(arch, x1, x2, tile, dtype, False, legacy)
  f = tile_fn(arch, legacy)
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
  for name in KERNELS:
    if not np.all(np.isfinite(out[name])):
      raise FloatingPointError(f'The {name} kernel of {arch.name} depth {arch.depth} came out NaN '
                               f'or inf; try --dtype float64 or another --w-std/--b-std.')
  return out


def kernel_vjp(arch: architectures.Architecture, x1: np.ndarray, x2: np.ndarray,
               g_ntk: Optional[np.ndarray] = None, g_nngp: Optional[np.ndarray] = None,
               tile: Optional[int] = None, dtype: str = 'float32',
               legacy: bool = False) -> np.ndarray:
  """d/dx1 of <g_ntk, NTK(x1, x2)> + <g_nngp, NNGP(x1, x2)>, summed over column tiles.

  For the gradient of <G, K(x, x)> with respect to x (both arguments moving), pass x2 = x1
  and the symmetrised cotangent G + G^T. tile and legacy as in `compute_kernel`.
  """
  x1, x2 = np.asarray(x1, dtype), np.asarray(x2, dtype)
  _check_pair(x1, x2, arch, tile)
  shape = (len(x1), len(x2))
  g_ntk = np.zeros(shape, dtype) if g_ntk is None else np.asarray(g_ntk, dtype)
  g_nngp = np.zeros(shape, dtype) if g_nngp is None else np.asarray(g_nngp, dtype)
  for name, g in (('g_ntk', g_ntk), ('g_nngp', g_nngp)):
    if g.shape != shape:
      raise ValueError(f'{name} has shape {g.shape}, expected {shape} (rows x1, columns x2).')
  t1, t2 = _tiles(arch, x1, x2, tile, dtype, True, legacy)
  f = tile_vjp_fn(arch, legacy)
  grad = np.zeros_like(x1)
  for r0, r1 in tile_ranges(len(x1), t1):
    x1_tile = pad_rows(x1[r0:r1], t1)
    for c0, c1 in tile_ranges(len(x2), t2):
      block = f(x1_tile, pad_rows(x2[c0:c1], t2),
                pad_matrix(g_ntk[r0:r1, c0:c1], t1, t2),
                pad_matrix(g_nngp[r0:r1, c0:c1], t1, t2))
      grad[r0:r1] += np.asarray(block)[:r1 - r0]
  return grad


def _tiles(arch: architectures.Architecture, x1: np.ndarray, x2: np.ndarray,
           tile: Optional[int], dtype: str, vjp: bool, legacy: bool) -> tuple[int, int]:
  """(row tile, column tile) of a blocked evaluation. legacy: the previous tiling, square tiles
  of min(tile, n) with the last ones padded, and an auto tile of 2^13 / pixels for images."""
  if legacy:
    if tile is None:
      pixels = int(np.prod(x1.shape[1:3])) if x1.ndim == 4 else 0
      tile = (max(1, min(256, (1 << 13) // pixels)) if pixels and arch.name != 'fc'
              else auto_tile(arch, x1.shape[1:], dtype, vjp))
    fitted_tile(1, tile)  # validates tile
    return min(tile, len(x1)), min(tile, len(x2))
  if tile is None:
    tile = auto_tile(arch, x1.shape[1:], dtype, vjp)
  return fitted_tile(len(x1), tile), fitted_tile(len(x2), tile)


def _check_pair(x1: np.ndarray, x2: np.ndarray, arch: architectures.Architecture,
                tile: Optional[int]) -> None:
  if tile is not None and tile < 1:   # a tile < 1 walks no pairs: an all-zero kernel
    raise ValueError(f'tile must be >= 1 (or None: chosen from free memory), got {tile}.')
  if x1.ndim == 4:
    architectures.check_input_shape(arch, x1.shape[1:])
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
