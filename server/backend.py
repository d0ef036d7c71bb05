"""In-process kernel backend: the kernel engine called directly, with pair counting for status."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ntkdd.common import architectures, kernels, sources
from ntkdd.server.progress import KernelProgress


class InProcessKernels:
  """`kernel`/`vjp` over blocked evaluation in this process (the default launch type)."""

  def __init__(self, arch: architectures.Architecture, tile: Optional[int] = None,
               dtype: str = 'float32'):
    kernels.enable_float64_if(dtype)
    self.arch, self.tile, self.dtype = arch, tile, dtype
    self.pairs = 0          # kernel pairs evaluated (forward; a vjp pair counts once)
    self.seconds = 0.0

  def kernel(self, x1: np.ndarray, x2: Optional[np.ndarray] = None) -> dict:
    start = time.perf_counter()
    x1 = sources.as_array(x1)
    x2 = None if x2 is None else sources.as_array(x2)
    pairs = len(x1) * (len(x1) if x2 is None else len(x2))
    progress = KernelProgress('kernel', pairs)
    out = kernels.compute_kernel(self.arch, x1, x2, tile=self.tile, dtype=self.dtype,
                                 progress=lambda done, of: progress.update(pairs * done // of))
    progress.close()
    self._count(pairs, start)
    return out

  def vjp(self, x1: np.ndarray, x2: np.ndarray, g_ntk: Optional[np.ndarray] = None,
          g_nngp: Optional[np.ndarray] = None) -> np.ndarray:
    start = time.perf_counter()
    x1, x2 = sources.as_array(x1), sources.as_array(x2)
    out = kernels.kernel_vjp(self.arch, x1, x2, g_ntk, g_nngp, tile=self.tile, dtype=self.dtype)
    self._count(len(x1) * len(x2), start)
    return out

  def _count(self, pairs: int, start: float) -> None:
    self.pairs += pairs
    self.seconds += time.perf_counter() - start

  def pairs_per_second(self) -> float:
    return self.pairs / self.seconds if self.seconds else 0.0
