"""neural-tangents' kernels of ntkdd's architectures for the benchmarks: kernel_fn and a KIP kernel backend.

Needs neural-tangents (the Python 3.10 environment, .venv-lp). tests/nt_reference.py builds the
same layers on its own on purpose (the tests' reference stays independent of ntkdd and bench/).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntkdd.common import architectures, kernels, sources
from ntkdd.common.choices import KERNELS


def nt_kernel_fn(arch: architectures.Architecture) -> Callable:
  """neural-tangents' `kernel_fn(x1, x2, get)` of ntkdd's `arch` (the NTK parameterisation).

  Args:
    arch: an ntkdd architecture, 'convnet' or 'fc' (its depth, w_std, b_std).

  Returns:
    The infinite-width kernel function of the same layers.
  """
  from neural_tangents import stax as nt_stax  # pylint: disable=import-outside-toplevel
  w, b = arch.w_std, arch.b_std
  if arch.name == 'convnet':
    layers = [nt_stax.Conv(1, (3, 3), (1, 1), 'SAME', W_std=w, b_std=b), nt_stax.Relu()]
    for _ in range(arch.depth):
      layers += [nt_stax.Conv(1, (3, 3), (1, 1), 'SAME', W_std=w, b_std=b), nt_stax.Relu(),
                 nt_stax.AvgPool((2, 2), (2, 2))]
    layers += [nt_stax.Flatten(), nt_stax.Dense(1, w, b)]
  elif arch.name == 'fc':
    layers = [nt_stax.Flatten()]
    for _ in range(arch.depth):
      layers += [nt_stax.Dense(1, w, b), nt_stax.Relu()]
    layers += [nt_stax.Dense(1, w, b)]
  else:
    raise ValueError(f'No neural-tangents kernel for architecture {arch.name!r}.')
  return nt_stax.serial(*layers)[2]


def nt_tile_functions(arch: architectures.Architecture) -> tuple[Callable, Callable]:
  """Jitted (forward, vjp) tile functions of neural-tangents' kernel of `arch`.

  forward(x1, x2) -> (ntk, nngp); vjp(x1, x2, g_ntk, g_nngp) -> d/dx1 of <g_ntk, NTK(x1, x2)> +
  <g_nngp, NNGP(x1, x2)> (jax.vjp through neural-tangents' kernel_fn, x2 held fixed).
  """
  kernel_fn = nt_kernel_fn(arch)

  def forward(x1, x2):
    k = kernel_fn(x1, x2, KERNELS)
    return k.ntk, k.nngp

  def vjp(x1, x2, g_ntk, g_nngp):
    def inner(a):
      ntk, nngp = forward(a, x2)
      return jnp.sum(g_ntk * ntk) + jnp.sum(g_nngp * nngp)
    return jax.vjp(inner, x1)[1](jnp.ones((), x1.dtype))[0]

  return jax.jit(forward), jax.jit(vjp)


class NtKernels:
  """A `common/kip.KernelBackend` computing neural-tangents' kernels, tile by tile.

  Tiles have one shape per call (rows and columns each split into the fewest tiles of at most
  `tile`, `kernels.fitted_tile`, the last padded), so one compiled function serves a KIP run.
  neural-tangents keeps each pair's full pixel-pixel covariances, so its tiles stay small:
  its forward was fastest at tile 4 at 32x32 (BENCHMARKS.md, kernel throughput).
  """

  def __init__(self, arch: architectures.Architecture, tile: int = 4, dtype: str = 'float64'):
    kernels.enable_float64_if(dtype)
    kernels.fitted_tile(1, tile)   # validates tile
    self.arch, self.tile, self.dtype = arch, tile, dtype
    self._forward, self._vjp = nt_tile_functions(arch)

  def kernel(self, x1: np.ndarray, x2: Optional[np.ndarray] = None) -> dict:
    """{'ntk', 'nngp'}: (n1, n2) kernels K(x1, x2) (x2 None: K(x1, x1)), in self.dtype."""
    x1 = np.asarray(sources.as_array(x1), self.dtype)
    x2 = x1 if x2 is None else np.asarray(sources.as_array(x2), self.dtype)
    t1, t2 = kernels.fitted_tile(len(x1), self.tile), kernels.fitted_tile(len(x2), self.tile)
    out = {name: np.zeros((len(x1), len(x2)), self.dtype) for name in KERNELS}
    for r0, r1 in kernels.tile_ranges(len(x1), t1):
      rows = kernels.pad_rows(x1[r0:r1], t1)
      for c0, c1 in kernels.tile_ranges(len(x2), t2):
        blocks = self._forward(rows, kernels.pad_rows(x2[c0:c1], t2))
        for name, block in zip(KERNELS, blocks):
          out[name][r0:r1, c0:c1] = np.asarray(block)[:r1 - r0, :c1 - c0]
    return out

  def vjp(self, x1: np.ndarray, x2: np.ndarray, g_ntk: Optional[np.ndarray] = None,
          g_nngp: Optional[np.ndarray] = None) -> np.ndarray:
    """d/dx1 of <g_ntk, NTK(x1, x2)> + <g_nngp, NNGP(x1, x2)>, summed over column tiles, in
    self.dtype (as ntkdd's backend returns its own dtype; Adam takes it in float64 either way)."""
    x1 = np.asarray(sources.as_array(x1), self.dtype)
    x2 = np.asarray(sources.as_array(x2), self.dtype)
    shape = (len(x1), len(x2))
    g_ntk = np.zeros(shape, self.dtype) if g_ntk is None else np.asarray(g_ntk, self.dtype)
    g_nngp = np.zeros(shape, self.dtype) if g_nngp is None else np.asarray(g_nngp, self.dtype)
    t1, t2 = kernels.fitted_tile(len(x1), self.tile), kernels.fitted_tile(len(x2), self.tile)
    grad = np.zeros_like(x1)
    for r0, r1 in kernels.tile_ranges(len(x1), t1):
      rows = kernels.pad_rows(x1[r0:r1], t1)
      for c0, c1 in kernels.tile_ranges(len(x2), t2):
        block = self._vjp(rows, kernels.pad_rows(x2[c0:c1], t2),
                          kernels.pad_matrix(g_ntk[r0:r1, c0:c1], t1, t2),
                          kernels.pad_matrix(g_nngp[r0:r1, c0:c1], t1, t2))
        grad[r0:r1] += np.asarray(block)[:r1 - r0]
    return grad
