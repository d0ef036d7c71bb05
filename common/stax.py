"""Layers as (init_fn, apply_fn, kernel_fn) triples: finite networks and their infinite-width kernels.

Each layer is a `Layer(init_fn, apply_fn, kernel_fn)`:
  * `init_fn(rng, input_shape) -> (output_shape, params)`,
  * `apply_fn(params, inputs) -> outputs` for the finite-width network,
  * `kernel_fn(kernel) -> kernel`, mapping the infinite-width NNGP/NTK of the layer's inputs to
    those of its outputs,
  * optionally `band_fn(radius, parts) -> radius` (displacement bands, below).

Kernels of convolutional layers keep the full pixel-pixel covariance: for a pair of batches the
`nngp` and `ntk` arrays have shape (n1, n2, H, W, H, W), and the per-image self-covariances
`cov1`, `cov2` have shape (n, H, W, H, W). Fully-connected kernels are (n1, n2) and (n,).

The recursions are those of neural-tangents' `stax` in NTK parameterisation, which the tests
check value by value; the implementation here is our own and organised for speed: the first
convolution acts on image patches (one matrix product), the diagonal 3x3 convolution of the
covariance is separable into two 3-tap passes, and everything between is elementwise.

Displacement bands: a flatten readout sees only the pixel pairs (p, p), a convolution keeps
the displacement q - p of a pair, a 2x2 pool of displacement D sees input displacements 2D +
{-1, 0, 1}, and a ReLU needs only its own pair and the pixels' variances. So the readout of
a ConvNet needs displacements |q - p| <= R per axis only (R = 7 at depth 3), and a layer's
variances need fewer still. A kernel with `band=R` stores just those: (..., H, W, 2R+1, 2R+1)
with [..., y, x, R + dy, R + dx] = Cov((y, x), (y + dy, x + dx)), zero where the partner
pixel lies outside the image; each layer's `band_fn` says which radius its input must carry.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Kernel(NamedTuple):
  """Infinite-width kernels of a batch pair at some layer.

  `inputs` holds the raw (x1, x2) until the first layer consumes them, so that a first
  convolution can work on image patches rather than on the (much larger) pixel covariance.

  `parts` says which kernels are computed: 'all' (cross and self), 'self' (only cov1, cov2;
  each ReLU appends the per-pixel variances it used to `variances`) or 'cross' (only nngp,
  ntk; each ReLU takes its variances from the front of `given` instead of from cov1, cov2).
  Splitting lets the cross kernel be computed pair by pair, with a working set that stays in
  cache, while the self-covariances are computed once per image (see `kernels.kernel_fn`).

  `legacy` selects the previous formulation of the same maps (bands whose vjp scatters: see
  `_gram_band`, `_shifted_band`), kept callable for side-by-side benchmarks and equality tests.
  """
  nngp: Any
  ntk: Any
  cov1: Any
  cov2: Any
  inputs: Optional[tuple] = None
  parts: str = 'all'
  variances: tuple = ()
  given: tuple = ()
  band: Optional[int] = None
  legacy: bool = False


class Layer(NamedTuple):
  """`band_fn(radius, parts) -> radius`: the displacement radius the layer's input kernel must
  carry for its output to carry `radius` (None: nothing needed), in a 'cross' or 'self' pass;
  a layer without one cannot work on bands."""
  init_fn: Callable
  apply_fn: Callable
  kernel_fn: Callable
  band_fn: Optional[Callable] = None


# ----------------------------------------------------------------------------------------------
# Inputs.

def inputs_to_kernel(x1, x2, parts: str = 'all', given: tuple = (),
                     band: Optional[int] = None, legacy: bool = False) -> Kernel:
  """The kernel of the inputs themselves; materialised lazily by the first layer.

  parts='self' computes only the self-covariances and records the ReLU variances;
  parts='cross' computes only nngp and ntk, taking the ReLU variances from `given` (the
  `variances` of a 'self' pass over the same inputs, one (var1, var2) per ReLU).
  band=R (split passes of one image or pair only) keeps displacements up to R (see above).
  legacy=True: the previous formulation (see `Kernel`), equal to float rounding.
  """
  if parts not in ('all', 'self', 'cross'):
    raise ValueError(f"parts must be 'all', 'self' or 'cross', got {parts!r}.")
  if band is not None and (parts == 'all' or x1.ndim != 4 or x1.shape[0] > 1
                           or x2.shape[0] > 1):
    raise ValueError('Displacement bands are for split passes over one image or one pair.')
  return Kernel(nngp=None, ntk=None, cov1=None, cov2=None, inputs=(x1, x2), parts=parts,
                given=tuple(given), band=band, legacy=legacy)


def _opt(f: Callable, x):
  """f(x), or None where a split pass does not compute x."""
  return None if x is None else f(x)


def _materialize(k: Kernel) -> Kernel:
  """Input covariances <x1_p, x2_q> / C (channels averaged, as neural-tangents does)."""
  if k.inputs is None:
    return k
  x1, x2 = k.inputs
  channels = x1.shape[-1]
  cross, self_ = k.parts != 'self', k.parts != 'cross'
  nngp = cov1 = cov2 = None
  if x1.ndim == 2:
    if cross:
      nngp = x1 @ x2.T / channels
    if self_:
      cov1 = jnp.sum(x1 * x1, -1) / channels
      cov2 = jnp.sum(x2 * x2, -1) / channels
  elif k.band is not None:
    r = k.band
    mask = _band_mask(x1.shape[1], x1.shape[2], r)
    if cross:
      nngp = _gram_band(x1, x2, r, pair=True, legacy=k.legacy) * (mask / channels)
    if self_:
      cov1 = _gram_band(x1, x1, r, legacy=k.legacy) * (mask / channels)
      cov2 = _gram_band(x2, x2, r, legacy=k.legacy) * (mask / channels)
  else:
    if cross:
      nngp = jnp.einsum('ahwc,bxyc->abhwxy', x1, x2) / channels
    if self_:
      cov1 = jnp.einsum('ahwc,axyc->ahwxy', x1, x1) / channels
      cov2 = jnp.einsum('ahwc,axyc->ahwxy', x2, x2) / channels
  return k._replace(nngp=nngp, ntk=_opt(jnp.zeros_like, nngp), cov1=cov1, cov2=cov2,
                    inputs=None)


def _spatial_diagonal(cov, band: Optional[int] = None):
  """Per-pixel variances (n, H, W) of self-covariances (n, H, W, H, W) or of their bands;
  fc variances pass."""
  if cov.ndim == 1:
    return cov
  if band is not None:
    return cov[..., band, band]
  n, h, w = cov.shape[:3]
  return _masked_diagonal(cov.reshape(n, h * w, h * w)).reshape(n, h, w)


def _masked_diagonal(square):
  """Diagonal of the last two axes as a masked sum.

  Not `jnp.diagonal`: under jit, jax 0.4.23 (the Launchpad environment) computes wrong
  gradients through it once it follows a diagonal convolution; the masked sum costs only
  O(n P^2), against the O(n1 n2 P^2) of the cross covariance.
  """
  return jnp.sum(square * jnp.eye(square.shape[-1], dtype=square.dtype), axis=-1)


# ----------------------------------------------------------------------------------------------
# Displacement bands.

def _band_mask(h: int, w: int, r: int) -> np.ndarray:
  """(H, W, 2r+1, 2r+1): 1 where pixel (y + dy, x + dx) lies inside the image, else 0."""
  d = np.arange(-r, r + 1)
  inside_y = (np.arange(h)[:, None] + d >= 0) & (np.arange(h)[:, None] + d < h)
  inside_x = (np.arange(w)[:, None] + d >= 0) & (np.arange(w)[:, None] + d < w)
  return (inside_y[:, None, :, None] & inside_x[None, :, None, :]).astype(np.float32)


def _band_indices(h: int, w: int, r: int) -> tuple:
  """Index arrays (y, x, y + dy, x + dx) broadcast to (H, W, 2r+1, 2r+1), offset by r for an
  array padded by r on its partner axes."""
  d = np.arange(2 * r + 1)
  y = np.arange(h)[:, None, None, None]
  x = np.arange(w)[None, :, None, None]
  return y, x, y + d[None, None, :, None], x + d[None, None, None, :]


def _skew_band(a, row_axis: int, partner_axis: int, r: int):
  """The band of `a` along a (row, partner) axis pair of equal length n, row before partner:
  out[..., i, ..., d, ...] = a[..., i, ..., i + d - r, ...] for d in [0, 2r], zero where
  i + d - r falls outside [0, n); the partner axis becomes the displacement axis.

  Pads, reshapes and slices only: with the partner axis padded by r, moving one row down
  moves the partner index one step right, which is a flat array read with rows one element
  longer (the 'skew'). Their transposes are again pads and slices, so a vjp has no scatter
  (a gather's transpose, which XLA on CPU runs element by element).
  """
  row_axis, partner_axis = row_axis % a.ndim, partner_axis % a.ndim
  if not row_axis < partner_axis or a.shape[row_axis] != a.shape[partner_axis]:
    raise ValueError(f'_skew_band needs row axis < partner axis of equal length, got axes '
                     f'{row_axis}, {partner_axis} of shape {a.shape}.')
  n = a.shape[row_axis]
  pad = [(0, 0)] * a.ndim
  pad[partner_axis] = (r, r)
  a = jnp.pad(a, pad)
  lead, block = a.shape[:row_axis], a.shape[row_axis + 1:]
  m = math.prod(block)                               # one row's entries
  s = math.prod(a.shape[partner_axis + 1:])          # stride of the partner axis
  flat = jnp.pad(a.reshape(lead + (n * m,)), [(0, 0)] * len(lead) + [(0, n * s)])
  skewed = flat.reshape(lead + (n, m + s))[..., :m].reshape(lead + (n,) + block)
  return lax.slice_in_dim(skewed, 0, 2 * r + 1, axis=partner_axis)


def _shifted_band(v, r: int, legacy: bool = False):
  """v (..., H, W) -> (..., H, W, 2r+1, 2r+1) holding v[..., y + dy, x + dx], 0 outside."""
  if legacy:
    return _shifted_band_gather(v, r)
  return _shifted_band_dense_vjp(v, r)


def _shifted_band_gather(v, r: int):
  h, w = v.shape[-2:]
  padded = jnp.pad(v, [(0, 0)] * (v.ndim - 2) + [(r, r), (r, r)])
  _, _, y2, x2 = _band_indices(h, w, r)
  return padded[..., y2, x2]


def _shifted_band_skewed(v, r: int):
  """`_shifted_band_gather` by broadcasts and `_skew_band` (no gather)."""
  h, w = v.shape[-2:]
  lead = v.shape[:-2]
  rows = jnp.broadcast_to(v[..., None, :], lead + (h, w, w))           # [y, x, u] = v[y, u]
  along_x = _skew_band(rows, -2, -1, r)                                # [y, x, dx]
  full = jnp.broadcast_to(jnp.swapaxes(along_x, -3, -2)[..., None, :, :, :],
                          lead + (h, w, h, 2 * r + 1))                 # [y, x, v, dx]
  return _skew_band(full, -4, -2, r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _shifted_band_dense_vjp(v, r: int):
  """The gather forward (fastest), with the skewed form's transpose as its vjp (pads and
  slices instead of a scatter)."""
  return _shifted_band_gather(v, r)


def _shifted_band_fwd(v, r):
  return _shifted_band_gather(v, r), v


def _shifted_band_bwd(r, v, g):
  return jax.vjp(lambda u: _shifted_band_skewed(u, r), v)[1](g)


_shifted_band_dense_vjp.defvjp(_shifted_band_fwd, _shifted_band_bwd)


def _gram_band(a, b, r: int, pair: bool = False, legacy: bool = False):
  """Band of the Gram matrix <a_p, b_q> of feature maps a, b (n, H, W, F) with n <= 1:
  (n, H, W, 2r+1, 2r+1), or (1, 1, ...) with pair=True. One matrix product, then the
  displacements |q - p| <= r taken out of it (the product is cheap next to the layers)."""
  n, h, w, f = a.shape
  if n == 0:
    return jnp.zeros((0, h, w, 2 * r + 1, 2 * r + 1), a.dtype)
  band = (_gram_band_gather if legacy else _local_gram)(a[0], b[0], r)[None]
  return band[None] if pair else band


def _gram_band_gather(a, b, r: int):
  """(H, W, 2r+1, 2r+1) band of <a_p, b_q> for feature maps (H, W, F): the full Gram matrix,
  then a gather of the band (autodiff transposes the gather into a scatter)."""
  h, w, f = a.shape
  gram = (a.reshape(-1, f) @ b.reshape(-1, f).T).reshape(h, w, h, w)
  gram = jnp.pad(gram, [(0, 0), (0, 0), (r, r), (r, r)])
  return gram[_band_indices(h, w, r)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _local_gram(a, b, r: int):
  """`_gram_band_gather` with a hand-written vjp: band[y, x, dy, dx] = <a[y, x], b[y + dy - r,
  x + dx - r]> is, for each row shift dy, a batch (over y) of matrix products between a's row
  and b's row y + dy, banded along x. The vjp un-bands the cotangent along x (pads and
  reshapes) and runs those matrix products backwards, instead of scattering it into the full
  (H, W, H, W) Gram matrix."""
  return _gram_band_gather(a, b, r)


def _local_gram_fwd(a, b, r):
  return _gram_band_gather(a, b, r), (a, b)


def _local_gram_bwd(r, residuals, g):
  a, b = residuals
  h, w, f = a.shape
  n = 2 * r + 1
  # rows[dy, y, x, u] = g[y, x, dy, u - x] for 0 <= u - x <= 2r (u indexes b padded by r).
  rows = jnp.moveaxis(g, 2, 0)                                        # (dy, y, x, dx)
  rows = jnp.pad(rows, [(0, 0)] * 3 + [(0, w + 2 * r + 1 - n)])
  rows = rows.reshape(n, h, w * (w + 2 * r + 1))[..., :w * (w + 2 * r)]
  rows = rows.reshape(n, h, w, w + 2 * r)
  padded_b = jnp.pad(b, [(r, r), (r, r), (0, 0)])
  shifted_b = jnp.stack([padded_b[dy:dy + h] for dy in range(n)])     # (dy, y, u, F)
  grad_a = jnp.einsum('dyxu,dyuf->yxf', rows, shifted_b)
  # b's rows receive from each dy the products with a's rows, shifted back by dy.
  per_shift = jnp.einsum('dyxu,yxf->dyuf', rows, a)                   # (dy, y, u, F)
  grad_padded_b = sum(jnp.pad(per_shift[dy], [(dy, n - 1 - dy), (0, 0), (0, 0)])
                      for dy in range(n))
  return grad_a, grad_padded_b[r:r + h, r:r + w]


_local_gram.defvjp(_local_gram_fwd, _local_gram_bwd)


def _band_diagonal_conv(cov, filter_shape: Sequence[int]):
  """The SAME diagonal convolution on a band: a displacement stays what it is, so the filter
  averages neighbouring pixels p + d of each displacement, one axis at a time. Entries whose
  partner falls outside the image come out non-zero; the caller masks them."""
  lead = cov.ndim - 4
  if math.prod(cov.shape[:lead]) > 1:
    raise ValueError('Displacement bands hold one image or one pair.')
  for axis, size in zip((lead, lead + 1), filter_shape):
    low = (size - 1) // 2
    offsets = tuple(o for o in range(-low, size - low) if o != 0 and abs(o) < cov.shape[axis])
    cov = _shifted_sum(cov, (axis,), offsets) * (1.0 / size)
  return cov


def _pooled_radius(window: Sequence[int], r: int) -> int:
  """Radius of a band of radius r after pooling with `window` (negative: nothing survives)."""
  return min((r - (size - 1)) // size for size in window)


def _band_pool(cov, window: Sequence[int], r: int, r_out: int, legacy: bool = False):
  """Average pooling of a band of radius r into one of radius r_out = _pooled_radius(window, r)
  (see `_band_pool_strided`). Strided slices forward, the fastest; as its vjp the transpose of
  `_band_pool_reshaped`, which is dense, where autodiff would transpose the strided slices
  into interior pads, 3x slower on XLA:CPU (legacy: autodiff)."""
  if legacy:
    return _band_pool_strided(cov, window, r, r_out)
  return _band_pool_dense_vjp(cov, tuple(window), r, r_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _band_pool_dense_vjp(cov, window: tuple, r: int, r_out: int):
  return _band_pool_strided(cov, window, r, r_out)


def _band_pool_fwd(cov, window, r, r_out):
  return _band_pool_strided(cov, window, r, r_out), cov


def _band_pool_bwd(window, r, r_out, cov, g):
  return jax.vjp(lambda c: _band_pool_reshaped(c, window, r, r_out), cov)[1](g)


_band_pool_dense_vjp.defvjp(_band_pool_fwd, _band_pool_bwd)


def _band_pool_reshaped(cov, window: Sequence[int], r: int, r_out: int):
  """`_band_pool_strided` by slices and reshapes: for each row offset a the partner offsets b
  of an output displacement are a contiguous run, so each (a_y, a_x) is a slice, a reshape and
  a sum, whose transposes are dense."""
  wh, ww = window
  h, w = cov.shape[-4:-2]
  oh, ow, n = h // wh, w // ww, 2 * r_out + 1
  lead = cov.shape[:-4]
  rows = cov[..., :oh * wh, :ow * ww, :, :].reshape(lead + (oh, wh, ow, ww) + cov.shape[-2:])
  total = 0.
  for ay in range(wh):
    sy = r - wh * r_out - ay
    for ax in range(ww):
      sx = r - ww * r_out - ax
      part = rows[..., :, ay, :, ax, sy:sy + wh * n, sx:sx + ww * n]
      total = total + part.reshape(lead + (oh, ow, n, wh, n, ww)).sum(axis=(-3, -1))
  return total * (1.0 / (wh * ww) ** 2)


def _band_pool_strided(cov, window: Sequence[int], r: int, r_out: int):
  """Average pooling of a band of radius r into one of radius r_out = _pooled_radius(window, r).
  Output displacement D of pooled pixels q, q + D averages the input pairs
  (w q + a, w (q + D) + b) over window offsets a, b: displacement w D + b - a."""
  wh, ww = window
  h, w = cov.shape[-4:-2]
  oh, ow, n = h // wh, w // ww, 2 * r_out + 1
  total = 0.
  for ay in range(wh):
    for ax in range(ww):
      rows = cov[..., ay:oh * wh:wh, ax:ow * ww:ww, :, :]
      for by in range(wh):
        for bx in range(ww):
          sy, sx = r - wh * r_out + by - ay, r - ww * r_out + bx - ax
          total = total + rows[..., sy:sy + wh * (n - 1) + 1:wh, sx:sx + ww * (n - 1) + 1:ww]
  return total * (1.0 / (wh * ww) ** 2)


# ----------------------------------------------------------------------------------------------
# Dense.

def Dense(out_dim: int, W_std: float = 1.0, b_std: float = 0.0,
          parameterization: str = 'ntk') -> Layer:
  """Fully-connected layer; kernel: W^2 K + b^2, and NTK: W^2 Theta + nngp."""
  _check_parameterization(parameterization)

  def init_fn(rng, input_shape):
    k_w, k_b = jax.random.split(rng)
    fan_in = input_shape[-1]
    # float32 parameters whatever jax_enable_x64 says: finite nets train in float32.
    w = jax.random.normal(k_w, (fan_in, out_dim), jnp.float32)
    b = jax.random.normal(k_b, (out_dim,), jnp.float32)
    if parameterization == 'standard':
      w, b = w * W_std / math.sqrt(fan_in), b * b_std
    return tuple(input_shape[:-1]) + (out_dim,), (w, b)

  def apply_fn(params, x, **unused):
    w, b = params
    if parameterization == 'ntk':
      return x @ w * (W_std / math.sqrt(x.shape[-1])) + b_std * b
    return x @ w + b

  def kernel_fn(k: Kernel) -> Kernel:
    _check_kernel_parameterization(parameterization)
    k = _materialize(k)
    return _affine(k, W_std, b_std, lambda t: t)

  return Layer(init_fn, apply_fn, kernel_fn, band_fn=lambda radius, parts: radius)


def _affine(k: Kernel, W_std: float, b_std: float, spatial_op: Callable, mask=None) -> Kernel:
  """The kernel map of a linear layer whose spatial action on covariances is `spatial_op`;
  `mask` (bands) zeroes the entries whose partner pixel is outside the image."""
  w2, b2 = W_std ** 2, b_std ** 2
  if mask is None:
    affine = lambda c: w2 * spatial_op(c) + b2
  else:
    affine = lambda c: (w2 * spatial_op(c) + b2) * mask
  nngp = _opt(affine, k.nngp)
  ntk = None if nngp is None else w2 * spatial_op(k.ntk) * (1 if mask is None else mask) + nngp
  cov1 = _opt(affine, k.cov1)
  cov2 = _opt(affine, k.cov2)
  return k._replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2)


# ----------------------------------------------------------------------------------------------
# Conv.

def Conv(out_chan: int, filter_shape: Sequence[int] = (3, 3), padding: str = 'SAME',
         W_std: float = 1.0, b_std: float = 0.0, parameterization: str = 'ntk') -> Layer:
  """2-D convolution (NHWC, stride 1, 'SAME' or 'VALID') with shared weights."""
  _check_parameterization(parameterization)
  padding = padding.upper()
  if padding not in ('SAME', 'VALID'):
    raise ValueError(f"Conv padding must be 'SAME' or 'VALID', got {padding!r}.")
  fh, fw = filter_shape
  if padding == 'SAME' and (fh % 2 == 0 or fw % 2 == 0):
    raise ValueError(f'SAME padding needs odd filter sizes, got {filter_shape}.')

  def init_fn(rng, input_shape):
    k_w, k_b = jax.random.split(rng)
    n, h, w, c = input_shape
    fan_in = fh * fw * c
    kernel = jax.random.normal(k_w, (fh, fw, c, out_chan), jnp.float32)
    bias = jax.random.normal(k_b, (out_chan,), jnp.float32)
    if parameterization == 'standard':
      kernel, bias = kernel * W_std / math.sqrt(fan_in), bias * b_std
    if padding == 'VALID':
      h, w = h - fh + 1, w - fw + 1
    return (n, h, w, out_chan), (kernel, bias)

  def apply_fn(params, x, **unused):
    kernel, bias = params
    y = lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if parameterization == 'ntk':
      fan_in = fh * fw * x.shape[-1]
      return y * (W_std / math.sqrt(fan_in)) + b_std * bias
    return y + bias

  def spatial_op(cov):
    return _diagonal_conv(cov, (fh, fw), padding)

  def kernel_fn(k: Kernel) -> Kernel:
    _check_kernel_parameterization(parameterization)
    if k.inputs is not None and k.inputs[0].ndim == 4:
      return _conv_on_inputs(k, (fh, fw), padding, W_std, b_std)
    k = _materialize(k)
    if k.band is not None:
      some = next((c for c in (k.nngp, k.cov1) if c is not None), None)
      if some is None:   # a 'self' pass past its last ReLU
        return k
      mask = _band_mask(some.shape[-4], some.shape[-3], k.band)
      return _affine(k, W_std, b_std, lambda c: _band_diagonal_conv(c, (fh, fw)), mask)
    return _affine(k, W_std, b_std, spatial_op)

  # SAME convolutions keep displacements (VALID ones are not done on bands).
  band_fn = (lambda radius, parts: radius) if padding == 'SAME' else None
  return Layer(init_fn, apply_fn, kernel_fn, band_fn)


def _diagonal_conv(cov, filter_shape: Sequence[int], padding: str):
  """Average of cov[..., h+i, w+j, h'+i, w'+j] over filter offsets (i, j), zero-padded.

  Weight sharing makes a convolution act on pixel covariances along their diagonals; the
  action factorises into one pass over the (h, h') axes and one over the (w, w') axes.
  """
  if cov.ndim < 4:
    raise ValueError('A convolution needs spatial inputs (NHWC), got a flat kernel.')
  lead = cov.ndim - 4
  out = _diagonal_conv_1d(cov, lead + 0, lead + 2, filter_shape[0], padding)
  return _diagonal_conv_1d(out, lead + 1, lead + 3, filter_shape[1], padding)


def _diagonal_conv_1d(cov, axis_a: int, axis_b: int, size: int, padding: str):
  n = cov.shape[axis_a]
  if padding == 'SAME' and math.prod(cov.shape[:cov.ndim - 4]) <= 1:
    # One image or pair (the split path). Not for batches: under jit, jax 0.10 computed wrong
    # gradients through the batched form (tests/test_kernels.py compares both paths).
    low = (size - 1) // 2
    offsets = tuple(o for o in range(-low, size - low) if o != 0 and abs(o) < n)
    return _shifted_sum(cov, (axis_a, axis_b), offsets) * (1.0 / size)
  if padding == 'SAME':
    pad = [(0, 0)] * cov.ndim
    pad[axis_a] = pad[axis_b] = ((size - 1) // 2, size // 2)
    cov = jnp.pad(cov, pad)
    out_n = n
  else:
    out_n = n - size + 1
  total = None
  for offset in range(size):
    part = lax.slice_in_dim(cov, offset, offset + out_n, axis=axis_a)
    part = lax.slice_in_dim(part, offset, offset + out_n, axis=axis_b)
    total = part if total is None else total + part
  return total * (1.0 / size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _shifted_sum(cov, axes: tuple, offsets: tuple):
  """cov + sum over offsets o of cov shifted by o along all `axes` at once, zero-filled:
  out[..., i, ..., j, ...] += cov[..., i + o, ..., j + o, ...] where both indices are in range.

  Written as in-place adds of shifted blocks onto a copy of cov, which XLA on CPU turns into
  vectorised updates, several times faster than zero padding followed by shifted slices. The
  map is linear with the negated offsets as its transpose, and the custom vjp uses exactly that
  (autodiff would transpose the updates into the slow pads and slices).
  """
  total = cov
  for offset in offsets:
    dst = [slice(None)] * cov.ndim
    src = [slice(None)] * cov.ndim
    for axis in axes:
      n = cov.shape[axis]
      dst[axis] = slice(max(0, -offset), n - max(0, offset))
      src[axis] = slice(max(0, offset), n - max(0, -offset))
    total = total.at[tuple(dst)].add(cov[tuple(src)])
  return total


def _shifted_sum_fwd(cov, axes, offsets):
  return _shifted_sum(cov, axes, offsets), None


def _shifted_sum_bwd(axes, offsets, _, g):
  return (_shifted_sum(g, axes, tuple(-o for o in offsets)),)


_shifted_sum.defvjp(_shifted_sum_fwd, _shifted_sum_bwd)


def _patches(x, filter_shape: Sequence[int], padding: str):
  """Image patches (n, H', W', fh*fw*C) of NHWC images."""
  fh, fw = filter_shape
  if padding == 'SAME':
    x = jnp.pad(x, ((0, 0), ((fh - 1) // 2, fh // 2), ((fw - 1) // 2, fw // 2), (0, 0)))
  n, h, w, c = x.shape
  oh, ow = h - fh + 1, w - fw + 1
  parts = [x[:, i:i + oh, j:j + ow, :] for i in range(fh) for j in range(fw)]
  return jnp.concatenate(parts, axis=-1)


def _conv_on_inputs(k: Kernel, filter_shape, padding, W_std: float, b_std: float) -> Kernel:
  """First convolution straight from images: the averaged diagonal of the input covariance
  equals an inner product of patches, so it is one matrix product instead of a pass over
  the (n1, n2, P, P) covariance."""
  x1, x2 = k.inputs
  fh, fw = filter_shape
  scale = W_std ** 2 / (fh * fw * x1.shape[-1])
  b2 = b_std ** 2
  p1, p2 = _patches(x1, filter_shape, padding), _patches(x2, filter_shape, padding)
  nngp = cov1 = cov2 = None
  if k.band is not None:
    mask = _band_mask(p1.shape[1], p1.shape[2], k.band)
    if k.parts == 'cross':
      nngp = (scale * _gram_band(p1, p2, k.band, pair=True, legacy=k.legacy) + b2) * mask
    else:
      cov1 = (scale * _gram_band(p1, p1, k.band, legacy=k.legacy) + b2) * mask
      cov2 = (scale * _gram_band(p2, p2, k.band, legacy=k.legacy) + b2) * mask
    return k._replace(nngp=nngp, ntk=nngp, cov1=cov1, cov2=cov2, inputs=None)
  if k.parts != 'self':
    if x1.shape[0] == 1 and x2.shape[0] == 1:
      # One pair (the split path): a plain GEMM whose output is already (1, 1, H, W, H', W'),
      # so no transposing copy ends up fused into (and slowing down) the ReLU that follows.
      f = p1.shape[-1]
      gram = p1.reshape(-1, f) @ p2.reshape(-1, f).T
      nngp = scale * gram.reshape((1, 1) + p1.shape[1:3] + p2.shape[1:3]) + b2
    else:
      nngp = scale * jnp.einsum('ahwf,bxyf->abhwxy', p1, p2) + b2
  if k.parts != 'cross':
    cov1 = scale * jnp.einsum('ahwf,axyf->ahwxy', p1, p1) + b2
    cov2 = scale * jnp.einsum('ahwf,axyf->ahwxy', p2, p2) + b2
  # The NTK of the inputs is zero, so after the first layer it equals the NNGP.
  return k._replace(nngp=nngp, ntk=nngp, cov1=cov1, cov2=cov2, inputs=None)


# ----------------------------------------------------------------------------------------------
# ReLU.

@functools.partial(jax.custom_jvp)
def _safe_sqrt(x):
  """sqrt(max(x, 0)) whose derivative is 0 where x <= 0 (so that c = 1 gives no NaN)."""
  return jnp.sqrt(jnp.maximum(x, 0.))


@_safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  x, = primals
  x_dot, = tangents
  tiny = 1e-30
  root = jnp.sqrt(jnp.maximum(x, tiny))
  return _safe_sqrt(x), jnp.where(x > tiny, x_dot / (2 * root), 0.)


@jax.custom_jvp
def _safe_arctan2(y, x):
  """arctan2 for y >= 0 that is pi/2 at (0, 0) and has a finite derivative there."""
  angle = _fast_arctan2_upper(y, x) if y.dtype == jnp.float32 else jnp.arctan2(y, x)
  return jnp.where((y == 0) & (x == 0), jnp.pi / 2, angle)


def _fast_arctan2_upper(y, x):
  """float32 arctan2 for y >= 0 by range reduction and the Cephes atanf polynomial.

  As accurate as XLA's float32 arctan2 (max error ~3e-7 rad) but about 10x faster on CPU,
  where XLA's version does not vectorise; it is most of the ReLU kernel's cost.
  """
  ax = jnp.abs(x)
  hi, lo = jnp.maximum(y, ax), jnp.minimum(y, ax)
  t = lo / jnp.where(hi == 0, 1., hi)                    # in [0, 1]
  reduce = t > 0.41421356237309503                       # tan(pi/8)
  t = jnp.where(reduce, (t - 1.) / (t + 1.), t)           # |t| <= tan(pi/8)
  z = t * t
  poly = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z
          - 3.33329491539e-1) * z * t + t
  angle = jnp.where(reduce, jnp.pi / 4 + poly, poly)      # atan(lo / hi) in [0, pi/4]
  angle = jnp.where(y > ax, jnp.pi / 2 - angle, angle)    # octant swap
  return jnp.where(x < 0, jnp.pi - angle, angle)          # upper half plane


@_safe_arctan2.defjvp
def _safe_arctan2_jvp(primals, tangents):
  y, x = primals
  y_dot, x_dot = tangents
  denom = jnp.maximum(x * x + y * y, 1e-30)
  return _safe_arctan2(y, x), (y_dot * x - x_dot * y) / denom


def _relu_maps(cov, prod):
  """Arc-cosine maps: E[relu(u) relu(v)] and E[relu'(u) relu'(v)] for Cov(u, v) = cov,
  Var(u) Var(v) = prod.

  Differentiated by autodiff through the guarded sqrt and arctan2: a hand-written vjp of
  the maps (closed-form derivatives, one fused loop) measured slower on XLA:CPU, 2.9 against
  2.1 ms per 32x32 band (BENCHMARKS.md, kernel speed log)."""
  sin_part = _safe_sqrt(prod - cov * cov)
  angle = _safe_arctan2(sin_part, cov)
  derivative = (jnp.pi - angle) * (0.5 / jnp.pi)
  value = sin_part * (0.5 / jnp.pi) + derivative * cov
  return value, derivative


def Relu() -> Layer:
  """ReLU nonlinearity."""

  def init_fn(rng, input_shape):
    return input_shape, ()

  def apply_fn(params, x, **unused):
    return jnp.maximum(x, 0.)

  def kernel_fn(k: Kernel) -> Kernel:
    k = _materialize(k)
    if k.parts == 'cross':
      if not k.given:
        raise ValueError("A 'cross' kernel pass needs the variances of a 'self' pass.")
      (var1, var2), rest = k.given[0], k.given[1:]
      k = k._replace(given=rest)
    else:
      var1, var2 = _spatial_diagonal(k.cov1, k.band), _spatial_diagonal(k.cov2, k.band)
    nngp = ntk = cov1 = cov2 = None
    # On a band, a partner outside the image has variance 0 there and a zero covariance, so
    # both maps give 0 and the band stays clean.
    if k.nngp is not None:
      nngp, derivative = _relu_maps(k.nngp, _outer(var1, var2, k.band, k.legacy))
      ntk = k.ntk * derivative
    if k.cov1 is not None:
      cov1, _ = _relu_maps(k.cov1, _outer_self(var1, k.band, k.legacy))
      cov2, _ = _relu_maps(k.cov2, _outer_self(var2, k.band, k.legacy))
    variances = k.variances + ((var1, var2),) if k.parts == 'self' else k.variances
    return k._replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, variances=variances)

  def band_fn(radius, parts):
    # A 'self' pass must give each ReLU its variances (displacement 0).
    return 0 if parts == 'self' and radius is None else radius

  return Layer(init_fn, apply_fn, kernel_fn, band_fn)


def _outer(var1, var2, band: Optional[int] = None, legacy: bool = False):
  """var1[a, p] * var2[b, q] laid out like a cross covariance (a, b, p..., q...) or its band."""
  if var1.ndim == 1:
    return var1[:, None] * var2[None, :]
  if band is not None:
    return var1[:, None, :, :, None, None] * _shifted_band(var2, band, legacy)[None, :]
  return var1[:, None, :, :, None, None] * var2[None, :, None, None, :, :]


def _outer_self(var, band: Optional[int] = None, legacy: bool = False):
  """var[a, p] * var[a, q] laid out like a self covariance (a, p..., q...) or its band."""
  if var.ndim == 1:
    return var * var
  if band is not None:
    return var[:, :, :, None, None] * _shifted_band(var, band, legacy)
  return var[:, :, :, None, None] * var[:, None, None, :, :]


# ----------------------------------------------------------------------------------------------
# Pooling, flattening.

def AvgPool(window_shape: Sequence[int] = (2, 2), strides: Optional[Sequence[int]] = None) -> Layer:
  """Average pooling with 'VALID' padding; only non-overlapping windows (strides == window)."""
  wh, ww = window_shape
  strides = tuple(strides or window_shape)
  if strides != (wh, ww):
    raise ValueError(f'AvgPool supports strides equal to the window, got {strides}.')

  def init_fn(rng, input_shape):
    n, h, w, c = input_shape
    return (n, h // wh, w // ww, c), ()

  def apply_fn(params, x, **unused):
    n, h, w, c = x.shape
    x = x[:, :h // wh * wh, :w // ww * ww, :]
    return x.reshape(n, h // wh, wh, w // ww, ww, c).mean(axis=(2, 4))

  def spatial_op(cov):
    lead = cov.shape[:-4]
    h, w = cov.shape[-4], cov.shape[-3]
    oh, ow = h // wh, w // ww
    cov = cov[..., :oh * wh, :ow * ww, :oh * wh, :ow * ww]
    cov = cov.reshape(lead + (oh, wh, ow, ww, oh, wh, ow, ww))
    k = len(lead)
    return cov.mean(axis=(k + 1, k + 3, k + 5, k + 7))

  def kernel_fn(k: Kernel) -> Kernel:
    k = _materialize(k)
    if k.band is not None:
      r_out = _pooled_radius((wh, ww), k.band)
      if r_out < 0:   # only a 'self' pass past its last ReLU, which needs nothing more
        return k._replace(nngp=None, ntk=None, cov1=None, cov2=None, band=0)
      pool = lambda c: _band_pool(c, (wh, ww), k.band, r_out, k.legacy)
      return k._replace(nngp=_opt(pool, k.nngp), ntk=_opt(pool, k.ntk),
                        cov1=_opt(pool, k.cov1), cov2=_opt(pool, k.cov2), band=r_out)
    return k._replace(nngp=_opt(spatial_op, k.nngp), ntk=_opt(spatial_op, k.ntk),
                      cov1=_opt(spatial_op, k.cov1), cov2=_opt(spatial_op, k.cov2))

  def band_fn(radius, parts):
    return None if radius is None else max(wh * radius + wh - 1, ww * radius + ww - 1)

  return Layer(init_fn, apply_fn, kernel_fn, band_fn)


def ZeroPad(pad: int, channels: Optional[int] = None) -> Layer:
  """Zero-pads images by `pad` pixels on every side; with `channels`, only images with that
  many channels (RCIG's ConvNet pads 28x28 grayscale images to 32x32). It must come first:
  its kernel map pads the raw inputs."""
  if pad < 0:
    raise ValueError(f'pad must be >= 0, got {pad}.')

  def applies(shape) -> bool:
    return pad > 0 and (channels is None or shape[-1] == channels)

  def padded(x):
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if applies(x.shape) else x

  def init_fn(rng, input_shape):
    n, h, w, c = input_shape
    if applies(input_shape):
      h, w = h + 2 * pad, w + 2 * pad
    return (n, h, w, c), ()

  def apply_fn(params, x, **unused):
    return padded(x)

  def kernel_fn(k: Kernel) -> Kernel:
    if k.inputs is None or k.inputs[0].ndim != 4:
      raise ValueError('ZeroPad must be the first layer, on NHWC images.')
    x1, x2 = k.inputs
    return k._replace(inputs=(padded(x1), padded(x2)))

  return Layer(init_fn, apply_fn, kernel_fn, band_fn=lambda radius, parts: radius)


def Flatten() -> Layer:
  """Flattening for an infinitely wide readout: the kernel averages the spatial diagonal."""

  def init_fn(rng, input_shape):
    return (input_shape[0], int(math.prod(input_shape[1:]))), ()

  def apply_fn(params, x, **unused):
    return x.reshape(x.shape[0], -1)

  def trace(cov, band=None):
    if cov.ndim <= 2:
      return cov
    if band is not None:
      return jnp.mean(cov[..., band, band], axis=(-2, -1))
    lead = cov.shape[:-4]
    pixels = cov.shape[-4] * cov.shape[-3]
    flat = cov.reshape(lead + (pixels, pixels))
    return jnp.sum(_masked_diagonal(flat), axis=-1) / pixels

  def kernel_fn(k: Kernel) -> Kernel:
    if k.inputs is not None:
      # Flattening raw images first keeps a fully-connected kernel at O(pixels), not O(pixels^2).
      x1, x2 = k.inputs
      flat = lambda x: x.reshape(x.shape[0], math.prod(x.shape[1:]))  # also for 0 images
      return k._replace(inputs=(flat(x1), flat(x2)))
    t = lambda c: trace(c, k.band)
    return k._replace(nngp=_opt(t, k.nngp), ntk=_opt(t, k.ntk), cov1=_opt(t, k.cov1),
                      cov2=_opt(t, k.cov2), band=None)

  def band_fn(radius, parts):
    # The readout sees the pairs (p, p); a 'self' pass does not need its readout.
    return 0 if parts == 'cross' else None

  return Layer(init_fn, apply_fn, kernel_fn, band_fn)


# ----------------------------------------------------------------------------------------------
# Combinators.

def serial(*layers: Layer) -> Layer:
  """Layers applied one after another."""

  def init_fn(rng, input_shape):
    params = []
    for layer in layers:
      rng, layer_rng = jax.random.split(rng)
      input_shape, p = layer.init_fn(layer_rng, input_shape)
      params.append(p)
    return input_shape, tuple(params)

  def apply_fn(params, x, **kwargs):
    for layer, p in zip(layers, params):
      x = layer.apply_fn(p, x, **kwargs)
    return x

  def kernel_fn(k: Kernel) -> Kernel:
    for layer in layers:
      k = layer.kernel_fn(k)
    return k

  def band_fn(radius, parts):
    for layer in reversed(layers):
      radius = layer.band_fn(radius, parts)
    return radius

  banded = all(layer.band_fn is not None for layer in layers)
  return Layer(init_fn, apply_fn, kernel_fn, band_fn if banded else None)


def _check_parameterization(parameterization: str) -> None:
  if parameterization not in ('ntk', 'standard'):
    raise ValueError(f"parameterization must be 'ntk' or 'standard', got {parameterization!r}.")


def _check_kernel_parameterization(parameterization: str) -> None:
  if parameterization != 'ntk':
    raise ValueError("Infinite-width kernels are computed in the NTK parameterisation; build the "
                     "layers with parameterization='ntk' for kernel_fn.")
