"""A distributed kernel backend over workers its owner started, and ends when it closes."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
  from ntkdd.server.distributed_kernels import DistributedKernels


class OwnedWorkersKernels:
  """A `DistributedKernels` (`self._backend`) over workers this object started; close()
  closes it, then `_release()`s the workers (ends a program, kills actors)."""

  _backend: Optional[DistributedKernels] = None

  def kernel(self, x1: np.ndarray, x2: Optional[np.ndarray] = None) -> dict:
    return self._backend.kernel(x1, x2)

  def vjp(self, x1: np.ndarray, x2: np.ndarray, g_ntk: Optional[np.ndarray] = None,
          g_nngp: Optional[np.ndarray] = None) -> np.ndarray:
    return self._backend.vjp(x1, x2, g_ntk, g_nngp)

  def status(self) -> dict:
    return self._backend.status()

  def pairs_per_second(self) -> float:
    return self._backend.pairs_per_second()

  def _release(self) -> None:
    """Ends the workers; subclasses say how."""

  def close(self) -> None:
    try:
      if self._backend is not None:
        self._backend.close()
    finally:
      self._release()

  def __enter__(self) -> 'OwnedWorkersKernels':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
