"""Layers as (init_fn, apply_fn, kernel_fn) triples: finite networks and their infinite-width kernels.

Each layer is a `Layer(init_fn, apply_fn, kernel_fn)`:
  * `init_fn(rng, input_shape) -> (output_shape, params)`,
  * `apply_fn(params, inputs) -> outputs` for the finite-width network,
  * `kernel_fn(kernel) -> kernel`, mapping the infinite-width NNGP/NTK of the layer's inputs to
    those of its outputs.

Kernels of convolutional layers keep the full pixel-pixel covariance: for a pair of batches the
`nngp` and `ntk` arrays have shape (n1, n2, H, W, H, W), and the per-image self-covariances
`cov1`, `cov2` have shape (n, H, W, H, W). Fully-connected kernels are (n1, n2) and (n,).
The recursions are those of neural-tangents' `stax` in NTK parameterisation, which the tests
check value by value; the implementation here is our own and organised for speed: the first
convolution acts on image patches (one matrix product), the diagonal 3x3 convolution of the
covariance is separable into two 3-tap passes, and everything between is elementwise.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
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
  """
  nngp: Any
  ntk: Any
  cov1: Any
  cov2: Any
  inputs: Optional[tuple] = None
  parts: str = 'all'
  variances: tuple = ()
  given: tuple = ()


class Layer(NamedTuple):
  init_fn: Callable
  apply_fn: Callable
  kernel_fn: Callable


# ----------------------------------------------------------------------------------------------
# Inputs.

def inputs_to_kernel(x1, x2, parts: str = 'all', given: tuple = ()) -> Kernel:
  """The kernel of the inputs themselves; materialised lazily by the first layer.

  parts='self' computes only the self-covariances and records the ReLU variances;
  parts='cross' computes only nngp and ntk, taking the ReLU variances from `given` (the
  `variances` of a 'self' pass over the same inputs, one (var1, var2) per ReLU).
  """
  if parts not in ('all', 'self', 'cross'):
    raise ValueError(f"parts must be 'all', 'self' or 'cross', got {parts!r}.")
  return Kernel(nngp=None, ntk=None, cov1=None, cov2=None, inputs=(x1, x2), parts=parts,
                given=tuple(given))


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
  else:
    if cross:
      nngp = jnp.einsum('ahwc,bxyc->abhwxy', x1, x2) / channels
    if self_:
      cov1 = jnp.einsum('ahwc,axyc->ahwxy', x1, x1) / channels
      cov2 = jnp.einsum('ahwc,axyc->ahwxy', x2, x2) / channels
  return k._replace(nngp=nngp, ntk=_opt(jnp.zeros_like, nngp), cov1=cov1, cov2=cov2,
                    inputs=None)


def _spatial_diagonal(cov):
  """Per-pixel variances (n, H, W) of self-covariances (n, H, W, H, W); fc variances pass."""
  if cov.ndim == 1:
    return cov
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

  return Layer(init_fn, apply_fn, kernel_fn)


def _affine(k: Kernel, W_std: float, b_std: float, spatial_op: Callable) -> Kernel:
  """The kernel map of a linear layer whose spatial action on covariances is `spatial_op`."""
  w2, b2 = W_std ** 2, b_std ** 2
  nngp = _opt(lambda c: w2 * spatial_op(c) + b2, k.nngp)
  ntk = None if nngp is None else w2 * spatial_op(k.ntk) + nngp
  cov1 = _opt(lambda c: w2 * spatial_op(c) + b2, k.cov1)
  cov2 = _opt(lambda c: w2 * spatial_op(c) + b2, k.cov2)
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
    return _affine(_materialize(k), W_std, b_std, spatial_op)

  return Layer(init_fn, apply_fn, kernel_fn)


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
  Var(u) Var(v) = prod."""
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
      var1, var2 = _spatial_diagonal(k.cov1), _spatial_diagonal(k.cov2)
    nngp = ntk = cov1 = cov2 = None
    if k.nngp is not None:
      nngp, derivative = _relu_maps(k.nngp, _outer(var1, var2))
      ntk = k.ntk * derivative
    if k.cov1 is not None:
      cov1, _ = _relu_maps(k.cov1, _outer_self(var1))
      cov2, _ = _relu_maps(k.cov2, _outer_self(var2))
    variances = k.variances + ((var1, var2),) if k.parts == 'self' else k.variances
    return k._replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, variances=variances)

  return Layer(init_fn, apply_fn, kernel_fn)


def _outer(var1, var2):
  """var1[a, p] * var2[b, q] laid out like a cross covariance (a, b, p..., q...)."""
  if var1.ndim == 1:
    return var1[:, None] * var2[None, :]
  return var1[:, None, :, :, None, None] * var2[None, :, None, None, :, :]


def _outer_self(var):
  """var[a, p] * var[a, q] laid out like a self covariance (a, p..., q...)."""
  if var.ndim == 1:
    return var * var
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
    return k._replace(nngp=_opt(spatial_op, k.nngp), ntk=_opt(spatial_op, k.ntk),
                      cov1=_opt(spatial_op, k.cov1), cov2=_opt(spatial_op, k.cov2))

  return Layer(init_fn, apply_fn, kernel_fn)


def Flatten() -> Layer:
  """Flattening for an infinitely wide readout: the kernel averages the spatial diagonal."""

  def init_fn(rng, input_shape):
    return (input_shape[0], int(math.prod(input_shape[1:]))), ()

  def apply_fn(params, x, **unused):
    return x.reshape(x.shape[0], -1)

  def trace(cov):
    if cov.ndim <= 2:
      return cov
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
    return k._replace(nngp=_opt(trace, k.nngp), ntk=_opt(trace, k.ntk),
                      cov1=_opt(trace, k.cov1), cov2=_opt(trace, k.cov2))

  return Layer(init_fn, apply_fn, kernel_fn)


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

  return Layer(init_fn, apply_fn, kernel_fn)


def _check_parameterization(parameterization: str) -> None:
  if parameterization not in ('ntk', 'standard'):
    raise ValueError(f"parameterization must be 'ntk' or 'standard', got {parameterization!r}.")


def _check_kernel_parameterization(parameterization: str) -> None:
  if parameterization != 'ntk':
    raise ValueError("Infinite-width kernels are computed in the NTK parameterisation; build the "
                     "layers with parameterization='ntk' for kernel_fn.")
